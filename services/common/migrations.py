"""Alembic, driven from code: each service keeps its revisions in
services/<context>/migrations/versions and an env.py that calls run_env()."""
from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config

from services.common.db import create_sync_engine


# The advisory lock key of migrations (any constant; each service has its own database).
MIGRATION_LOCK = 0x1C_4B_17_C0


def alembic_config(migrations_dir: Path, url: str, target_metadata=None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir))
    cfg.attributes["database_url"] = url
    cfg.attributes["target_metadata"] = target_metadata
    return cfg


def upgrade(migrations_dir: Path, url: str) -> None:
    """Applies every pending migration; called by each service at start."""
    command.upgrade(alembic_config(migrations_dir, url), "head")


def run_env() -> None:
    from alembic import context

    cfg = context.config
    engine = create_sync_engine(cfg.attributes["database_url"])
    postgres = engine.dialect.name == "postgresql"
    try:
        with engine.connect() as connection:
            if postgres:
                # Replicas starting at once on a fresh database would race in
                # CREATE TABLE / CREATE TYPE; a session advisory lock makes
                # them take turns (the later ones then find nothing to do).
                connection.execute(sa.text("SELECT pg_advisory_lock(:key)"), {"key": MIGRATION_LOCK})
                connection.commit()
            try:
                context.configure(
                    connection=connection,
                    target_metadata=cfg.attributes.get("target_metadata"),
                    render_as_batch=engine.dialect.name == "sqlite",
                    compare_type=True,
                )
                with context.begin_transaction():
                    context.run_migrations()
                if postgres:
                    connection.commit()
            finally:
                if postgres:
                    connection.execute(sa.text("SELECT pg_advisory_unlock(:key)"), {"key": MIGRATION_LOCK})
                    connection.commit()
    finally:
        engine.dispose()


def create_indexes(indexes: dict[str, tuple[str, list[str]]]) -> None:
    """In a revision's upgrade(): index name -> (table, columns)."""
    from alembic import op
    for name, (table, columns) in indexes.items():
        op.create_index(name, table, columns)


def drop_indexes(indexes: dict[str, tuple[str, list[str]]]) -> None:
    """In a revision's downgrade(): the indexes create_indexes made."""
    from alembic import op
    for name, (table, _) in indexes.items():
        op.drop_index(name, table_name=table)
