"""Users' access tokens from an OpenID Connect identity provider: RS256/ES256
(and their larger variants) JWTs verified against the provider's JWKS.

Configured with (all `IK_OIDC_*`, off unless the issuer is set):
- `ISSUER` (required) and `AUDIENCE` (required): the `iss` and `aud` a token must carry;
- `JWKS_URL` or `JWKS_FILE`: the provider's keys; cached, fetched again when a
  token names a key id not in the cache (key rotation), at most every
  `JWKS_REFETCH_SECONDS` (10);
- `USER_CLAIM` (`sub`): the claim that names the user (e.g. `email`);
- `ROLE_CLAIM` (`groups`): a string or list claim whose values map to roles;
- `ROLE_MAP`: `value=role` pairs, comma-separated, e.g.
  `platform-admins=admin,platform-engineers=write,everyone=read` (the highest
  role matched wins; without a map the values `admin`, `write`, `read` are
  the roles themselves); `DEFAULT_ROLE`: the role of a token that matches
  nothing (empty: such a token is refused, TOKEN_NO_ROLE);
- `LEEWAY` (30, at most 300): seconds of clock skew allowed on exp/nbf/iat.

Only asymmetric algorithms are accepted for these tokens, with the key the
JWKS names for the token's `kid`, so neither `alg: none` nor a token
HMAC-signed with the public key can pass. Every refusal is UNAUTHENTICATED
with a reason (TOKEN_EXPIRED, TOKEN_WRONG_ISSUER, TOKEN_WRONG_AUDIENCE,
TOKEN_UNKNOWN_KEY, TOKEN_ALGORITHM_REFUSED, TOKEN_NO_ROLE, TOKEN_INVALID)."""
from __future__ import annotations

import json
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import jwt

from services.common.auth import Principal, Role
from services.common.errors import Unauthenticated

ALGORITHMS = ("RS256", "RS384", "RS512", "ES256", "ES384", "PS256", "PS384", "PS512")
REFETCH_AT_MOST_EVERY = 10.0
MAX_LEEWAY = 300


class OidcConfigError(ValueError):
    pass


@dataclass
class OidcVerifier:
    issuer: str
    audience: str
    jwks_url: str = ""
    jwks_file: str = ""
    user_claim: str = "sub"
    role_claim: str = "groups"
    role_map: dict[str, Role] = field(default_factory=dict)
    default_role: Role | None = None
    leeway: int = 30
    refetch_every: float = REFETCH_AT_MOST_EVERY
    _keys: dict[str, object] = field(default_factory=dict, repr=False)
    _fetched_at: float = field(default=0.0, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def from_env(cls, env: dict[str, str]) -> "OidcVerifier | None":
        issuer = env.get("IK_OIDC_ISSUER", "").strip()
        if not issuer:
            return None
        audience = env.get("IK_OIDC_AUDIENCE", "").strip()
        url, path = env.get("IK_OIDC_JWKS_URL", "").strip(), env.get("IK_OIDC_JWKS_FILE", "").strip()
        if not audience or not (url or path):
            raise OidcConfigError("IK_OIDC_ISSUER needs IK_OIDC_AUDIENCE and IK_OIDC_JWKS_URL or IK_OIDC_JWKS_FILE")
        role_map = {}
        for pair in filter(None, (p.strip() for p in env.get("IK_OIDC_ROLE_MAP", "").split(","))):
            value, sep, role = pair.rpartition("=")
            if not sep or not value:
                raise OidcConfigError(f"IK_OIDC_ROLE_MAP: expected value=role pairs, got {pair!r}")
            role_map[value] = Role.parse(role)
        default = env.get("IK_OIDC_DEFAULT_ROLE", "").strip()
        leeway = int(env.get("IK_OIDC_LEEWAY", "30"))
        if not 0 <= leeway <= MAX_LEEWAY:
            raise OidcConfigError(f"IK_OIDC_LEEWAY must be between 0 and {MAX_LEEWAY} seconds")
        return cls(issuer=issuer, audience=audience, jwks_url=url, jwks_file=path,
                   user_claim=env.get("IK_OIDC_USER_CLAIM", "sub").strip() or "sub",
                   role_claim=env.get("IK_OIDC_ROLE_CLAIM", "groups").strip() or "groups", role_map=role_map,
                   default_role=Role.parse(default) if default else None, leeway=leeway,
                   refetch_every=float(env.get("IK_OIDC_JWKS_REFETCH_SECONDS", REFETCH_AT_MOST_EVERY)))

    # --- keys ---------------------------------------------------------------

    def _load(self) -> dict[str, object]:
        if self.jwks_file:
            document = json.loads(Path(self.jwks_file).read_text())
        else:
            with urllib.request.urlopen(self.jwks_url, timeout=5) as response:  # noqa: S310 - configured URL
                document = json.loads(response.read(1024 * 1024))
        keys = {}
        for jwk in document.get("keys", []):
            if jwk.get("use", "sig") != "sig" or not jwk.get("kid"):
                continue
            try:
                keys[jwk["kid"]] = jwt.PyJWK(jwk).key
            except (jwt.PyJWKError, jwt.InvalidKeyError, KeyError, ValueError):
                continue  # a key of a kind we do not verify with
        return keys

    def key_for(self, kid: str):
        """The key of `kid`, fetching the JWKS again (at most every
        refetch_every seconds) when it is not known: the provider may have
        rotated its keys."""
        with self._lock:
            if kid in self._keys:
                return self._keys[kid]
            if time.monotonic() - self._fetched_at >= self.refetch_every or not self._fetched_at:
                self._fetched_at = time.monotonic()
                try:
                    self._keys = self._load()
                except (OSError, ValueError) as exc:
                    raise Unauthenticated(f"the identity provider's keys cannot be read: {type(exc).__name__}",
                                          reason="TOKEN_KEYS_UNAVAILABLE") from None
            key = self._keys.get(kid)
        if key is None:
            raise Unauthenticated("the token is signed with a key the identity provider does not publish",
                                  reason="TOKEN_UNKNOWN_KEY")
        return key

    # --- tokens -------------------------------------------------------------

    def verify(self, token: str) -> Principal:
        """Blocking (it may fetch the JWKS): call from a thread."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            raise Unauthenticated("invalid token", reason="TOKEN_INVALID") from None
        if header.get("alg") not in ALGORITHMS:
            raise Unauthenticated(f"tokens of the identity provider must be signed with one of "
                                  f"{', '.join(ALGORITHMS)}", reason="TOKEN_ALGORITHM_REFUSED")
        key = self.key_for(str(header.get("kid", "")))
        try:
            claims = jwt.decode(token, key, algorithms=[header["alg"]], issuer=self.issuer, audience=self.audience,
                                leeway=self.leeway, options={"require": ["exp", "iss", "aud"]})
        except jwt.ExpiredSignatureError:
            raise Unauthenticated("token expired", reason="TOKEN_EXPIRED") from None
        except jwt.InvalidIssuerError:
            raise Unauthenticated("token of another issuer", reason="TOKEN_WRONG_ISSUER") from None
        except jwt.InvalidAudienceError:
            raise Unauthenticated("token for another audience", reason="TOKEN_WRONG_AUDIENCE") from None
        except jwt.ImmatureSignatureError:
            raise Unauthenticated("token not valid yet", reason="TOKEN_NOT_YET_VALID") from None
        except jwt.InvalidTokenError:
            raise Unauthenticated("invalid token", reason="TOKEN_INVALID") from None
        user = claims.get(self.user_claim)
        if not isinstance(user, str) or not user.strip() or len(user) > 256:
            raise Unauthenticated(f"the token has no usable {self.user_claim!r} claim", reason="TOKEN_INVALID")
        return Principal(user=user, role=self._role(claims))

    def _role(self, claims: dict) -> Role:
        values = claims.get(self.role_claim, [])
        values = [values] if isinstance(values, str) else [v for v in values if isinstance(v, str)] \
            if isinstance(values, list) else []
        if self.role_map:
            matched = [self.role_map[v] for v in values if v in self.role_map]
        else:
            matched = [Role.parse(v) for v in values if v.lower() in ("read", "write", "admin")]
        if matched:
            return max(matched)
        if self.default_role is not None:
            return self.default_role
        raise Unauthenticated(f"the token's {self.role_claim!r} claim maps to no role", reason="TOKEN_NO_ROLE")
