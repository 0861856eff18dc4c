"""Health follows readiness (a real nats-server of the test's own and a
PostgreSQL database): NOT_SERVING while NATS or the database cannot be
reached, SERVING again once they are back."""
from __future__ import annotations

import asyncio
import socket
import subprocess
import time

import psycopg
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy.engine import make_url

from services.approval.__main__ import DEFINITION
from tests.support.inprocess import InProcessService
from tests.support.processes import free_port
from tests.support.waiting import eventually

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


def start_nats(port: int, store) -> subprocess.Popen:
    server = "nats-server" if subprocess.run(["which", "nats-server"], capture_output=True).returncode == 0 \
        else "/usr/sbin/nats-server"
    proc = subprocess.Popen([server, "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", str(store)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc
        time.sleep(0.1)
    raise RuntimeError("nats-server did not start")


@pytest.fixture
def own_nats(tmp_path):
    port = free_port()
    state = {"proc": start_nats(port, tmp_path / "js")}
    yield port, state, lambda: state.update(proc=start_nats(port, tmp_path / "js"))
    state["proc"].terminate()
    state["proc"].wait(10)


async def test_health_is_not_serving_while_nats_or_the_database_is_unreachable(tmp_path, event_prefix, own_nats,
                                                                             postgres):
    port, nats, restart = own_nats
    url = postgres.create()
    name = make_url(url).database
    svc = InProcessService(DEFINITION, url, event_prefix, f"nats://127.0.0.1:{port}", tmp_path / "data",
                           extra_env={"IK_HEALTH_INTERVAL": "0.3"})
    await svc.__aenter__()
    stub = health_pb2_grpc.HealthStub(svc.channel)
    service = "infrakitchen.approval.v1.ApprovalService"

    async def status(expected):
        async def check():
            got = [(await stub.Check(health_pb2.HealthCheckRequest(service=s))).status for s in ("", service)]
            return got == [expected, expected]
        await eventually(check, timeout=20, interval=0.2)

    admin = make_url(url).set(drivername="postgresql", database="postgres").render_as_string(hide_password=False)
    try:
        await status(SERVING)
        nats["proc"].kill()
        nats["proc"].wait(10)
        await status(NOT_SERVING)
        restart()
        await status(SERVING)
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS false')
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
        await status(NOT_SERVING)
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS true')
        await status(SERVING)
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS true')
        await svc.__aexit__(None, None, None)
        await asyncio.sleep(0)
