"""Where the services are, who the caller is, and what an error means to a
person at a terminal.

Where (highest first): IK_<SVC>_TARGET, as the services read it; else the
server (`--server`, IK_SERVER, or the one `ik login --server` saved) with the
service's port (IK_<SVC>_PORT, else its default); else 127.0.0.1. The token:
--token, IK_TOKEN, or the one `ik login` saved. Both live in the config
directory: $IK_CONFIG_DIR, else ~/.config/infrakitchen (token: `token`, mode
600; settings: `config.json`)."""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import typer
from rich.console import Console

from infrakitchen.approval.v1 import approval_pb2_grpc
from infrakitchen.blueprint.v1 import blueprint_pb2_grpc
from infrakitchen.executor.v1 import executor_pb2_grpc
from infrakitchen.resource.v1 import resource_pb2_grpc
from infrakitchen.workflow.v1 import workflow_pb2_grpc
from services.common.config import DEFAULT_PORTS
from services.common.grpc_errors import status_details
from services.common.tls import GrpcTls

console = Console()
err_console = Console(stderr=True)

STUBS = {
    "blueprint": blueprint_pb2_grpc.BlueprintServiceStub,
    "workflow": workflow_pb2_grpc.WorkflowServiceStub,
    "resource": resource_pb2_grpc.ResourceServiceStub,
    "executor": executor_pb2_grpc.ExecutorServiceStub,
    "approval": approval_pb2_grpc.ApprovalServiceStub,
}


@dataclass
class Options:
    """The command line's global options (set by the root callback)."""
    server: str = ""
    output: str = "text"  # or "json"
    token: str = ""


options = Options()


def config_dir() -> Path:
    return Path(os.environ.get("IK_CONFIG_DIR") or Path.home() / ".config" / "infrakitchen")


def saved_config() -> dict:
    path = config_dir() / "config.json"
    try:
        return json.loads(path.read_text()) if path.exists() else {}
    except (OSError, ValueError):
        return {}


def save_config(**values) -> Path:
    directory = config_dir()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "config.json"
    path.write_text(json.dumps({**saved_config(), **values}, indent=2) + "\n")
    return path


def server() -> str:
    return options.server or os.environ.get("IK_SERVER") or saved_config().get("server") or "127.0.0.1"


def target(service: str) -> str:
    explicit = os.environ.get(f"IK_{service.upper()}_TARGET")
    if explicit:
        return explicit
    port = os.environ.get(f"IK_{service.upper()}_PORT") or DEFAULT_PORTS[service]
    return f"{server()}:{port}"


def token(explicit: str | None = None) -> str:
    found = explicit or options.token or os.environ.get("IK_TOKEN")
    if not found:
        saved = config_dir() / "token"
        found = saved.read_text().strip() if saved.exists() else ""
    if not found:
        fail("No token: run `ik login --token <token>` (`make token` prints one) or set IK_TOKEN.", code=2)
    return found


def fail(message: str, code: int = 1):
    err_console.print(f"[red]{message}[/red]", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def explain(service: str, err: grpc.RpcError) -> str:
    """What went wrong, for a person: the service and where it was looked for
    when it is down, `ik login` when the token is the problem, and each field
    or precondition the service named."""
    code = err.code()
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED) and \
            not status_details(err).get("ErrorInfo"):
        return (f"The {service} service at {target(service)} is not reachable ({code.name}). Is it running? "
                f"Set --server, IK_SERVER or IK_{service.upper()}_TARGET to reach it elsewhere.")
    if code == grpc.StatusCode.UNAUTHENTICATED:
        details = err.details() or ""
        why = "Your token has expired" if "expired" in details.lower() else f"Not authenticated ({details})"
        return f"{why}: run `ik login --token <token>`."
    lines = [f"{code.name}: {err.details()}"]
    found = status_details(err)
    for v in getattr(found.get("BadRequest"), "field_violations", []):
        lines.append(f"  {v.field}: {v.description}")
    for v in getattr(found.get("PreconditionFailure"), "violations", []):
        lines.append(f"  {v.subject}: {v.description}" + (f" ({v.type})" if v.type else ""))
    return "\n".join(lines)


def command_trace() -> str:
    """The W3C context of this command's span ("" when the CLI does not trace).

    With IK_TRACES_EXPORTER set for the CLI as for the services (`otlp` or
    `file`, the same variables), the command is a span of its own (`ik
    workflow run`), the parent of every call it makes (create, execute,
    watch), exported when the command ends: one trace, with its root. Without
    it no context is sent and each call starts a trace of its own (a context
    whose span is never exported left the services' spans pointing at a
    parent nobody had)."""
    env = dict(os.environ)
    if (env.get("IK_TRACES_EXPORTER") or "none").strip().lower() == "none":
        return ""
    try:  # typer (pinned) carries its own copy of click
        from typer._click.globals import get_current_context
    except ImportError:
        from click import get_current_context
    from opentelemetry import trace
    from opentelemetry.trace import SpanKind
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    from services.common import tracing
    ctx = get_current_context(silent=True)
    if ctx is not None and "traceparent" in ctx.meta:
        return ctx.meta["traceparent"]  # one span per command, however many clients it makes
    # A collector that does not answer delays the command's exit by this much at most (OTel's default: 10 s).
    os.environ.setdefault("OTEL_EXPORTER_OTLP_TIMEOUT", "2")
    try:
        tracing.configure("cli", env, Path(env.get("IK_DATA_DIR", ".data")))
    except ValueError as exc:
        fail(str(exc), code=2)
    words, at = [], ctx
    while at is not None and at.parent is not None:  # the subcommands' names, not how ik was started
        words.insert(0, at.info_name or "")
        at = at.parent
    span = trace.get_tracer(tracing.TRACER_NAME).start_span(" ".join(["ik", *words]), kind=SpanKind.CLIENT)
    carrier: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(carrier, context=trace.set_span_in_context(span))

    def end() -> None:
        span.end()
        tracing.shutdown()  # exports it (and flushes) before the process exits
    if ctx is not None:
        ctx.meta["traceparent"] = carrier["traceparent"]
        ctx.call_on_close(end)
    else:
        import atexit
        atexit.register(end)
    return carrier["traceparent"]


class Client:
    """The five services' stubs, with the caller's token and one trace context per command."""

    def __init__(self, explicit_token: str | None = None):
        self.md = [("authorization", f"Bearer {token(explicit_token)}")]
        if parent := command_trace():
            self.md.append(("traceparent", parent))
        self._channels: dict[str, grpc.Channel] = {}
        self._stubs: dict[str, object] = {}

    def channel(self, service: str) -> grpc.Channel:
        if service not in self._channels:
            # IK_TLS_CA_FILE (and, for mutual TLS, IK_TLS_CERT_FILE / IK_TLS_KEY_FILE) as the services read them.
            self._channels[service] = GrpcTls.from_env(dict(os.environ)).channel(target(service))
        return self._channels[service]

    def stub(self, service: str):
        if service not in self._stubs:
            self._stubs[service] = STUBS[service](self.channel(service))
        return self._stubs[service]

    @property
    def blueprint(self):
        return self.stub("blueprint")

    @property
    def workflow(self):
        return self.stub("workflow")

    @property
    def resource(self):
        return self.stub("resource")

    @property
    def executor(self):
        return self.stub("executor")

    @property
    def approval(self):
        return self.stub("approval")

    def __call__(self, method, request, timeout: float = 30):
        """A unary call; an error ends the command with its explanation."""
        service = _service_of(method)
        try:
            return method(request, metadata=self.md, timeout=timeout)
        except grpc.RpcError as err:
            fail(explain(service, err))

    def collect(self, method, request, field: str, limit: int = 0) -> list:
        """Every item of a List (`field` of each page), page after page, or the first `limit`."""
        request.page_size = min(limit or 500, 500)
        found: list = []
        while True:
            page = self(method, request)
            found += getattr(page, field)
            if not page.next_page_token or (limit and len(found) >= limit):
                return found[:limit] if limit else found
            request.page_token = page.next_page_token

    def stream(self, open_stream, resume, on_item, *, service: str, wait: float = 30.0):
        """Follows a server stream to its end, reconnecting while the service
        is away (UNAVAILABLE: a restart): `open_stream()` opens it again from
        where `resume()` says the last item left off. Gives up after `wait`
        seconds without the service."""
        down_since = None
        while True:
            try:
                for item in open_stream():
                    down_since = None
                    on_item(item)
                return
            except grpc.RpcError as err:
                if err.code() != grpc.StatusCode.UNAVAILABLE:
                    fail(explain(service, err))
                now = time.monotonic()
                down_since = down_since or now
                if now - down_since > wait:
                    fail(explain(service, err))
                err_console.print(f"[dim]the {service} service went away; reconnecting…[/dim]")
                time.sleep(1.0)
                resume()


def _service_of(method) -> str:
    """The service a bound stub method calls (its path names it)."""
    path = getattr(method, "_method", b"")
    path = path.decode() if isinstance(path, bytes) else str(path)
    for name in STUBS:
        if f".{name}.v1." in path:
            return name
    return "InfraKitchen"
