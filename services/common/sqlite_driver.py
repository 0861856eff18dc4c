"""SQLite connections for the async engine with one thread round trip per
statement.

aiosqlite runs every sqlite3 call on the connection's own thread and wakes
the event loop when it is done. SQLAlchemy's aiosqlite adapter makes four
such round trips for one SELECT (open a cursor, execute, fetch, close) and
three for a write; each costs about 0.1 ms of thread and loop wake-ups, and
a step dispatch runs some sixty statements across the services. The cursor
here opens, executes, fetches and closes in a single call on that thread and
keeps what SQLAlchemy reads afterwards (description, rowcount, lastrowid,
rows). Everything else (connect, commit, rollback, close, the thread) is
aiosqlite's own.

Server-side cursors (`stream()`) are not used by the services and are not
supported here."""
from __future__ import annotations

import sqlite3
from typing import Any

import aiosqlite
import sqlalchemy as sa
from sqlalchemy.dialects.sqlite.aiosqlite import SQLiteDialect_aiosqlite


class OneHopCursor:
    """The parts of aiosqlite's Cursor that SQLAlchemy's adapter uses."""

    arraysize = 1

    def __init__(self, connection: aiosqlite.Connection):
        self._connection = connection
        self.description: Any = None
        self.rowcount = -1
        self.lastrowid: int | None = None
        self._rows: list = []

    async def __aenter__(self) -> "OneHopCursor":
        return self

    async def __aexit__(self, *exc) -> None:
        return None

    def _run(self, method: str, sql: str, parameters: Any) -> tuple:
        """Runs on the connection's thread."""
        cursor = self._connection._conn.cursor()
        try:
            getattr(cursor, method)(sql, parameters)
            rows = cursor.fetchall() if cursor.description else []
            return cursor.description, cursor.rowcount, cursor.lastrowid, rows
        finally:
            cursor.close()

    async def _call(self, method: str, sql: str, parameters: Any) -> "OneHopCursor":
        self.description, self.rowcount, self.lastrowid, self._rows = await self._connection._execute(
            self._run, method, sql, parameters)
        return self

    async def execute(self, sql: str, parameters: Any = ()) -> "OneHopCursor":
        return await self._call("execute", sql, () if parameters is None else parameters)

    async def executemany(self, sql: str, seq_of_parameters: Any) -> "OneHopCursor":
        return await self._call("executemany", sql, seq_of_parameters)

    async def fetchall(self) -> list:
        rows, self._rows = self._rows, []
        return rows

    async def close(self) -> None:
        return None  # closed on the thread right after it ran


class OneHopConnection(aiosqlite.Connection):
    def cursor(self) -> OneHopCursor:  # type: ignore[override]
        # SQLAlchemy enters the cursor with `await cursor.__aenter__()`; no
        # round trip is needed to make one.
        return OneHopCursor(self)


def async_creator(url: sa.URL):
    """For create_async_engine(async_creator=...): the same connect
    arguments SQLAlchemy's aiosqlite dialect would use."""
    args, kwargs = SQLiteDialect_aiosqlite().create_connect_args(url)

    async def connect() -> OneHopConnection:
        connection = OneHopConnection(lambda: sqlite3.connect(*args, **kwargs), iter_chunk_size=64)
        connection._thread.daemon = True  # as SQLAlchemy does: never hold up interpreter exit
        return await connection

    return connect
