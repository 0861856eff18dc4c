"""Log format: text lines by default; JSON lines with IK_LOG_FORMAT=json, one
object per record with the service, the logger, the message and, for served
calls, the method, status code, user and duration (the ErrorInterceptor
passes them as `extra`)."""
from __future__ import annotations

import datetime as dt
import json
import logging

# Fields a record may carry beyond the standard ones (bounded, never request bodies).
CALL_FIELDS = ("method", "code", "user", "duration_ms", "reason")


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str):
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        out = {"time": dt.datetime.fromtimestamp(record.created, dt.timezone.utc).isoformat(),
               "level": record.levelname, "service": self.service, "logger": record.name,
               "message": record.getMessage()}
        out.update({k: getattr(record, k) for k in CALL_FIELDS if hasattr(record, k)})
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
