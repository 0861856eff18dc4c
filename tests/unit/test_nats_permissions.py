"""The NATS identities' permissions name every durable consumer each service
really makes, on the stream it really reads (a consumer missing here would be
refused by the server at start)."""
from __future__ import annotations

import re
from pathlib import Path

from services.common import nats_identities
from services.executor.app import worker

ROOT = Path(__file__).resolve().parents[2]


def test_every_durable_consumer_of_a_service_is_its_own_in_the_permissions():
    found: dict[str, set[tuple[str, str]]] = {s: set() for s in nats_identities.SERVICES}
    for service in nats_identities.SERVICES:
        for path in (ROOT / "services" / service).rglob("*.py"):
            text = path.read_text()
            for m in re.finditer(r'ConsumerSpec\(\s*durable="([^"]+)",\s*context="([^"]+)"', text):
                found[service].add((m[2], m[1]))
    found["executor"].add(("dispatch", worker.DURABLE))
    assert found == {s: set(d) for s, d in nats_identities.DURABLES.items()}


def test_an_identity_may_change_only_its_own_stream_and_delete_nothing():
    for service in nats_identities.SERVICES:
        p = nats_identities.permissions(service, "t1")
        updates = [s for s in p["publish"]["allow"] if s.startswith("$JS.API.STREAM.UPDATE.")]
        own = {f"$JS.API.STREAM.UPDATE.T1_IK_{service.upper()}"} | (
            {"$JS.API.STREAM.UPDATE.T1_IK_EXECUTOR_JOBS"} if service == "executor" else set())
        assert set(updates) == own
        assert not [s for s in p["publish"]["allow"] if ".DELETE." in s or ".PURGE." in s]
        assert p["subscribe"]["allow"] == [f"_INBOX_{service}.>"]
