"""A pg storage's state reaches terraform through the executor (issue 28):
moved from PostgreSQL into a file for the run and back, under a lock that
keeps other runs out; written back only over the row the run started from;
what a killed run left on disk is written back when it fits, else kept
aside, never over a newer row; a plan writes nothing back; and the files the
job could plant in its state directory (a FIFO, a symlink, a huge file, a
state that is not one) never hang, leak or crash the executor. Against a
real PostgreSQL."""
from __future__ import annotations

import asyncio
import json
import os

import psycopg
import pytest
from sqlalchemy.engine import make_url

from services.executor.adapters import pg_state
from services.executor.adapters.pg_state import PgState, StateLocked, left_on_disk, state_file, write_back_leftovers


def libpq(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def state(serial: int, lineage: str = "lineage-1", value: str = "v") -> str:
    return json.dumps({"version": 4, "serial": serial, "lineage": lineage, "resources": [], "outputs": {},
                       "value": value})


def stored(conninfo: str, name: str) -> str | None:
    with psycopg.connect(conninfo) as conn:
        row = conn.execute("SELECT data FROM ik_states.states WHERE name = %s", (name,)).fetchone()
    return row[0] if row else None


def put(conninfo: str, name: str, text: str) -> None:
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute("INSERT INTO ik_states.states (name, data) VALUES (%s, %s) ON CONFLICT (name) "
                     "DO UPDATE SET data = EXCLUDED.data", (name, text))


@pytest.fixture
def db(postgres) -> str:
    return libpq(postgres.create())


async def test_a_run_gets_the_state_in_a_private_file_and_its_changes_go_back(db, tmp_path):
    path = state_file(tmp_path, "storage-1", "team__vpc")
    async with PgState(db, "ik_states", "team__vpc", path, 5):
        assert not path.exists() and path.parent.is_dir(), "no state yet: an empty directory of its own"
        path.write_text(state(1))  # what terraform writes
    assert json.loads(stored(db, "team__vpc"))["serial"] == 1
    assert not path.parent.exists() and not list(tmp_path.iterdir()), "nothing of the state stays on disk"
    async with PgState(db, "ik_states", "team__vpc", path, 5):
        assert json.loads(path.read_text())["serial"] == 1
        assert path.stat().st_mode & 0o077 == 0 and path.parent.stat().st_mode & 0o077 == 0
        path.write_text(state(2))
    assert json.loads(stored(db, "team__vpc"))["serial"] == 2 and not path.exists()


async def test_a_plan_writes_nothing_back(db, tmp_path):
    path = state_file(tmp_path, "s", "p")
    async with PgState(db, "ik_states", "p", path, 5):
        path.write_text(state(1))
    async with PgState(db, "ik_states", "p", path, 5, plan=True):
        path.write_text(state(7, value="planned"))  # a module's code rewriting its state during a plan
    assert json.loads(stored(db, "p"))["serial"] == 1


async def test_one_run_at_a_time_holds_a_state(db, tmp_path):
    path = state_file(tmp_path, "storage-1", "app")
    async with PgState(db, "ik_states", "app", path, 5):
        with pytest.raises(StateLocked):
            async with PgState(db, "ik_states", "app", state_file(tmp_path / "other", "storage-1", "app"), 1):
                pass
        # Another state, its first run too: no wait.
        async with PgState(db, "ik_states", "web", state_file(tmp_path, "storage-1", "web"), 0.1):
            pass
        path.write_text(state(1))
    async with PgState(db, "ik_states", "app", state_file(tmp_path / "other", "storage-1", "app"), 1):
        pass  # free again


async def test_a_run_never_writes_over_a_row_that_moved_on(db, tmp_path):
    path = state_file(tmp_path, "s", "moved")
    async with PgState(db, "ik_states", "moved", path, 5):
        path.write_text(state(1))
    async with PgState(db, "ik_states", "moved", path, 5):
        put(db, "moved", state(5, value="someone else's"))  # as if the lock had been lost
        path.write_text(state(2, value="mine"))
    assert json.loads(stored(db, "moved"))["value"] == "someone else's"
    [aside] = list((tmp_path / ".conflicts").iterdir())
    assert json.loads(aside.read_text())["value"] == "mine" and aside.stat().st_mode & 0o077 == 0


async def test_the_run_s_progress_reaches_the_database_while_it_runs(db, tmp_path, monkeypatch):
    monkeypatch.setattr(pg_state, "SYNC_SECONDS", 0.2)
    path = state_file(tmp_path, "s", "long")
    async with PgState(db, "ik_states", "long", path, 5):
        path.write_text(state(1, value="half-way"))
        for _ in range(50):
            if stored(db, "long"):
                break
            await asyncio.sleep(0.1)
        assert json.loads(stored(db, "long"))["value"] == "half-way"
        path.write_text(state(2, value="done"))
    assert json.loads(stored(db, "long"))["value"] == "done"


async def test_what_a_killed_run_left_is_written_back_only_when_it_fits(db, tmp_path):
    path = state_file(tmp_path, "storage-1", "db")
    async with PgState(db, "ik_states", "db", path, 5):
        path.write_text(state(3))

    def killed_run(left: str, base: int) -> None:
        """What a run killed after terraform wrote `left` leaves: its directory and record."""
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(left)
        path.parent.with_name(path.parent.name + ".json").write_text(
            json.dumps({"base": [base, "lineage-1"], "plan": False}))

    killed_run(state(4, value="left"), base=3)
    async with PgState(db, "ik_states", "db", path, 5):
        assert json.loads(path.read_text())["serial"] == 4
    assert json.loads(stored(db, "db"))["value"] == "left"
    # Left by a run that started from serial 3, but the row moved on to 4 since: kept aside.
    killed_run(state(5, value="stale"), base=3)
    async with PgState(db, "ik_states", "db", path, 5):
        assert json.loads(path.read_text())["value"] == "left"
    assert json.loads(stored(db, "db"))["value"] == "left"
    assert any("stale" in p.read_text() for p in (tmp_path / ".conflicts").iterdir())


async def test_files_a_job_plants_never_hang_leak_or_crash_the_executor(db, tmp_path, monkeypatch):
    secret = tmp_path / "executor-secret.json"
    secret.write_text(state(9, value="the executor's secret"))
    monkeypatch.setattr(pg_state, "MAX_STATE_BYTES", 1024)
    path = state_file(tmp_path / "root", "s", "hostile")
    async with PgState(db, "ik_states", "hostile", path, 5):
        path.write_text(state(1))
    plants = {
        "fifo": lambda: os.mkfifo(path),
        "symlink": lambda: os.symlink(secret, path),
        "huge": lambda: path.write_text(state(2, value="x" * 4096)),
        "not a state": lambda: path.write_text('{"serial": null, "lineage": {}}'),
        "overflow": lambda: path.write_text('{"serial": 1e999}'),
    }
    for name, plant in plants.items():
        async with asyncio.timeout(10):  # a FIFO opened without O_NONBLOCK would hang here
            async with PgState(db, "ik_states", "hostile", path, 5):
                path.unlink()
                plant()
        assert json.loads(stored(db, "hostile"))["serial"] == 1, name
        assert not path.parent.exists(), name
    # A symlink planted for the executor's own temporary file is gone with the directory.
    async with PgState(db, "ik_states", "hostile", path, 5):
        os.symlink(secret, path.parent / f".{path.name}.{os.getpid()}")
    async with PgState(db, "ik_states", "hostile", path, 5):
        path.write_text(state(2))
    assert json.loads(secret.read_text())["value"] == "the executor's secret"
    assert json.loads(stored(db, "hostile"))["serial"] == 2


async def test_the_executor_writes_back_leftovers_at_start(db, tmp_path):
    class Storage:
        pg_connection_string, pg_schema = db, "ik_states"
    path = state_file(tmp_path, "storage-1", "team__net")
    path.parent.mkdir(parents=True)
    path.write_text(state(1, value="kept"))
    unknown = state_file(tmp_path, "storage-gone", "x")
    unknown.parent.mkdir(parents=True)
    unknown.write_text(state(1))
    await write_back_leftovers(left_on_disk(tmp_path), {"storage-1": Storage()}, 5)
    assert json.loads(stored(db, "team__net"))["value"] == "kept" and not path.parent.exists()
    assert unknown.exists(), "a storage this database does not know: left alone"
