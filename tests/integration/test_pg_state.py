"""A pg storage's state reaches terraform through the executor (issue 28):
moved from PostgreSQL into a file for the run and back, under a lock that
keeps other runs (and terraform's own pg backend) out; what a killed run
left on disk is written back when newer, never over a newer copy, and
removed. Against a real PostgreSQL."""
from __future__ import annotations

import json

import psycopg
import pytest
from sqlalchemy.engine import make_url

from services.executor.adapters.pg_state import PgState, StateLocked, state_file, write_back_leftovers


def libpq(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def state(serial: int, lineage: str = "lineage-1", value: str = "v") -> str:
    return json.dumps({"version": 4, "serial": serial, "lineage": lineage, "resources": [], "outputs": {},
                       "value": value})


def stored(conninfo: str, name: str) -> str | None:
    with psycopg.connect(conninfo) as conn:
        row = conn.execute("SELECT data FROM ik_states.states WHERE name = %s", (name,)).fetchone()
    return row[0] if row else None


@pytest.fixture
def db(postgres) -> str:
    return libpq(postgres.create())


async def test_a_run_gets_the_state_in_a_private_file_and_its_changes_go_back(db, tmp_path):
    path = state_file(tmp_path, "storage-1", "team__vpc")
    async with PgState(db, "ik_states", "team__vpc", path, 5):
        assert not path.exists(), "no state yet: no file"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(state(1))  # what terraform writes
    assert json.loads(stored(db, "team__vpc"))["serial"] == 1
    assert not path.exists() and not path.parent.exists(), "nothing of the state stays on disk"
    async with PgState(db, "ik_states", "team__vpc", path, 5):
        assert json.loads(path.read_text())["serial"] == 1
        assert path.stat().st_mode & 0o077 == 0, "mode 600"
        path.write_text(state(2))
    assert json.loads(stored(db, "team__vpc"))["serial"] == 2 and not path.exists()


async def test_one_run_at_a_time_holds_a_state(db, tmp_path):
    path = state_file(tmp_path, "storage-1", "app")
    async with PgState(db, "ik_states", "app", path, 5):
        with pytest.raises(StateLocked):
            async with PgState(db, "ik_states", "app", state_file(tmp_path / "other", "storage-1", "app"), 1):
                pass
        # The first run of another state does not wait for this one.
        async with PgState(db, "ik_states", "web", state_file(tmp_path, "storage-1", "web"), 0.1):
            pass
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(state(1))
    # Once the row exists, its id is the lock, as terraform's pg backend takes it.
    async with PgState(db, "ik_states", "app", path, 5):
        with psycopg.connect(db, autocommit=True) as conn:
            [row_id] = conn.execute("SELECT id FROM ik_states.states WHERE name = 'app'").fetchone()
            assert conn.execute("SELECT pg_try_advisory_lock(%s)", (row_id,)).fetchone()[0] is False
    with psycopg.connect(db, autocommit=True) as conn:
        assert conn.execute("SELECT pg_try_advisory_lock(%s)", (row_id,)).fetchone()[0] is True


async def test_what_a_killed_run_left_is_written_back_only_when_newer(db, tmp_path):
    path = state_file(tmp_path, "storage-1", "db")
    async with PgState(db, "ik_states", "db", path, 5):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(state(3))
    # A run killed after terraform wrote serial 4: the next run starts from it.
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(state(4, value="left"))
    async with PgState(db, "ik_states", "db", path, 5):
        assert json.loads(path.read_text())["serial"] == 4
    assert json.loads(stored(db, "db"))["value"] == "left"
    # An older leftover, or one of another lineage, never replaces the database's copy.
    for leftover in (state(2, value="old"), state(9, lineage="other", value="alien")):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(leftover)
        async with PgState(db, "ik_states", "db", path, 5):
            assert json.loads(path.read_text())["serial"] == 4
        assert json.loads(stored(db, "db"))["value"] == "left" and not path.exists()


async def test_the_executor_writes_back_leftovers_at_start(db, tmp_path):
    class Storage:
        pg_connection_string, pg_schema = db, "ik_states"
    path = state_file(tmp_path, "storage-1", "team__net")
    path.parent.mkdir(parents=True)
    path.write_text(state(1, value="kept"))
    unknown = state_file(tmp_path, "storage-gone", "x")
    unknown.parent.mkdir(parents=True)
    unknown.write_text(state(1))
    await write_back_leftovers(tmp_path, {"storage-1": Storage()}, 5)
    assert json.loads(stored(db, "team__net"))["value"] == "kept" and not path.exists()
    assert unknown.exists(), "a storage this database does not know: left alone"
