"""Retry policies of transient failures (pure Python): shared by the
blueprint service (a template's default) and the workflow service (a
workflow's policy, which retries its steps)."""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import re2

from services.common.errors import FieldViolation

MAX_ATTEMPTS = 10
MAX_PATTERNS = 20
MAX_PATTERN_LENGTH = 200
DEFAULT_BACKOFF_SECONDS = 10.0
MAX_BACKOFF_SECONDS = 600.0
# A failure's message is matched on its last 64 KiB (where terraform puts the error).
MATCHED_MESSAGE_BYTES = 64 * 1024

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
        error = error[-MATCHED_MESSAGE_BYTES:]
        for pattern in self.transient_patterns or BUILT_IN_TRANSIENT:
            if _compiled(pattern).search(error):
                return pattern
        return ""


@lru_cache(maxsize=1024)
def _compiled(pattern: str):
    """Patterns are users' own, matched on the workflow service's event loop:
    RE2 matches in time linear in the message (no catastrophic backtracking,
    e.g. `(a+)+$`), at the price of back-references and look-arounds, which
    it refuses when the policy is set. Case never matters."""
    options = re2.Options()
    options.case_sensitive = False
    options.log_errors = False  # a refused pattern is the caller's field violation, not a log line
    return re2.compile(pattern, options)


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
            _compiled(pattern)
        except re2.error as exc:
            reason = exc.args[0].decode(errors="replace") if exc.args and isinstance(exc.args[0], bytes) else str(exc)
            problems.append(FieldViolation(f"{field_name}.transient_patterns[{i}]",
                                           f"is not a regular expression RE2 accepts ({reason[:120]})"))
    return problems
