"""Start-up and shutdown of one service process.

Order: migrations -> database -> NATS (streams) -> outbox relay -> event
consumers -> gRPC server (with reflection and health SERVING). SIGTERM or
SIGINT: health NOT_SERVING, in-flight calls get IK_SHUTDOWN_GRACE seconds,
background tasks stop, connections close."""
from __future__ import annotations

import asyncio
import datetime as dt
import gc
import logging
import signal
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import nats
import sqlalchemy as sa
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from services.common import logs, metrics, profiling, reflection, tracing
from services.common.bus import EventBus
from services.common.changes import ChangeFeed
from services.common.config import Settings
from services.common.consumer import ConsumerSpec, EventConsumer
from services.common.db import DEFAULT_WAL_LIMIT, Database
from services.common.interceptors import AuthInterceptor, ErrorInterceptor
from services.common.identities import ServiceIdentity
from services.common.signing import EventSigner, EventVerifier
from services.common.oidc import OidcVerifier
from services.common.tls import SERVER_OPTIONS, GrpcTls, nats_options
from services.common.migrations import upgrade
from services.common.outbox import OutboxRelay
from services.common.tables import plumbing_tables
from services.common.uow import CHANGES_CHANNEL, UnitOfWork

log = logging.getLogger(__name__)


class StartupError(Exception):
    """A service cannot start; the message says why, without a stack trace."""


@dataclass
class ServiceDefinition:
    """What a service contributes; everything else is common."""

    name: str
    migrations_dir: Path
    metadata: sa.MetaData
    # Adds the servicers to the server; returns the full names of the
    # services added (for reflection and health).
    register: Callable[[grpc.aio.Server, "Runtime"], Iterable[str]]
    uow_class: type[UnitOfWork] = UnitOfWork
    consumers: Callable[["Runtime"], list[ConsumerSpec]] = lambda runtime: []
    # Extra long-running tasks (e.g. executor workers, reconcilers).
    background: Callable[["Runtime"], list] = lambda runtime: []
    # Runs once the background tasks (consumers included) ended, before the bus
    # and the database close (e.g. work those tasks handed off finishes).
    on_stop: list[Callable] = field(default_factory=list)
    # Wires service-specific objects onto the runtime before anything starts
    # (e.g. the executor's vault, passed to its unit of work via uow_options).
    setup: Callable[["Runtime"], None] = lambda runtime: None
    # Streams beyond the per-context event streams (e.g. a work queue).
    streams: Callable[["Runtime"], list] = lambda runtime: []
    # Runs when shutdown begins, before background tasks are cancelled (e.g.
    # executor workers hand their jobs back).
    on_stopping: list[Callable] = field(default_factory=list)
    # Refreshes the service's own gauges with the common ones (metrics on), e.g. the job queue's depth.
    gauges: Callable[["Runtime"], Awaitable[None]] | None = None


class Runtime:
    """The process-wide objects a service's code is wired with."""

    def __init__(self, definition: ServiceDefinition, settings: Settings):
        self.definition = definition
        self.settings = settings
        try:
            wal_limit = int(settings.env.get("IK_SQLITE_WAL_LIMIT", DEFAULT_WAL_LIMIT))
            self.db = Database(settings.database_url, sqlite_synchronous=settings.sqlite_synchronous,
                               wal_limit=wal_limit)
        except ValueError as exc:  # a setting the operator gave: said, without a stack trace
            raise StartupError(f"IK_SQLITE_WAL_LIMIT: {exc}") from None
        md = definition.metadata
        if "outbox" not in md.tables:
            plumbing_tables(md)
        self.outbox_table, self.inbox_table = md.tables["outbox"], md.tables["inbox"]
        # This service's key pair: it signs calls to the others (clients) and checks theirs (server).
        self.identity = ServiceIdentity.from_settings(definition.name, settings.env, settings.data_dir)
        # It signs every event this service publishes; consumers check the signer owns the subject.
        self.bus = EventBus(settings.nats_url, settings.event_prefix, client_name=f"ik-{definition.name}",
                            connect_options=nats_options(settings.env, definition.name, settings.data_dir),
                            replicas=int(settings.env.get("IK_STREAM_REPLICAS", "1")),
                            signer=EventSigner(self.identity))
        self.verifier = EventVerifier(self.identity, self.bus.names)
        self.relay = OutboxRelay(self.db, self.outbox_table, self.bus, name=f"outbox-{self.definition.name}")
        self.server: grpc.aio.Server | None = None
        self.health = health.aio.HealthServicer()
        self._stopping = False
        self.tasks: list[asyncio.Task] = []
        self.consumers: list[tuple[EventConsumer, asyncio.Task]] = []
        self.port: int | None = None
        self.uow_options: dict = {}
        self.changes = ChangeFeed()
        definition.setup(self)

    def uow(self) -> UnitOfWork:
        return self.definition.uow_class(self.db, self.outbox_table, self.inbox_table, self.bus.names,
                                         on_commit=self.relay.notify, changes=self.changes, **self.uow_options)

    def read_uow(self) -> UnitOfWork:
        """A unit of work for reads only (autocommit on PostgreSQL)."""
        return self.definition.uow_class(self.db, self.outbox_table, self.inbox_table, self.bus.names,
                                         read_only=True, **self.uow_options)

    async def start(self) -> None:
        s = self.settings
        await self.bus.connect()
        await self.bus.ensure_event_streams(owner=self.definition.name)
        for config in self.definition.streams(self):
            await self.bus.ensure_stream(config)
        self._spawn("outbox-relay", self.relay.run())
        self._checkpoints = self._spawn("database-checkpoints", self.db.checkpoints())
        if self.db.is_postgres:  # other replicas' commits wake this one's streams
            self._spawn("change-listener", self.changes.listen(s.database_url, CHANGES_CHANNEL))
        for spec in self.definition.consumers(self):
            consumer = EventConsumer(self.bus, self.uow, spec, self.verifier)
            for attempt in range(1, 11):  # create the durable before serving; a cluster electing leaders answers late
                try:
                    await consumer.subscribe()
                    break
                except nats.errors.TimeoutError:
                    if attempt == 10:
                        raise
                    log.warning("consumer %s: JetStream did not answer; asking again", spec.durable)
                    await asyncio.sleep(min(attempt, 3))
            self.consumers.append((consumer, self._spawn(f"consumer-{spec.durable}", consumer.run())))
        for i, coro in enumerate(self.definition.background(self)):
            self._spawn(f"background-{i}", coro)

        self.server = grpc.aio.server(
            # The trace's server span first, so it covers authentication and errors too.
            interceptors=[*tracing.server_interceptors(), ErrorInterceptor(self.definition.name),
                          AuthInterceptor(s.auth_secret, OidcVerifier.from_env(s.env), self.identity)],
            # No SO_REUSEPORT: a second process on the same port must fail, not share it.
            options=[("grpc.so_reuseport", 0), *SERVER_OPTIONS],
        )
        names = list(self.definition.register(self.server, self))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable(self.server, [*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name])
        tls = GrpcTls.from_env(s.env)
        try:
            address = f"{s.host}:{s.port}"
            self.port = self.server.add_secure_port(address, tls.server_credentials()) if tls.serving \
                else self.server.add_insecure_port(address)
        except RuntimeError:
            raise StartupError(f"cannot listen on {s.host}:{s.port} (port taken? set IK_{self.definition.name.upper()}_PORT)") from None
        await self.server.start()
        for name in ["", *names]:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._served = names
        if metrics.serve(self.definition.name, s.env, s.host):
            self._spawn("backlog-gauges", self._backlog_gauges(float(s.env.get("IK_METRICS_INTERVAL", "5"))))
        self._spawn("readiness", self._readiness(float(s.env.get("IK_HEALTH_INTERVAL", "2"))))
        # What start-up made (modules, protos, statements) lives as long as the
        # process: out of the collector's way, so its full passes stay short.
        gc.freeze()
        log.info("%s service listening on %s:%d%s", self.definition.name, s.host, self.port,
                 (" with mutual TLS" if tls.require_client_cert else " with TLS") if tls.serving else "")

    async def _backlog_gauges(self, interval: float) -> None:
        """Consumer lag (from JetStream's consumer info) and the outbox's
        backlog and oldest age, refreshed for the metrics endpoint."""
        outbox = self.outbox_table
        while not self._stopping:
            try:
                for consumer, _ in self.consumers:
                    spec = consumer.spec
                    info = await self.bus.js.consumer_info(self.bus.names.context_stream(spec.context),
                                                           spec.durable)
                    metrics.CONSUMER_PENDING.labels(spec.durable).set(info.num_pending + info.num_ack_pending)
                async with self.db.engine.connect() as conn:
                    count, oldest = (await conn.execute(sa.select(sa.func.count(), sa.func.min(
                        outbox.c.created_at)))).one()
                metrics.OUTBOX_BACKLOG.set(count)
                if self.definition.gauges is not None:
                    await self.definition.gauges(self)
                metrics.OUTBOX_OLDEST.set(metrics.seconds_between(
                    oldest if oldest is None or oldest.tzinfo else oldest.replace(tzinfo=dt.timezone.utc),
                    dt.datetime.now(dt.timezone.utc)) if oldest is not None else 0)
            except Exception as exc:  # noqa: BLE001 - NATS or the database away: the gauges wait
                log.debug("backlog gauges: %s", exc)
            await asyncio.sleep(interval)

    async def _ready(self) -> str:
        """What keeps the service from serving now ("" when nothing does)."""
        if self.bus.nc is None or not self.bus.nc.is_connected:
            return "NATS is not connected"
        try:
            async with asyncio.timeout(2):
                async with self.db.engine.connect() as conn:
                    await conn.execute(sa.text("SELECT 1"))
        except Exception as exc:  # noqa: BLE001 - any failure means the database cannot be used
            return f"the database does not answer ({type(exc).__name__})"
        return ""

    async def _readiness(self, interval: float) -> None:
        """Health follows readiness: NOT_SERVING (for every service name) while
        the database or NATS cannot be reached, SERVING again on recovery, so a
        load balancer or Kubernetes stops sending calls that would fail."""
        serving = True
        while not self._stopping:
            await asyncio.sleep(interval)
            problem = await self._ready()
            if self._stopping or serving == (not problem):
                continue
            serving = not problem
            status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
            for name in ["", *self._served]:
                await self.health.set(name, status)
            if serving:
                log.info("ready again: SERVING")
            else:
                log.warning("not ready (%s): NOT_SERVING", problem)

    def _spawn(self, name: str, coro) -> asyncio.Task:
        task = asyncio.create_task(coro, name=f"{self.definition.name}-{name}")
        task.add_done_callback(self._task_done)
        self.tasks.append(task)
        return task

    @staticmethod
    def _task_done(task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("background task %s died", task.get_name(), exc_info=task.exception())

    async def stop(self) -> None:
        self._stopping = True
        for name in ["", *getattr(self, "_served", [])]:
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        if self.server is not None:
            await self.server.stop(self.settings.shutdown_grace)
        for consumer, _ in self.consumers:
            consumer.stop()
        for hook in self.definition.on_stopping:
            await hook(self)
        self.relay.stop()
        if getattr(self, "_checkpoints", None) is not None:
            self._checkpoints.cancel()  # it has nothing to finish; the last connection checkpoints at close
        # Consumers finish their current fetch (about a second) and the relay
        # its batch; whatever is still running then is cancelled.
        if self.tasks:
            await asyncio.wait(self.tasks, timeout=3)
        for task in self.tasks:
            task.cancel()
        if self.tasks:
            _, stuck = await asyncio.wait(self.tasks, timeout=5)
            for task in stuck:
                log.error("task %s did not stop; abandoning it", task.get_name())
        for hook in self.definition.on_stop:
            await hook(self)
        await self.bus.close()
        await self.db.dispose()
        log.info("%s service stopped", self.definition.name)


def run_service(definition: ServiceDefinition) -> None:
    settings = Settings.from_env(definition.name)
    logs.configure(definition.name, settings.log_level, settings.env.get("IK_LOG_FORMAT", "text"))
    try:
        tracing.configure(definition.name, settings.env, settings.data_dir)
    except ValueError as exc:
        log.error("%s service cannot start: %s", definition.name, exc)
        raise SystemExit(1) from None
    upgrade(definition.migrations_dir, settings.database_url)
    try:
        asyncio.run(_serve(definition, settings))
    except StartupError as exc:
        log.error("%s service cannot start: %s", definition.name, exc)
        raise SystemExit(1) from None
    finally:
        tracing.shutdown()


async def _serve(definition: ServiceDefinition, settings: Settings) -> None:
    runtime = Runtime(definition, settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # Benchmarks only (IK_PROFILE_DIR): a CPU sampler or cProfile of this process (services/common/profiling.py).
    profiler = profiling.ServiceProfiler.from_env(definition.name, settings.env)
    if profiler is not None:
        profiler.install(loop)
    try:
        await runtime.start()
    except BaseException:
        await runtime.stop()
        raise
    if profiler is not None:
        profiler.serving()
    await stop.wait()
    log.info("%s service stopping", definition.name)
    if profiler is not None:
        profiler.close()
    await runtime.stop()
