"""Bearer tokens and the caller's identity.

A local token is an HS256 JWT signed with the deployment's auth secret,
carrying the user (`sub`) and a platform role: read < write < admin. With an
identity provider configured (services.common.oidc), its RS/ES-signed access
tokens are accepted too. Per-object ownership is
decided by each service; this module only says who is calling and with which
role."""
from __future__ import annotations

import contextvars
import enum
import time
from dataclasses import dataclass

import jwt

from services.common.errors import PermissionDenied, Unauthenticated

ISSUER = "infrakitchen"
DEFAULT_TTL_SECONDS = 12 * 3600


class Role(enum.IntEnum):
    READ = 1
    WRITE = 2
    ADMIN = 3

    @classmethod
    def parse(cls, text: str) -> "Role":
        try:
            return cls[text.upper()]
        except KeyError:
            raise ValueError(f"unknown role {text!r}; expected read, write or admin") from None


@dataclass(frozen=True)
class Principal:
    user: str
    role: Role
    # The service acting for the user ("" for a user calling directly): some
    # inputs only a service may set (e.g. a workflow plan's approval).
    via: str = ""

    def has(self, role: Role) -> bool:
        return self.role >= role

    @property
    def is_admin(self) -> bool:
        return self.role >= Role.ADMIN


def mint_token(secret: str, user: str, role: Role, ttl_seconds: int = DEFAULT_TTL_SECONDS) -> str:
    now = int(time.time())
    claims = {"iss": ISSUER, "sub": user, "role": role.name.lower(), "iat": now, "exp": now + ttl_seconds}
    return jwt.encode(claims, secret, algorithm="HS256")


def verify_token(secret: str, token: str) -> Principal:
    try:
        claims = jwt.decode(token, secret, algorithms=["HS256"], issuer=ISSUER, options={"require": ["exp", "sub"]})
        return Principal(user=str(claims["sub"]), role=Role.parse(str(claims.get("role", ""))))
    except jwt.ExpiredSignatureError:
        raise Unauthenticated("token expired", reason="TOKEN_EXPIRED") from None
    except (jwt.InvalidTokenError, ValueError):
        raise Unauthenticated("invalid token", reason="TOKEN_INVALID") from None


def bearer_token(authorization: str | None) -> str:
    if not authorization:
        raise Unauthenticated("missing 'authorization: Bearer <token>' metadata", reason="TOKEN_MISSING")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated("authorization metadata must be 'Bearer <token>'", reason="TOKEN_INVALID")
    return token.strip()


def token_algorithm(token: str) -> str:
    """The `alg` a token says it is signed with: it picks the verifier (HS256:
    local tokens; EdDSA: another service; RS/ES/PS: the identity provider).
    Each verifier accepts only its own algorithms, so saying another one
    gains nothing. "" for what is not a JWT (the local check refuses it)."""
    try:
        return str(jwt.get_unverified_header(token).get("alg", ""))
    except jwt.InvalidTokenError:
        return ""


def principal_from_metadata(secret: str, authorization: str | None) -> Principal:
    return verify_token(secret, bearer_token(authorization))


_current: contextvars.ContextVar[Principal | None] = contextvars.ContextVar("ik_principal", default=None)


def set_current_principal(principal: Principal | None) -> contextvars.Token:
    return _current.set(principal)


def current_principal() -> Principal:
    """The caller of the gRPC method being served (set by the auth interceptor)."""
    principal = _current.get()
    if principal is None:
        raise Unauthenticated("no authenticated caller", reason="TOKEN_MISSING")
    return principal


def require_role(principal: Principal, role: Role, action: str) -> None:
    if not principal.has(role):
        raise PermissionDenied(
            f"{action} needs the {role.name.lower()} role; {principal.user} has {principal.role.name.lower()}",
            reason="ROLE_TOO_LOW",
            metadata={"required_role": role.name.lower(), "role": principal.role.name.lower()},
        )
