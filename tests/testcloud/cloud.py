"""The test cloud: a tiny HTTP "cloud" API on loopback, for honest tests of
real modules (its Terraform provider is provider/testcloud_provider.py).

Three kinds of objects, with values the cloud computes (ids, addresses,
endpoints, passwords), never echoes of the inputs:

- networks  (name, cidr; computed: id, arn, gateway)
- buckets   (name, network_id, tags; computed: id, arn, url)
- databases (name, network_id, engine, size; computed: id, arn, endpoint,
  password). `size` changes in place; the provider replaces a database whose
  `engine` changes.

What tests need beyond a cloud that works:

- slow creates: `create_delay` seconds per kind (`POST /_admin/config`);
- transient failures: `POST /_admin/faults` makes the next N calls (of a
  kind, a method) answer 503 with Retry-After, or 429 "Rate exceeded";
- out-of-band changes (drift): `PATCH /_admin/objects/<id>` changes an
  object as a console user would; `DELETE /_admin/objects/<id>` removes it;
- what happened: `GET /_admin/objects`, `GET /_admin/log` (every call).

Auth: every `/v1/` call carries `Authorization: Bearer <token>`; the cloud
accepts the static tokens it was given, and, with `jwks_url` set, JWTs signed
by a key of that JWKS (issuer and audience checked; the `sub` claim must
name the resource the call is for when the token says so).

Run alone: `python -m tests.testcloud.cloud --port 8790 --token dev`.
"""
from __future__ import annotations

import argparse
import ipaddress
import json
import re
import secrets
import threading
import time
import uuid
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

KINDS = ("networks", "buckets", "databases")
ENGINES = ("postgres", "mysql")
MAX_BODY = 64 * 1024
NAME = re.compile(r"^[a-z][a-z0-9-]{0,62}$")


class CloudError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


@dataclass
class Fault:
    status: int  # 503 or 429
    count: int
    kind: str = ""  # "" = any kind
    method: str = ""  # "" = any method
    retry_after: int = 1


@dataclass
class Cloud:
    """The cloud's objects and knobs; thread-safe (the server is threaded)."""
    tokens: set[str] = field(default_factory=set)
    verifier: Any = None  # a callable(token) -> claims, or None
    objects: dict[str, dict] = field(default_factory=dict)
    create_delay: dict[str, float] = field(default_factory=dict)
    faults: list[Fault] = field(default_factory=list)
    log: list[dict] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    # --- the API --------------------------------------------------------------------------

    def call(self, method: str, path: str, body: dict, token: str) -> tuple[int, Any]:
        parts = [p for p in path.split("/") if p]
        if len(parts) < 2 or parts[0] != "v1" or parts[1] not in KINDS or len(parts) > 3:
            raise CloudError(404, "no such API")
        kind, object_id = parts[1], parts[2] if len(parts) == 3 else ""
        claims = self._authenticate(token)
        self._inject_fault(kind, method)
        if method == "POST" and not object_id:
            return 201, self._create(kind, body, claims)
        if not object_id:
            if method == "GET":
                with self.lock:
                    return 200, {"items": [o for o in self.objects.values() if o["kind"] == kind]}
            raise CloudError(405, "method not allowed")
        self._belongs(kind, object_id, claims)
        if method == "GET":
            return 200, self._get(kind, object_id)
        if method == "PATCH":
            return 200, self._update(kind, object_id, body)
        if method == "DELETE":
            self._delete(kind, object_id)
            return 204, None
        raise CloudError(405, "method not allowed")

    def _authenticate(self, token: str) -> dict:
        if not token:
            raise CloudError(401, "missing bearer token")
        if token in self.tokens:
            return {}
        if self.verifier is not None:
            try:
                return self.verifier(token)
            except Exception as exc:  # noqa: BLE001 - any verification failure is a 401
                raise CloudError(401, f"token refused: {type(exc).__name__}: {str(exc)[:200]}") from None
        raise CloudError(401, "unknown token")

    def _belongs(self, kind: str, object_id: str, claims: dict) -> None:
        """A token issued for one resource's job acts on that resource's objects only."""
        with self.lock:
            obj = self.objects.get(object_id)
            owner = (obj or {}).get("owner_resource")
        if claims.get("resource_id") and owner and owner != claims["resource_id"]:
            raise CloudError(403, f"this token is for resource {str(claims['resource_id'])[:64]}, not the owner "
                                  f"of {kind[:-1]} {object_id[:64]}")

    def _inject_fault(self, kind: str, method: str) -> None:
        with self.lock:
            for fault in self.faults:
                if fault.count > 0 and fault.kind in ("", kind) and fault.method in ("", method):
                    fault.count -= 1
                    if fault.status == 429:
                        raise CloudError(429, "Rate exceeded: too many requests (throttling)",
                                         {"Retry-After": str(fault.retry_after)})
                    raise CloudError(503, "Service Unavailable: the service is busy, try again",
                                     {"Retry-After": str(fault.retry_after)})

    def _create(self, kind: str, body: dict, claims: dict) -> dict:
        name = body.get("name")
        if not isinstance(name, str) or not NAME.match(name):
            raise CloudError(400, "name: lower-case letters, digits and '-', starting with a letter, at most 63")
        attrs: dict[str, Any] = {"name": name, "tags": _tags(body.get("tags"))}
        prefix = {"networks": "net", "buckets": "bkt", "databases": "db"}[kind]
        object_id = f"{prefix}-{uuid.uuid4().hex[:12]}"
        if kind == "networks":
            try:
                network = ipaddress.ip_network(str(body.get("cidr", "")), strict=True)
            except ValueError:
                raise CloudError(400, "cidr: an IPv4 network such as 10.0.0.0/16") from None
            attrs.update(cidr=str(network), gateway=str(next(network.hosts())))
        else:
            network_id = body.get("network_id") or ""
            if network_id or kind == "databases":
                self._get("networks", str(network_id))  # 404 when it does not exist
            attrs["network_id"] = network_id
        if kind == "buckets":
            with self.lock:
                if any(o["kind"] == "buckets" and o["name"] == name for o in self.objects.values()):
                    raise CloudError(409, f"bucket name {name} is taken")
            attrs["url"] = f"https://{name}.buckets.testcloud.internal/"
        if kind == "databases":
            engine, size = body.get("engine"), body.get("size")
            if engine not in ENGINES:
                raise CloudError(400, f"engine: one of {', '.join(ENGINES)}")
            if not isinstance(size, int) or isinstance(size, bool) or not 1 <= size <= 1024:
                raise CloudError(400, "size: GiB, 1 to 1024")
            attrs.update(engine=engine, size=size, password=secrets.token_urlsafe(18),
                         endpoint=f"{object_id}.{engine}.testcloud.internal:{5432 if engine == 'postgres' else 3306}")
        if claims.get("resource_id"):  # whose job made it (the token's resource): only that resource's tokens act on it
            attrs["owner_resource"] = str(claims["resource_id"])
        delay = self.create_delay.get(kind, 0.0)
        if delay:
            time.sleep(delay)
        obj = {"id": object_id, "kind": kind, "arn": f"tc:{kind[:-1]}:{object_id}",
               "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **attrs}
        with self.lock:
            self.objects[object_id] = obj
        return dict(obj)

    def _get(self, kind: str, object_id: str) -> dict:
        with self.lock:
            obj = self.objects.get(object_id)
            if obj is None or obj["kind"] != kind:
                raise CloudError(404, f"{kind[:-1]} {object_id[:64]} not found")
            return dict(obj)

    def _update(self, kind: str, object_id: str, body: dict) -> dict:
        changeable = {"tags"} | ({"size"} if kind == "databases" else set())
        if unknown := set(body) - changeable:
            raise CloudError(400, f"cannot change {', '.join(sorted(unknown))[:200]} in place")
        with self.lock:
            obj = self.objects.get(object_id)
            if obj is None or obj["kind"] != kind:
                raise CloudError(404, f"{kind[:-1]} {object_id[:64]} not found")
            if "size" in body:
                size = body["size"]
                if not isinstance(size, int) or isinstance(size, bool) or not 1 <= size <= 1024:
                    raise CloudError(400, "size: GiB, 1 to 1024")
                obj["size"] = size
            if "tags" in body:
                obj["tags"] = _tags(body["tags"])
            return dict(obj)

    def _delete(self, kind: str, object_id: str) -> None:
        with self.lock:
            obj = self.objects.get(object_id)
            if obj is None or obj["kind"] != kind:
                raise CloudError(404, f"{kind[:-1]} {object_id[:64]} not found")
            if kind == "networks" and any(o.get("network_id") == object_id for o in self.objects.values()):
                raise CloudError(409, f"network {object_id} still has buckets or databases")
            del self.objects[object_id]

    # --- the knobs tests turn ---------------------------------------------------------------

    def admin(self, method: str, path: str, body: dict) -> tuple[int, Any]:
        parts = [p for p in path.split("/") if p][1:]
        with self.lock:
            if parts == ["objects"] and method == "GET":
                return 200, {"items": [dict(o) for o in self.objects.values()]}
            if parts == ["log"] and method == "GET":
                return 200, {"items": list(self.log)}
            if parts == ["faults"] and method == "POST":
                self.faults.append(Fault(status=int(body.get("status", 503)), count=int(body.get("count", 1)),
                                         kind=str(body.get("kind", "")), method=str(body.get("method", "")),
                                         retry_after=int(body.get("retry_after", 1))))
                return 200, {}
            if parts == ["config"] and method == "POST":
                self.create_delay.update({k: float(v) for k, v in body.get("create_delay", {}).items()})
                return 200, {}
            if len(parts) == 2 and parts[0] == "objects" and parts[1] in self.objects:
                obj = self.objects[parts[1]]
                if method == "PATCH":  # a change made outside the platform (drift)
                    obj.update({k: v for k, v in body.items() if k not in ("id", "kind")})
                    return 200, dict(obj)
                if method == "DELETE":
                    del self.objects[parts[1]]
                    return 204, None
        raise CloudError(404, "no such admin call")


def jwks_verifier(jwks_url: str, issuer: str, audience: str):
    """Checks a JWT against the issuer's published keys (fetched, and fetched
    again for a key id it does not know yet), its issuer, audience and expiry."""
    import jwt
    client = jwt.PyJWKClient(jwks_url, cache_keys=True, lifespan=60)

    def verify(token: str) -> dict:
        key = client.get_signing_key_from_jwt(token)
        return jwt.decode(token, key.key, algorithms=["RS256"], audience=audience, issuer=issuer,
                          options={"require": ["exp", "iat", "sub", "aud", "iss"]})
    return verify


def _tags(value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or len(value) > 50:
        raise CloudError(400, "tags: a map of at most 50 strings")
    return {str(k)[:128]: str(v)[:256] for k, v in value.items()}


def _handler(cloud: Cloud):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # the cloud's log is /_admin/log, not stderr
            pass

        def _serve(self, method: str) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY:
                return self._reply(413, {"error": "body too large"})
            raw = self.rfile.read(length) if length else b""
            try:
                body = json.loads(raw) if raw else {}
                if not isinstance(body, dict):
                    raise ValueError
            except ValueError:
                return self._reply(400, {"error": "the body must be a JSON object"})
            path = self.path.split("?", 1)[0]
            auth = self.headers.get("Authorization", "")
            token = auth[7:] if auth.startswith("Bearer ") else ""
            try:
                if path.startswith("/_admin/"):
                    status, reply = cloud.admin(method, path, body)
                else:
                    status, reply = cloud.call(method, path, body, token)
                    with cloud.lock:
                        cloud.log.append({"method": method, "path": path, "status": status})
                self._reply(status, reply)
            except CloudError as exc:
                if not path.startswith("/_admin/"):
                    with cloud.lock:
                        cloud.log.append({"method": method, "path": path, "status": exc.status})
                self._reply(exc.status, {"error": exc.message}, exc.headers)

        def _reply(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
            data = b"" if body is None else json.dumps(body).encode()
            self.send_response(status, HTTPStatus(status).phrase)
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802 - the http.server naming
            self._serve("GET")

        def do_POST(self) -> None:  # noqa: N802
            self._serve("POST")

        def do_PATCH(self) -> None:  # noqa: N802
            self._serve("PATCH")

        def do_DELETE(self) -> None:  # noqa: N802
            self._serve("DELETE")

    return Handler


class CloudServer:
    """The cloud on 127.0.0.1:<port> (0: a free one), served on a thread."""

    def __init__(self, cloud: Cloud | None = None, port: int = 0):
        self.cloud = cloud or Cloud()
        self.server = ThreadingHTTPServer(("127.0.0.1", port), _handler(self.cloud))
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.server.serve_forever, name="testcloud", daemon=True)

    def __enter__(self) -> "CloudServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    # helpers for tests
    def objects(self, kind: str = "") -> list[dict]:
        with self.cloud.lock:
            return [dict(o) for o in self.cloud.objects.values() if kind in ("", o["kind"])]

    def fail_next(self, count: int, status: int = 503, kind: str = "", method: str = "", retry_after: int = 1):
        with self.cloud.lock:
            self.cloud.faults.append(Fault(status, count, kind, method, retry_after))

    def change_out_of_band(self, object_id: str, **attrs) -> None:
        with self.cloud.lock:
            self.cloud.objects[object_id].update(attrs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=8790)
    parser.add_argument("--token", action="append", default=[], help="a bearer token the cloud accepts")
    args = parser.parse_args()
    server = CloudServer(Cloud(tokens=set(args.token)), args.port)
    print(f"test cloud on {server.url}", flush=True)
    try:
        server.server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
