"""The state of a pg storage reaches terraform through the executor: a job
never gets the database's connection string or a route to it.

For one run the executor moves the state in and out around terraform:
1. it locks the state in PostgreSQL (a session advisory lock on the row's
   id, as terraform's own pg backend takes it, so a terraform using that
   backend is kept out too; a key of the state's own while it has no row)
   and holds the lock for the whole run;
2. it writes the state into a file of that storage and state under the
   executor's work directory (`pg-states/<storage id>.<state name>/`, mode 600; the same path on every executor that
   shares IK_EXECUTOR_WORK_DIR, so a saved plan, which names its backend,
   applies on any of them), which terraform uses with its local backend;
3. when the run ends, whatever its outcome (a failed apply may have changed
   the state), it writes a changed file back to the same table terraform's
   pg backend uses (`<schema>.states`, one row per state path), removes the
   file and releases the lock.
A file left by an executor that was killed mid-run is written back when the
next run of that state starts, or when the executor starts, if it is newer
than the database's copy (same lineage, higher serial), and then removed."""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import time
from pathlib import Path

import psycopg
from psycopg import sql

log = logging.getLogger(__name__)

class StateLocked(Exception):
    """Another run holds the state longer than the lock timeout."""


def meta(text: str | bytes | None) -> tuple[int, str] | None:
    """(serial, lineage) of a state's text; None when there is none."""
    if not text:
        return None
    try:
        state = json.loads(text)
        return int(state.get("serial", 0)), str(state.get("lineage", ""))
    except (ValueError, AttributeError):
        return None


def newer(candidate: tuple[int, str] | None, stored: tuple[int, str] | None) -> bool:
    """Whether a file's state should replace the database's copy."""
    if candidate is None:
        return False
    if stored is None:
        return True
    return candidate[1] == stored[1] and candidate[0] > stored[0]


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def state_file(root: Path, storage_id: str, name: str) -> Path:
    """Where a run holds one state: a directory of its own per storage and
    state (`<storage id>.<state name>`), removed with the file."""
    return root / f"{storage_id}.{name}" / "terraform.tfstate"


def remove_files(path: Path) -> None:
    """The state file, what terraform writes beside it, and their directory."""
    for leftover in (path, path.with_name(path.name + ".backup"), path.with_name(".terraform.tfstate.lock.info")):
        leftover.unlink(missing_ok=True)
    try:
        path.parent.rmdir()
    except OSError:  # not empty (something else written there) or gone: left as it is
        pass


class PgState:
    """One run's hold on a pg storage's state; `async with` around the run."""

    def __init__(self, conninfo: str, schema: str, name: str, path: Path, lock_timeout: float):
        self.conninfo = conninfo
        self.schema = schema
        self.name = name
        self.path = path
        self.lock_timeout = lock_timeout
        self._conn: psycopg.AsyncConnection | None = None
        self._locks: list[int] = []
        self._moved_in: str | None = None

    @property
    def _table(self) -> sql.Composed:
        return sql.SQL("{}.states").format(sql.Identifier(self.schema))

    async def __aenter__(self) -> "PgState":
        self._conn = await psycopg.AsyncConnection.connect(self.conninfo, autocommit=True, connect_timeout=10)
        try:
            await self._ensure_table()
            await self._lock()
            await self._write_back_leftover()
            self._moved_in = await self._read()
            if self._moved_in:
                _write_private(self.path, self._moved_in)
            else:
                remove_files(self.path)
        except BaseException:
            await self._close()
            raise
        return self

    async def __aexit__(self, *exc) -> None:
        try:
            text = self.path.read_text() if self.path.exists() else None
            if text is not None and text != self._moved_in and meta(text) is not None:
                await self._write(text)
            remove_files(self.path)
        finally:
            await self._close()

    async def _ensure_table(self) -> None:
        # What terraform's pg backend creates (both read the same rows).
        await self._conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(self.schema)))
        await self._conn.execute(sql.SQL("CREATE TABLE IF NOT EXISTS {} (id SERIAL PRIMARY KEY, name TEXT, data TEXT)")
                                 .format(self._table))
        await self._conn.execute(sql.SQL("CREATE UNIQUE INDEX IF NOT EXISTS states_by_name ON {} (name)")
                                 .format(self._table))

    def _creation_key(self) -> int:
        """The lock of a state whose row does not exist yet: its own
        (negative, never a row's id), so first runs of different states do
        not wait for each other."""
        digest = hashlib.sha256(f"{self.schema}.{self.name}".encode()).digest()
        return -(int.from_bytes(digest[:7], "big") + 2)

    async def _try(self, key: int) -> bool:
        return (await (await self._conn.execute("SELECT pg_try_advisory_lock(%s)", (key,))).fetchone())[0]

    async def _row_id(self) -> int | None:
        row = await (await self._conn.execute(sql.SQL("SELECT id FROM {} WHERE name = %s").format(self._table),
                                              (self.name,))).fetchone()
        return row[0] if row is not None else None

    async def _lock(self) -> None:
        """The row's id (as terraform's pg backend locks a state), or, while
        there is no row, the state's creation key; a run that took the
        creation key and finds the row made meanwhile takes the row's too."""
        deadline = time.monotonic() + self.lock_timeout
        while True:
            held: list[int] = []
            row_id = await self._row_id()
            if row_id is not None:
                if await self._try(row_id):
                    held = [row_id]
            elif await self._try(key := self._creation_key()):
                held = [key]
                if (row_id := await self._row_id()) is not None:
                    if await self._try(row_id):
                        held.append(row_id)
                    else:
                        await self._conn.execute("SELECT pg_advisory_unlock(%s)", (key,))
                        held = []
            if held:
                self._locks = held
                return
            if time.monotonic() > deadline:
                raise StateLocked(f"the state {self.name} is locked by another run (waited "
                                  f"{self.lock_timeout:.0f}s)")
            await asyncio.sleep(0.5)

    async def _read(self) -> str | None:
        row = await (await self._conn.execute(sql.SQL("SELECT data FROM {} WHERE name = %s").format(self._table),
                                              (self.name,))).fetchone()
        return row[0] if row is not None else None

    async def _write(self, text: str) -> None:
        await self._conn.execute(sql.SQL("INSERT INTO {} (name, data) VALUES (%s, %s) ON CONFLICT (name) "
                                         "DO UPDATE SET data = EXCLUDED.data").format(self._table),
                                 (self.name, text))

    async def _write_back_leftover(self) -> None:
        """A file a killed run left: written back when newer, then removed."""
        if not self.path.exists():
            return
        text = self.path.read_text()
        if newer(meta(text), meta(await self._read())):
            log.warning("state %s: writing back what a run that was killed left on disk (serial %s)",
                        self.name, meta(text)[0])
            await self._write(text)
        remove_files(self.path)

    async def _close(self) -> None:
        if self._conn is None:
            return
        try:
            for key in self._locks:
                await self._conn.execute("SELECT pg_advisory_unlock(%s)", (key,))
        except psycopg.Error:
            pass  # the session's end releases them
        finally:
            self._locks = []
            await self._conn.close()
            self._conn = None


async def write_back_leftovers(states_root: Path, storages: dict, lock_timeout: float) -> None:
    """At the executor's start: every state file under `states_root` (see
    state_file) that a killed run left is written back (when newer) and
    removed. `storages`: id -> Storage."""
    if not states_root.is_dir():
        return
    for state in states_root.glob("*/terraform.tfstate"):
        storage_id, _, name = state.parent.name.partition(".")
        storage = storages.get(storage_id)
        if storage is None or not name:
            continue
        try:
            async with PgState(storage.pg_connection_string, storage.pg_schema, name, state, lock_timeout):
                pass  # entering writes a newer leftover back; leaving removes the file
        except (psycopg.Error, StateLocked, OSError) as exc:
            log.warning("state %s of storage %s left on disk: not written back yet: %s", name, storage_id,
                        type(exc).__name__)
