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


def test_json_lines_carry_the_ids_being_worked_on_and_the_trace():
    from opentelemetry.sdk.trace import TracerProvider

    from services.common import logs, tracing
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "working", (), None)
    with logs.bound(workflow_id="w1", job_id="j1", step_id=""):
        line = json.loads(JsonFormatter("executor").format(record))
    assert (line["workflow_id"], line["job_id"]) == ("w1", "j1") and "step_id" not in line
    assert "trace_id" not in line  # tracing off
    assert "workflow_id" not in json.loads(JsonFormatter("executor").format(record))  # unbound again
    tracing._provider = provider = TracerProvider()
    try:
        with provider.get_tracer("t").start_as_current_span("s") as span:
            line = json.loads(JsonFormatter("executor").format(record))
            assert line["trace_id"] == format(span.get_span_context().trace_id, "032x")
    finally:
        tracing._provider = None


def test_an_unknown_traces_exporter_is_refused(tmp_path):
    from services.common import tracing
    with pytest.raises(ValueError):
        tracing.configure("resource", {"IK_TRACES_EXPORTER": "zipkin"}, tmp_path)
    assert not tracing.configure("resource", {}, tmp_path) and not tracing.enabled()


def test_a_served_requests_ids_are_its_log_fields():
    from infrakitchen.executor.v1 import executor_pb2 as ep
    from infrakitchen.resource.v1 import resource_pb2 as rp
    from infrakitchen.workflow.v1 import workflow_pb2 as wp
    from services.common.logs import request_ids
    assert request_ids("/x.ResourceService/CreateResource", rp.CreateResourceRequest(
        workflow_id="w1", step_id="s1", resource=rp.Resource(name="n"))) == {"workflow_id": "w1", "step_id": "s1"}
    assert request_ids("/x.ExecutorService/SubmitJob", ep.SubmitJobRequest(correlation=ep.JobCorrelation(
        workflow_id="w1", resource_id="r1"))) == {"workflow_id": "w1", "resource_id": "r1"}
    assert request_ids("/x.WorkflowService/GetWorkflow", wp.GetWorkflowRequest(id="w" * 500)) == \
        {"workflow_id": "w" * 64}  # bounded
    assert request_ids("/x.ExecutorService/GetJob", ep.GetJobRequest(id="j1")) == {"job_id": "j1"}
    assert request_ids("/x.ResourceService/ListResources", rp.ListResourcesRequest(workflow_id="w1")) == \
        {"workflow_id": "w1"}
    assert request_ids("/x.Y/Z", object()) == {}  # bytes that were not the message
