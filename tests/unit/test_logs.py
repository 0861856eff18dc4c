"""JSON log lines (IK_LOG_FORMAT=json): one object per record, with the
served call's method, code, user and duration when the record carries them."""
from __future__ import annotations

import json
import logging

import pytest

from services.common.logs import JsonFormatter, configure


def test_a_call_log_line_is_one_json_object_with_its_fields():
    record = logging.LogRecord("services.common.interceptors", logging.INFO, __file__, 1, "%s %s", ("a", "b"), None)
    record.method, record.code, record.user, record.duration_ms = "/x.v1.S/Get", "OK", "alice", 1.5
    line = json.loads(JsonFormatter("resource").format(record))
    assert line["message"] == "a b" and line["service"] == "resource" and line["level"] == "INFO"
    assert (line["method"], line["code"], line["user"], line["duration_ms"]) == ("/x.v1.S/Get", "OK", "alice", 1.5)
    plain = json.loads(JsonFormatter("resource").format(
        logging.LogRecord("x", logging.WARNING, __file__, 1, "no call", (), None)))
    assert "method" not in plain and plain["level"] == "WARNING"


def test_an_unknown_log_format_is_refused():
    with pytest.raises(ValueError):
        configure("resource", "INFO", "xml")
