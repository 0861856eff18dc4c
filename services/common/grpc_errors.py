"""Domain errors -> canonical gRPC status with rich details (AIP-193)."""
from __future__ import annotations

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from services.common import errors

ERROR_DOMAIN = "infrakitchen.io"

_CODES: list[tuple[type[errors.DomainError], int]] = [
    (errors.InvalidArgument, code_pb2.INVALID_ARGUMENT),
    (errors.NotFound, code_pb2.NOT_FOUND),
    (errors.AlreadyExists, code_pb2.ALREADY_EXISTS),
    (errors.FailedPrecondition, code_pb2.FAILED_PRECONDITION),
    (errors.Aborted, code_pb2.ABORTED),
    (errors.PermissionDenied, code_pb2.PERMISSION_DENIED),
    (errors.Unauthenticated, code_pb2.UNAUTHENTICATED),
    (errors.Unavailable, code_pb2.UNAVAILABLE),
]


def _pack(message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


# Status details travel in a trailer (base64), and gRPC refuses metadata over
# 16 KiB by default: an error that quoted a huge input would reach the caller as
# RESOURCE_EXHAUSTED "Stream removed" instead. Every text is cut, and so is the
# number of violations.
MAX_MESSAGE = 1000
MAX_TEXT = 300
VIOLATIONS_BUDGET = 4000  # characters of all violations together


def _cut(text: str, limit: int = MAX_TEXT) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _within_budget(violations: list, *texts) -> list:
    kept, used = [], 0
    for v in violations:
        used += sum(len(_cut(getattr(v, t))) for t in texts)
        if used > VIOLATIONS_BUDGET:
            break
        kept.append(v)
    return kept


def to_grpc_status(err: errors.DomainError) -> grpc.Status:
    code = next((c for cls, c in _CODES if isinstance(err, cls)), code_pb2.FAILED_PRECONDITION)
    metadata = {_cut(k, 64): _cut(v, 2000) for k, v in list(err.metadata.items())[:10]}
    details = [_pack(error_details_pb2.ErrorInfo(reason=err.reason, domain=ERROR_DOMAIN, metadata=metadata))]
    if isinstance(err, errors.InvalidArgument) and err.violations:
        details.append(_pack(error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=_cut(v.field), description=_cut(v.description))
            for v in _within_budget(err.violations, "field", "description")])))
    if isinstance(err, errors.FailedPrecondition) and err.violations:
        details.append(_pack(error_details_pb2.PreconditionFailure(violations=[
            error_details_pb2.PreconditionFailure.Violation(type=_cut(v.type), subject=_cut(v.subject),
                                                            description=_cut(v.description))
            for v in _within_budget(err.violations, "type", "subject", "description")])))
    if isinstance(err, (errors.NotFound, errors.AlreadyExists)):
        details.append(_pack(error_details_pb2.ResourceInfo(
            resource_type=_cut(err.resource_type), resource_name=_cut(err.resource_name),
            description=_cut(err.message))))
    return rpc_status.to_status(status_pb2.Status(code=code, message=_cut(err.message, MAX_MESSAGE),
                                                  details=details))


def status_details(rpc_error: grpc.RpcError) -> dict[str, object]:
    """Client side: the rich details of an error, keyed by detail type name
    ('ErrorInfo', 'BadRequest', 'PreconditionFailure', 'ResourceInfo')."""
    status = rpc_status.from_call(rpc_error)
    found: dict[str, object] = {}
    if status is None:
        return found
    for detail in status.details:
        for cls in (error_details_pb2.ErrorInfo, error_details_pb2.BadRequest,
                    error_details_pb2.PreconditionFailure, error_details_pb2.ResourceInfo):
            if detail.Is(cls.DESCRIPTOR):
                msg = cls()
                detail.Unpack(msg)
                found[cls.DESCRIPTOR.name] = msg
    return found
