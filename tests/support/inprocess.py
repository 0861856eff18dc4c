"""Runs one service's Runtime inside the test's event loop, on a free port,
with a real database and real NATS: the same code path as the process,
without the process. Clients talk to it through gRPC."""
from __future__ import annotations

import asyncio
import contextlib
import uuid
from pathlib import Path

import grpc

from services.common.auth import Role, mint_token
from services.common.config import Settings
from services.common.migrations import upgrade
from services.common.runtime import Runtime, ServiceDefinition
from tests.support.processes import free_port


class InProcessService:
    def __init__(self, definition: ServiceDefinition, database_url: str, event_prefix: str, nats_url: str,
                 data_dir: Path, extra_env: dict[str, str] | None = None, secret: str | None = None,
                 port: int | None = None):
        self.secret = secret or uuid.uuid4().hex
        env = {"IK_DATA_DIR": str(data_dir), "IK_EVENT_PREFIX": event_prefix, "IK_NATS_URL": nats_url,
               "IK_AUTH_SECRET": self.secret, "IK_SHUTDOWN_GRACE": "1",
               f"IK_{definition.name.upper()}_DATABASE_URL": database_url,
               f"IK_{definition.name.upper()}_PORT": str(port or free_port()), **(extra_env or {})}
        self.settings = Settings.from_env(definition.name, env)
        self.definition = definition
        self.runtime: Runtime | None = None
        self.channel: grpc.aio.Channel | None = None

    def metadata(self, role: Role = Role.ADMIN, user: str = "alice") -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {mint_token(self.secret, user, role)}")]

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.runtime.port}"

    async def __aenter__(self) -> "InProcessService":
        upgrade(self.definition.migrations_dir, self.settings.database_url)
        self.runtime = Runtime(self.definition, self.settings)
        await self.runtime.start()
        self.channel = grpc.aio.insecure_channel(self.target)
        return self

    async def __aexit__(self, *exc) -> None:
        with contextlib.suppress(Exception):
            await self.channel.close()
        await self.runtime.stop()


class InProcessPlatform:
    """Several services in this event loop, wired to each other as in
    production: one auth secret, one event prefix, each other's addresses."""

    def __init__(self, definitions: dict[str, ServiceDefinition], database_urls: dict[str, str], event_prefix: str,
                 nats_url: str, data_dir: Path, extra_env: dict[str, str] | None = None):
        self.secret = uuid.uuid4().hex
        ports = {name: free_port() for name in definitions}
        targets = {f"IK_{name.upper()}_TARGET": f"127.0.0.1:{port}" for name, port in ports.items()}
        self.services = {
            name: InProcessService(d, database_urls[name], event_prefix, nats_url, data_dir,
                                   {**targets, **(extra_env or {})}, secret=self.secret, port=ports[name])
            for name, d in definitions.items()}

    def __getitem__(self, name: str) -> InProcessService:
        return self.services[name]

    def metadata(self, role: Role = Role.ADMIN, user: str = "alice") -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {mint_token(self.secret, user, role)}")]

    async def start(self, *names: str) -> None:
        for name in names or self.services:
            await self.services[name].__aenter__()

    async def stop(self, *names: str) -> None:
        """Stops the named services (all by default) at once: each one's
        graceful stop waits about a second for its consumers' last fetch, and
        one after the other that added up to most of a test's teardown."""
        await asyncio.gather(*[self._stop(self.services[name]) for name in names or self.services])

    @staticmethod
    async def _stop(service: InProcessService) -> None:
        if service.runtime is not None:
            await service.__aexit__(None, None, None)
            service.runtime = None

    async def __aenter__(self) -> "InProcessPlatform":
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()
