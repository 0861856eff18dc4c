"""A JetStream cluster of three nats-server processes on loopback ports, for
the tests and benchmarks that run the platform on many machines' engines."""
from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess
import time
from pathlib import Path

import nats

from tests.support.processes import free_port


def nats_server_binary() -> str:
    return shutil.which("nats-server") or "/usr/sbin/nats-server"


class NatsCluster:
    def __init__(self, directory: Path, size: int = 3, name: str = "ik"):
        self.directory = directory
        self.name = name
        self.client_ports = [free_port() for _ in range(size)]
        self.cluster_ports = [free_port() for _ in range(size)]
        self.procs: dict[int, subprocess.Popen] = {}

    @property
    def url(self) -> str:
        """Every node, comma-separated (IK_NATS_URL)."""
        return ",".join(f"nats://127.0.0.1:{p}" for p in self.client_ports)

    def node_url(self, n: int) -> str:
        return f"nats://127.0.0.1:{self.client_ports[n]}"

    def start(self, timeout: float = 60.0) -> None:
        for n in range(len(self.client_ports)):
            self.start_node(n)
        self.wait_ready(timeout)

    def start_node(self, n: int) -> None:
        routes = ",".join(f"nats://127.0.0.1:{p}" for i, p in enumerate(self.cluster_ports) if i != n)
        store = self.directory / f"node-{n}"
        store.mkdir(parents=True, exist_ok=True)
        log = open(self.directory / f"node-{n}.log", "ab")
        self.procs[n] = subprocess.Popen(
            [nats_server_binary(), "-a", "127.0.0.1", "-p", str(self.client_ports[n]), "-js", "-sd", str(store),
             "--server_name", f"{self.name}-{n}", "--cluster_name", self.name,
             "--cluster", f"nats://127.0.0.1:{self.cluster_ports[n]}", "--routes", routes],
            stdout=log, stderr=subprocess.STDOUT)

    def kill(self, n: int) -> None:
        proc = self.procs.pop(n)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    def wait_ready(self, timeout: float) -> None:
        """Until JetStream answers through every live node (a meta leader is elected)."""
        async def ready() -> bool:
            for n in self.procs:
                try:
                    nc = await nats.connect(self.node_url(n), connect_timeout=1, max_reconnect_attempts=0)
                except Exception:  # noqa: BLE001 - not listening yet
                    return False
                try:
                    await nc.jetstream(timeout=2).account_info()
                except Exception:  # noqa: BLE001 - no meta leader yet
                    return False
                finally:
                    await nc.close()
            return True
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if asyncio.run(ready()):
                return
            time.sleep(0.5)
        raise TimeoutError(f"the NATS cluster did not become ready in {timeout}s")

    def stop(self) -> None:
        for proc in self.procs.values():
            proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.procs.clear()
