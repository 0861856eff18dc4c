"""The outbox relay: publishes committed outbox rows to JetStream, in order,
each with Nats-Msg-Id = event id, and deletes them once the stream acked.

Two ways in, one task doing the publishing (so order is kept):
- the fast path: a unit of work that committed rows hands them over at once
  (`notify(rows)`), and the relay publishes them from memory without reading
  the table first; this is the way of every event on a step dispatch;
- the table: at start, after any publishing failure and every poll interval
  the relay reads the table in `seq` order, which covers rows of a crashed
  process, of another process sharing the database, and failures.
The fast path is used only while the table holds nothing older (after a
drained read), so an event never overtakes an older one waiting there.

The rows published from memory are deleted together, later: once the relay
was idle for DELETE_WHEN_IDLE_FOR, before any read of the table (which would
find them again), and under continuous load once DELETE_BATCH of them wait
or the oldest was published DELETE_WITHIN ago (then the table is read as
well, so a busy relay still looks at it that often). While the fast path is
in use (the last read drained the table) the table is read after
`drained_poll_interval` of quiet; after a failure, until a read drains it
again, after `poll_interval`.

A crash between the publish and the delete publishes the row again after a
restart; the stream's duplicate window (bus.DUPLICATE_WINDOW_SECONDS, 2
minutes, far longer than DELETE_WITHIN) drops the copy, and consumers'
inboxes drop it after the window. On PostgreSQL several relays share the
table with FOR UPDATE SKIP LOCKED; on SQLite run one relay per service."""
from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Iterable

import sqlalchemy as sa
from nats.errors import MaxPayloadError

from infrakitchen.events.v1 import events_pb2
from services.common import metrics
from services.common.bus import EventBus
from services.common.db import Database

log = logging.getLogger(__name__)

# Room left in a dead letter for the envelope around the refused event's first bytes.
DEAD_LETTER_DATA_BYTES = 64 * 1024

# Rows published from memory are deleted in one transaction once the relay has
# had nothing new to publish for this many seconds (one delete covers every
# commit of a burst, e.g. the several steps of a busy workflow) ...
DELETE_WHEN_IDLE_FOR = 1.0
# ... and under continuous load once this many wait (one statement's worth,
# within SQLite's oldest limit of 999 bound parameters) ...
DELETE_BATCH = 500
# ... or the oldest of them was published this many seconds ago: a crash
# republishes at most that much, well inside the stream's duplicate window.
DELETE_WITHIN = 5.0
# The table is read after this many seconds of quiet while the fast path is in
# use (it covers rows no commit of this process handed over: another replica's
# that died, a commit without a relay); every poll_interval otherwise.
DRAINED_POLL_INTERVAL = 2.0

# (event id, prefixed subject, payload, traceparent or "")
OutboxRow = tuple[str, str, bytes, str]
# (prefixed subject, payload, event id, traceparent or "")
Message = tuple[str, bytes, str, str]


class OutboxRelay:
    def __init__(self, db: Database, outbox: sa.Table, bus: EventBus, *, batch_size: int = 100,
                 poll_interval: float = 0.5, drained_poll_interval: float | None = None, name: str = "outbox"):
        self.db = db
        self.outbox = outbox
        self.bus = bus
        self.batch_size = batch_size
        self.poll_interval = poll_interval
        self.drained_poll_interval = max(poll_interval, DRAINED_POLL_INTERVAL if drained_poll_interval is None
                                         else drained_poll_interval)
        self._wake = asyncio.Event()
        self._stopping = False
        self._ready: OrderedDict[str, OutboxRow] = OrderedDict()
        self._table_drained = False  # nothing older than the fast-path rows waits in the table
        self._published: list[str] = []  # published from memory, deleted later together
        self._delete_by = 0.0  # loop time by which the published rows are deleted, even under load
        self.name = name  # the dead-letter subject is ik.deadletter.<name>
        # Built once: building a statement costs more than running it on SQLite.
        read = sa.select(outbox.c.seq, outbox.c.event_id, outbox.c.subject, outbox.c.payload,
                         outbox.c.trace_context).order_by(outbox.c.seq).limit(batch_size)
        self._read = read.with_for_update(skip_locked=True) if db.is_postgres else read
        self._delete_seqs = sa.delete(outbox).where(outbox.c.seq.in_(sa.bindparam("seqs", expanding=True)))
        self._delete_ids = sa.delete(outbox).where(outbox.c.event_id.in_(sa.bindparam("ids", expanding=True)))

    def stop(self) -> None:
        """Finish the batch under way, then return from run()."""
        self._stopping = True
        self._wake.set()

    def notify(self, rows: Iterable[OutboxRow] = ()) -> None:
        """Called after a commit that wrote outbox rows: relay now, not at the
        next poll, and without reading back what the caller just wrote."""
        for row in rows:
            self._ready[row[0]] = row
        self._wake.set()

    async def relay_once(self) -> int:
        """Publishes one batch read from the table; returns how many rows it published."""
        await self._delete_published()  # else the read finds them again
        async with self.db.session() as session, session.begin():
            rows = (await session.execute(self._read)).all()
            if rows:
                await self._publish([(row.subject, row.payload, row.event_id, row.trace_context or "")
                                     for row in rows])
                await session.execute(self._delete_seqs, {"seqs": [row.seq for row in rows]})
            for row in rows:
                self._ready.pop(row.event_id, None)
            return len(rows)

    async def _relay_ready(self) -> int:
        """Publishes the rows handed over by commits; they are deleted later,
        together (the delete is off the way of whatever the events set
        going, and one delete covers many commits)."""
        rows = list(self._ready.values())
        await self._publish([(subject, payload, event_id, parent) for event_id, subject, payload, parent in rows])
        if rows and not self._published:
            self._delete_by = asyncio.get_running_loop().time() + DELETE_WITHIN
        for event_id, _, _, _ in rows:
            self._ready.pop(event_id, None)
            self._published.append(event_id)
        return len(rows)

    async def _publish(self, messages: list[Message]) -> None:
        """Publishes in order; a message NATS refuses for good (larger than
        the server's max payload) is dead-lettered instead, with an error in
        the log, so it never holds back the events after it."""
        limit = self.bus.max_payload
        refused = [m for m in messages if limit and len(m[1]) > limit]
        if refused:
            await self._dead_letter(refused, f"maximum payload exceeded (over {limit} bytes)")
            messages = [m for m in messages if not (limit and len(m[1]) > limit)]
        try:
            await self.bus.publish_in_order(messages)
            metrics.OUTBOX_PUBLISHED.labels(self.name).inc(len(messages))
        except MaxPayloadError:
            # The server's limit is lower than the one known at connect: one by one.
            for message in messages:
                try:
                    await self.bus.publish_in_order([message])
                except MaxPayloadError:
                    await self._dead_letter([message], "maximum payload exceeded")

    async def _dead_letter(self, messages: list[Message], error: str) -> None:
        for subject, payload, event_id, _ in messages:
            log.error("outbox relay: event %s on %s (%d bytes) refused by NATS for good: %s; dead-lettered to %s",
                      event_id, subject, len(payload), error, self.bus.names.deadletter_subject(self.name))
            letter = events_pb2.DeadLetter(consumer=self.name, subject=subject, deliveries=0, error=error,
                                           data=payload[:DEAD_LETTER_DATA_BYTES], headers={"Nats-Msg-Id": event_id})
            await self.bus.publish(self.bus.names.deadletter_subject(self.name), letter.SerializeToString(),
                                   msg_id=f"dead-{event_id}")
            metrics.DEAD_LETTERS.labels(self.name).inc()

    async def _delete_published(self) -> None:
        if not self._published:
            return
        ids = self._published[:]
        async with self.db.session() as session, session.begin():
            for start in range(0, len(ids), DELETE_BATCH):
                await session.execute(self._delete_ids, {"ids": ids[start:start + DELETE_BATCH]})
        del self._published[:len(ids)]
        if self._published:  # published while the delete ran
            self._delete_by = asyncio.get_running_loop().time() + DELETE_WITHIN

    def _round_due(self) -> bool:
        """Under continuous load: DELETE_BATCH published rows wait, or the
        oldest was published DELETE_WITHIN ago."""
        return bool(self._published) and (len(self._published) >= DELETE_BATCH
                                          or asyncio.get_running_loop().time() >= self._delete_by)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._stopping:
            self._wake.clear()
            try:
                if self._ready and self._table_drained:
                    published = 0
                    # The commit that woke us may have started more work (e.g. a call
                    # to the next service on a step's way to its job): let it go first.
                    await asyncio.sleep(0)
                    await self._relay_ready()
                else:
                    published = await self.relay_once()
                    self._table_drained = published < self.batch_size
                if self._round_due():  # busy: the published rows deleted, and a look at the table
                    published = await self.relay_once()
                    self._table_drained = published < self.batch_size
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - NATS or DB hiccup: retry from the table later
                # Some NATS errors (a timeout, a reconnect) carry no message: name the type.
                log.warning("outbox relay: %s: %s; retrying", type(exc).__name__, str(exc) or "(no detail)")
                self._table_drained = False
                published = 0
                await asyncio.sleep(self.poll_interval)
            if published == self.batch_size or self._stopping or (self._ready and self._table_drained):
                continue
            # Quiet: the published rows are deleted once nothing new came for
            # DELETE_WHEN_IDLE_FOR, and the table is read once nothing came for
            # the poll interval (the long one while the fast path is in use; the
            # short one after a failure, until a read drained the table again).
            # asyncio.timeout, not wait_for: in Python 3.11 wait_for can swallow
            # a cancellation that arrives as the event is set.
            poll_at = loop.time() + (self.drained_poll_interval if self._table_drained else self.poll_interval)
            while not self._wake.is_set():
                delete = bool(self._published) and loop.time() + DELETE_WHEN_IDLE_FOR < poll_at
                try:
                    async with asyncio.timeout(DELETE_WHEN_IDLE_FOR if delete else poll_at - loop.time()):
                        await self._wake.wait()
                except TimeoutError:
                    pass
                if self._wake.is_set() or not delete:
                    break
                try:
                    await self._delete_published()
                except Exception as exc:  # noqa: BLE001 - kept for the next try; a restart republishes (deduplicated)
                    log.warning("outbox relay: deleting published rows: %s", exc)
        try:
            await self._delete_published()
        except Exception as exc:  # noqa: BLE001 - the next start republishes them; the stream drops the copies
            log.warning("outbox relay: deleting published rows at stop: %s", exc)
