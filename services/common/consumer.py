"""Durable JetStream pull consumers behind an idempotent inbox.

Each event is handled inside one unit of work: the inbox records the event id
and the handler's state changes (and the events it emits, via the outbox) are
committed together; the message is acked only after that commit. An event
the consumer acts on that is not signed by the service owning its subject
is dead-lettered unapplied (services.common.signing); one it ignores is acked
unchecked. A redelivered
or re-published event finds its id in the inbox and changes nothing. A handler
that keeps failing is dead-lettered after max_deliver attempts."""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from google.protobuf.message import DecodeError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from sqlalchemy.exc import IntegrityError

from infrakitchen.events.v1 import events_pb2
from services.common import logs, metrics, tracing
from services.common.bus import EventBus
from services.common.errors import Unavailable
from services.common.events import Envelope
from services.common.signing import EventVerifier
from services.common.uow import UnitOfWork

log = logging.getLogger(__name__)

# What a dead letter keeps of a rejected (forged) event: enough to look at, never
# so much that the letter itself outgrows what NATS accepts.
REJECTED_DATA_BYTES = 64 * 1024

Handler = Callable[[UnitOfWork, Envelope], Awaitable[None]]


class NotYet(Exception):
    """A handler's answer to an event that came before what it refers to was
    stored here, a race the sender cannot avoid (a job's event before the
    resource service recorded the job it submitted): retried like any
    failure, but logged as information, not as a warning, until its last
    delivery (then dead-lettered with an error, as any other)."""


@dataclass
class ConsumerSpec:
    durable: str
    context: str  # whose stream, e.g. "executor"
    filter_subject: str  # unprefixed, e.g. "ik.executor.job.*"
    handler: Handler
    max_deliver: int = 8
    ack_wait: float = 30.0
    max_ack_pending: int = 256
    # Delay before the n-th redelivery after a handler error (last one repeats).
    retry_delays: list[float] = field(default_factory=lambda: [0.5, 1, 2, 5, 10, 30])
    batch: int = 32
    # Events the handler ignores whatever the state: acked without opening a
    # unit of work (no inbox row, no transaction). None: every event counts.
    wants: Callable[[Envelope], bool] | None = None
    # The event is a hint, its publisher's records are the truth: asked
    # before the handler runs (outside its transaction), it returns the event
    # as that service reports it now (e.g. a job's end with the executor's
    # outputs), or None when the service does not report what the event says
    # (then nothing is applied: warned and counted). Errors are retried.
    confirm: Callable[[Envelope], Awaitable[Envelope | None]] | None = None


class EventConsumer:
    def __init__(self, bus: EventBus, uow_factory: Callable[[], UnitOfWork], spec: ConsumerSpec,
                 verifier: EventVerifier):
        self.bus = bus
        self.uow_factory = uow_factory
        self.spec = spec
        self.verifier = verifier  # only events signed by their subject's owner get through
        self._sub = None
        self._stopping = asyncio.Event()

    def stop(self) -> None:
        """Graceful stop: finish the fetch under way (its pull request would
        otherwise stay open on the server and swallow the next messages until
        ack_wait), handle what it brought, then unsubscribe."""
        self._stopping.set()

    async def subscribe(self):
        if self._sub is not None:
            return self._sub
        names = self.bus.names
        spec = self.spec
        self._sub = await self.bus.js.pull_subscribe(
            names.subject(spec.filter_subject),
            durable=spec.durable,
            stream=names.context_stream(spec.context),
            config=ConsumerConfig(
                durable_name=spec.durable,
                ack_policy=AckPolicy.EXPLICIT,
                deliver_policy=DeliverPolicy.ALL,
                max_deliver=spec.max_deliver,
                ack_wait=spec.ack_wait,
                max_ack_pending=spec.max_ack_pending,
            ),
        )
        return self._sub

    async def run(self) -> None:
        sub = await self.subscribe()
        try:
            while not self._stopping.is_set():
                try:
                    msgs = await sub.fetch(self.spec.batch, timeout=1.0)
                except (NatsTimeoutError, asyncio.TimeoutError):
                    continue
                except Exception as exc:  # noqa: BLE001 - connection trouble: wait and fetch again
                    log.warning("consumer %s: fetch failed: %s", self.spec.durable, exc)
                    await asyncio.sleep(1.0)
                    continue
                for msg in msgs:
                    await self.handle(msg)
        finally:
            self._sub = None
            try:
                await sub.unsubscribe()
            except Exception:  # noqa: BLE001 - connection may be gone already
                pass

    async def handle(self, msg) -> None:
        try:
            envelope = Envelope.FromString(msg.data)
        except DecodeError as exc:
            envelope, undecodable = None, exc
        if envelope is not None and self.spec.wants is not None and not self.spec.wants(envelope):
            # Ignored whoever sent it, so it changes nothing either way: acked
            # without checking its signature (the costliest part of a message
            # nobody acts on; most events a consumer sees are such).
            await msg.ack()
            return
        if reason := self.verifier.refuses(msg, self.spec.durable):
            # Forged or tampered with: it changes nothing, and no retry can make it genuine.
            await self._dead_letter(msg, f"rejected: {reason}", keep=REJECTED_DATA_BYTES)
            return
        if envelope is None:
            await self._dead_letter(msg, f"not an Envelope: {undecodable}")
            return
        heartbeat = asyncio.create_task(self._heartbeat(msg))
        c = envelope.correlation
        try:
            with tracing.consuming(f"{self.spec.durable} {envelope.type}", msg.headers, event_id=envelope.event_id,
                                   workflow_id=c.workflow_id, step_id=c.step_id, resource_id=c.resource_id,
                                   job_id=c.job_id), \
                    logs.bound(event_id=envelope.event_id, workflow_id=c.workflow_id, step_id=c.step_id,
                               resource_id=c.resource_id, job_id=c.job_id,
                               approval_request_id=c.approval_request_id):
                if self.spec.confirm is not None:
                    confirmed = await self._confirmed(envelope)
                    if confirmed is None:
                        log.warning("consumer %s: event %s (%s) not applied: its publisher does not report it so",
                                    self.spec.durable, envelope.event_id, envelope.type)
                        metrics.EVENTS_REJECTED.labels(self.spec.durable, "unconfirmed").inc()
                        await msg.ack()
                        return
                    envelope = confirmed
                await self._apply(envelope)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - any handler failure is retried, then dead-lettered
            delivered = msg.metadata.num_delivered
            if delivered >= self.spec.max_deliver:
                log.error("consumer %s: event %s (%s) failed %d times, dead-lettered: %s",
                          self.spec.durable, envelope.event_id, envelope.type, delivered, exc)
                await self._dead_letter(msg, str(exc))
            else:
                delays = self.spec.retry_delays
                delay = delays[min(delivered - 1, len(delays) - 1)]
                log.log(logging.INFO if isinstance(exc, NotYet) else logging.WARNING,
                        "consumer %s: event %s (%s) failed (attempt %d), retry in %.1fs: %s",
                        self.spec.durable, envelope.event_id, envelope.type, delivered, delay, exc)
                await msg.nak(delay=delay)
            return
        finally:
            heartbeat.cancel()
        await msg.ack()

    async def _confirmed(self, envelope: Envelope) -> Envelope | None:
        """The publisher's word on the event. While the publisher is not
        reachable the message is kept (heartbeats) and asked about again:
        an outage of the executor or the approval service must not use up
        a genuine event's deliveries and dead-letter it."""
        delay = 0.5
        while True:
            try:
                return await self.spec.confirm(envelope)
            except Unavailable as exc:
                if self._stopping.is_set():
                    raise
                log.info("consumer %s: event %s waits for its publisher to answer: %s", self.spec.durable,
                         envelope.event_id, exc.message)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)

    async def _apply(self, envelope: Envelope) -> None:
        try:
            async with self.uow_factory() as uow:
                if await uow.already_processed(self.spec.durable, envelope.event_id):
                    return
                await self.spec.handler(uow, envelope)
                await uow.commit()
        except IntegrityError:
            # Lost the race with a concurrent delivery of the same event?
            async with self.uow_factory() as uow:
                if await uow.already_processed(self.spec.durable, envelope.event_id):
                    return
            raise

    async def _heartbeat(self, msg) -> None:
        """Long handlers keep the message theirs (no redelivery while working)."""
        while True:
            await asyncio.sleep(self.spec.ack_wait / 3)
            try:
                await msg.in_progress()
            except Exception:  # noqa: BLE001 - best effort
                return

    async def _dead_letter(self, msg, error: str, keep: int | None = None) -> None:
        """`keep`: how many bytes of the message are kept (all by default)."""
        letter = events_pb2.DeadLetter(
            consumer=self.spec.durable, subject=msg.subject, deliveries=msg.metadata.num_delivered,
            error=error[:2000], data=msg.data[:keep], headers={k: v[:1024] for k, v in (msg.headers or {}).items()},
        )
        await self.bus.publish(self.bus.names.deadletter_subject(self.spec.durable), letter.SerializeToString())
        metrics.DEAD_LETTERS.labels(self.spec.durable).inc()
        await msg.term()
