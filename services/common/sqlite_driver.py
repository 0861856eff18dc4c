"""SQLite connections for the async engine that run each statement on the
event loop's own thread, with one writer at a time per process.

Why not aiosqlite's thread: a statement on a local SQLite file takes some
microseconds, but handing it to a thread and back costs a thread wake-up, a
loop wake-up and, whenever the loop is busy, a wait for the GIL of up to its
5 ms switch interval. On a step dispatch (some sixty statements across the
services) that hand-off, not SQLite, was most of the database time.

What could block the loop instead is the write lock, so nothing here waits
for it inside SQLite (busy_timeout is 0):
- writers of one process queue on an asyncio lock, taken before the first
  write of a transaction and released at its commit or rollback, so they
  never meet inside SQLite and a waiter wakes the moment the lock is free;
- a writer of another process sharing the file (e.g. a second executor)
  makes SQLite answer "database is locked" at once; the statement (which had
  no effect) is retried after an asyncio sleep, for up to BUSY_TIMEOUT.

pysqlite's own transaction handling stays as it is: reads outside a
transaction run on their own, a write opens the transaction (BEGIN), so a
transaction holds the write lock only from its first write to its end.

Server-side cursors (`stream()`) are not used by the services and are not
supported here."""
from __future__ import annotations

import asyncio
import sqlite3
import time
from typing import Any

import aiosqlite
import sqlalchemy as sa
from sqlalchemy.dialects.sqlite.aiosqlite import SQLiteDialect_aiosqlite

BUSY_TIMEOUT = 30.0  # seconds a statement waits for another process's write lock
_WRITES = ("INSERT", "UPDATE", "DELETE", "REPLAC")


def _is_write(sql: str) -> bool:
    return sql.lstrip()[:6].upper() in _WRITES


class WriterLock:
    """One writing transaction at a time among a process's connections to one
    database file, handed over in arrival order."""

    def __init__(self) -> None:
        self._lock = asyncio.Lock()

    async def acquire(self) -> None:
        try:
            async with asyncio.timeout(BUSY_TIMEOUT):
                await self._lock.acquire()
        except TimeoutError:
            raise sqlite3.OperationalError("database is locked (no write turn within "
                                           f"{BUSY_TIMEOUT:g}s)") from None

    def release(self) -> None:
        self._lock.release()


async def _retry_busy(fn, *args):
    """Runs fn now; while another process holds the write lock, again after
    a short asyncio sleep."""
    deadline = time.monotonic() + BUSY_TIMEOUT
    delay = 0.001
    while True:
        try:
            return fn(*args)
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc):
                raise
            if time.monotonic() >= deadline:
                raise
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.05)


class _Inline:
    """Stands in for aiosqlite's queue to its thread (SQLAlchemy's adapter
    puts a few calls there directly): runs them at once."""

    @staticmethod
    def put_nowait(item) -> None:
        future, function = item
        try:
            result = function()
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting future
            if future is not None and not future.done():
                future.set_exception(exc)
            return
        if future is not None and not future.done():
            future.set_result(result)


class InlineCursor:
    """The parts of aiosqlite's Cursor that SQLAlchemy's adapter uses."""

    arraysize = 1

    def __init__(self, connection: "InlineConnection"):
        self._connection = connection
        self.description: Any = None
        self.rowcount = -1
        self.lastrowid: int | None = None
        self._rows: list = []

    async def __aenter__(self) -> "InlineCursor":
        return self

    async def __aexit__(self, *exc) -> None:
        return None

    def _run(self, method: str, sql: str, parameters: Any) -> None:
        cursor = self._connection._conn.cursor()
        try:
            getattr(cursor, method)(sql, parameters)
            self._rows = cursor.fetchall() if cursor.description else []
            self.description, self.rowcount, self.lastrowid = cursor.description, cursor.rowcount, cursor.lastrowid
        finally:
            cursor.close()

    async def _call(self, method: str, sql: str, parameters: Any) -> "InlineCursor":
        connection = self._connection
        if _is_write(sql) and not connection._holds_writer:
            await connection._writer.acquire()
            connection._holds_writer = True
        try:
            await _retry_busy(self._run, method, sql, parameters)
        finally:
            connection._release_if_idle()
        return self

    async def execute(self, sql: str, parameters: Any = ()) -> "InlineCursor":
        return await self._call("execute", sql, () if parameters is None else parameters)

    async def executemany(self, sql: str, seq_of_parameters: Any) -> "InlineCursor":
        return await self._call("executemany", sql, seq_of_parameters)

    async def fetchall(self) -> list:
        rows, self._rows = self._rows, []
        return rows

    async def close(self) -> None:
        return None


class InlineConnection(aiosqlite.Connection):
    """aiosqlite's Connection without its thread."""

    def __init__(self, connector, writer: WriterLock):
        super().__init__(connector, iter_chunk_size=64)
        self._tx = _Inline()  # type: ignore[assignment]
        self._writer = writer
        self._holds_writer = False

    def __await__(self):
        return self._connect().__await__()

    async def _connect(self) -> "InlineConnection":
        if self._connection is None:
            self._connection = self._connector()
        return self

    async def _execute(self, fn, *args, **kwargs):
        if not self._running or not self._connection:
            raise ValueError("Connection closed")
        try:
            return await _retry_busy(lambda: fn(*args, **kwargs))
        finally:
            self._release_if_idle()

    def _release_if_idle(self) -> None:
        """The transaction ended (commit, rollback, or a write that failed
        before it began one): the next writer's turn."""
        if self._holds_writer and (self._connection is None or not self._connection.in_transaction):
            self._holds_writer = False
            self._writer.release()

    def cursor(self) -> InlineCursor:  # type: ignore[override]
        return InlineCursor(self)

    def stop(self):
        self._running = False
        if self._connection is not None:
            self._connection.close()
            self._connection = None
        self._release_if_idle()
        return None

    async def close(self) -> None:
        self.stop()


def async_creator(url: sa.URL, writer: WriterLock):
    """For create_async_engine(async_creator=...): the same connect
    arguments SQLAlchemy's aiosqlite dialect would use, and one writer lock
    shared by the engine's connections (and the WAL's checkpoints, see
    Database.checkpoints)."""
    args, kwargs = SQLiteDialect_aiosqlite().create_connect_args(url)
    kwargs = {**kwargs, "check_same_thread": False, "timeout": 0}

    async def connect() -> InlineConnection:
        connection = InlineConnection(lambda: sqlite3.connect(*args, **kwargs), writer)
        return await connection

    return connect
