"""Runs one service's Runtime inside the test's event loop, on a free port,
with a real database and real NATS: the same code path as the process,
without the process. Clients talk to it through gRPC."""
from __future__ import annotations

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
                 data_dir: Path, extra_env: dict[str, str] | None = None):
        self.secret = uuid.uuid4().hex
        env = {"IK_DATA_DIR": str(data_dir), "IK_EVENT_PREFIX": event_prefix, "IK_NATS_URL": nats_url,
               "IK_AUTH_SECRET": self.secret, "IK_SHUTDOWN_GRACE": "1",
               f"IK_{definition.name.upper()}_DATABASE_URL": database_url,
               f"IK_{definition.name.upper()}_PORT": str(free_port()), **(extra_env or {})}
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
