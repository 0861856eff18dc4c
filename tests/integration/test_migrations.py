"""Each service's Alembic migrations build exactly the schema its code uses,
on SQLite and on PostgreSQL, and running them again changes nothing."""
import importlib
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from services.common.config import SERVICES
from services.common.db import create_sync_engine
from services.common.migrations import upgrade

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("service", SERVICES)
def test_migrations_match_tables(service, database_url):
    metadata = importlib.import_module(f"services.{service}.adapters.tables").metadata
    migrations = ROOT / "services" / service / "migrations"
    upgrade(migrations, database_url)
    upgrade(migrations, database_url)  # idempotent: a restart applies nothing new
    assert schema_diff(database_url, metadata) == []


def schema_diff(url: str, metadata) -> list:
    """What differs between the database's schema and the service's tables."""
    engine = create_sync_engine(url)
    try:
        with engine.connect() as conn:
            return compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), metadata)
    finally:
        engine.dispose()


def test_replicas_starting_at_once_on_a_fresh_postgres_database_take_turns(postgres):
    """Three replicas (processes) migrating one fresh database at the same
    moment: without the advisory lock they raced in CREATE TABLE / CREATE TYPE."""
    import subprocess
    import sys
    url = postgres.create()
    migrations = ROOT / "services" / "resource" / "migrations"
    code = ("import sys, time; from pathlib import Path; from services.common.migrations import upgrade; "
            "time.sleep(max(0.0, float(sys.argv[3]) - time.time())); upgrade(Path(sys.argv[1]), sys.argv[2])")
    at = __import__("time").time() + 2  # all three start their migrations at this moment
    replicas = [subprocess.Popen([sys.executable, "-c", code, str(migrations), url, str(at)], cwd=ROOT,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(3)]
    outcomes = [(r.wait(120), r.stdout.read()) for r in replicas]
    assert [code for code, _ in outcomes] == [0, 0, 0], [out[-2000:] for _, out in outcomes]
    metadata = importlib.import_module("services.resource.adapters.tables").metadata
    assert schema_diff(url, metadata) == []


def _insert_row(url: str, table: str, values: dict) -> None:
    """A row with the given values and a placeholder in every other required column."""
    import datetime
    import sqlalchemy as sa
    engine = create_sync_engine(url)
    try:
        with engine.begin() as conn:
            t = sa.Table(table, sa.MetaData(), autoload_with=conn)
            row = dict(values)
            for c in t.columns:
                if c.name in row or c.nullable or c.server_default is not None:
                    continue
                python_type = c.type.python_type if not isinstance(c.type, sa.JSON) else dict
                row[c.name] = {str: "x", int: 0, float: 0.0, bool: False, dict: {}, bytes: b"",
                               datetime.datetime: datetime.datetime(2026, 1, 1)}[python_type]
            conn.execute(t.insert().values(**row))
    finally:
        engine.dispose()


@pytest.mark.parametrize("service, before, table, live, settled", [
    ("executor", "executor_0007", "jobs", {"id": "j1", "status": "waiting"}, "UPDATE jobs SET status = 'cancelled'"),
    ("resource", "resource_0008", "resources",
     {"id": "r1", "status": "queued", "prepared_after_job_id": "j1"}, "DELETE FROM resources"),
])
def test_removing_preparing_ahead_refuses_while_a_prepared_row_is_live(service, before, table, live, settled,
                                                                       database_url):
    """A job still waiting for its upstream, or a resource prepared ahead and still
    hidden, would be left to code that no longer exists: the migration that drops
    their columns refuses until they settled (the previous version, preparing
    ahead off, settles them), and then runs."""
    import sqlalchemy as sa
    from alembic import command
    from services.common.migrations import alembic_config
    migrations = ROOT / "services" / service / "migrations"
    command.upgrade(alembic_config(migrations, database_url), before)
    _insert_row(database_url, table, live)
    with pytest.raises(RuntimeError, match="IK_WORKFLOW_PREPARE_AHEAD=off"):
        upgrade(migrations, database_url)
    engine = create_sync_engine(database_url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text(settled))
    finally:
        engine.dispose()
    upgrade(migrations, database_url)
    metadata = importlib.import_module(f"services.{service}.adapters.tables").metadata
    assert schema_diff(database_url, metadata) == []
