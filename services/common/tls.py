"""Encrypted transport: TLS (optionally mutual) on gRPC, TLS and credentials
on NATS. Off by default (plaintext on loopback for local use); in production
set, for every service (and the `ik` command line, which reads the same):

gRPC
- `IK_TLS_CERT_FILE`, `IK_TLS_KEY_FILE`: the service's certificate and key
  (PEM). With them the server listens with TLS only, and the service presents
  them as its client certificate when calling others.
- `IK_TLS_CA_FILE`: the CA that signed the services' certificates; with it,
  calls to other services (and the CLI's) use TLS and check the server.
- `IK_TLS_CLIENT_AUTH=require`: mutual TLS, the server accepts only clients
  with a certificate of that CA (the CLI then needs a certificate too).
- `IK_TLS_SERVER_NAME`: the name to check in the servers' certificates when
  it is not the host of the target address.

NATS
- a `tls://` URL in `IK_NATS_URL`, `IK_NATS_TLS_CA_FILE` (and for mutual TLS
  `IK_NATS_TLS_CERT_FILE`, `IK_NATS_TLS_KEY_FILE`);
- `IK_NATS_USER` + `IK_NATS_PASSWORD`, or `IK_NATS_NKEY_SEED_FILE`."""
from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc

from services.common import nats_identities


class TlsConfigError(ValueError):
    pass


def _read(env: dict[str, str], name: str) -> bytes | None:
    path = env.get(name, "").strip()
    if not path:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise TlsConfigError(f"{name}: cannot read {path}: {exc.strerror}") from None


@dataclass(frozen=True)
class GrpcTls:
    cert: bytes | None = None
    key: bytes | None = None
    ca: bytes | None = None
    require_client_cert: bool = False
    server_name: str = ""

    @classmethod
    def from_env(cls, env: dict[str, str]) -> "GrpcTls":
        tls = cls(cert=_read(env, "IK_TLS_CERT_FILE"), key=_read(env, "IK_TLS_KEY_FILE"),
                  ca=_read(env, "IK_TLS_CA_FILE"),
                  require_client_cert=env.get("IK_TLS_CLIENT_AUTH", "").strip().lower() == "require",
                  server_name=env.get("IK_TLS_SERVER_NAME", "").strip())
        if bool(tls.cert) != bool(tls.key):
            raise TlsConfigError("IK_TLS_CERT_FILE and IK_TLS_KEY_FILE go together")
        if tls.require_client_cert and not tls.ca:
            raise TlsConfigError("IK_TLS_CLIENT_AUTH=require needs IK_TLS_CA_FILE (the clients' CA)")
        return tls

    @property
    def serving(self) -> bool:
        return self.cert is not None

    @property
    def calling(self) -> bool:
        return self.ca is not None

    def server_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials([(self.key, self.cert)], root_certificates=self.ca,
                                           require_client_auth=self.require_client_cert)

    def _channel_args(self):
        credentials = grpc.ssl_channel_credentials(root_certificates=self.ca, private_key=self.key,
                                                   certificate_chain=self.cert)
        options = [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []
        return credentials, options

    def aio_channel(self, target: str, interceptors: list | None = None) -> grpc.aio.Channel:
        if not self.calling:
            return grpc.aio.insecure_channel(target, options=BALANCED, interceptors=interceptors)
        credentials, options = self._channel_args()
        return grpc.aio.secure_channel(target, credentials, options=[*options, *BALANCED], interceptors=interceptors)

    def channel(self, target: str) -> grpc.Channel:
        """A blocking channel (the CLI, tests)."""
        if not self.calling:
            return grpc.insecure_channel(target, options=BALANCED)
        credentials, options = self._channel_args()
        return grpc.secure_channel(target, credentials, options=[*options, *BALANCED])


# Calls spread over every address a target's name resolves to (a Kubernetes
# headless Service: one per replica) instead of sticking to the first one,
# as HTTP/2 clients do with a single connection; one address: as before.
BALANCED = [("grpc.lb_policy_name", "round_robin")]
# A server asks a client to leave each connection after 5 minutes (GOAWAY:
# calls under way, long watches included, run on to their end; no grace
# bound), so clients resolve the name again and reach replicas added since.
SERVER_OPTIONS = [("grpc.max_connection_age_ms", 300_000)]


def nats_options(env: dict[str, str], service: str = "", data_dir: Path | None = None) -> dict:
    """Keyword arguments of nats.connect for TLS and credentials. A service
    logs in with its own NATS identity (services.common.nats_identities):
    `IK_NATS_NKEY_SEED_FILE`, or by default its seed in the data directory's
    `nats-identities/` when there is one; a user and password
    (`IK_NATS_USER`) are taken instead when set."""
    options: dict = {}
    ca = env.get("IK_NATS_TLS_CA_FILE", "").strip()
    if ca:
        context = ssl.create_default_context(cafile=ca)
        cert, key = env.get("IK_NATS_TLS_CERT_FILE", "").strip(), env.get("IK_NATS_TLS_KEY_FILE", "").strip()
        if cert or key:
            context.load_cert_chain(cert, key)
        options["tls"] = context
        if name := env.get("IK_NATS_TLS_SERVER_NAME", "").strip():
            options["tls_hostname"] = name
    if service:  # its replies come to its own inbox, the only subjects its identity may subscribe to
        options["inbox_prefix"] = nats_identities.inbox_prefix(service).encode()
    if env.get("IK_NATS_USER"):
        options["user"] = env["IK_NATS_USER"]
        options["password"] = env.get("IK_NATS_PASSWORD", "")
        return options
    seed = env.get("IK_NATS_NKEY_SEED_FILE", "").strip()
    if not seed and service and data_dir is not None:
        chosen = env.get("IK_NATS_IDENTITIES_DIR", "").strip()
        default = nats_identities.seed_file(Path(chosen or data_dir / nats_identities.DEFAULT_DIRECTORY), service)
        if chosen and not default.exists():  # told where its identity is: never on without one
            raise TlsConfigError(f"IK_NATS_IDENTITIES_DIR holds no {default.name} for the {service} service")
        seed = str(default) if default.exists() else ""
    if seed and not Path(seed).is_file():
        raise TlsConfigError(f"the NATS identity {seed} of the {service or 'this'} service does not exist")
    if seed:
        options["nkeys_seed"] = seed
    return options
