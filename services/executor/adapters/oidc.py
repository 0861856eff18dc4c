"""The executor as an OIDC issuer: short-lived cloud credentials without a
stored cloud key (workload identity federation).

For each attempt of a job that names an OIDC integration, the executor signs
a token (RS256; clouds' token exchanges take it) whose claims say what runs:

    iss  IK_EXECUTOR_OIDC_ISSUER        aud  the integration's audience
    sub  integration:<id>:resource:<id> for a job the resource service
         submitted, else integration:<id>:job:<id> (see runs._claims)
    iat, nbf, exp (exp = start + the job's timeout, at most 24 h), jti <job id>:<attempt>
    integration_id, resource_id, template_id, workflow_id, step_id, job_id,
    attempt, operation (plan, apply, destroy), owner (who the job is for)

The job gets it as a file in its own working directory (mode 600: no other
job's sandbox mounts that directory, and it is removed with it) and the
cloud's standard variables pointing at it (see `federation_env`).

Keys: RSA 2048, kept in the executor's database sealed by the vault, so every
executor replica signs with the newest and publishes the same JWKS. A new
key is made when the newest is older than IK_EXECUTOR_OIDC_ROTATE_HOURS
(default 168) and signs once published for PUBLISH_AHEAD; a key is
published while a token it signed can still be valid and deleted after. The discovery document and the JWKS are served over HTTP on
IK_EXECUTOR_OIDC_PORT (off when unset), at the issuer's
/.well-known/openid-configuration and /jwks; a cloud must reach the issuer
URL, so in production it is an https URL in front of that port.
"""
from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import logging
import threading
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlparse

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from services.executor.domain.model import protected_env_name, valid_env_name


log = logging.getLogger(__name__)

ALGORITHM = "RS256"
MAX_TOKEN_SECONDS = 24 * 3600
# A new key is published this long before it signs: longer than replicas take to
# read it (keep_rotating, every minute) and clouds keep the JWKS (max-age 60 s).
PUBLISH_AHEAD = 600.0
DEFAULT_ROTATE_HOURS = 168.0
FIELD_MAX = 512
CLOUDS = ("aws", "google", "azure", "generic")
DEFAULT_AUDIENCE = {"aws": "sts.amazonaws.com", "azure": "api://AzureADTokenExchange"}
TOKEN_FILE = "oidc-token.jwt"
GOOGLE_CONFIG = "google-external-account.json"


class OidcUnavailable(RuntimeError):
    """The issuer's settings cannot work: the executor does not start."""


@dataclass(frozen=True)
class OidcSettings:
    issuer: str
    port: int  # 0: this executor serves no discovery endpoint (another replica, or a proxy, does)
    rotate_seconds: float

    @classmethod
    def from_env(cls, env: dict[str, str]) -> "OidcSettings":
        port_setting = env.get("IK_EXECUTOR_OIDC_PORT", "").strip()
        try:
            port = int(port_setting) if port_setting else 0
            rotate = float(env.get("IK_EXECUTOR_OIDC_ROTATE_HOURS", DEFAULT_ROTATE_HOURS)) * 3600
        except ValueError:
            raise OidcUnavailable("IK_EXECUTOR_OIDC_PORT must be a port number and IK_EXECUTOR_OIDC_ROTATE_HOURS "
                                  "a number of hours") from None
        if not 0 <= port < 65536 or rotate < 3600:
            raise OidcUnavailable("IK_EXECUTOR_OIDC_PORT: 0-65535; IK_EXECUTOR_OIDC_ROTATE_HOURS: at least 1")
        issuer = env.get("IK_EXECUTOR_OIDC_ISSUER", "").strip().rstrip("/")
        if not issuer and port:
            issuer = f"http://127.0.0.1:{port}"
        if issuer and (urlparse(issuer).scheme not in ("http", "https") or not urlparse(issuer).hostname):
            raise OidcUnavailable("IK_EXECUTOR_OIDC_ISSUER must be an http(s) URL (clouds want https)")
        if issuer.startswith("http://") and urlparse(issuer).hostname not in ("127.0.0.1", "localhost", "::1"):
            log.warning("IK_EXECUTOR_OIDC_ISSUER %s is not https: clouds (AWS, Google, Azure) refuse such an "
                        "issuer; put an https URL in front of IK_EXECUTOR_OIDC_PORT", issuer[:200])
        return cls(issuer, port, rotate)


def check_federation(oidc: dict[str, str]) -> list[tuple[str, str]]:
    """(field, problem) of an OIDC integration's settings."""
    problems = []
    for name, value in oidc.items():
        if len(value) > FIELD_MAX:
            problems.append((f"integration.oidc.{name}", f"at most {FIELD_MAX} characters"))
    cloud = oidc.get("cloud", "")
    if cloud not in CLOUDS:
        problems.append(("integration.oidc.cloud", f"one of {', '.join(CLOUDS)}"))
    if cloud == "aws" and not oidc.get("role_arn", "").startswith("arn:"):
        problems.append(("integration.oidc.role_arn", "the role to assume, an arn:"))
    if cloud == "google" and not oidc.get("audience", "").startswith("//iam.googleapis.com/"):
        problems.append(("integration.oidc.audience", "the workload identity provider's full name, "
                                                      "//iam.googleapis.com/projects/.../providers/..."))
    if cloud == "azure":
        for name in ("azure_client_id", "azure_tenant_id"):
            if not oidc.get(name):
                problems.append((f"integration.oidc.{name}", "is required for azure"))
    if cloud == "generic" and not oidc.get("audience"):
        problems.append(("integration.oidc.audience", "is required for generic"))
    for name, value in oidc.items():
        if any(ord(c) < 32 or ord(c) == 127 for c in value):
            problems.append((f"integration.oidc.{name}", "must not hold control characters"))
    env_name = oidc.get("token_file_env", "")
    if env_name and not valid_env_name(env_name):
        problems.append(("integration.oidc.token_file_env", "an environment variable name (letters, digits, _)"))
    elif env_name and (why := protected_env_name(env_name)):
        problems.append(("integration.oidc.token_file_env", why))
    return problems


def audience_of(oidc: dict[str, str]) -> str:
    return oidc.get("audience") or DEFAULT_AUDIENCE.get(oidc.get("cloud", ""), "")


def federation_env(oidc: dict[str, str], token_file: Path, workdir: Path, job_id: str) -> dict[str, str]:
    """The cloud's standard variables for a job's token file (and, for
    Google, the external_account file they name, written here)."""
    cloud = oidc.get("cloud", "")
    if cloud == "aws":
        return {"AWS_WEB_IDENTITY_TOKEN_FILE": str(token_file), "AWS_ROLE_ARN": oidc["role_arn"],
                "AWS_ROLE_SESSION_NAME": f"infrakitchen-{job_id[:40]}"}
    if cloud == "azure":
        env = {"ARM_USE_OIDC": "true", "ARM_OIDC_TOKEN_FILE_PATH": str(token_file),
               "ARM_CLIENT_ID": oidc["azure_client_id"], "ARM_TENANT_ID": oidc["azure_tenant_id"]}
        if oidc.get("azure_subscription_id"):
            env["ARM_SUBSCRIPTION_ID"] = oidc["azure_subscription_id"]
        return env
    if cloud == "google":
        config = {"type": "external_account", "audience": oidc["audience"],
                  "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
                  "token_url": "https://sts.googleapis.com/v1/token",
                  "credential_source": {"file": str(token_file)}}
        if oidc.get("service_account_email"):
            config["service_account_impersonation_url"] = (
                "https://iamcredentials.googleapis.com/v1/projects/-/serviceAccounts/"
                f"{oidc['service_account_email']}:generateAccessToken")
        path = workdir / GOOGLE_CONFIG
        path.write_text(json.dumps(config))
        path.chmod(0o600)
        return {"GOOGLE_APPLICATION_CREDENTIALS": str(path), "CLOUDSDK_AUTH_CREDENTIAL_FILE_OVERRIDE": str(path)}
    return {oidc.get("token_file_env") or "IK_OIDC_TOKEN_FILE": str(token_file)}


def _b64(n: int) -> str:
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def public_jwk(kid: str, key: rsa.RSAPrivateKey) -> dict:
    numbers = key.public_key().public_numbers()
    return {"kty": "RSA", "use": "sig", "alg": ALGORITHM, "kid": kid, "n": _b64(numbers.n), "e": _b64(numbers.e)}


class OidcIssuer:
    """Signs jobs' tokens; keeps the keys (see the module's doc)."""

    def __init__(self, settings: OidcSettings, vault):
        self.settings = settings
        self.vault = vault
        self._keys: list[tuple[str, rsa.RSAPrivateKey, dt.datetime]] = []  # newest first, as last read
        self._published: dict = {"keys": []}
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    # --- keys -------------------------------------------------------------------------------

    async def rotate(self, uow, now: dt.datetime) -> None:
        """Reads the keys; makes a new one when the newest is due; forgets
        keys no token can need any more; refreshes what this replica signs
        with and publishes."""
        keys = [(kid, serialization.load_pem_private_key(pem, password=None), created)
                for kid, pem, created in await uow.oidc_keys.all()]
        if not keys or (now - keys[0][2]).total_seconds() >= self.settings.rotate_seconds:
            key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
            kid = f"{now:%Y%m%d}-{uuid.uuid4().hex[:12]}"
            await uow.oidc_keys.add(kid, pem, now)
            keys.insert(0, (kid, key, now))
        # A key signs until the next one starts to (PUBLISH_AHEAD after it was
        # made); its tokens live at most MAX_TOKEN_SECONDS after that.
        live, newer_created = [], None
        for kid, key, created in keys:
            if newer_created is None or \
                    (now - newer_created).total_seconds() < PUBLISH_AHEAD + MAX_TOKEN_SECONDS + 600:
                live.append((kid, key, created))
            else:
                await uow.oidc_keys.delete(kid)
            newer_created = created
        with self._lock:
            self._keys = live
            self._published = {"keys": [public_jwk(kid, key) for kid, key, _ in live]}

    def _signing_key(self, now: dt.datetime) -> tuple[str, rsa.RSAPrivateKey]:
        """The newest key published for PUBLISH_AHEAD already (every replica
        and every cloud's cached JWKS knows it by then); the oldest one while
        none is (the first start)."""
        with self._lock:
            keys = list(self._keys)
        for kid, key, created in keys:
            if (now - created).total_seconds() >= PUBLISH_AHEAD:
                return kid, key
        kid, key, _ = keys[-1]
        return kid, key

    async def mint(self, uow_factory, claims: dict, lifetime: float, now: dt.datetime) -> str:
        """A token with `claims` (sub, aud and the job's), valid for `lifetime`
        seconds from now. No I/O once the keys were read (keep_rotating
        does, at start and every minute); before that, reads them first."""
        if not self.settings.issuer:
            raise OidcUnavailable("this executor issues no OIDC tokens: set IK_EXECUTOR_OIDC_ISSUER (and serve "
                                  "its discovery document, IK_EXECUTOR_OIDC_PORT)")
        if not self._keys:
            async with uow_factory() as uow:
                await self.rotate(uow, now)
                await uow.commit()
        kid, key = self._signing_key(now)
        issued = int(now.timestamp())
        body = {**claims, "iss": self.settings.issuer, "iat": issued, "nbf": issued - 5,
                "exp": issued + int(min(max(lifetime, 1), MAX_TOKEN_SECONDS))}
        return jwt.encode(body, key, algorithm=ALGORITHM, headers={"kid": kid})

    def published(self) -> dict:
        with self._lock:
            return self._published

    # --- the discovery endpoint ---------------------------------------------------------------

    def discovery(self) -> dict:
        issuer = self.settings.issuer
        return {"issuer": issuer, "jwks_uri": f"{issuer}/jwks", "response_types_supported": ["id_token"],
                "subject_types_supported": ["public"], "id_token_signing_alg_values_supported": [ALGORITHM],
                "claims_supported": ["sub", "aud", "exp", "iat", "iss", "nbf", "jti", "integration_id", "resource_id",
                                     "template_id", "workflow_id", "step_id", "job_id", "attempt", "operation",
                                     "owner"]}

    def serve(self, host: str) -> None:
        """Serves the discovery document and the JWKS on the settings' port (a thread)."""
        if not self.settings.port:
            return
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            timeout = 10  # a client that sends nothing holds a thread no longer

            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 - the http.server naming
                path = self.path.split("?", 1)[0]
                prefix = urlparse(issuer.settings.issuer).path.rstrip("/")
                if path == f"{prefix}/.well-known/openid-configuration":
                    body = issuer.discovery()
                elif path == f"{prefix}/jwks":
                    body = issuer.published()
                else:
                    self.send_error(404)
                    return
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Cache-Control", "max-age=60")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._server = ThreadingHTTPServer((host, self.settings.port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, name="oidc-discovery", daemon=True).start()
        log.info("OIDC discovery for %s served on port %d", self.settings.issuer, self.settings.port)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    async def keep_rotating(self, uow_factory, interval: float = 60.0) -> None:
        """Rotates when due and refreshes what this replica publishes."""
        from services.common.uow import utcnow
        if not self.settings.issuer:
            return  # no tokens issued here: no keys to keep
        while True:
            try:
                async with uow_factory() as uow:
                    await self.rotate(uow, utcnow())
                    await uow.commit()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the database may be away: next round
                log.warning("OIDC key rotation: %s", exc)
            await asyncio.sleep(interval)
