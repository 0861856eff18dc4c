"""Configuration from IK_* environment variables, with documented defaults.

| variable                 | default                          | meaning |
|--------------------------|----------------------------------|---------|
| IK_DATA_DIR              | ./.data                          | SQLite files, auth secret, local state |
| IK_<SVC>_DATABASE_URL    | sqlite:///<data>/<svc>.db        | e.g. postgresql+psycopg://user@host/db |
| IK_NATS_URL              | nats://127.0.0.1:4222            | NATS server with JetStream; a cluster's servers comma-separated |
| IK_EVENT_PREFIX          | (empty)                          | namespaces streams and subjects |
| IK_HOST                  | 127.0.0.1                        | address the gRPC servers bind |
| IK_<SVC>_PORT            | 50051..50055                     | gRPC port of each service |
| IK_<SVC>_TARGET          | 127.0.0.1:<port>                 | where clients reach a service (a gRPC target: e.g. dns:///ik-resource:50053, or ipv4:10.0.0.1:50053,10.0.0.2:50053 for replicas) |
| IK_AUTH_SECRET           | generated into <data>/auth-secret| HMAC key of bearer tokens |
| IK_LOG_LEVEL             | INFO                             | Python logging level |
| IK_SHUTDOWN_GRACE        | 5                                | seconds in-flight calls get on SIGTERM |
| IK_SQLITE_SYNCHRONOUS    | NORMAL                           | SQLite commit durability: NORMAL (no fsync per commit in WAL mode; a power cut may lose the last transactions) or FULL |
"""
from __future__ import annotations

import os
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path

SERVICES = ("blueprint", "workflow", "resource", "executor", "approval")
DEFAULT_PORTS = {
    "blueprint": 50051,
    "workflow": 50052,
    "resource": 50053,
    "executor": 50054,
    "approval": 50055,
}
_PREFIX_RE = re.compile(r"^[a-z0-9_]*$")


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class Settings:
    service: str
    data_dir: Path
    database_url: str
    nats_url: str
    event_prefix: str
    host: str
    port: int
    targets: dict[str, str] = field(default_factory=dict)
    auth_secret: str = ""
    log_level: str = "INFO"
    shutdown_grace: float = 5.0
    sqlite_synchronous: str = "NORMAL"
    # The whole environment the settings came from, for service-specific
    # variables (e.g. the executor's IK_EXECUTOR_*); not compared or printed.
    env: dict[str, str] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_env(cls, service: str, env: dict[str, str] | None = None) -> "Settings":
        env = dict(os.environ if env is None else env)
        if service not in SERVICES:
            raise ConfigError(f"unknown service {service!r}")
        data_dir = Path(env.get("IK_DATA_DIR", ".data")).resolve()
        upper = service.upper()
        prefix = env.get("IK_EVENT_PREFIX", "")
        if not _PREFIX_RE.match(prefix):
            raise ConfigError("IK_EVENT_PREFIX may hold only a-z, 0-9 and _")
        host = env.get("IK_HOST", "127.0.0.1")
        targets = {
            name: env.get(f"IK_{name.upper()}_TARGET")
            or f"127.0.0.1:{env.get(f'IK_{name.upper()}_PORT', DEFAULT_PORTS[name])}"
            for name in SERVICES
        }
        return cls(
            service=service,
            data_dir=data_dir,
            database_url=database_url(service, env),
            nats_url=env.get("IK_NATS_URL", "nats://127.0.0.1:4222"),
            event_prefix=prefix,
            host=host,
            port=int(env.get(f"IK_{upper}_PORT", DEFAULT_PORTS[service])),
            targets=targets,
            # IK_LOCAL_TOKENS=off: only an identity provider's tokens (and other
            # services') are accepted, and this service holds no key that mints one.
            auth_secret="" if env.get("IK_LOCAL_TOKENS", "on").strip().lower() == "off" else (
                env.get("IK_AUTH_SECRET") or load_or_create_secret(data_dir)),
            log_level=env.get("IK_LOG_LEVEL", "INFO"),
            shutdown_grace=float(env.get("IK_SHUTDOWN_GRACE", "5")),
            sqlite_synchronous=_sqlite_synchronous(env.get("IK_SQLITE_SYNCHRONOUS", "NORMAL")),
            env=env,
        )


def database_url(service: str, env: dict[str, str]) -> str:
    """The service's database: IK_<SVC>_DATABASE_URL, else SQLite in the data directory."""
    data_dir = Path(env.get("IK_DATA_DIR", ".data")).resolve()
    return env.get(f"IK_{service.upper()}_DATABASE_URL") or f"sqlite:///{data_dir / (service + '.db')}"


def _sqlite_synchronous(value: str) -> str:
    if value.upper() not in ("OFF", "NORMAL", "FULL", "EXTRA"):
        raise ConfigError("IK_SQLITE_SYNCHRONOUS must be NORMAL or FULL (or OFF, EXTRA)")
    return value.upper()


def load_or_create_secret(data_dir: Path, name: str = "auth-secret", make=lambda: secrets.token_hex(32)) -> str:
    """A local key (the token-signing key, the executor's encryption key),
    created once and shared by all services started from the same data
    directory. Creation is atomic (link, not overwrite) because five services
    start at the same moment."""
    path = data_dir / name
    if path.exists():
        return path.read_text().strip()
    data_dir.mkdir(parents=True, exist_ok=True)
    tmp = data_dir / f".{name}.{os.getpid()}"
    tmp.write_text(make())
    os.chmod(tmp, 0o600)
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)
    return path.read_text().strip()
