from __future__ import annotations

import itertools
import os
import uuid

import pytest

from tests.support.databases import PostgresDatabases
from tests.support.processes import drop_streams

NATS_URL = os.environ.get("IK_TEST_NATS_URL", "nats://127.0.0.1:4222")
RUN_ID = uuid.uuid4().hex[:6]
_prefixes = itertools.count(1)


@pytest.fixture(scope="session")
def nats_url() -> str:
    return NATS_URL


@pytest.fixture
def event_prefix(nats_url):
    """A prefix no other test (or deployment) uses; its streams are deleted afterwards."""
    prefix = f"t{RUN_ID}{next(_prefixes)}"
    yield prefix
    drop_streams(nats_url, prefix)


@pytest.fixture(scope="session")
def postgres():
    dbs = PostgresDatabases()
    yield dbs
    dbs.drop_all()


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request, tmp_path, postgres) -> str:
    """The same test runs once on a SQLite file and once on a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'test.db'}"
    return postgres.create()
