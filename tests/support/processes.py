"""Starts InfraKitchen services as separate OS processes, the way `make run`
does, each on a free port, with a private data dir and event prefix."""
from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.auth import Role, mint_token
from services.common.config import SERVICES
from services.common.tls import GrpcTls

ROOT = Path(__file__).resolve().parents[2]


_handed_out: set[int] = set()


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A port to listen on, below the kernel's ephemeral range: outgoing
    connections take their ports from that range, so a port found free there
    (bind to 0) could be taken by one before the service binds it. Never the
    same port twice in one test process."""
    low, high = 20000, _ephemeral_low() - 1
    for _ in range(500):
        port = random.randint(low, high)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free port between {low} and {high}")


class PortTaken(RuntimeError):
    """A service could not listen on the port it was given."""


class ServiceProcesses:
    def __init__(self, data_dir: Path, event_prefix: str, nats_url: str,
                 database_urls: dict[str, str] | None = None, extra_env: dict[str, str] | None = None):
        self.data_dir = data_dir
        self.secret = "test-secret-" + uuid.uuid4().hex
        self.ports = {name: free_port() for name in SERVICES}
        self.env = {
            **os.environ,
            "IK_DATA_DIR": str(data_dir),
            "IK_EVENT_PREFIX": event_prefix,
            "IK_NATS_URL": nats_url,
            "IK_AUTH_SECRET": self.secret,
            "IK_SHUTDOWN_GRACE": "2",
            **{f"IK_{n.upper()}_PORT": str(p) for n, p in self.ports.items()},
            **{f"IK_{n.upper()}_DATABASE_URL": url for n, url in (database_urls or {}).items()},
            **(extra_env or {}),
        }
        self.procs: dict[str, subprocess.Popen] = {}
        # alias -> (service, extra env): a second executor is e.g. "executor-b".
        self.instances: dict[str, tuple[str, dict[str, str]]] = {name: (name, {}) for name in SERVICES}

    def add_instance(self, alias: str, service: str, **env: str) -> None:
        """Another process of `service` (same data dir and databases), on its own port."""
        self.ports[alias] = free_port()
        self.instances[alias] = (service, {f"IK_{service.upper()}_PORT": str(self.ports[alias]), **env})

    def target(self, name: str) -> str:
        return f"127.0.0.1:{self.ports[name]}"

    def token(self, role: Role = Role.ADMIN, user: str = "alice") -> str:
        return mint_token(self.secret, user, role)

    def metadata(self, role: Role = Role.ADMIN, user: str = "alice") -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {self.token(role, user)}")]

    def log(self, name: str) -> str:
        return (self.data_dir / f"{name}.log").read_text(errors="replace")

    def start(self, *names: str, timeout: float = 60.0) -> None:
        if names:
            self._start(names, timeout)
            return
        for attempt in range(3):
            try:
                self._start(SERVICES, timeout)
                return
            except PortTaken:
                # Another process took a port between free_port() and the bind (tests run in
                # parallel): every service is told every port, so all start again on new ones.
                self.stop(sig=signal.SIGKILL)
                if attempt == 2:
                    raise
                for name in SERVICES:
                    self.ports[name] = free_port()
                    self.env[f"IK_{name.upper()}_PORT"] = str(self.ports[name])

    def _start(self, names, timeout: float) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        for name in names:
            logfile = open(self.data_dir / f"{name}.log", "ab")
            service, env = self.instances[name]
            self.procs[name] = subprocess.Popen(
                [sys.executable, "-m", f"services.{service}"], cwd=ROOT, env={**self.env, **env},
                stdout=logfile, stderr=subprocess.STDOUT)
        for name in names:
            self.wait_serving(name, timeout)

    def channel(self, name: str) -> grpc.Channel:
        """A channel to a service, with TLS when the services are told to use it."""
        return GrpcTls.from_env(self.env).channel(self.target(name))

    def wait_serving(self, name: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self.channel(name) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                proc = self.procs[name]
                if proc.poll() is not None:
                    log = self.log(name)
                    if "cannot listen on" in log[-2000:]:
                        raise PortTaken(f"{name}: its port was taken")
                    raise RuntimeError(f"{name} exited with {proc.returncode}:\n{log}")
                try:
                    if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == \
                            health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.2)
        raise TimeoutError(f"{name} not SERVING after {timeout}s:\n{self.log(name)}")

    def stop(self, *names: str, sig: int = signal.SIGTERM, timeout: float = 20.0) -> dict[str, int]:
        codes = {}
        targets = names or tuple(self.procs)
        for name in targets:
            proc = self.procs.get(name)
            if proc is not None and proc.poll() is None:
                proc.send_signal(sig)
        for name in targets:
            proc = self.procs.pop(name, None)
            if proc is None:
                continue
            try:
                codes[name] = proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                codes[name] = proc.wait()
        return codes


def drop_streams(nats_url: str, prefix: str, connect_options: dict | None = None) -> None:
    """Deletes every stream of a test's event prefix (sync; for fixtures)."""
    import asyncio

    from services.common.bus import EventBus

    async def drop():
        bus = EventBus(nats_url, prefix, connect_options=connect_options)
        await bus.connect(attempts=3)
        try:
            await bus.delete_streams()
        finally:
            await bus.close()

    asyncio.run(drop())
