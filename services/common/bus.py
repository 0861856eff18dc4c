"""NATS JetStream: connection, idempotent stream set-up and publishing.

One stream per bounded context (IK_BLUEPRINT, ... with subjects
ik.<context>.>), one dead-letter stream, and, for the executor, a work-queue
stream for job dispatch. A non-empty event prefix (IK_EVENT_PREFIX) namespaces
all of them, e.g. prefix "t1a2" gives stream T1A2_IK_EXECUTOR and subjects
t1a2.ik.executor.>, so parallel deployments or test runs never collide."""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import nats
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import BadRequestError, NotFoundError, ServiceUnavailableError

from services.common import tracing
from services.common.config import SERVICES

log = logging.getLogger(__name__)

DUPLICATE_WINDOW_SECONDS = 120.0
EVENT_RETENTION_SECONDS = 7 * 24 * 3600.0


@dataclass(frozen=True)
class Names:
    prefix: str = ""

    def subject(self, unprefixed: str) -> str:
        return f"{self.prefix}.{unprefixed}" if self.prefix else unprefixed

    def unprefixed(self, subject: str) -> str:
        if self.prefix and subject.startswith(self.prefix + "."):
            return subject[len(self.prefix) + 1:]
        return subject

    def stream(self, name: str) -> str:
        return f"{self.prefix.upper()}_{name}" if self.prefix else name

    def context_stream(self, context: str) -> str:
        return self.stream(f"IK_{context.upper()}")

    def context_subjects(self, context: str) -> str:
        return self.subject(f"ik.{context}.>")

    @property
    def deadletter_stream(self) -> str:
        return self.stream("IK_DEADLETTER")

    def deadletter_subject(self, consumer: str) -> str:
        return self.subject(f"ik.deadletter.{consumer}")


class EventBus:
    def __init__(self, nats_url: str, prefix: str = "", client_name: str = "infrakitchen",
                 connect_options: dict | None = None, replicas: int = 1, signer=None):
        self.nats_url = nats_url
        # Copies of each stream in a JetStream cluster (IK_STREAM_REPLICAS; 3 in a
        # 3-node cluster): a stream survives the loss of a minority of nodes.
        self.replicas = replicas
        self.names = Names(prefix)
        self.client_name = client_name
        self.connect_options = dict(connect_options or {})  # TLS and credentials (services.common.tls)
        self.nc: nats.NATS | None = None
        self.js: JetStreamContext | None = None
        # Signs every message this bus publishes (services.common.signing.EventSigner):
        # consumers refuse an event its subject's owner did not sign.
        self.signer = signer

    async def connect(self, attempts: int = 30, delay: float = 1.0) -> None:
        last: Exception | None = None
        for attempt in range(1, attempts + 1):
            try:
                # IK_NATS_URL may name several servers of a cluster, comma-separated: the
                # client connects to one and moves to another when it goes away.
                self.nc = await nats.connect(
                    servers=[u.strip() for u in self.nats_url.split(",") if u.strip()], name=self.client_name, connect_timeout=2,
                    max_reconnect_attempts=-1, reconnect_time_wait=1, drain_timeout=3, **self.connect_options,
                )
                self.js = self.nc.jetstream(timeout=5)
                return
            except Exception as exc:  # noqa: BLE001 - any connect failure is retried
                last = exc
                log.warning("NATS at %s not reachable (attempt %d/%d): %s", self.nats_url, attempt, attempts, exc)
                await asyncio.sleep(delay)
        raise RuntimeError(f"cannot connect to NATS at {self.nats_url}: {last}")

    @property
    def max_payload(self) -> int:
        """The largest message the connected server accepts (0 when not connected)."""
        return self.nc.max_payload if self.nc is not None and self.nc.is_connected else 0

    async def ensure_stream(self, config: StreamConfig, attempts: int = 10, update: bool = True) -> None:
        """Creates the stream, or brings an existing one to this config (its
        replicas included: every replica of every service may call this at once).
        `update=False`: only created when missing (a stream of another service,
        whose NATS identity alone may change it). A cluster still electing the
        new stream's leader answers late: asked again."""
        assert self.js is not None
        config.num_replicas = self.replicas
        for attempt in range(1, attempts + 1):
            try:
                return await self._ensure_stream(config, update)
            except (nats.errors.TimeoutError, ServiceUnavailableError) as exc:
                if attempt == attempts:
                    raise
                log.warning("stream %s: JetStream did not answer (%s); asking again", config.name,
                            type(exc).__name__)
                await asyncio.sleep(min(attempt, 3))

    async def _ensure_stream(self, config: StreamConfig, update: bool) -> None:
        try:
            info = await self.js.stream_info(config.name)
        except NotFoundError:
            try:
                await self.js.add_stream(config)
                log.info("created stream %s (%s)", config.name, ", ".join(config.subjects or []))
                return
            except BadRequestError:  # another replica created it a moment ago: bring it to this config
                info = await self.js.stream_info(config.name)
        if not _differs(info.config, config):
            return  # as wanted: no update (ten replicas starting at once would each ask the cluster)
        if not update:
            log.info("stream %s differs from this service's idea of it; its owner brings it up to date",
                     config.name)
            return
        await self.js.update_stream(config)

    async def ensure_event_streams(self, contexts: tuple[str, ...] = SERVICES, owner: str | None = None) -> None:
        """Every context's stream and the dead letters'. `owner`: the service
        calling, which brings only its own stream up to date and creates the
        others when missing (services start in any order); None: all of them."""
        for context in contexts:
            await self.ensure_stream(update=owner is None or owner == context, config=StreamConfig(
                name=self.names.context_stream(context),
                subjects=[self.names.context_subjects(context)],
                retention=RetentionPolicy.LIMITS,
                storage=StorageType.FILE,
                max_age=EVENT_RETENTION_SECONDS,
                duplicate_window=DUPLICATE_WINDOW_SECONDS,
                discard=DiscardPolicy.OLD,
            ))
        await self.ensure_stream(update=owner is None, config=StreamConfig(
            name=self.names.deadletter_stream,
            subjects=[self.names.subject("ik.deadletter.>")],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            max_age=30 * 24 * 3600.0,
        ))

    async def publish(self, subject: str, payload: bytes, msg_id: str | None = None,
                      headers: dict[str, str] | None = None) -> None:
        """Publishes to a prefixed subject and waits for the stream's ack."""
        assert self.js is not None
        hdrs = dict(headers or {})
        if msg_id:
            hdrs["Nats-Msg-Id"] = msg_id
        if self.signer is not None:
            hdrs.update(self.signer.headers(subject, payload))
        await self.js.publish(subject, payload, headers=hdrs or None)

    async def publish_in_order(self, messages: list[tuple[str, bytes, str, str]], timeout: float = 5.0) -> None:
        """Publishes (subject, payload, msg_id, traceparent) messages in this order without
        waiting for each ack before sending the next; returns once the streams
        acked them all, raises if any was refused or unacked in time."""
        assert self.js is not None
        acks = []
        try:
            for subject, payload, msg_id, parent in messages:
                headers = tracing.message_headers(msg_id, parent)
                if self.signer is not None:
                    headers.update(self.signer.headers(subject, payload))
                acks.append(await self.js.publish_async(subject, payload, headers=headers))
            async with asyncio.timeout(timeout):
                await asyncio.gather(*acks)
        finally:
            for ack in acks:  # frees the client's slot of an ack that never came
                if not ack.done():
                    ack.cancel()

    async def delete_streams(self) -> None:
        """Removes every stream of this prefix (test clean-up)."""
        assert self.js is not None
        if not self.names.prefix:
            raise RuntimeError("refusing to delete un-prefixed (production) streams")
        prefix = self.names.stream("IK_")
        for info in await self.js.streams_info():
            if info.config.name.startswith(prefix):
                await self.js.delete_stream(info.config.name)

    async def close(self) -> None:
        if self.nc is not None and not self.nc.is_closed:
            try:
                await self.nc.drain()
            except Exception:  # noqa: BLE001 - closing anyway
                await self.nc.close()


def _differs(current: StreamConfig, wanted: StreamConfig) -> bool:
    """Whether a stream's config differs from the wanted one in what we set."""
    for name in ("subjects", "retention", "storage", "max_age", "duplicate_window", "discard", "num_replicas"):
        have, want = getattr(current, name), getattr(wanted, name)
        if want is None:
            continue
        if name == "subjects":
            have, want = sorted(have or []), sorted(want)
        elif name in ("max_age", "duplicate_window"):
            have, want = round(have or 0, 3), round(want, 3)
        if have != want:
            return True
    return False
