"""Domain errors. Pure Python: domain and use-case code raise these, and the
gRPC layer maps each to its canonical status code with rich details."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str


@dataclass(frozen=True)
class PreconditionViolation:
    type: str
    subject: str
    description: str


class DomainError(Exception):
    """Base of every error a user can cause. `reason` is a stable
    UPPER_SNAKE_CASE identifier clients can switch on (AIP-193 ErrorInfo)."""

    reason = "DOMAIN_ERROR"

    def __init__(self, message: str, *, reason: str | None = None, metadata: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        if reason:
            self.reason = reason
        self.metadata = dict(metadata or {})


class InvalidArgument(DomainError):
    reason = "INVALID_ARGUMENT"

    def __init__(self, message: str, violations: list[FieldViolation] | None = None, **kw):
        super().__init__(message, **kw)
        self.violations = list(violations or [])

    @classmethod
    def of(cls, field: str, description: str) -> "InvalidArgument":
        return cls(f"{field}: {description}", [FieldViolation(field, description)])


class NotFound(DomainError):
    reason = "NOT_FOUND"

    def __init__(self, resource_type: str, resource_name: str, message: str | None = None, **kw):
        super().__init__(message or f"{resource_type} {resource_name!r} not found", **kw)
        self.resource_type = resource_type
        self.resource_name = resource_name


class AlreadyExists(DomainError):
    reason = "ALREADY_EXISTS"

    def __init__(self, resource_type: str, resource_name: str, message: str | None = None, **kw):
        super().__init__(message or f"{resource_type} {resource_name!r} already exists", **kw)
        self.resource_type = resource_type
        self.resource_name = resource_name


class FailedPrecondition(DomainError):
    reason = "FAILED_PRECONDITION"

    def __init__(self, message: str, violations: list[PreconditionViolation] | None = None, **kw):
        super().__init__(message, **kw)
        self.violations = list(violations or [])


class Aborted(DomainError):
    """A stale etag or a lost race: re-read and retry."""

    reason = "ABORTED"


class PermissionDenied(DomainError):
    reason = "PERMISSION_DENIED"


class Unauthenticated(DomainError):
    reason = "UNAUTHENTICATED"


class Unavailable(DomainError):
    """A dependency (another service, NATS, the database) is down."""

    reason = "UNAVAILABLE"
