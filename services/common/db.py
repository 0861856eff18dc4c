"""Database plumbing: one database per service, SQLite file by default,
PostgreSQL by URL. SQLAlchemy 2.0 async for serving, sync for migrations."""
from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import threading
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

from services.common.sqlite_driver import WriterLock, async_creator

log = logging.getLogger(__name__)

UTC_NOW = sa.func.now()


def _normalise(url: str, *, async_driver: bool) -> sa.URL:
    u = make_url(url)
    backend = u.get_backend_name()
    if backend == "sqlite":
        return u.set(drivername="sqlite+aiosqlite" if async_driver else "sqlite")
    if backend == "postgresql":
        return u.set(drivername="postgresql+psycopg")
    raise ValueError(f"unsupported database URL scheme {u.drivername!r}: use sqlite:/// or postgresql://")


def async_url(url: str) -> sa.URL:
    return _normalise(url, async_driver=True)


def sync_url(url: str) -> sa.URL:
    return _normalise(url, async_driver=False)


def is_postgres(url: str) -> bool:
    return make_url(url).get_backend_name() == "postgresql"


def _ensure_sqlite_dir(url: sa.URL) -> None:
    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
        Path(url.database).parent.mkdir(parents=True, exist_ok=True)


SQLITE_SYNCHRONOUS = ("OFF", "NORMAL", "FULL", "EXTRA")


# The WAL file is cut back to this size whenever a checkpoint has emptied it
# (without a limit it keeps the largest size it ever reached: 448 MiB after
# 10k resource creates was measured).
DEFAULT_WAL_LIMIT = 64 * 1024 * 1024


def _sqlite_pragmas(dbapi_conn, _record, busy_timeout_ms: int = 30000, synchronous: str = "FULL",
                    autocheckpoint: bool = True, wal_limit: int = DEFAULT_WAL_LIMIT) -> None:
    # WAL lets readers run beside the single writer; busy_timeout makes
    # concurrent writers wait instead of failing with "database is locked".
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute(f"PRAGMA busy_timeout={busy_timeout_ms}")
    cur.execute(f"PRAGMA synchronous={synchronous}")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute(f"PRAGMA journal_size_limit={int(wal_limit)}")
    if not autocheckpoint:
        cur.execute("PRAGMA wal_autocheckpoint=0")
    cur.close()


def create_sync_engine(url: str) -> sa.Engine:
    u = sync_url(url)
    _ensure_sqlite_dir(u)
    engine = sa.create_engine(u)
    if u.get_backend_name() == "sqlite":
        sa.event.listen(engine, "connect", _sqlite_pragmas)
    return engine


class Database:
    """The serving engine. On SQLite it never waits inside SQLite (its driver
    queues writers on the event loop: services/common/sqlite_driver.py), and
    commits with `sqlite_synchronous` (IK_SQLITE_SYNCHRONOUS): NORMAL, the
    default, does not fsync at each commit in WAL mode; a process crash
    loses nothing, a power cut may lose the last transactions (as NATS, which
    syncs its file store every two minutes by default, may lose the last
    messages). FULL fsyncs every commit, about a millisecond each here."""

    def __init__(self, url: str, *, sqlite_synchronous: str = "NORMAL", wal_limit: int = DEFAULT_WAL_LIMIT):
        if sqlite_synchronous.upper() not in SQLITE_SYNCHRONOUS:
            raise ValueError(f"sqlite synchronous must be one of {', '.join(SQLITE_SYNCHRONOUS)}")
        if wal_limit < 64 * 1024:  # 0 or SQLite's -1 ("no limit") would make every look a TRUNCATE
            raise ValueError("IK_SQLITE_WAL_LIMIT must be at least 64 KiB (65536 bytes)")
        self.url = url
        u = async_url(url)
        _ensure_sqlite_dir(u)
        self.is_postgres = u.get_backend_name() == "postgresql"
        self._writer = WriterLock()  # SQLite: the process's write turn, see sqlite_driver
        kwargs = {"pool_pre_ping": True} if self.is_postgres else {"async_creator": async_creator(u, self._writer)}
        self.engine: AsyncEngine = create_async_engine(u, **kwargs)
        if not self.is_postgres:
            sa.event.listen(self.engine.sync_engine, "connect", functools.partial(
                _sqlite_pragmas, busy_timeout_ms=0, synchronous=sqlite_synchronous.upper(), autocheckpoint=False,
                wal_limit=wal_limit))
        self.wal_limit = wal_limit
        self.sessionmaker = async_sessionmaker(self.engine, expire_on_commit=False)
        # Reads on PostgreSQL run in autocommit: one round trip for a one-statement
        # read instead of three (BEGIN, the SELECT, ROLLBACK). SQLite's BEGIN is local.
        self.read_sessionmaker = async_sessionmaker(
            self.engine.execution_options(isolation_level="AUTOCOMMIT"), expire_on_commit=False) \
            if self.is_postgres else self.sessionmaker
        self._sqlite_file = None if self.is_postgres else u.database
        self._checkpointer = None  # the sqlite3 connection of checkpoint(), opened at the first
        self._checkpointing = threading.Lock()

    async def checkpoints(self, interval: float = 1.0, truncate_every: int = 60, watch: float = 0.1,
                          quiet_watch: float = 0.25) -> None:
        """Background task on SQLite: the WAL is copied back into the database
        file on a thread of its own, since the serving connections run on the
        event loop and a checkpoint (copy and fsync) there would hold it up
        for milliseconds. One connection does every checkpoint.

        - Every `interval`, a PASSIVE checkpoint (it never waits for readers
          or writers), only when the WAL file changed since the last one (its
          size or modification time: a commit writes it), so an idle service
          does nothing but look at the file.
        - The WAL's size is bounded by `wal_limit` at every moment, not only
          after a quiet minute: under constant reads a PASSIVE checkpoint never
          lets the WAL start over, and a burst of writes grew it to 765 MiB
          in 20 s. The file's size is looked at (a stat) every `watch`
          seconds while it is being written, every `quiet_watch` seconds
          while it is not (an idle service wakes 4 times a second, not 10),
          and once it reaches a quarter of the limit a TRUNCATE
          checkpoint empties it. It takes the process's write turn first
          (the serving writers wait asynchronously, see sqlite_driver), so
          the file cannot grow while it waits for the readers of older
          frames, and a writer committing back to back cannot starve it
          (SQLite's busy handler polls the write lock: under a CI run's load
          it lost the race for seconds and the WAL reached 83 MiB).
        - Every `truncate_every` rounds a TRUNCATE empties a WAL file that is
          not empty at all (the file keeps its size otherwise), with the write
          turn too.
        - A size-bound TRUNCATE waits at most 1 s for readers of older frames
          (writers wait meanwhile); one that could not finish (a reader holds
          an old snapshot: a backup, a shell) is tried again after 1, 2, 4...
          up to 30 s, PASSIVE rounds going on between, so a long reader never
          keeps writers waiting most of the time. Once the WAL reaches half
          the limit, though, the writers wait until a TRUNCATE finishes: the
          limit holds, and a reader that never ends makes writes fail (after
          sqlite_driver.BUSY_TIMEOUT), with a warning, rather than fill the
          disk."""
        if self._sqlite_file is None or self._sqlite_file == ":memory:":
            return
        import asyncio
        import sqlite3
        wal = Path(f"{self._sqlite_file}-wal")
        watch, quiet_watch = min(watch, interval), min(quiet_watch, interval)
        trigger, urgent = self.wal_limit // 4, self.wal_limit // 2
        rounds, checkpointed, elapsed, looked, changed = 0, None, 0.0, None, False
        backoff, held_until = 1.0, 0.0  # size-bound TRUNCATEs after one that could not finish
        loop = asyncio.get_running_loop()
        try:
            while True:
                pause = watch if changed else quiet_watch  # written since the last look: look again soon
                await asyncio.sleep(pause)
                elapsed += pause
                try:
                    st = wal.stat()
                    seen = (st.st_size, st.st_mtime_ns)
                except FileNotFoundError:
                    seen = None
                changed, looked = seen != looked, seen
                if seen is None:
                    continue
                bound = seen[0] >= trigger and (seen[0] >= urgent or loop.time() >= held_until)
                if bound:
                    mode = "TRUNCATE"
                elif elapsed + 1e-9 < interval:
                    continue  # between rounds only the size is watched
                else:
                    elapsed = 0.0
                    rounds += 1
                    truncate = rounds % truncate_every == 0 and seen[0] > 0
                    if seen == checkpointed and not truncate:
                        continue  # nothing written since the last checkpoint
                    mode = "TRUNCATE" if truncate else "PASSIVE"
                try:
                    if mode == "TRUNCATE":
                        finished = await self._truncate_holding_writers(until_done=bound and seen[0] >= urgent)
                    else:
                        finished = await self._checkpoint_on_thread(mode, 5.0)
                    # What was seen before the checkpoint: a commit during it changes the file again.
                    checkpointed = seen
                except sqlite3.Error:
                    finished = False  # e.g. locked: the next look
                if bound:
                    if finished:
                        backoff, held_until = 1.0, 0.0
                    else:
                        held_until, backoff = loop.time() + backoff, min(backoff * 2, 30.0)
        finally:
            self._close_checkpointer_if_idle()

    async def _truncate_holding_writers(self, until_done: bool) -> bool:
        """A TRUNCATE checkpoint while this process's writers wait for their
        turn: one try of at most 1 s for the readers of older frames, or, when
        `until_done`, tries until one finishes, the writers waiting all along
        (after BUSY_TIMEOUT a write fails rather than the WAL passing its
        limit). A warning every 5 s says a reader holds an old snapshot."""
        import asyncio
        loop = asyncio.get_running_loop()
        await self._writer.acquire()
        try:
            started = warned = loop.time()
            while True:
                finished = await self._checkpoint_on_thread("TRUNCATE", 1.0)
                if finished or not until_done:
                    return finished
                if loop.time() - warned >= 5.0:
                    warned = loop.time()
                    log.warning("sqlite WAL at half its limit: writes have waited %.0f s for a reader of an "
                                "older snapshot to finish", warned - started)
        finally:
            self._writer.release()

    async def _checkpoint_on_thread(self, mode: str, wait: float) -> bool:
        """checkpoint() on a thread. Cancelled meanwhile (the service stops),
        it still waits for the thread: the write turn is handed on, and the
        database closed, only once SQLite's checkpoint is over."""
        import asyncio
        running = asyncio.ensure_future(asyncio.to_thread(self.checkpoint, mode, wait))
        try:
            return await asyncio.shield(running)
        except asyncio.CancelledError:
            await asyncio.wait({running})
            raise

    def checkpoint(self, mode: str = "PASSIVE", wait: float = 5.0) -> bool:
        """One checkpoint of the SQLite WAL, on a connection of its own, kept
        for the next (blocking: call it on a thread, one call at a time).
        FULL, RESTART and TRUNCATE wait up to `wait` seconds for writers and
        readers; False when one could not finish (SQLite's busy answer)."""
        import sqlite3
        with self._checkpointing:
            if self._checkpointer is None:
                conn = sqlite3.connect(self._sqlite_file, timeout=5, check_same_thread=False)
                try:
                    conn.execute(f"PRAGMA journal_size_limit={int(self.wal_limit)}")
                except BaseException:
                    conn.close()
                    raise
                self._checkpointer = conn
            try:
                self._checkpointer.execute(f"PRAGMA busy_timeout={int(wait * 1000)}")
                [(busy, _, _)] = self._checkpointer.execute(f"PRAGMA wal_checkpoint({mode})").fetchall()
            except sqlite3.Error:
                self._close_checkpointer()  # a connection in trouble is not kept
                raise
            return not busy

    def _close_checkpointer(self) -> None:
        conn, self._checkpointer = self._checkpointer, None
        if conn is not None:
            conn.close()

    def _close_checkpointer_if_idle(self) -> None:
        """Closes checkpoint()'s connection unless a checkpoint is under way on
        a thread (never waiting for it on the event loop); such a connection
        closes when it is collected."""
        if self._checkpointing.acquire(blocking=False):
            try:
                self._close_checkpointer()
            finally:
                self._checkpointing.release()

    @contextlib.asynccontextmanager
    async def leading(self, name: str):
        """Whether this process runs the periodic work `name` (a reconciler
        round) now. On PostgreSQL one replica at a time does (a session
        advisory lock held for the round; the others skip it); on SQLite,
        which is one machine's, every process does."""
        if not self.is_postgres:
            yield True
            return
        key = int.from_bytes(hashlib.sha256(f"ik-round:{name}".encode()).digest()[:8], "big", signed=True)
        async with self.engine.connect() as conn:
            mine = bool((await conn.execute(sa.text("SELECT pg_try_advisory_lock(:k)"), {"k": key})).scalar())
            await conn.commit()
            try:
                yield mine
            finally:
                if mine:
                    await conn.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                    await conn.commit()

    def session(self) -> AsyncSession:
        return self.sessionmaker()

    def read_session(self) -> AsyncSession:
        """A session for reads only (autocommit on PostgreSQL): never commit through it."""
        return self.read_sessionmaker()

    async def dispose(self) -> None:
        self._close_checkpointer_if_idle()  # before the serving connections: the last one checkpoints at close
        await self.engine.dispose()


def guarded_update(table: sa.Table) -> sa.Update:
    """An UPDATE of every column of the row with this id and this version
    (optimistic concurrency), built once: its bind parameters are the columns
    plus w_id and w_version. Building a statement costs more than running it
    on SQLite, so repositories keep the statements of their hot paths."""
    return sa.update(table).where(table.c.id == sa.bindparam("w_id"), table.c.version == sa.bindparam("w_version")) \
        .values({c.name: sa.bindparam(c.name) for c in table.columns if c.name != "id"})


def guarded_update_params(row: dict, read_version: int) -> dict:
    """A repository's row (with its id) as the parameters of guarded_update."""
    params = dict(row)
    params.update(w_id=params.pop("id"), w_version=read_version)
    return params
