"""The outbox relay: publishes committed outbox rows to JetStream, in order,
each with Nats-Msg-Id = event id, and deletes them once the stream acked.

A crash between the publish and the delete publishes the row again after a
restart; the stream's duplicate window drops the copy, and consumers' inboxes
drop it after the window. On PostgreSQL several relays share the table with
FOR UPDATE SKIP LOCKED; on SQLite run one relay per service."""
from __future__ import annotations

import asyncio
import logging

import sqlalchemy as sa

from services.common.bus import EventBus
from services.common.db import Database

log = logging.getLogger(__name__)


class OutboxRelay:
    def __init__(self, db: Database, outbox: sa.Table, bus: EventBus, *, batch_size: int = 100,
                 poll_interval: float = 0.5):
        self.db = db
        self.outbox = outbox
        self.bus = bus
        self.batch_size = batch_size
        self.poll_interval = poll_interval
        self._wake = asyncio.Event()
        self._stopping = False

    def stop(self) -> None:
        """Finish the batch under way, then return from run()."""
        self._stopping = True
        self._wake.set()

    def notify(self) -> None:
        """Called after a commit that wrote outbox rows: relay now, not at the next poll."""
        self._wake.set()

    async def relay_once(self) -> int:
        """Publishes one batch; returns how many rows it published."""
        async with self.db.session() as session, session.begin():
            query = sa.select(self.outbox.c.seq, self.outbox.c.event_id, self.outbox.c.subject,
                              self.outbox.c.payload).order_by(self.outbox.c.seq).limit(self.batch_size)
            if self.db.is_postgres:
                query = query.with_for_update(skip_locked=True)
            rows = (await session.execute(query)).all()
            for row in rows:
                await self.bus.publish(row.subject, row.payload, msg_id=row.event_id)
            if rows:
                await session.execute(sa.delete(self.outbox).where(
                    self.outbox.c.seq.in_([row.seq for row in rows])))
            return len(rows)

    async def run(self) -> None:
        while not self._stopping:
            self._wake.clear()
            try:
                published = await self.relay_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - NATS or DB hiccup: retry later
                log.warning("outbox relay: %s; retrying", exc)
                published = 0
                await asyncio.sleep(self.poll_interval)
            if published == self.batch_size or self._stopping:
                continue
            # asyncio.timeout, not wait_for: in Python 3.11 wait_for can swallow
            # a cancellation that arrives as the event is set.
            try:
                async with asyncio.timeout(self.poll_interval):
                    await self._wake.wait()
            except TimeoutError:
                pass
