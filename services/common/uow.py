"""Unit of work: one database transaction in which a use case changes state
and records the events it causes. Events go to the outbox table in the same
transaction, so a state change and its event are stored together or not at
all; the relay publishes them after the commit."""
from __future__ import annotations

import datetime as dt
import functools
from collections.abc import Awaitable, Callable

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession

from services.common import tracing
from services.common.bus import Names
from services.common.changes import ChangeFeed
from services.common.db import Database
from services.common.events import Envelope


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


# Statements built once: building one costs more than running it on SQLite.
@functools.cache
def _insert(table: sa.Table) -> sa.Insert:
    return sa.insert(table)


@functools.cache
def _inbox_insert(inbox: sa.Table, postgres: bool):
    return (pg_insert if postgres else sqlite_insert)(inbox).on_conflict_do_nothing().returning(inbox.c.event_id)


@functools.cache
def _find_request(request_ids: sa.Table) -> sa.Select:
    return sa.select(request_ids.c.resource_id).where(request_ids.c.scope == sa.bindparam("scope"),
                                                      request_ids.c.request_id == sa.bindparam("request_id"))


CHANGES_CHANNEL = "ik_changes"
_NOTIFY = sa.text(f"SELECT pg_notify('{CHANGES_CHANNEL}', k) FROM unnest(CAST(:keys AS text[])) AS k")


class UnitOfWork:
    """Use as `async with uow_factory() as uow: ...; await uow.commit()`.
    Leaving the block without commit rolls back. Services subclass it to add
    their repositories in `_open()`."""

    def __init__(self, db: Database, outbox: sa.Table, inbox: sa.Table, names: Names,
                 on_commit: Callable[[list[tuple[str, str, bytes, str]]], None] | None = None,
                 changes: ChangeFeed | None = None, read_only: bool = False):
        self.db = db
        # A read-only unit of work reads in autocommit on PostgreSQL (one round trip
        # per statement, each statement its own snapshot): for answers that read one
        # thing, or several that need not agree to the instant. It never commits.
        self.read_only = read_only
        self._changes = changes
        self._touched: set[str] = set()  # ids whose followers wake at commit
        self._outbox = outbox
        self._inbox = inbox
        self._names = names
        self._on_commit = on_commit
        self._emitted: list[tuple[str, str, bytes, str]] = []  # outbox rows of this transaction
        self._after_commit: list[Callable[[], Awaitable[None]]] = []
        self.session: AsyncSession

    async def __aenter__(self):
        self.session = self.db.read_session() if self.read_only else self.db.session()
        await self.session.begin()
        self._open()
        return self

    def _open(self) -> None:
        """Hook for subclasses: build repositories on self.session."""

    async def __aexit__(self, exc_type, exc, tb) -> None:
        try:
            if self.session.in_transaction():
                await self.session.rollback()
        finally:
            await self.session.close()

    async def emit(self, envelope: Envelope) -> None:
        await self.enqueue(envelope.type, envelope.SerializeToString(), envelope.event_id)

    async def enqueue(self, unprefixed_subject: str, payload: bytes, message_id: str) -> None:
        """A message (an event, or e.g. a job dispatch to a work queue), sent
        through the outbox so it leaves only if this transaction commits."""
        subject = self._names.subject(unprefixed_subject)
        parent = tracing.traceparent()  # the message continues this trace
        await self.session.execute(_insert(self._outbox), dict(
            event_id=message_id, subject=subject, payload=payload, created_at=utcnow(), trace_context=parent or None))
        self._emitted.append((message_id, subject, payload, parent))

    async def already_processed(self, consumer: str, event_id: str) -> bool:
        """Records the event as processed by `consumer` unless it already was
        (one statement: an insert that does nothing on a known id). A
        concurrent duplicate waits for this transaction and then finds the id."""
        inserted = await self.session.scalar(_inbox_insert(self._inbox, self.db.is_postgres), dict(
            consumer=consumer, event_id=event_id, processed_at=utcnow()))
        return inserted is None

    async def find_request(self, scope: str, request_id: str) -> str | None:
        """The id of what an earlier create with this request_id made, if any."""
        if not request_id:
            return None
        return await self.session.scalar(_find_request(self._outbox.metadata.tables["request_ids"]),
                                         dict(scope=scope, request_id=request_id))

    async def remember_request(self, scope: str, request_id: str, resource_id: str) -> None:
        if request_id:
            await self.session.execute(_insert(self._outbox.metadata.tables["request_ids"]), dict(
                scope=scope, request_id=request_id, resource_id=resource_id, created_at=utcnow()))

    def touch(self, key: str) -> None:
        """Marks a followed id (workflow, resource, job) as changed by this
        transaction: its streams in this process wake once it commits."""
        self._touched.add(key)

    def after_commit(self, action: Callable[[], Awaitable[None]]) -> None:
        """Work that must happen only once the transaction is committed (e.g. a
        call to another service that starts a job for a state just stored).
        It runs at the end of commit(); its failures are its own to record."""
        self._after_commit.append(action)

    async def commit(self) -> None:
        if self.read_only:
            raise RuntimeError("a read-only unit of work cannot commit")
        if self._touched and self.db.is_postgres:
            # Replicas of this service on other machines wake their streams
            # too: NOTIFY is delivered when (and only if) this transaction commits.
            await self.session.execute(_NOTIFY, {"keys": sorted(self._touched)})
        await self.session.commit()
        emitted, self._emitted = self._emitted, []
        if emitted and self._on_commit is not None:
            self._on_commit(emitted)
        touched, self._touched = self._touched, set()
        if touched and self._changes is not None:
            self._changes.notify(touched)
        actions, self._after_commit = self._after_commit, []
        for action in actions:
            await action()

    async def rollback(self) -> None:
        await self.session.rollback()
        self._emitted = []
        self._after_commit = []
        self._touched = set()
