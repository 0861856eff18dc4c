"""Log format: text lines by default; JSON lines with IK_LOG_FORMAT=json, one
object per record with the service, the logger, the message, for served
calls the method, status code, user and duration (the ErrorInterceptor
passes them as `extra`), the trace and span ids when tracing is on, and the
ids of what is being worked on (workflow, step, resource, job: bound by the
event consumers and the executor's workers with `bound`)."""
from __future__ import annotations

import contextlib
import contextvars
import datetime as dt
import json
import logging

from services.common import tracing

# Fields a record may carry beyond the standard ones (bounded, never request bodies).
CALL_FIELDS = ("method", "code", "user", "duration_ms", "reason")
CORRELATION_FIELDS = ("workflow_id", "step_id", "resource_id", "job_id", "approval_request_id", "event_id")

_bound: contextvars.ContextVar[dict] = contextvars.ContextVar("ik_log_ids", default={})


@contextlib.contextmanager
def bound(**ids: str):
    """Records logged inside carry these ids (empty ones left out)."""
    token = _bound.set({**_bound.get(), **{k: v for k, v in ids.items() if v}})
    try:
        yield
    finally:
        _bound.reset(token)


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str):
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        out = {"time": dt.datetime.fromtimestamp(record.created, dt.timezone.utc).isoformat(),
               "level": record.levelname, "service": self.service, "logger": record.name,
               "message": record.getMessage()}
        out.update({k: getattr(record, k) for k in CALL_FIELDS if hasattr(record, k)})
        out.update(_bound.get())
        trace_id, span_id = tracing.current_ids()
        if trace_id:
            out["trace_id"], out["span_id"] = trace_id, span_id
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure(service: str, level: str, fmt: str) -> None:
    if fmt not in ("text", "json"):
        raise ValueError("IK_LOG_FORMAT must be text or json")
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter(service) if fmt == "json" else logging.Formatter(
        f"%(asctime)s %(levelname)s {service} %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler])
