"""Fresh databases for tests: a SQLite file in a temp dir, or a new
PostgreSQL database on the machine's server, dropped afterwards."""
from __future__ import annotations

import itertools
import os
import uuid

import psycopg
from sqlalchemy.engine import make_url

PG_ADMIN_URL = os.environ.get("IK_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
_RUN = uuid.uuid4().hex[:8]
_counter = itertools.count(1)


def _admin_conninfo() -> str:
    return make_url(PG_ADMIN_URL).set(drivername="postgresql").render_as_string(hide_password=False)


class PostgresDatabases:
    """Creates databases named ik_test_<run>_<n>; drop_all() removes them."""

    def __init__(self) -> None:
        self.created: list[str] = []

    def create(self) -> str:
        name = f"ik_test_{_RUN}_{next(_counter)}"
        with psycopg.connect(_admin_conninfo(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        self.created.append(name)
        return make_url(PG_ADMIN_URL).set(drivername="postgresql+psycopg", database=name).render_as_string(
            hide_password=False)

    def drop_all(self) -> None:
        with psycopg.connect(_admin_conninfo(), autocommit=True) as conn:
            for name in self.created:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        self.created.clear()
