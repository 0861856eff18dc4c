"""OpenTelemetry traces; off unless IK_TRACES_EXPORTER says where they go.

- `otlp`: OTLP over gRPC to a collector; the standard OTEL_EXPORTER_OTLP_*
  variables (endpoint, headers, certificate) apply.
- `file`: each finished span as one JSON line in
  `$IK_DATA_DIR/traces/<service>-<pid>.jsonl`, for a look without a collector.
- `none` (the default): no tracer provider, nothing recorded.

One trace follows a piece of work across the five services:
- gRPC calls served and made (opentelemetry-instrumentation-grpc), with the
  W3C context in the calls' metadata;
- events and work-queue messages: the outbox row keeps the `traceparent` of
  the transaction that wrote it, the relay sends it as a NATS header, and a
  consumer handles the message in a CONSUMER span continuing that trace;
- executor jobs: a span per attempt, with a child span per terraform command.
So a workflow's ExecuteWorkflow, every step's CreateResource and SubmitJob,
every job and its commands, and the completion events that start the next
steps share one trace id. Work started by timers and reconcilers (a retry
after its backoff, a recovered step) starts a trace of its own.

Spans carry ids (workflow, step, resource, job), never variables, outputs or
error texts: those may hold sensitive values."""
from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.trace import SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

log = logging.getLogger(__name__)

EXPORTERS = ("none", "otlp", "file")
TRACER_NAME = "infrakitchen"

_propagator = TraceContextTextMapPropagator()
_provider = None  # the SDK provider this process set up, when tracing is on


def enabled() -> bool:
    return _provider is not None


def configure(service: str, env: dict[str, str], data_dir: Path) -> bool:
    """Sets up this process's tracer provider from IK_TRACES_EXPORTER; True when tracing is on."""
    global _provider
    exporter_name = env.get("IK_TRACES_EXPORTER", "none").strip().lower() or "none"
    if exporter_name not in EXPORTERS:
        raise ValueError(f"IK_TRACES_EXPORTER must be one of {', '.join(EXPORTERS)}")
    if exporter_name == "none" or _provider is not None:
        return _provider is not None
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    if exporter_name == "otlp":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        exporter = OTLPSpanExporter()
    else:
        exporter = JsonLinesExporter(Path(data_dir) / "traces" / f"{service}-{os.getpid()}.jsonl")
    provider = TracerProvider(resource=Resource.create({"service.name": f"infrakitchen-{service}",
                                                        "service.namespace": "infrakitchen"}))
    provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=1000))
    trace.set_tracer_provider(provider)
    _provider = provider
    return True


def shutdown() -> None:
    """Exports what is buffered (at the process's stop)."""
    global _provider
    if _provider is not None:
        _provider.shutdown()
        _provider = None


class JsonLinesExporter(SpanExporter):
    """A span exporter appending one JSON object per span to a file."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - open for the process's life

    def export(self, spans):
        for span in spans:
            self._file.write(span.to_json(indent=None) + "\n")
        self._file.flush()
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        self._file.close()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


def server_interceptors() -> list:
    if not enabled():
        return []
    from opentelemetry.instrumentation.grpc import aio_server_interceptor
    return [aio_server_interceptor()]


def client_interceptors() -> list:
    if not enabled():
        return []
    from opentelemetry.instrumentation.grpc import aio_client_interceptors
    return list(aio_client_interceptors())


def traceparent() -> str:
    """The current span's W3C context as one header value ("" without one),
    kept with an outbox row so the message continues this trace."""
    if not enabled():
        return ""
    carrier: dict[str, str] = {}
    _propagator.inject(carrier)
    return carrier.get("traceparent", "")


def message_headers(msg_id: str, parent: str | None) -> dict[str, str]:
    headers = {"Nats-Msg-Id": msg_id}
    if parent:
        headers["traceparent"] = parent
    return headers


@contextlib.contextmanager
def consuming(name: str, headers: dict[str, str] | None, **attributes):
    """A CONSUMER span continuing the trace of a message's `traceparent`
    header (a new trace without one)."""
    if not enabled():
        yield None
        return
    parent = _propagator.extract({"traceparent": headers["traceparent"]}) \
        if headers and headers.get("traceparent") else otel_context.Context()
    with trace.get_tracer(TRACER_NAME).start_as_current_span(
            name, context=parent, kind=SpanKind.CONSUMER, attributes=_clean(attributes)) as span:
        yield span


@contextlib.contextmanager
def span(name: str, **attributes):
    """An INTERNAL span, child of the current one."""
    if not enabled():
        yield None
        return
    with trace.get_tracer(TRACER_NAME).start_as_current_span(name, attributes=_clean(attributes)) as current:
        yield current


def annotate(**attributes) -> None:
    """Adds attributes (e.g. an outcome) to the current span."""
    if enabled():
        trace.get_current_span().set_attributes(_clean(attributes))


def current_ids() -> tuple[str, str]:
    """(trace id, span id) of the current span, hex, or ("", "")."""
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return "", ""
    return format(ctx.trace_id, "032x"), format(ctx.span_id, "016x")


def _clean(attributes: dict) -> dict:
    return {f"ik.{k}": v for k, v in attributes.items() if v not in (None, "")}
