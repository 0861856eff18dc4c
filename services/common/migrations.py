"""Alembic, driven from code: each service keeps its revisions in
services/<context>/migrations/versions and an env.py that calls run_env()."""
from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

from services.common.db import create_sync_engine


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
    try:
        with engine.connect() as connection:
            context.configure(
                connection=connection,
                target_metadata=cfg.attributes.get("target_metadata"),
                render_as_batch=engine.dialect.name == "sqlite",
                compare_type=True,
            )
            with context.begin_transaction():
                context.run_migrations()
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
