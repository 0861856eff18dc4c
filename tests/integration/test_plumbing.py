"""The event plumbing against a real NATS JetStream server, on SQLite and on
PostgreSQL: outbox relay, stream de-duplication, durable consumers, the
idempotent inbox and dead-lettering."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

import pytest
import sqlalchemy as sa

from infrakitchen.events.v1 import events_pb2
from services.common.bus import EventBus
from services.common.changes import ChangeFeed
from services.common.consumer import ConsumerSpec, EventConsumer, NotYet
from services.common.db import Database, create_sync_engine
from services.common.errors import Unavailable
from services.common.events import new_event
from services.common.identities import ServiceIdentity
from services.common.migrations import upgrade
from services.common.outbox import OutboxRelay
from services.common import metrics, signing
from services.common.signing import EventSigner, EventVerifier
from services.common.tables import plumbing_tables
from services.common.uow import CHANGES_CHANNEL, UnitOfWork
from tests.support.waiting import eventually

MIGRATIONS = Path(__file__).resolve().parents[2] / "services" / "approval" / "migrations"

metadata = sa.MetaData()
outbox_table, inbox_table = plumbing_tables(metadata)
# What a handler changes: one row per application of an event, no uniqueness,
# so applying an event twice would show as two rows.
applied = sa.Table("applied", metadata,
                   sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
                   sa.Column("event_id", sa.String(64), nullable=False))


@dataclass
class Plumbing:
    db: Database
    bus: EventBus  # publishes signed as the executor
    keys: Path  # the services' keys

    def uow(self) -> UnitOfWork:
        return UnitOfWork(self.db, outbox_table, inbox_table, self.bus.names)

    async def emit_jobs(self, count: int, start: int = 0) -> list[events_pb2.Envelope]:
        envs = [new_event("executor", "job_succeeded", events_pb2.JobChanged(job_id=f"job-{i}"))
                for i in range(start, start + count)]
        async with self.uow() as uow:
            for env in envs:
                await uow.emit(env)
            await uow.commit()
        return envs

    async def count(self, table: sa.Table) -> int:
        async with self.db.session() as s:
            return await s.scalar(sa.select(sa.func.count()).select_from(table))

    async def outbox_empty(self) -> bool:
        return await self.count(outbox_table) == 0

    async def applications(self) -> dict[str, int]:
        async with self.db.session() as s:
            rows = await s.execute(sa.select(applied.c.event_id, sa.func.count()).group_by(applied.c.event_id))
            return dict(rows.all())

    async def consumer_settled(self, durable: str, expected_delivered: int) -> bool:
        info = await self.bus.js.consumer_info(self.bus.names.context_stream("executor"), durable)
        return info.delivered.stream_seq >= expected_delivered and info.num_pending == 0 \
            and info.num_ack_pending == 0


def identity(keys: Path, service: str) -> ServiceIdentity:
    return ServiceIdentity.from_settings(service, {"IK_SERVICE_KEYS_DIR": str(keys)}, keys)


@pytest.fixture
async def plumbing(database_url, event_prefix, nats_url, tmp_path):
    upgrade(MIGRATIONS, database_url)  # the real migrations create outbox and inbox
    engine = create_sync_engine(database_url)
    applied.create(engine, checkfirst=True)
    engine.dispose()
    db = Database(database_url)
    keys = tmp_path / "service-keys"
    bus = EventBus(nats_url, event_prefix, signer=EventSigner(identity(keys, "executor")))
    await bus.connect(attempts=3)
    await bus.ensure_event_streams()
    yield Plumbing(db, bus, keys)
    await bus.close()
    await db.dispose()


async def record(uow: UnitOfWork, env: events_pb2.Envelope) -> None:
    await uow.session.execute(sa.insert(applied).values(event_id=env.event_id))


class RelayCrash(Exception):
    pass


class CrashingBus:
    """Publishes `survive` events for real, then dies, as a relay process killed mid-batch would."""

    def __init__(self, bus: EventBus, survive: int):
        self.bus, self.left = bus, survive
        self.max_payload = bus.max_payload

    async def publish_in_order(self, messages):
        for subject, payload, msg_id, _ in messages:
            if self.left == 0:
                raise RelayCrash()
            self.left -= 1
            await self.bus.publish(subject, payload, msg_id=msg_id)


async def run_consumer(p: Plumbing, spec: ConsumerSpec) -> asyncio.Task:
    # The consumer checks signatures as the resource service's consumers do.
    consumer = EventConsumer(p.bus, p.uow, spec, EventVerifier(identity(p.keys, "resource"), p.bus.names))
    await consumer.subscribe()
    task = asyncio.create_task(consumer.run())
    task.consumer = consumer
    return task


async def stop(task: asyncio.Task) -> None:
    """Stops a consumer as a service shutting down does (or a relay: cancelled)."""
    consumer = getattr(task, "consumer", None)
    if consumer is not None:
        consumer.stop()
        await asyncio.wait_for(task, timeout=5)
    else:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_event_reaches_consumer_exactly_once_across_relay_crash_and_republish(plumbing):
    p = plumbing
    envs = await p.emit_jobs(20)

    with pytest.raises(RelayCrash):
        await OutboxRelay(p.db, outbox_table, CrashingBus(p.bus, survive=7)).relay_once()
    assert await p.count(outbox_table) == 20, "a crashed relay must not lose outbox rows"

    # The restarted relay publishes all 20 again; the stream drops the 7 it already has.
    assert await OutboxRelay(p.db, outbox_table, p.bus).relay_once() == 20
    assert await p.count(outbox_table) == 0
    # The same event published once more, past the duplicate window (no msg id).
    await p.bus.publish(p.bus.names.subject(envs[0].type), envs[0].SerializeToString())
    stream = await p.bus.js.stream_info(p.bus.names.context_stream("executor"))
    assert stream.state.messages == 21

    task = await run_consumer(p, ConsumerSpec("exactly-once", "executor", "ik.executor.job.*", record))
    try:
        await eventually(lambda: p.consumer_settled("exactly-once", 21))
    finally:
        await stop(task)
    assert await p.applications() == {env.event_id: 1 for env in envs}
    assert await p.count(inbox_table) == 20


async def test_consumer_catches_up_after_restart_and_relay_loop_publishes_on_commit(plumbing):
    p = plumbing
    relay = OutboxRelay(p.db, outbox_table, p.bus, poll_interval=30)  # only notify() wakes it quickly
    relay_task = asyncio.create_task(relay.run())
    spec = ConsumerSpec("catch-up", "executor", "ik.executor.job.*", record)
    consumer_task = await run_consumer(p, spec)
    try:
        first = await p.emit_jobs(5)
        relay.notify()
        await eventually(lambda: p.consumer_settled("catch-up", 5), timeout=10)
        await stop(consumer_task)  # the consuming service goes down...

        second = await p.emit_jobs(5, start=5)
        relay.notify()
        await eventually(lambda: p.outbox_empty())

        consumer_task = await run_consumer(p, spec)  # ...and comes back
        await eventually(lambda: p.consumer_settled("catch-up", 10))
    finally:
        await stop(consumer_task)
        await stop(relay_task)
    assert await p.applications() == {env.event_id: 1 for env in first + second}


async def test_committed_rows_are_published_from_memory_after_older_rows_of_the_table(plumbing):
    p = plumbing
    left_over = await p.emit_jobs(3)  # rows a crashed process left behind
    relay = OutboxRelay(p.db, outbox_table, p.bus, poll_interval=30)  # no poll during the test
    table_reads = 0
    read_table = relay.relay_once

    async def counting_read():
        nonlocal table_reads
        table_reads += 1
        return await read_table()
    relay.relay_once = counting_read
    relay_task = asyncio.create_task(relay.run())
    reader = await p.bus.js.pull_subscribe(p.bus.names.subject("ik.executor.job.*"), durable="order-reader",
                                           stream=p.bus.names.context_stream("executor"))
    try:
        new = []
        for start in (3, 5):  # two commits through a unit of work wired to the relay
            envs = [new_event("executor", "job_succeeded", events_pb2.JobChanged(job_id=f"job-{i}"))
                    for i in range(start, start + 2)]
            async with UnitOfWork(p.db, outbox_table, inbox_table, p.bus.names, on_commit=relay.notify) as uow:
                for env in envs:
                    await uow.emit(env)
                await uow.commit()
            new += envs
            await eventually(lambda: p.outbox_empty())
        got = [events_pb2.Envelope.FromString(m.data).event_id for m in await reader.fetch(7, timeout=5)]
    finally:
        await stop(relay_task)
    assert got == [env.event_id for env in left_over + new], "published in commit order, the table's rows first"
    assert table_reads == 1, "after the first read drained the table, commits are relayed without reading it"


async def one_event_failing_first(p: Plumbing, durable: str, failures: list[Exception]):
    """One job event through a consumer whose handler records it and raises
    `failures` in turn first; returns the event and the event ids of every attempt."""
    attempts: list[str] = []

    async def handler(uow, env):
        await record(uow, env)
        attempts.append(env.event_id)
        if len(attempts) <= len(failures):
            raise failures[len(attempts) - 1]

    [env] = await p.emit_jobs(1)
    await OutboxRelay(p.db, outbox_table, p.bus).relay_once()
    task = await run_consumer(p, ConsumerSpec(durable, "executor", "ik.executor.job.*", handler, retry_delays=[0.1]))
    try:
        await eventually(lambda: p.consumer_settled(durable, 1))
    finally:
        await stop(task)
    return env, attempts


async def test_failed_handler_is_retried_and_its_changes_rolled_back(plumbing):
    p = plumbing
    env, attempts = await one_event_failing_first(p, "flaky", [RuntimeError("transient")] * 2)
    assert attempts == [env.event_id] * 3
    assert await p.applications() == {env.event_id: 1}, "failed attempts must not leave changes"


async def test_an_event_ahead_of_what_it_refers_to_is_retried_without_a_warning(plumbing, caplog):
    """A race the sender cannot avoid (a job's event before the resource
    service stored the job id) is retried like a failure, and said in an
    information line, not a warning an operator would chase."""
    p = plumbing
    caplog.set_level("INFO", logger="services.common.consumer")
    env, attempts = await one_event_failing_first(p, "early", [NotYet("the job is not recorded yet")])
    assert attempts == [env.event_id] * 2
    assert await p.applications() == {env.event_id: 1}
    said = [r for r in caplog.records if r.name == "services.common.consumer"]
    assert [r.levelname for r in said] == ["INFO"] and "not recorded yet" in said[0].getMessage()


async def test_poison_event_is_dead_lettered_after_max_deliver(plumbing):
    p = plumbing

    async def poison(uow, env):
        raise ValueError("cannot handle this")

    [env] = await p.emit_jobs(1)
    await OutboxRelay(p.db, outbox_table, p.bus).relay_once()
    dead = await p.bus.js.pull_subscribe(p.bus.names.deadletter_subject("poisoned"), durable="dlq-reader",
                                         stream=p.bus.names.deadletter_stream)
    task = await run_consumer(p, ConsumerSpec("poisoned", "executor", "ik.executor.job.*", poison,
                                              max_deliver=3, retry_delays=[0.1]))
    try:
        [letter_msg] = await dead.fetch(1, timeout=15)
        await eventually(lambda: p.consumer_settled("poisoned", 1))
    finally:
        await stop(task)
    letter = events_pb2.DeadLetter.FromString(letter_msg.data)
    assert letter.consumer == "poisoned" and letter.deliveries == 3
    assert "cannot handle this" in letter.error
    assert events_pb2.Envelope.FromString(letter.data).event_id == env.event_id
    assert await p.count(inbox_table) == 0


async def test_sqlite_writers_queue_without_blocking_the_event_loop(tmp_path):
    """SQLite statements run on the event loop's thread: writers of one process
    take turns on an asyncio lock, and a write lock held by another process
    (here a plain connection in a thread) is waited for with asyncio sleeps,
    so the loop keeps serving meanwhile."""
    import sqlite3
    import threading
    import time as clock

    url = f"sqlite:///{tmp_path / 'writers.db'}"
    engine = create_sync_engine(url)
    applied.create(engine)
    engine.dispose()
    db = Database(url)
    try:
        async def write(n: int) -> None:
            async with db.session() as s, s.begin():
                await s.execute(sa.insert(applied).values(event_id=f"e{n}"))
                await asyncio.sleep(0.01)  # holds its write turn across an await
        await asyncio.gather(*[write(n) for n in range(20)])  # no "database is locked"

        other_holds = threading.Event()

        def other_process_writes() -> None:
            conn = sqlite3.connect(tmp_path / "writers.db", isolation_level=None)
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("INSERT INTO applied (event_id) VALUES ('other')")
            other_holds.set()
            clock.sleep(0.5)
            conn.execute("COMMIT")
            conn.close()
        thread = threading.Thread(target=other_process_writes)
        thread.start()
        await asyncio.to_thread(other_holds.wait)
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1
        ticker = asyncio.create_task(tick())
        started = clock.monotonic()
        await write(20)  # waits for the other writer, then goes through
        waited = clock.monotonic() - started
        ticker.cancel()
        thread.join()
        assert waited >= 0.3 and ticks >= 15, (waited, ticks)
        async with db.session() as s:
            assert await s.scalar(sa.select(sa.func.count()).select_from(applied)) == 22
    finally:
        await db.dispose()


async def test_sqlite_wal_is_checkpointed_off_the_event_loop(tmp_path):
    """The serving connections never checkpoint (it would hold up the loop);
    a background task copies the WAL into the database file from a thread."""
    import sqlite3

    path = tmp_path / "checkpointed.db"
    engine = create_sync_engine(f"sqlite:///{path}")
    applied.create(engine)
    engine.dispose()
    db = Database(f"sqlite:///{path}")

    def rows_in_database_file() -> int:  # the main file alone, not the WAL
        conn = sqlite3.connect(f"file:{path}?immutable=1", uri=True)
        try:
            return conn.execute("SELECT count(*) FROM applied").fetchone()[0]
        finally:
            conn.close()
    try:
        for n in range(1100):  # past SQLite's own auto-checkpoint threshold (1000 pages)
            async with db.session() as s, s.begin():
                await s.execute(sa.insert(applied).values(event_id=f"e{n}" + "x" * 4000))
        assert rows_in_database_file() == 0, "a serving connection checkpointed"
        task = asyncio.create_task(db.checkpoints(interval=0.05))
        try:
            await eventually(lambda: rows_in_database_file() == 1100, timeout=10)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    finally:
        await db.dispose()


async def test_sqlite_wal_stays_under_its_limit_through_a_burst_under_constant_reads(tmp_path):
    """A burst of writes while readers always hold a snapshot (the serving
    load of many clients) grew the WAL to 765 MiB in 20 s: a PASSIVE
    checkpoint never lets it start over then. It stays under the limit at
    every moment, with the product's checkpoint timing."""
    import sqlite3
    import threading

    path = tmp_path / "burst.db"
    wal = Path(f"{path}-wal")
    engine = create_sync_engine(f"sqlite:///{path}")
    applied.create(engine)
    engine.dispose()
    limit = 32 * 1024 * 1024
    db = Database(f"sqlite:///{path}", wal_limit=limit)
    stop = threading.Event()
    peak = [0]

    def read_constantly() -> None:
        """Overlapping read transactions: some snapshot is always held. Each
        is a lookup, as a served read is: a count(*) here scanned the whole
        growing table, held its snapshot for over a second under a CI run's
        load, and no checkpoint can empty a WAL a reader still reads."""
        conn = sqlite3.connect(path, timeout=5, isolation_level=None)
        try:
            while not stop.is_set():
                conn.execute("BEGIN")
                conn.execute("SELECT max(rowid) FROM applied").fetchone()
                stop.wait(0.02)
                conn.execute("COMMIT")
        finally:
            conn.close()

    def watch_size() -> None:
        while not stop.is_set():
            try:
                peak[0] = max(peak[0], wal.stat().st_size)
            except FileNotFoundError:
                pass
            stop.wait(0.001)
    threads = [threading.Thread(target=f, daemon=True) for f in (read_constantly, read_constantly, watch_size)]
    for t in threads:
        t.start()
    task = asyncio.create_task(db.checkpoints())
    try:
        rows = 0
        while rows * 4000 < 6 * limit:  # six limits' worth of rows, as fast as one writer goes
            async with db.session() as s, s.begin():
                await s.execute(sa.insert(applied), [{"event_id": f"e{rows + n}-" + "x" * 4000} for n in range(8)])
            rows += 8
            await asyncio.sleep(0)  # as a serving loop does between requests
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=5)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await db.dispose()
    assert 0 < peak[0] <= limit, f"the WAL reached {peak[0] / 2**20:.1f} MiB (limit {limit / 2**20:.0f} MiB)"


async def test_a_reader_holding_an_old_snapshot_does_not_keep_writers_waiting(tmp_path, monkeypatch):
    """A size-bound TRUNCATE that cannot finish (a backup or a shell holds an
    old snapshot) waits at most 1 s, then is tried again only after 1, 2,
    4... s, so writes go on most of the time instead of waiting 5 s out of
    every 5.1."""
    import sqlite3
    import time

    path = tmp_path / "held.db"
    engine = create_sync_engine(f"sqlite:///{path}")
    applied.create(engine)
    engine.dispose()
    db = Database(f"sqlite:///{path}", wal_limit=1024 * 1024)  # TRUNCATE from 256 KiB of WAL
    truncates: list[tuple[float, bool]] = []
    checkpoint = db.checkpoint

    def recording(mode: str = "PASSIVE", wait: float = 5.0) -> bool:
        finished = checkpoint(mode, wait)
        if mode == "TRUNCATE":
            truncates.append((wait, finished))
        return finished
    monkeypatch.setattr(db, "checkpoint", recording)
    async with db.session() as s, s.begin():  # past the trigger, well under half the limit
        await s.execute(sa.insert(applied), [{"event_id": f"a{n}-" + "x" * 4000} for n in range(70)])
    wal_size = Path(f"{path}-wal").stat().st_size
    assert 256 * 1024 <= wal_size < 448 * 1024, wal_size
    reader = sqlite3.connect(path, isolation_level=None)
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM applied").fetchone()  # holds this snapshot
    async with db.session() as s, s.begin():  # a frame the reader's snapshot does not have
        await s.execute(sa.insert(applied).values(event_id="after"))
    task = asyncio.create_task(db.checkpoints())
    try:
        started = time.monotonic()
        await asyncio.sleep(4.5)
        slowest = 0.0
        for n in range(20):  # writes go on while the reader holds on
            t = time.monotonic()
            async with db.session() as s, s.begin():
                await s.execute(sa.insert(applied).values(event_id=f"w{n}"))
            slowest = max(slowest, time.monotonic() - t)
            await asyncio.sleep(0.05)
        assert truncates and all(wait == 1.0 and not finished for wait, finished in truncates)
        assert len(truncates) <= 4, f"{len(truncates)} blocking attempts in {time.monotonic() - started:.1f}s"
        assert slowest < 1.5
        reader.execute("COMMIT")  # the reader lets go: the next attempt empties the WAL
        await eventually(lambda: truncates[-1][1], timeout=40)
    finally:
        reader.close()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await db.dispose()


async def test_at_half_its_limit_the_wal_makes_writers_wait_for_an_old_reader(tmp_path, caplog):
    """The limit holds even against a reader that never lets go: once the WAL
    reaches half of it, the writers wait until a TRUNCATE finishes, with a
    warning, and go on the moment the reader is done."""
    import sqlite3
    import time

    path = tmp_path / "urgent.db"
    wal = Path(f"{path}-wal")
    engine = create_sync_engine(f"sqlite:///{path}")
    applied.create(engine)
    engine.dispose()
    limit = 1024 * 1024
    db = Database(f"sqlite:///{path}", wal_limit=limit)
    reader = sqlite3.connect(path, isolation_level=None)
    reader.execute("BEGIN")
    reader.execute("SELECT max(rowid) FROM applied").fetchone()  # holds this snapshot from the start
    task = asyncio.create_task(db.checkpoints())
    written = 0

    async def write_on() -> None:
        nonlocal written
        while True:
            async with db.session() as s, s.begin():
                await s.execute(sa.insert(applied), [{"event_id": f"r{written}-" + "x" * 4000}])
            written += 1
            await asyncio.sleep(0.005)  # a pace the 0.1 s look at the file keeps up with, at this small limit
    writer = asyncio.create_task(write_on())
    try:
        last, still_since = -1, time.monotonic()
        while time.monotonic() - still_since < 6.0:  # until the writes have waited 6 s
            assert wal.stat().st_size <= limit
            if written != last:
                last, still_since = written, time.monotonic()
            assert written < 2000, "the writes never waited"
            await asyncio.sleep(0.01)
        assert written > 20
        await eventually(lambda: any("writes have waited" in r.getMessage() for r in caplog.records), timeout=15)
        reader.execute("COMMIT")  # the reader lets go: the WAL empties and the writes go on
        await eventually(lambda: written > last + 20, timeout=10)
        assert wal.stat().st_size <= limit
    finally:
        writer.cancel()
        await asyncio.gather(writer, return_exceptions=True)
        reader.close()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await db.dispose()


async def test_an_event_nats_refuses_for_good_is_dead_lettered_and_the_rest_flow_on(plumbing):
    """One event over the server's max payload (it was a 1.2 MB user name)
    used to be retried forever, holding every later event back, across
    restarts. It is dead-lettered with an error log; the others are relayed,
    both from the table and from the commit fast path."""
    p = plumbing
    before = await p.emit_jobs(2)
    huge = new_event("executor", "job_succeeded", events_pb2.JobChanged(job_id="huge", error_message="x" * (
        p.bus.max_payload + 10)))
    async with p.uow() as uow:
        await uow.emit(huge)
        await uow.commit()
    after = await p.emit_jobs(2, start=2)
    dead = await p.bus.js.pull_subscribe(p.bus.names.deadletter_subject("outbox-test"), durable="dlq-outbox",
                                         stream=p.bus.names.deadletter_stream)
    reader = await p.bus.js.pull_subscribe(p.bus.names.subject("ik.executor.job.*"), durable="relayed",
                                           stream=p.bus.names.context_stream("executor"))
    assert await OutboxRelay(p.db, outbox_table, p.bus, name="outbox-test").relay_once() == 5
    assert await p.count(outbox_table) == 0
    got = [events_pb2.Envelope.FromString(m.data).event_id for m in await reader.fetch(4, timeout=5)]
    assert got == [e.event_id for e in before + after]
    [letter_msg] = await dead.fetch(1, timeout=5)
    letter = events_pb2.DeadLetter.FromString(letter_msg.data)
    assert letter.consumer == "outbox-test" and "maximum payload" in letter.error
    assert letter.headers["Nats-Msg-Id"] == huge.event_id

    # The fast path (rows handed over by a commit) dead-letters it the same way.
    relay = OutboxRelay(p.db, outbox_table, p.bus, name="outbox-test")
    big = new_event("executor", "job_failed", events_pb2.JobChanged(job_id="big", error_message="y" * (
        p.bus.max_payload + 10)))
    small = new_event("executor", "job_failed", events_pb2.JobChanged(job_id="small"))
    relay.notify([(big.event_id, p.bus.names.subject(big.type), big.SerializeToString(), ""),
                  (small.event_id, p.bus.names.subject(small.type), small.SerializeToString(), "")])
    assert await relay._relay_ready() == 2
    [msg] = await reader.fetch(1, timeout=5)
    assert events_pb2.Envelope.FromString(msg.data).event_id == small.event_id
    [letter_msg] = await dead.fetch(1, timeout=5)
    assert events_pb2.DeadLetter.FromString(letter_msg.data).headers["Nats-Msg-Id"] == big.event_id


class SilentFailure:
    """A bus whose publish fails the way nats-py does on a reconnect: an
    exception with an empty message."""

    max_payload = 1024 * 1024

    async def publish_in_order(self, messages):
        raise TimeoutError()


async def test_a_relay_failure_without_a_message_still_says_what_failed(plumbing, caplog):
    p = plumbing
    await p.emit_jobs(1)
    relay = OutboxRelay(p.db, outbox_table, SilentFailure(), poll_interval=0.05)
    task = asyncio.create_task(relay.run())
    try:
        await eventually(lambda: any("outbox relay" in r.getMessage() for r in caplog.records), timeout=5)
    finally:
        relay.stop()
        await asyncio.wait_for(task, timeout=5)
    [line] = {r.getMessage() for r in caplog.records if "outbox relay" in r.getMessage()}
    assert line == "outbox relay: TimeoutError: (no detail); retrying"
    assert await p.count(outbox_table) == 1, "kept for the next try"


async def test_the_sqlite_wal_stays_bounded_under_sustained_writes(tmp_path):
    """Without a bound the WAL file keeps the largest size it ever reached;
    with journal_size_limit and the checkpoints it is cut back to the limit."""
    limit = 256 * 1024
    db = Database(f"sqlite:///{tmp_path / 'wal.db'}", wal_limit=limit)
    wal = tmp_path / "wal.db-wal"
    try:
        async with db.engine.begin() as conn:
            await conn.execute(sa.text("CREATE TABLE rows (id INTEGER PRIMARY KEY, body TEXT)"))
        largest = 0
        for batch in range(40):  # ~4 MiB written, checkpointed now and then as the service does
            async with db.engine.begin() as conn:
                await conn.execute(sa.text("INSERT INTO rows (body) VALUES (:b)"), [{"b": "x" * 1000}] * 100)
            largest = max(largest, wal.stat().st_size)
            if batch % 5 == 4:
                await asyncio.to_thread(db.checkpoint, "PASSIVE")
        assert largest > limit, "the writes did fill the WAL beyond the limit between checkpoints"
        await asyncio.to_thread(db.checkpoint, "PASSIVE")
        async with db.engine.begin() as conn:  # the next write starts the WAL over, cut back to the limit
            await conn.execute(sa.text("INSERT INTO rows (body) VALUES ('y')"))
        assert wal.stat().st_size <= limit
        await asyncio.to_thread(db.checkpoint, "TRUNCATE")
        assert wal.stat().st_size == 0
    finally:
        await db.dispose()


async def test_one_replica_at_a_time_leads_a_periodic_round_on_postgres(postgres, tmp_path):
    url = postgres.create()
    first, second = Database(url), Database(url)
    try:
        async with first.leading("reconciler") as mine:
            assert mine
            async with second.leading("reconciler") as theirs:
                assert not theirs, "the other replica skips this round"
            async with second.leading("another round") as other:
                assert other, "each kind of round has its own leader"
        async with second.leading("reconciler") as theirs:
            assert theirs, "the next round may be anyone's"
        on_sqlite = Database(f"sqlite:///{tmp_path / 'one.db'}")
        async with on_sqlite.leading("reconciler") as mine:
            assert mine
        await on_sqlite.dispose()
    finally:
        await first.dispose()
        await second.dispose()


async def test_a_commit_on_postgres_wakes_the_streams_of_another_replica(postgres, event_prefix, nats_url):
    """Two replicas on one PostgreSQL database: a commit of one (a unit of
    work that touched an id) wakes the other's watch of that id at once; a
    rolled-back one does not."""
    url = postgres.create()
    upgrade(MIGRATIONS, url)
    writer_db = Database(url)
    bus = EventBus(nats_url, event_prefix)
    other = ChangeFeed()  # the other replica's streams
    listening = asyncio.create_task(other.listen(url, CHANGES_CHANNEL))
    try:
        with other.watch("workflow-1") as watch:
            await asyncio.sleep(1)  # LISTEN is in place
            async with UnitOfWork(writer_db, outbox_table, inbox_table, bus.names) as uow:
                uow.touch("workflow-1")
                await uow.rollback()
            await watch.after(0, 1)
            assert watch.changes == 0, "nothing committed, nothing woken"
            started = asyncio.get_running_loop().time()
            async with UnitOfWork(writer_db, outbox_table, inbox_table, bus.names) as uow:
                uow.touch("workflow-1")
                uow.touch("resource-7")
                await uow.commit()
            await watch.after(0, 10)
            assert watch.changes == 1 and asyncio.get_running_loop().time() - started < 2
    finally:
        listening.cancel()
        await asyncio.gather(listening, return_exceptions=True)
        await writer_db.dispose()


# --- the relay's deletes and polls ------------------------------------------------------

class CountingRelay(OutboxRelay):
    """Counts the transactions that deleted published rows, and the table reads."""

    deletes = 0
    reads = 0

    async def _delete_published(self) -> None:
        if self._published:
            self.deletes += 1
        await super()._delete_published()

    async def relay_once(self) -> int:
        self.reads += 1
        return await super().relay_once()


async def commit_events(p: Plumbing, relay: OutboxRelay, count: int, start: int = 0) -> None:
    """`count` commits of one event each, handed to the relay as the services' units of work do."""
    for i in range(start, start + count):
        async with UnitOfWork(p.db, outbox_table, inbox_table, p.bus.names, on_commit=relay.notify) as uow:
            await uow.emit(new_event("executor", "job_succeeded", events_pb2.JobChanged(job_id=f"job-{i}")))
            await uow.commit()


async def test_published_rows_are_deleted_together_once_the_relay_is_idle(plumbing, monkeypatch):
    """Rows published from memory stay in the table while commits keep
    coming, and go in one delete once the relay had nothing to do for
    DELETE_WHEN_IDLE_FOR; the table is not read meanwhile."""
    from services.common import outbox
    p = plumbing
    monkeypatch.setattr(outbox, "DELETE_WHEN_IDLE_FOR", 0.5)
    relay = CountingRelay(p.db, outbox_table, p.bus, poll_interval=30)
    published = outbox.metrics.OUTBOX_PUBLISHED.labels(relay.name)
    task = asyncio.create_task(relay.run())
    try:
        await eventually(lambda: relay.reads == 1)  # the read at start drains the (empty) table
        before = published._value.get()
        for i in range(5):  # a commit every 0.1 s: never idle for 0.5 s
            await commit_events(p, relay, 1, start=i)
            await eventually(lambda: published._value.get() == before + i + 1)
            await asyncio.sleep(0.1)
        assert relay.deletes == 0 and await p.count(outbox_table) == 5, "deleted while commits kept coming"
        await eventually(lambda: p.outbox_empty(), timeout=5)
        assert relay.deletes == 1, "one delete for the whole burst"
        assert relay.reads == 1, "no table read while the fast path is in use"
    finally:
        await stop(task)


@pytest.mark.parametrize("bound", ["count", "age"])
async def test_under_continuous_load_published_rows_are_deleted_within_bounds(plumbing, monkeypatch, bound):
    """A relay that is never idle still deletes what it published: once
    DELETE_BATCH rows wait, or the oldest was published DELETE_WITHIN ago
    (a crash republishes at most that much, inside the stream's duplicate
    window); it reads the table then too."""
    from services.common import bus as bus_module
    from services.common import outbox
    p = plumbing
    monkeypatch.setattr(outbox, "DELETE_WHEN_IDLE_FOR", 60)  # never idle long enough here
    if bound == "count":
        monkeypatch.setattr(outbox, "DELETE_BATCH", 4)
    else:
        monkeypatch.setattr(outbox, "DELETE_WITHIN", 0.3)
    assert outbox.DELETE_WITHIN < bus_module.DUPLICATE_WINDOW_SECONDS
    relay = CountingRelay(p.db, outbox_table, p.bus, poll_interval=30)
    published = outbox.metrics.OUTBOX_PUBLISHED.labels(relay.name)
    task = asyncio.create_task(relay.run())
    try:
        await eventually(lambda: relay.reads == 1)
        before = published._value.get()
        for i in range(10):
            await commit_events(p, relay, 1, start=i)
            await eventually(lambda: published._value.get() == before + i + 1)
            await asyncio.sleep(0.05)
        left = await p.count(outbox_table)
        if bound == "count":  # deleted at the 4th and the 8th
            assert relay.deletes == 2 and left == 2
        else:
            assert relay.deletes >= 1 and left < 10
        assert relay.reads == 1 + relay.deletes
    finally:
        await stop(task)


class FailingOnce:
    """A bus whose first publish fails (a NATS reconnect), then works."""

    def __init__(self, bus: EventBus):
        self.bus, self.failed = bus, False
        self.max_payload = bus.max_payload

    async def publish_in_order(self, messages):
        if not self.failed:
            self.failed = True
            raise TimeoutError()
        await self.bus.publish_in_order(messages)


async def test_a_failed_publish_is_retried_from_the_table_at_the_short_poll(plumbing):
    """While the fast path is in use the table is read only after a long
    quiet (drained_poll_interval); a publish that failed is retried from the
    table at the short poll_interval, without waiting for that or for
    another commit."""
    p = plumbing
    relay = CountingRelay(p.db, outbox_table, FailingOnce(p.bus), poll_interval=0.2, drained_poll_interval=60)
    assert relay.drained_poll_interval == 60
    task = asyncio.create_task(relay.run())
    try:
        await eventually(lambda: relay.reads == 1)
        await asyncio.sleep(0.5)
        assert relay.reads == 1, "no table read while drained, before the long poll"
        started = asyncio.get_running_loop().time()
        await commit_events(p, relay, 1)  # the fast path's publish fails
        await eventually(lambda: p.outbox_empty(), timeout=10)
        assert relay.bus.failed and relay.reads == 2
        assert asyncio.get_running_loop().time() - started < 3
    finally:
        await stop(task)


async def test_an_idle_sqlite_database_is_not_checkpointed_again(tmp_path, monkeypatch):
    """A checkpoint round does something only when the WAL changed since the
    last checkpoint; every checkpoint uses the same connection."""
    import sqlite3

    path = tmp_path / "idle.db"
    engine = create_sync_engine(f"sqlite:///{path}")
    applied.create(engine)
    engine.dispose()
    db = Database(f"sqlite:///{path}")
    done: list[str] = []
    connections: set[int] = set()
    checkpoint = db.checkpoint

    def counting(mode: str = "PASSIVE", wait: float = 5.0) -> bool:
        finished = checkpoint(mode, wait)
        done.append(mode)
        connections.add(id(db._checkpointer))
        return finished
    monkeypatch.setattr(db, "checkpoint", counting)
    opened = []
    real_connect = sqlite3.connect
    monkeypatch.setattr(sqlite3, "connect", lambda *a, **kw: opened.append(kw) or real_connect(*a, **kw))
    try:
        async with db.session() as s, s.begin():
            await s.execute(sa.insert(applied).values(event_id="first"))
        task = asyncio.create_task(db.checkpoints(interval=0.05, truncate_every=1000))
        try:
            await eventually(lambda: len(done) == 1)
            await asyncio.sleep(0.5)  # ten rounds with nothing written
            assert done == ["PASSIVE"], "checkpointed an unchanged WAL"
            async with db.session() as s, s.begin():
                await s.execute(sa.insert(applied).values(event_id="second"))
            await eventually(lambda: len(done) == 2)
            await asyncio.sleep(0.3)
            assert len(done) == 2
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        checkpointers = [kw for kw in opened if kw.get("timeout") == 5]  # the serving ones wait for nothing (0)
        assert len(connections) == 1 and len(checkpointers) == 1, "one connection for every checkpoint"
        assert db._checkpointer is None, "closed with the task"
    finally:
        await db.dispose()


async def test_only_events_signed_by_the_owner_of_their_subject_are_applied(plumbing, event_prefix, nats_url,
                                                                            tmp_path):
    """A client that can publish on NATS (anonymous, another service's key, a
    key of its own named after the executor, a real signature moved to
    another payload) changes nothing: each forgery is dead-lettered with its
    reason and counted; the genuine event after them is applied once."""
    p = plumbing
    subject = p.bus.names.subject("ik.executor.job.succeeded")

    def job_event(job_id: str) -> bytes:
        return new_event("executor", "job_succeeded", events_pb2.JobChanged(job_id=job_id)).SerializeToString()

    anonymous = EventBus(nats_url, event_prefix)
    other_service = EventBus(nats_url, event_prefix, signer=EventSigner(identity(p.keys, "approval")))
    impostor = EventBus(nats_url, event_prefix, signer=EventSigner(identity(tmp_path / "own-keys", "executor")))
    forged = [(anonymous, "unsigned"), (other_service, "wrong_signer"), (impostor, "bad_signature")]
    for bus, _ in forged:
        await bus.connect(attempts=3)
    moved = EventSigner(identity(p.keys, "executor")).headers(subject, job_event("job-signed"))
    rejected_before = {reason: metrics.EVENTS_REJECTED.labels("signed-only", reason)._value.get()
                       for reason in signing.REASONS}
    try:
        for bus, reason in forged:
            await bus.publish(subject, job_event(f"job-{reason}"))
        await anonymous.publish(subject, job_event("job-moved"), headers=moved)  # a real signature, another body
        await anonymous.publish(subject, job_event("job-stranger"), headers={"Ik-Signer": "mallory",
                                                                             "Ik-Signature": "AAAA"})
        genuine = job_event("job-genuine")
        await p.bus.publish(subject, genuine)
    finally:
        for bus, _ in forged:
            await bus.close()
    seen: list[str] = []

    async def handler(uow, env):
        seen.append(env.job_succeeded.job_id)
        await record(uow, env)

    dead = await p.bus.js.pull_subscribe(p.bus.names.deadletter_subject("signed-only"), durable="dlq-signed",
                                         stream=p.bus.names.deadletter_stream)
    task = await run_consumer(p, ConsumerSpec("signed-only", "executor", "ik.executor.job.*", handler))
    try:
        letters = [events_pb2.DeadLetter.FromString(m.data) for m in await dead.fetch(5, timeout=15)]
        while len(letters) < 5:
            letters += [events_pb2.DeadLetter.FromString(m.data) for m in await dead.fetch(5 - len(letters),
                                                                                           timeout=15)]
        await eventually(lambda: p.consumer_settled("signed-only", 6))
    finally:
        await stop(task)
    assert seen == ["job-genuine"]
    assert await p.applications() == {events_pb2.Envelope.FromString(genuine).event_id: 1}
    reasons = [letter.error for letter in letters]
    assert reasons == ["rejected: unsigned", "rejected: wrong_signer", "rejected: bad_signature",
                       "rejected: bad_signature", "rejected: unknown_signer"]
    assert [events_pb2.Envelope.FromString(letter.data).job_succeeded.job_id for letter in letters] == \
        ["job-unsigned", "job-wrong_signer", "job-bad_signature", "job-moved", "job-stranger"]
    counted = {reason: metrics.EVENTS_REJECTED.labels("signed-only", reason)._value.get() - rejected_before[reason]
               for reason in signing.REASONS}
    assert counted == {"unsigned": 1, "wrong_signer": 1, "bad_signature": 2, "unknown_signer": 1}


async def test_an_event_waits_for_its_publisher_to_answer_without_using_up_deliveries(plumbing):
    """The publisher confirms an event before it is applied; while it is not
    reachable the event waits (no redelivery counted, no dead letter), and
    an event it does not confirm is not applied."""
    p = plumbing
    envs = await p.emit_jobs(2)
    await OutboxRelay(p.db, outbox_table, p.bus).relay_once()
    asked: list[str] = []

    async def confirm(env):
        asked.append(env.job_succeeded.job_id)
        if len(asked) <= 3:
            raise Unavailable("the executor service is not reachable")
        return env if env.job_succeeded.job_id == "job-0" else None

    task = await run_consumer(p, ConsumerSpec("confirming", "executor", "ik.executor.job.*", record, max_deliver=2,
                                              confirm=confirm))
    try:
        await eventually(lambda: p.consumer_settled("confirming", 2), timeout=30)
    finally:
        await stop(task)
    assert asked == ["job-0"] * 4 + ["job-1"]
    assert await p.applications() == {envs[0].event_id: 1}
    info = await p.bus.js.consumer_info(p.bus.names.context_stream("executor"), "confirming")
    assert info.num_redelivered == 0
