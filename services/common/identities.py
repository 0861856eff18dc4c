"""Service identities: a service calling another proves who it is with its
own key, and says on whose behalf it acts.

Each service has an Ed25519 key pair. Its private key
(`IK_SERVICE_KEY_FILE`, default `<data>/service-keys/<service>.key`, created
once) never leaves it; the public keys of all services are read from
`IK_SERVICE_KEYS_DIR` (default `<data>/service-keys`, `<service>.pub`). A
local installation shares one data directory, so the keys find each other; in
production each service mounts its own private key and the directory of
public keys.

A call carries a short-lived token signed with the caller's key: `iss`
`service:<caller>`, `aud` the callee, `sub` the user it acts for (or
`system:<caller>`), the role it acts with, 5 minutes of validity. The callee
accepts it only from a service allowed to call it (CALLERS): the workflow
service may act for a user towards the blueprint, resource and executor
services, but nothing may act towards the workflow service, and the blueprint
service towards nobody. No service holds a key that can mint a user's token
with an identity provider (OIDC), and none needs the local token secret to
call another; with `IK_LOCAL_TOKENS=off` none holds it at all."""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from services.common.auth import Principal, Role
from services.common.errors import PermissionDenied, Unauthenticated

ALGORITHM = "EdDSA"
TTL_SECONDS = 300
CACHE_SIZE = 4096  # minted and verified tokens kept (cleared when full)
LEEWAY_SECONDS = 30
# Who may act for a user towards whom (callee -> callers), from the calls the
# services make: nothing else is accepted.
CALLERS: dict[str, frozenset[str]] = {
    "blueprint": frozenset({"workflow", "resource"}),
    "resource": frozenset({"workflow", "executor"}),
    "executor": frozenset({"workflow", "resource"}),
    "approval": frozenset({"resource", "workflow"}),
    "workflow": frozenset(),
}


def _write_once(path: Path, data: bytes, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_bytes(data)
    os.chmod(tmp, mode)
    try:
        os.link(tmp, path)  # atomic: services of one data directory start at the same moment
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)


class ServiceIdentity:
    """This service's key, and the public keys of the others."""

    def __init__(self, service: str, private_key: Ed25519PrivateKey, keys_dir: Path):
        self.service = service
        self._private = private_key
        self.keys_dir = keys_dir
        self._public: dict[str, Ed25519PublicKey] = {}
        self._lock = threading.Lock()
        # Minted once per (callee, user, role) and reused while far from
        # expiry, and verified once per token: signing and checking Ed25519
        # on every call was measurable on the dispatch path.
        self._minted: dict[tuple[str, str, str], tuple[str, float]] = {}
        self._verified: dict[str, tuple[Principal, float]] = {}

    @classmethod
    def from_settings(cls, service: str, env: dict[str, str], data_dir: Path) -> "ServiceIdentity":
        keys_dir = Path(env.get("IK_SERVICE_KEYS_DIR") or data_dir / "service-keys")
        key_file = Path(env.get("IK_SERVICE_KEY_FILE") or keys_dir / f"{service}.key")
        if not key_file.exists():
            key = Ed25519PrivateKey.generate()
            _write_once(key_file, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption()), 0o600)
        private = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
        if not isinstance(private, Ed25519PrivateKey):
            raise ValueError(f"{key_file} is not an Ed25519 private key")
        public_file = keys_dir / f"{service}.pub"
        if not public_file.exists():
            _write_once(public_file, private.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo), 0o644)
        return cls(service, private, keys_dir)

    # --- calling ---------------------------------------------------------------

    def token(self, callee: str, user: str, role: Role) -> str:
        key = (callee, user, role.name)
        now = time.time()
        cached = self._minted.get(key)
        if cached is not None and cached[1] - now > TTL_SECONDS / 2:
            return cached[0]
        issued = int(now)
        claims = {"iss": f"service:{self.service}", "aud": callee, "sub": user or f"system:{self.service}",
                  "role": role.name.lower(), "iat": issued, "exp": issued + TTL_SECONDS}
        token = jwt.encode(claims, self._private, algorithm=ALGORITHM, headers={"kid": self.service})
        if len(self._minted) > CACHE_SIZE:
            self._minted.clear()
        self._minted[key] = (token, issued + TTL_SECONDS)
        return token

    def sign(self, data: bytes) -> bytes:
        """This service's signature of `data` (its events: services.common.signing)."""
        return self._private.sign(data)

    # --- being called ----------------------------------------------------------

    def public_key(self, service: str) -> Ed25519PublicKey:
        with self._lock:
            if service not in self._public:
                path = self.keys_dir / f"{service}.pub"
                try:
                    key = serialization.load_pem_public_key(path.read_bytes())
                except (OSError, ValueError):
                    raise Unauthenticated(f"no public key of service {service!r}",
                                          reason="SERVICE_UNKNOWN") from None
                if not isinstance(key, Ed25519PublicKey):
                    raise Unauthenticated(f"the key of service {service!r} is not Ed25519",
                                          reason="SERVICE_UNKNOWN")
                self._public[service] = key
            return self._public[service]

    def verify(self, token: str) -> Principal:
        """The user a calling service acts for, with the role it acts with.
        A token verified before is not checked again until it expires."""
        cached = self._verified.get(token)
        if cached is not None and cached[1] > time.time():
            return cached[0]
        principal, expires = self._verify(token)
        if len(self._verified) > CACHE_SIZE:
            self._verified.clear()
        self._verified[token] = (principal, expires)
        return principal

    def _verify(self, token: str) -> tuple[Principal, float]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            raise Unauthenticated("invalid token", reason="TOKEN_INVALID") from None
        caller = str(header.get("kid", ""))
        if caller not in CALLERS:
            raise Unauthenticated("a service token must name a known service", reason="SERVICE_UNKNOWN")
        try:
            claims = jwt.decode(token, self.public_key(caller), algorithms=[ALGORITHM], audience=self.service,
                                issuer=f"service:{caller}", leeway=LEEWAY_SECONDS,
                                options={"require": ["exp", "iss", "aud", "sub"]})
        except jwt.ExpiredSignatureError:
            raise Unauthenticated("service token expired", reason="TOKEN_EXPIRED") from None
        except jwt.InvalidAudienceError:
            raise Unauthenticated(f"service token for another service, not {self.service}",
                                  reason="TOKEN_WRONG_AUDIENCE") from None
        except jwt.InvalidTokenError:
            raise Unauthenticated("invalid service token", reason="TOKEN_INVALID") from None
        if caller not in CALLERS[self.service]:
            raise PermissionDenied(f"service {caller} may not act for users towards the {self.service} service",
                                   reason="SERVICE_NOT_ALLOWED")
        try:
            return (Principal(user=str(claims["sub"]), role=Role.parse(str(claims.get("role", ""))), via=caller),
                    float(claims["exp"]))
        except ValueError:
            raise Unauthenticated("invalid service token", reason="TOKEN_INVALID") from None


def make_keys(keys_dir: Path, private_dir: Path, services) -> None:
    """Each service's key pair, once: `<private_dir>/<service>/service.key`
    (0600, for that service alone to mount) and `<keys_dir>/<service>.pub`
    (for all to mount read-only), so no service can write another's public
    key (a shared writable directory would let one pass for another)."""
    for service in services:
        ServiceIdentity.from_settings(service, {"IK_SERVICE_KEYS_DIR": str(keys_dir),
                                                "IK_SERVICE_KEY_FILE": str(private_dir / service / "service.key")},
                                      private_dir)


if __name__ == "__main__":
    import argparse

    from services.common.config import SERVICES
    parser = argparse.ArgumentParser(prog="python -m services.common.identities",
                                     description="Makes each service's key pair (once).")
    parser.add_argument("--keys-dir", type=Path, required=True, help="where the public keys go (<service>.pub)")
    parser.add_argument("--private-dir", type=Path, required=True,
                        help="where the private keys go (<service>/service.key)")
    args = parser.parse_args()
    make_keys(args.keys_dir, args.private_dir, SERVICES)
