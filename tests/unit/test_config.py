from pathlib import Path

import pytest

from services.common.bus import Names
from services.common.config import ConfigError, Settings


def test_defaults(tmp_path):
    s = Settings.from_env("resource", {"IK_DATA_DIR": str(tmp_path)})
    assert s.port == 50053
    assert s.database_url == f"sqlite:///{tmp_path / 'resource.db'}"
    assert s.nats_url == "nats://127.0.0.1:4222"
    assert s.targets["executor"] == "127.0.0.1:50054"
    assert s.event_prefix == ""
    # the generated secret is stable for all services of one data dir
    assert s.auth_secret == Settings.from_env("executor", {"IK_DATA_DIR": str(tmp_path)}).auth_secret
    assert (Path(tmp_path) / "auth-secret").stat().st_mode & 0o777 == 0o600


def test_overrides(tmp_path):
    s = Settings.from_env("workflow", {
        "IK_DATA_DIR": str(tmp_path), "IK_WORKFLOW_PORT": "6000",
        "IK_WORKFLOW_DATABASE_URL": "postgresql://u@h/db", "IK_EVENT_PREFIX": "ci_1",
        "IK_AUTH_SECRET": "x", "IK_BLUEPRINT_TARGET": "blueprint:50051"})
    assert (s.port, s.database_url, s.event_prefix, s.auth_secret) == (6000, "postgresql://u@h/db", "ci_1", "x")
    assert s.targets["blueprint"] == "blueprint:50051"


def test_prefix_must_be_safe_for_subjects():
    with pytest.raises(ConfigError):
        Settings.from_env("workflow", {"IK_EVENT_PREFIX": "a.b>"})


def test_sqlite_commit_durability_is_normal_unless_asked_for_more(tmp_path):
    env = {"IK_DATA_DIR": str(tmp_path), "IK_AUTH_SECRET": "x"}
    assert Settings.from_env("workflow", env).sqlite_synchronous == "NORMAL"
    assert Settings.from_env("workflow", {**env, "IK_SQLITE_SYNCHRONOUS": "full"}).sqlite_synchronous == "FULL"
    with pytest.raises(ConfigError):
        Settings.from_env("workflow", {**env, "IK_SQLITE_SYNCHRONOUS": "sometimes"})


def test_names_with_and_without_prefix():
    assert Names("").context_stream("executor") == "IK_EXECUTOR"
    assert Names("").subject("ik.executor.job.queued") == "ik.executor.job.queued"
    n = Names("t1")
    assert n.context_stream("executor") == "T1_IK_EXECUTOR"
    assert n.subject("ik.executor.job.queued") == "t1.ik.executor.job.queued"
    assert n.unprefixed("t1.ik.executor.job.queued") == "ik.executor.job.queued"
