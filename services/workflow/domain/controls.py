"""What an operator controls on a running workflow (pure Python): what a
failed step stops, when a failure is transient and retried, and when a
workflow expires."""
from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass, field

from services.common.errors import FieldViolation

STOP, CONTINUE_INDEPENDENT = "stop", "continue_independent"
FAILURE_POLICIES = (STOP, CONTINUE_INDEPENDENT)

MAX_ATTEMPTS = 10
MAX_PATTERNS = 20
MAX_PATTERN_LENGTH = 200
DEFAULT_BACKOFF_SECONDS = 10.0
MAX_BACKOFF_SECONDS = 600.0
MIN_TTL = dt.timedelta(minutes=1)
MAX_TTL = dt.timedelta(days=366)

# What clouds and terraform say when trying again later may work: rate limits
# and throttling, timeouts, state lock contention, connection trouble,
# eventual consistency, and 5xx answers.
BUILT_IN_TRANSIENT = (
    r"rate ?limit", r"throttl", r"too many requests", r"\b429\b", r"request ?limit ?exceeded",
    r"timed? ?out", r"timeout", r"deadline exceeded",
    r"error acquiring the state lock", r"state (is )?locked", r"lock.*(held|contention)",
    r"connection (reset|refused)", r"\bEOF\b", r"temporar(il)?y unavailable", r"service unavailable",
    r"\b50[234]\b", r"internal server error", r"try again",
    r"eventual consistency", r"not (yet )?propagated",
)


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 0  # 0: not set
    initial_backoff: float = 0.0  # seconds; 0: the default
    transient_patterns: tuple[str, ...] = field(default_factory=tuple)  # empty: the built-in list

    def to_json(self) -> dict:
        return {"max_attempts": self.max_attempts, "initial_backoff": self.initial_backoff,
                "transient_patterns": list(self.transient_patterns)}

    @classmethod
    def from_json(cls, d: dict | None) -> "RetryPolicy":
        d = d or {}
        return cls(int(d.get("max_attempts", 0)), float(d.get("initial_backoff", 0.0)),
                   tuple(d.get("transient_patterns", ())))

    def over(self, default: "RetryPolicy") -> "RetryPolicy":
        """This policy, with what it leaves unset taken from `default` (a template's)."""
        return RetryPolicy(self.max_attempts or default.max_attempts,
                           self.initial_backoff or default.initial_backoff,
                           self.transient_patterns or default.transient_patterns)

    @property
    def attempts(self) -> int:
        return self.max_attempts or 1

    def backoff(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number `attempt` (1-based)."""
        first = self.initial_backoff or DEFAULT_BACKOFF_SECONDS
        return min(first * 2 ** (attempt - 1), MAX_BACKOFF_SECONDS)

    def transient(self, error: str) -> str:
        """The pattern that makes `error` transient, or ""."""
        for pattern in self.transient_patterns or BUILT_IN_TRANSIENT:
            if re.search(pattern, error, re.IGNORECASE):
                return pattern
        return ""


def retry_problems(policy: RetryPolicy, field_name: str) -> list[FieldViolation]:
    problems = []
    if not 0 <= policy.max_attempts <= MAX_ATTEMPTS:
        problems.append(FieldViolation(f"{field_name}.max_attempts", f"must be between 0 and {MAX_ATTEMPTS}"))
    if not 0 <= policy.initial_backoff <= MAX_BACKOFF_SECONDS:
        problems.append(FieldViolation(f"{field_name}.initial_backoff",
                                       f"must be between 0 and {MAX_BACKOFF_SECONDS:.0f} seconds"))
    if len(policy.transient_patterns) > MAX_PATTERNS:
        problems.append(FieldViolation(f"{field_name}.transient_patterns", f"at most {MAX_PATTERNS} patterns"))
    for i, pattern in enumerate(policy.transient_patterns[:MAX_PATTERNS]):
        if not pattern or len(pattern) > MAX_PATTERN_LENGTH:
            problems.append(FieldViolation(f"{field_name}.transient_patterns[{i}]",
                                           f"must have 1 to {MAX_PATTERN_LENGTH} characters"))
            continue
        try:
            re.compile(pattern)
        except re.error as exc:
            problems.append(FieldViolation(f"{field_name}.transient_patterns[{i}]",
                                           f"is not a regular expression ({exc.msg})"))
    return problems


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
