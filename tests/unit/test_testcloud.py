"""The test cloud itself (tests/testcloud): what tests rely on it for. Its
provider's errors for a busy or throttling cloud are what the workflow's
built-in retry patterns call transient; faults, out-of-band changes and
ownership behave as documented."""
from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from services.common.retry import RetryPolicy
from tests.testcloud.cloud import CloudServer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "testcloud" / "provider"))
from testcloud_client import Client, CloudCallFailed  # noqa: E402


@pytest.fixture
def cloud():
    with CloudServer() as server:
        server.cloud.tokens.add("t")
        yield server


def _call(cloud, method, path, body=None, token="t"):
    request = urllib.request.Request(f"{cloud.url}{path}", method=method, data=json.dumps(body).encode()
                                     if body is not None else None, headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=5) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def test_a_busy_or_throttling_cloud_fails_the_call_with_words_the_retry_policy_calls_transient(cloud):
    client = Client(cloud.url, "t", "")
    cloud.fail_next(1, 503)
    cloud.fail_next(1, 429)
    failures = []
    for _ in range(2):
        with pytest.raises(CloudCallFailed) as caught:
            client.call("POST", "/v1/networks", {"name": "n", "cidr": "10.0.0.0/16"})
        failures.append(str(caught.value))
    assert "HTTP 503" in failures[0] and "retry after 1s" in failures[0]
    assert "HTTP 429" in failures[1]
    assert all(RetryPolicy().transient(f) for f in failures)
    created = client.call("POST", "/v1/networks", {"name": "n", "cidr": "10.0.0.0/16"})
    assert created["gateway"] == "10.0.0.1" and created["id"].startswith("net-")
    assert [e["status"] for e in cloud.cloud.log] == [503, 429, 201]


def test_values_are_the_clouds_and_changes_outside_are_seen(cloud):
    _, net = _call(cloud, "POST", "/v1/networks", {"name": "n", "cidr": "10.1.0.0/16"})
    status, db = _call(cloud, "POST", "/v1/databases", {"name": "d", "network_id": net["id"], "engine": "postgres",
                                                         "size": 10})
    assert status == 201 and db["endpoint"].startswith(db["id"]) and len(db["password"]) >= 20
    assert _call(cloud, "PATCH", f"/v1/databases/{db['id']}", {"engine": "mysql"})[0] == 400  # not in place
    assert _call(cloud, "PATCH", f"/v1/databases/{db['id']}", {"size": 20})[1]["size"] == 20
    cloud.change_out_of_band(db["id"], size=50)  # someone's console
    assert _call(cloud, "GET", f"/v1/databases/{db['id']}")[1]["size"] == 50
    assert _call(cloud, "DELETE", f"/v1/networks/{net['id']}")[0] == 409  # still has a database
    assert _call(cloud, "GET", "/v1/networks", token="wrong")[0] == 401
    assert _call(cloud, "POST", "/v1/databases", {"name": "x", "network_id": "net-none", "engine": "postgres",
                                                  "size": 1})[0] == 404


def test_creates_take_as_long_as_the_cloud_is_told(cloud):
    import time
    assert _call(cloud, "POST", "/_admin/config", {"create_delay": {"networks": 0.5}})[0] == 200
    started = time.monotonic()
    assert _call(cloud, "POST", "/v1/networks", {"name": "slow", "cidr": "10.9.0.0/16"})[0] == 201
    assert time.monotonic() - started >= 0.5
    started = time.monotonic()
    assert _call(cloud, "POST", "/v1/buckets", {"name": "quick"})[0] == 201
    assert time.monotonic() - started < 0.5
