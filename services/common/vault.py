"""Encryption at rest (Fernet: AES-128-CBC + HMAC-SHA256, from the
`cryptography` package): the executor's credentials, secret values, sensitive
variables and outputs and saved plans; the resource service's sensitive
variable values and proposed changes; the workflow service's overrides. The
key comes from IK_ENCRYPTION_KEY, or is created once into
<data>/encryption-key (mode 0600) for a local installation: each service has
its own unless they share the variable."""
from __future__ import annotations

import hashlib
import hmac
import json
from collections import OrderedDict
from typing import Any

from cryptography.fernet import Fernet, InvalidToken

from services.common.config import Settings, load_or_create_secret


# Tokens opened lately, and what they hold: a workflow step's sealed overrides
# are read many times per step (each read of the step), always the same token
# until it is written again. Bounded; in memory only, as any opened value is.
OPENED_CACHE_SIZE = 512


class Vault:
    def __init__(self, key: str):
        self._opened: OrderedDict[bytes, bytes] = OrderedDict()
        self._key = key.encode()
        try:
            self._fernet = Fernet(self._key)
        except (ValueError, TypeError):
            raise ValueError("IK_ENCRYPTION_KEY must be a Fernet key (32 url-safe base64-encoded bytes)") from None

    @classmethod
    def from_settings(cls, settings: Settings) -> "Vault":
        key = settings.env.get("IK_ENCRYPTION_KEY") or load_or_create_secret(
            settings.data_dir, "encryption-key", lambda: Fernet.generate_key().decode())
        return cls(key)

    def derive(self, purpose: str) -> bytes:
        """A key of its own for `purpose` (e.g. keyed digests), from this one."""
        return hmac.new(self._key, purpose.encode(), hashlib.sha256).digest()

    def seal(self, data: bytes) -> bytes:
        return self._fernet.encrypt(data)

    def open(self, token: bytes) -> bytes:
        if (data := self._opened.get(token)) is not None:
            self._opened.move_to_end(token)
            return data
        try:
            data = self._fernet.decrypt(token)
        except InvalidToken:
            raise RuntimeError("stored secret cannot be decrypted: IK_ENCRYPTION_KEY differs from the one "
                               "it was written with") from None
        self._opened[token] = data
        if len(self._opened) > OPENED_CACHE_SIZE:
            self._opened.popitem(last=False)
        return data

    def seal_json(self, value: Any) -> bytes:
        return self.seal(json.dumps(value).encode())

    def open_json(self, token: bytes | None, default: Any = None) -> Any:
        if not token:
            return default
        return json.loads(self.open(token))

    # Values inside a JSON column: a sealed dict is kept under SEALED ("$" is no
    # character of a Terraform identifier, so no variable has this name).
    SEALED = "$sealed"

    def seal_into(self, plain: dict[str, Any], secret: dict[str, Any]) -> dict[str, Any]:
        """`plain` with `secret` sealed in (nothing added when `secret` is empty)."""
        return {**plain, self.SEALED: self.seal_json(secret).decode()} if secret else dict(plain)

    def open_from(self, stored: dict[str, Any]) -> dict[str, Any]:
        """The values of a dict written by seal_into (or an older, all-plain one)."""
        values = dict(stored or {})
        token = values.pop(self.SEALED, None)
        if token:
            values.update(self.open_json(token.encode(), {}))
        return values
