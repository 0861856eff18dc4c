"""The resource service's copy of the catalog it reads on every create and
job submission: templates and source code versions (owned by the blueprint
service) and which integrations exist (owned by the executor).

Templates and versions are kept current by the blueprint service's events,
which carry the whole entity after each change: an ordered push consumer
from the moment the service starts (no durable state, nothing written to the
database) puts each one in the cache or forgets it. What was not seen since
then is read through over gRPC on first use. Each entry remembers the
revision it holds, so a late event never replaces a newer read, and a
deleted entity is remembered as deleted so a read that started before the
delete does not bring it back.

An entry stored while the follower is subscribed never goes stale: every
later change reaches it as an event (the ordered consumer resumes after its
last sequence, so it misses none), which is what keeps the copy fresh, not
its age. `max_age` bounds only what was stored while no follower was
subscribed (before it started, or after it stopped), in case an event was
missed then; 0 turns the cache off.

Which integrations and storages exist has no events; an answer is reused
for at most a minute (the executor checks them again when a job is
submitted, so a deleted one fails the job with a clear error)."""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from nats.js.api import DeliverPolicy

from services.common.bus import EventBus
from services.common.events import Envelope, body_of
from services.common.signing import EventVerifier

log = logging.getLogger(__name__)

INTEGRATION_SECONDS = 60.0
_GONE = object()  # a deleted entity, remembered as such


def revision_of(etag: str) -> int:
    """The blueprint service's etags are '"<version>"' (formerly 'v<version>')."""
    try:
        return int(etag.strip('"').lstrip("v"))
    except ValueError:
        return 0


FOLLOWED = ("template", "version")  # the kinds the blueprint service's events keep current


class CatalogCache:
    def __init__(self, max_age: float):
        self.max_age = max_age
        self._entries: dict[tuple[str, str], tuple[float, int, Any]] = {}  # key -> (stored at, revision, value)
        self._followed_since: float | None = None  # when the follower subscribed; None while it is not

    def following(self, live: bool) -> None:
        """The follower subscribed (True) or stopped (False)."""
        self._followed_since = time.monotonic() if live else None

    def _fresh(self, key: tuple[str, str], stored_at: float, limit: float) -> bool:
        since = self._followed_since
        if since is not None and key[0] in FOLLOWED and stored_at >= since:
            return True  # kept current by events
        return time.monotonic() - stored_at < limit

    async def get(self, key: tuple[str, str], load: Callable[[], Awaitable[tuple[int, Any]]],
                  max_age: float | None = None) -> Any:
        """The cached value, or what `load` answers as (revision, value);
        None for something that does not exist."""
        limit = self.max_age if max_age is None else min(max_age, self.max_age)
        if limit <= 0:
            return (await load())[1]
        hit = self._entries.get(key)
        if hit is not None and self._fresh(key, hit[0], limit):
            return None if hit[2] is _GONE else hit[2]
        revision, value = await load()
        if value is not None:
            self._store(key, revision, value)
        return value

    def put(self, key: tuple[str, str], revision: int, value: Any) -> None:
        if self.max_age > 0:
            self._store(key, revision, value)

    def forget(self, key: tuple[str, str], revision: int) -> None:
        if self.max_age > 0:
            self._store(key, revision, _GONE)

    def _store(self, key: tuple[str, str], revision: int, value: Any) -> None:
        current = self._entries.get(key)
        if current is not None and current[1] > revision:
            return  # what we hold is newer
        self._entries[key] = (time.monotonic(), revision, value)


class CatalogFollower:
    """Applies the blueprint service's template and version events to the cache."""

    def __init__(self, bus: EventBus, cache: CatalogCache, template_info, version_info, verifier: EventVerifier):
        self.bus = bus
        self.verifier = verifier  # only the blueprint service's own events move the cache
        self.cache = cache
        self.template_info = template_info  # pb.Template -> TemplateInfo
        self.version_info = version_info  # pb.SourceCodeVersion -> VersionInfo
        self._sub = None

    async def start(self) -> None:
        names = self.bus.names
        self._sub = await self.bus.js.subscribe(
            names.subject("ik.blueprint.>"), stream=names.context_stream("blueprint"), cb=self._on_message,
            ordered_consumer=True, deliver_policy=DeliverPolicy.NEW, idle_heartbeat=5.0)
        self.cache.following(True)

    async def stop(self) -> None:
        self.cache.following(False)
        if self._sub is not None:
            try:
                await self._sub.unsubscribe()
            except Exception:  # noqa: BLE001 - the connection may be gone already
                pass
            self._sub = None

    async def _on_message(self, msg) -> None:
        if self.verifier.refuses(msg, "resource-catalog-follower"):
            return  # a forged catalog event would point later jobs at another module: dropped
        try:
            self.apply(Envelope.FromString(msg.data))
        except Exception as exc:  # noqa: BLE001 - a bad event must not stop the follower; entries age out
            log.warning("catalog event on %s not applied: %s", msg.subject, exc)

    def apply(self, env: Envelope) -> None:
        kind, body = body_of(env)
        if kind in ("template_created", "template_updated") and body.HasField("template"):
            self.cache.put(("template", body.template_id), revision_of(body.template.etag),
                           self.template_info(body.template))
        elif kind == "template_deleted":
            self.cache.forget(("template", body.template_id), revision_of(body.template.etag) + 1)
        elif kind in ("source_code_version_created", "source_code_version_updated") \
                and body.HasField("source_code_version"):
            self.cache.put(("version", body.source_code_version_id),
                           revision_of(body.source_code_version.etag), self.version_info(body.source_code_version))
        elif kind == "source_code_version_deleted":
            self.cache.forget(("version", body.source_code_version_id),
                              revision_of(body.source_code_version.etag) + 1)


async def follow(follower: CatalogFollower) -> None:
    """Background task: follows the catalog until cancelled."""
    while True:
        try:
            await follower.start()
            break
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - NATS not ready: reads go through gRPC meanwhile
            log.warning("cannot follow catalog events yet: %s", exc)
            await asyncio.sleep(2)
    try:
        await asyncio.Event().wait()
    finally:
        await follower.stop()
