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
    engine = create_sync_engine(database_url)
    try:
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), metadata)
    finally:
        engine.dispose()
    assert diff == []
