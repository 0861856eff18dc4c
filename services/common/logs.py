"""Log format: text lines by default; JSON lines with IK_LOG_FORMAT=json, one
object per record with the service, the logger, the message, for served
calls the method, status code, user and duration (the ErrorInterceptor
passes them as `extra`), the trace and span ids when tracing is on, and the
ids of what is being worked on (workflow, step, resource, job: bound by the
event consumers and the executor's workers with `bound`, and for a served
call, those its request names)."""
from __future__ import annotations

import contextlib
import contextvars
import datetime as dt
import json
import logging

from services.common import tracing

log = logging.getLogger(__name__)

# Fields a record may carry beyond the standard ones (bounded, never request bodies).
CALL_FIELDS = ("method", "code", "user", "duration_ms", "reason")
CORRELATION_FIELDS = ("workflow_id", "step_id", "resource_id", "job_id", "approval_request_id", "event_id")

_bound: contextvars.ContextVar[dict] = contextvars.ContextVar("ik_log_ids", default={})


@contextlib.contextmanager
def bound(**ids: str):
    """Records logged inside carry these ids (empty ones left out)."""
    token = _bound.set(_with(ids))
    try:
        yield
    finally:
        _bound.reset(token)


# A request's `id` names what its method's noun is (GetWorkflow: a workflow).
_ID_OF_NOUN = (("ApprovalRequest", "approval_request_id"), ("Workflow", "workflow_id"), ("Resource", "resource_id"),
               ("Job", "job_id"))


def request_ids(method: str, request) -> dict[str, str]:
    """The ids a served request names (its workflow_id, step_id, resource_id,
    job_id... fields, those of its `correlation`, and its `id` by the
    method's noun), bounded, for the call's log records."""
    descriptor = getattr(request, "DESCRIPTOR", None)
    if descriptor is None:  # bytes that were not the method's message
        return {}
    ids: dict[str, str] = {}

    def take(message) -> None:
        for name in CORRELATION_FIELDS:
            value = getattr(message, name, None) if name in message.DESCRIPTOR.fields_by_name else None
            if isinstance(value, str) and value:  # a repeated field is a container, left out
                ids[name] = value[:64]
    try:
        take(request)
        if "correlation" in descriptor.fields_by_name and request.HasField("correlation"):
            take(request.correlation)
        request_id = getattr(request, "id", None) if "id" in descriptor.fields_by_name else None
        if isinstance(request_id, str) and request_id:
            name = method.rsplit("/", 1)[-1]
            key = next((k for noun, k in _ID_OF_NOUN if name.endswith((noun, noun + "s"))), "")
            if key:
                ids.setdefault(key, request_id[:64])
    except Exception:  # noqa: BLE001 - a log field is never worth failing the call for
        log.debug("no ids from a %s request", method, exc_info=True)
    return ids


def bind(**ids: str) -> None:
    """Like `bound`, for the rest of the current context: a served call runs
    in a task (and context) of its own, and a stream's generator may be
    closed from another task, where resetting a context variable fails."""
    _bound.set(_with(ids))


def _with(ids: dict[str, str]) -> dict[str, str]:
    """The ids bound now, with these (empty ones left out)."""
    return {**_bound.get(), **{k: v for k, v in ids.items() if v}}


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
