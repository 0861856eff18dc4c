"""The test cloud's API client, as its provider uses it (standard library only)."""
from __future__ import annotations

import json
import urllib.error
import urllib.request

TIMEOUT = 30


class CloudCallFailed(Exception):
    pass


class Client:
    def __init__(self, endpoint: str, token: str, token_file: str):
        self.endpoint, self.token, self.token_file = endpoint.rstrip("/"), token, token_file

    def _token(self) -> str:
        if self.token_file:
            with open(self.token_file, encoding="utf-8") as f:
                return f.read().strip()
        return self.token

    def call(self, method: str, path: str, body: dict | None = None) -> dict | None:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(f"{self.endpoint}{path}", data=data, method=method, headers={
            "Authorization": f"Bearer {self._token()}", "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
                raw = response.read()
                return json.loads(raw) if raw else None
        except urllib.error.HTTPError as exc:
            if exc.code == 404 and method == "GET":
                return None
            try:
                message = json.loads(exc.read()).get("error", "")
            except ValueError:
                message = ""
            retry = exc.headers.get("Retry-After")
            raise CloudCallFailed(f"testcloud: {method} {path}: HTTP {exc.code} {exc.reason}: {message}"
                                  + (f" (retry after {retry}s)" if retry else "")) from None
        except (urllib.error.URLError, OSError) as exc:
            raise CloudCallFailed(f"testcloud: {method} {path}: connection failed: {exc}") from None
