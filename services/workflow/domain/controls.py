"""What an operator controls on a running workflow (pure Python): what a
failed step stops, when it expires, and its retry policy (the policy itself
is services.common.retry, shared with templates' defaults)."""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

from services.common.errors import FieldViolation
from services.common.retry import RetryPolicy, retry_problems

STOP, CONTINUE_INDEPENDENT = "stop", "continue_independent"
FAILURE_POLICIES = (STOP, CONTINUE_INDEPENDENT)

MIN_TTL = dt.timedelta(minutes=1)
MAX_TTL = dt.timedelta(days=366)

__all__ = ["CONTINUE_INDEPENDENT", "Controls", "FAILURE_POLICIES", "RetryPolicy", "STOP", "blocked_by",
           "expiry_problems", "retry_problems"]


def expiry_problems(expire_time: dt.datetime | None, now: dt.datetime, field_name: str) -> list[FieldViolation]:
    if expire_time is None:
        return []
    if expire_time < now + MIN_TTL:
        return [FieldViolation(field_name, "must be at least a minute from now")]
    if expire_time > now + MAX_TTL:
        return [FieldViolation(field_name, "must be at most a year from now")]
    return []


def blocked_by(step_id: str, failed: set[str], depends_on: dict[str, list[str]]) -> str:
    """The failed step `step_id` waits for, directly or through its own
    dependencies (first found), or ""."""
    seen: set[str] = set()
    stack = list(depends_on.get(step_id, ()))
    while stack:
        current = stack.pop()
        if current in failed:
            return current
        if current not in seen:
            seen.add(current)
            stack.extend(depends_on.get(current, ()))
    return ""


@dataclass(frozen=True)
class Controls:
    """What CreateWorkflow (and UpdateWorkflow) set besides the inputs."""
    on_failure: str = STOP
    retry_policy: RetryPolicy = field(default_factory=RetryPolicy)
    expire_time: dt.datetime | None = None
    ttl_seconds: float = 0.0

    def expiry(self, now: dt.datetime) -> dt.datetime | None:
        if self.ttl_seconds:
            return now + dt.timedelta(seconds=self.ttl_seconds)
        return self.expire_time

    def problems(self, now: dt.datetime) -> list[FieldViolation]:
        found = [] if self.on_failure in FAILURE_POLICIES else [
            FieldViolation("on_failure", "must be STOP or CONTINUE_INDEPENDENT")]
        found += retry_problems(self.retry_policy, "retry_policy")
        if self.ttl_seconds and self.expire_time is not None:
            found.append(FieldViolation("ttl", "give expire_time or ttl, not both"))
        elif self.ttl_seconds < 0:
            found.append(FieldViolation("ttl", "must not be negative"))
        else:
            found += expiry_problems(self.expiry(now), now, "ttl" if self.ttl_seconds else "expire_time")
        return found
