"""nats-server processes on loopback ports with the platform's NATS
identities (services.common.nats_identities): one server, or a JetStream
cluster of three for the tests and benchmarks that run the platform on many
machines' engines. The identities' seeds are made in `identities` (a data
directory's `nats-identities/`, where the services find theirs)."""
from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess
import time
from pathlib import Path

import nats

from services.common import nats_identities
from tests.support.processes import free_port


def nats_server_binary() -> str:
    return shutil.which("nats-server") or "/usr/sbin/nats-server"


class NatsCluster:
    def __init__(self, directory: Path, size: int = 3, name: str = "ik", *, identities: Path, prefix: str = ""):
        self.directory = directory
        self.name = name
        self.client_ports = [free_port() for _ in range(size)]
        self.cluster_ports = [free_port() for _ in range(size)]
        self.procs: dict[int, subprocess.Popen] = {}
        self.identities = identities
        directory.mkdir(parents=True, exist_ok=True)
        self.authorization = directory / "authorization.conf"
        self.authorization.write_text(nats_identities.authorization(nats_identities.ensure(identities), prefix))

    def connect_options(self, identity: str = nats_identities.ADMIN) -> dict:
        """nats.connect's options to log in as one identity (admin by default)."""
        return {"nkeys_seed": str(nats_identities.seed_file(self.identities, identity))}

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
        store = self.directory / f"node-{n}"
        store.mkdir(parents=True, exist_ok=True)
        config = self.directory / f"node-{n}.conf"
        clustered = ""
        if len(self.client_ports) > 1:
            routes = ", ".join(f'"nats://127.0.0.1:{p}"' for i, p in enumerate(self.cluster_ports) if i != n)
            clustered = (f'cluster {{ name: "{self.name}", listen: "127.0.0.1:{self.cluster_ports[n]}", '
                         f'routes: [{routes}] }}\n')
        config.write_text(f'server_name: "{self.name}-{n}"\nlisten: "127.0.0.1:{self.client_ports[n]}"\n'
                          f'jetstream {{ store_dir: "{store}" }}\n{clustered}include "{self.authorization.name}"\n')
        log = open(self.directory / f"node-{n}.log", "ab")
        self.procs[n] = subprocess.Popen([nats_server_binary(), "-c", str(config)], stdout=log,
                                         stderr=subprocess.STDOUT)

    def kill(self, n: int) -> None:
        proc = self.procs.pop(n)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    def wait_ready(self, timeout: float) -> None:
        """Until JetStream answers through every live node (a meta leader is elected)."""
        async def ready() -> bool:
            for n in self.procs:
                try:
                    nc = await nats.connect(self.node_url(n), connect_timeout=1, max_reconnect_attempts=0,
                                            **self.connect_options())
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
