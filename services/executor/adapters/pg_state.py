"""The state of a pg storage reaches terraform through the executor: a job
never gets the database's connection string or a route to it.

For one run the executor moves the state in and out around terraform:
1. it locks the state in PostgreSQL (a session advisory lock on a key of the
   storage's schema and the state's name, on a connection with TCP
   keepalives) and holds the lock for the whole run;
2. it writes the state into a file in a directory made afresh for that storage
   and state under the executor's work directory
   (`pg-states/<storage id>.<state name>/terraform.tfstate`, mode 600; the
   same path on every executor that shares IK_EXECUTOR_WORK_DIR, so a saved
   plan, which names its backend, applies on any of them), which terraform
   uses with its local backend; beside that directory, where the job cannot
   write, a record of what the database held (`<dir>.json`: serial and
   lineage) is the base of every write;
3. while the run goes (every SYNC_SECONDS) and when it ends, whatever its
   outcome (a failed apply may have changed the state), a changed file goes
   back to the same table terraform's pg backend uses (`<schema>.states`, one
   row per state), in a transaction that first checks the row still holds the
   recorded base (compare and set); then the directory and the record are
   removed and the lock released. A plan job's run writes nothing back.

The job can write that directory: the executor reads a file there only as a
regular file (no symlink, FIFO or device; O_NOFOLLOW, O_NONBLOCK), at most
MAX_STATE_BYTES, off the event loop, and creates the directory and the file
itself before the job runs. A file that is not a state is not written back.

A file left by an executor that was killed mid-run is written back when the
next run of that state starts, or when the executor starts, if the row still
holds the base its record names (and the file is newer: same lineage, higher
serial); a file that does not fit (the row moved on meanwhile) is kept aside
in `pg-states/.conflicts/` (mode 600) with an error in the log, for an
operator, and never written over the newer row."""
from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import errno
import hashlib
import json
import logging
import os
import shutil
import stat
import time
from pathlib import Path

import psycopg
from psycopg import sql

log = logging.getLogger(__name__)

MAX_STATE_BYTES = 256 * 1024 * 1024
SYNC_SECONDS = 10.0
STATE_FILE = "terraform.tfstate"
CONFLICTS = ".conflicts"


class StateLocked(Exception):
    """Another run holds the state longer than the lock timeout."""


def meta(text: str | bytes | None) -> tuple[int, str] | None:
    """(serial, lineage) of a state's text; None when it is not a state."""
    if not text:
        return None
    try:
        state = json.loads(text)
    except (ValueError, RecursionError):
        return None
    if not isinstance(state, dict):
        return None
    serial, lineage = state.get("serial", 0), state.get("lineage", "")
    if isinstance(serial, bool) or not isinstance(serial, int) or not 0 <= serial < 2 ** 63 \
            or not isinstance(lineage, str) or len(lineage) > 200:
        return None
    return serial, lineage


def newer(candidate: tuple[int, str] | None, base: tuple[int, str] | None) -> bool:
    """Whether a file's state may replace `base` (what the row holds)."""
    if candidate is None:
        return False
    if base is None:
        return True
    return candidate[1] == base[1] and candidate[0] > base[0]


def read_regular(path: Path) -> str | None:
    """A file the job could have replaced: its text when it is a regular file
    of at most MAX_STATE_BYTES; None otherwise (or when there is none).
    Blocking: call it on a thread."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno not in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
            log.warning("state file %s cannot be opened: %s", path.name, exc.strerror)
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            log.warning("state file %s is not a regular file: ignored", path.name)
            return None
        if info.st_size > MAX_STATE_BYTES:
            log.warning("state file %s is larger than %d bytes: ignored", path.name, MAX_STATE_BYTES)
            return None
        chunks, left = [], MAX_STATE_BYTES + 1
        while chunk := os.read(fd, min(left, 1 << 20)):
            chunks.append(chunk)
            left -= len(chunk)
            if left <= 0:
                return None
        return b"".join(chunks).decode("utf-8", errors="replace")
    finally:
        os.close(fd)


def state_file(root: Path, storage_id: str, name: str) -> Path:
    """Where a run holds one state (see the module's docstring)."""
    return root / f"{storage_id}.{name}" / STATE_FILE


def left_on_disk(root: Path) -> list[tuple[str, str, Path]]:
    """(storage id, state name, state file) of every run's directory under
    `root` (state_file's), left there by runs that were killed."""
    if not root.is_dir():
        return []
    found = []
    for directory in root.iterdir():
        if directory.name.startswith(".") or not directory.is_dir() or directory.is_symlink():
            continue
        storage_id, _, name = directory.name.partition(".")
        if name:
            found.append((storage_id, name, directory / STATE_FILE))
    return found


def _record_of(path: Path) -> Path:
    return path.parent.with_name(path.parent.name + ".json")


def _write_new(path: Path, text: str) -> None:
    """A new private file in a directory the executor just made."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def _write_record(path: Path, base: tuple[int, str] | None, plan: bool) -> None:
    record = _record_of(path)
    tmp = record.with_name(f".{record.name}.{os.getpid()}")
    tmp.unlink(missing_ok=True)
    _write_new(tmp, json.dumps({"base": list(base) if base else None, "plan": plan}))
    os.replace(tmp, record)


def _read_record(path: Path) -> dict | None:
    try:
        record = json.loads(_record_of(path).read_text())
        base = record.get("base")
        return {"base": (int(base[0]), str(base[1])) if base else None, "plan": bool(record.get("plan"))}
    except (OSError, ValueError, TypeError, IndexError, AttributeError):
        return None


def remove_files(path: Path) -> None:
    """The run's directory (whatever the job put there) and its record."""
    shutil.rmtree(path.parent, ignore_errors=True)  # never follows a symlink out of it
    if path.parent.is_symlink():
        path.parent.unlink(missing_ok=True)
    _record_of(path).unlink(missing_ok=True)


def _keep_aside(path: Path, text: str) -> Path:
    aside = path.parent.parent / CONFLICTS / f"{path.parent.name}.{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%S}" \
        f".{os.getpid()}.tfstate"
    aside.parent.mkdir(mode=0o700, exist_ok=True)
    _write_new(aside, text)
    return aside


class PgState:
    """One run's hold on a pg storage's state; `async with` around the run.
    `plan`: the run only reads the state (a plan job): nothing goes back."""

    def __init__(self, conninfo: str, schema: str, name: str, path: Path, lock_timeout: float,
                 plan: bool = False):
        self.conninfo = conninfo
        self.schema = schema
        self.name = name
        self.path = path
        self.lock_timeout = lock_timeout
        self.plan = plan
        self._conn: psycopg.AsyncConnection | None = None
        self._key = 0
        self._base: tuple[int, str] | None = None  # what the row holds, as this run last saw or wrote it
        self._written: str | None = None  # the text behind _base
        self._sync: asyncio.Task | None = None

    @property
    def _table(self) -> sql.Composed:
        return sql.SQL("{}.states").format(sql.Identifier(self.schema))

    async def __aenter__(self) -> "PgState":
        # Keepalives: a session that died silently would release the lock unseen.
        self._conn = await psycopg.AsyncConnection.connect(self.conninfo, autocommit=True, connect_timeout=10,
                                                           keepalives=1, keepalives_idle=30, keepalives_interval=10,
                                                           keepalives_count=3)
        try:
            await self._ensure_table()
            await self._lock()
            await self._write_back_leftover()
            remove_files(self.path)
            text = await self._read()
            self._base, self._written = meta(text), text
            await asyncio.to_thread(self._move_in, text)
        except BaseException:
            await self._close()
            raise
        if not self.plan:
            self._sync = asyncio.create_task(self._sync_while_running())
        return self

    def _move_in(self, text: str | None) -> None:
        self.path.parent.mkdir(parents=True, mode=0o700)
        os.chmod(self.path.parent, 0o700)
        _write_record(self.path, meta(text), self.plan)
        if text:
            _write_new(self.path, text)

    async def __aexit__(self, *exc) -> None:
        try:
            if self._sync is not None:
                self._sync.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._sync
            if not self.plan:
                await self._write_back(await asyncio.to_thread(read_regular, self.path))
            await asyncio.to_thread(remove_files, self.path)
        finally:
            await self._close()

    async def _sync_while_running(self) -> None:
        """The run's progress reaches the database as it goes (a killed
        executor, or a pod whose disk went with it, loses at most this much)."""
        while True:
            await asyncio.sleep(SYNC_SECONDS)
            try:
                await self._write_back(await asyncio.to_thread(read_regular, self.path))
            except (psycopg.Error, OSError) as exc:
                log.warning("state %s: progress not written yet: %s", self.name, type(exc).__name__)

    async def _write_back(self, text: str | None) -> None:
        """Writes `text` when it is a newer state than the base, and only if
        the row still holds the base (compare and set); otherwise keeps it aside."""
        if text is None or text == self._written:
            return
        found = meta(text)
        if not newer(found, self._base):
            if found is not None and found != self._base:
                log.error("state %s: the run left a state (serial %s) that does not follow the stored one; "
                          "kept aside in %s", self.name, found[0], await asyncio.to_thread(_keep_aside, self.path,
                                                                                            text))
            return
        async with self._conn.transaction():
            row = await (await self._conn.execute(
                sql.SQL("SELECT data FROM {} WHERE name = %s FOR UPDATE").format(self._table),
                (self.name,))).fetchone()
            if meta(row[0] if row else None) != self._base:
                aside = await asyncio.to_thread(_keep_aside, self.path, text)
                log.error("state %s: the stored state moved on while this run held it; its own (serial %s) "
                          "is kept aside in %s, not written over it", self.name, found[0], aside)
                self._written = text
                return
            await self._conn.execute(sql.SQL("INSERT INTO {} (name, data) VALUES (%s, %s) ON CONFLICT (name) "
                                             "DO UPDATE SET data = EXCLUDED.data").format(self._table),
                                     (self.name, text))
        self._base, self._written = found, text
        if not self.plan:
            await asyncio.to_thread(_write_record, self.path, found, self.plan)

    async def _ensure_table(self) -> None:
        # What terraform's pg backend creates (both read the same rows).
        await self._conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(self.schema)))
        await self._conn.execute(sql.SQL("CREATE TABLE IF NOT EXISTS {} (id SERIAL PRIMARY KEY, name TEXT, data TEXT)")
                                 .format(self._table))
        await self._conn.execute(sql.SQL("CREATE UNIQUE INDEX IF NOT EXISTS states_by_name ON {} (name)")
                                 .format(self._table))

    async def _lock(self) -> None:
        """One key per schema and state (not the row's id: ids of different
        schemas of one database share the advisory key space, and a state's
        first run has no row yet)."""
        digest = hashlib.sha256(f"infrakitchen-state\0{self.schema}\0{self.name}".encode()).digest()
        self._key = int.from_bytes(digest[:8], "big", signed=True)
        deadline = time.monotonic() + self.lock_timeout
        while True:
            got = (await (await self._conn.execute("SELECT pg_try_advisory_lock(%s)", (self._key,))).fetchone())[0]
            if got:
                return
            if time.monotonic() > deadline:
                self._key = 0
                raise StateLocked(f"the state {self.name} is locked by another run (waited "
                                  f"{self.lock_timeout:.0f}s)")
            await asyncio.sleep(0.5)

    async def _read(self) -> str | None:
        row = await (await self._conn.execute(sql.SQL("SELECT data FROM {} WHERE name = %s").format(self._table),
                                              (self.name,))).fetchone()
        return row[0] if row is not None else None

    async def _write_back_leftover(self) -> None:
        """What a killed run left: written back when it follows what the row
        holds (its record's base), else kept aside; a plan's is dropped."""
        record = await asyncio.to_thread(_read_record, self.path)
        text = await asyncio.to_thread(read_regular, self.path)
        if text is None or (record is not None and record["plan"]):
            return
        stored = await self._read()
        self._base, self._written = meta(stored), stored
        if record is not None and record["base"] != self._base:
            if meta(text) != self._base:
                aside = await asyncio.to_thread(_keep_aside, self.path, text)
                log.error("state %s: a killed run left a state the stored one has moved past; kept aside in %s",
                          self.name, aside)
            return
        if newer(meta(text), self._base):
            log.warning("state %s: writing back what a run that was killed left on disk (serial %s)",
                        self.name, meta(text)[0])
            await self._write_back(text)

    async def _close(self) -> None:
        if self._conn is None:
            return
        try:
            if self._key:
                await self._conn.execute("SELECT pg_advisory_unlock(%s)", (self._key,))
        except psycopg.Error:
            pass  # the session's end releases it
        finally:
            self._key = 0
            await self._conn.close()
            self._conn = None


async def write_back_leftovers(left: list[tuple[str, str, Path]], storages: dict, lock_timeout: float) -> None:
    """At the executor's start: the states killed runs `left` on disk
    (left_on_disk's) are written back (when they fit) and removed.
    `storages`: id -> Storage; a storage not there is left alone."""
    for storage_id, name, path in left:
        storage = storages.get(storage_id)
        if storage is None:
            continue
        try:
            async with PgState(storage.pg_connection_string, storage.pg_schema, name, path, lock_timeout, plan=True):
                pass  # entering writes a fitting leftover back; leaving removes the directory
        except (psycopg.Error, StateLocked, OSError) as exc:
            log.warning("state %s of storage %s left on disk: not written back yet: %s", name, storage_id,
                        type(exc).__name__)
