"""Users' tokens from an identity provider (OIDC): RS256/ES256 access tokens
verified against a JWKS served on loopback, with issuer, audience, expiry,
key rotation and role mapping; every forged variant is UNAUTHENTICATED with a
reason, never INTERNAL; local HS256 tokens keep working."""
from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from infrakitchen.approval.v1 import approval_pb2 as pb
from infrakitchen.approval.v1 import approval_pb2_grpc
from services.approval.__main__ import DEFINITION
from services.common.auth import Role
from tests.support.grpc_asserts import reason, rpc_error
from tests.support.inprocess import InProcessService

ISSUER, AUDIENCE = "https://idp.test/realms/platform", "infrakitchen"


class Jwks:
    """A JWKS endpoint on loopback whose keys the test changes (rotation)."""

    def __init__(self):
        self.keys: dict[str, object] = {}  # kid -> private key
        served = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's name
                body = json.dumps({"keys": [served.jwk(kid) for kid in served.keys]}).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/certs"

    def jwk(self, kid: str) -> dict:
        key = self.keys[kid]
        algorithm = jwt.algorithms.RSAAlgorithm if isinstance(key, rsa.RSAPrivateKey) else jwt.algorithms.ECAlgorithm
        return {**json.loads(algorithm.to_jwk(key.public_key())), "kid": kid, "use": "sig"}

    def token(self, kid: str, key=None, alg: str | None = None, **claims) -> str:
        now = int(time.time())
        body = {"iss": ISSUER, "aud": AUDIENCE, "sub": "dana", "groups": ["platform-engineers"], "iat": now,
                "exp": now + 300, **claims}
        key = key or self.keys[kid]
        alg = alg or ("RS256" if isinstance(key, rsa.RSAPrivateKey) else "ES256")
        return jwt.encode(body, key, algorithm=alg, headers={"kid": kid})


@pytest.fixture
def jwks():
    served = Jwks()
    served.keys["rsa-1"] = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    served.keys["ec-1"] = ec.generate_private_key(ec.SECP256R1())
    yield served
    served.server.shutdown()


@pytest.fixture
async def svc(tmp_path, event_prefix, nats_url, jwks):
    env = {"IK_OIDC_ISSUER": ISSUER, "IK_OIDC_AUDIENCE": AUDIENCE, "IK_OIDC_JWKS_URL": jwks.url,
           "IK_OIDC_ROLE_MAP": "platform-admins=admin,platform-engineers=write,everyone=read",
           "IK_OIDC_JWKS_REFETCH_SECONDS": "0"}
    async with InProcessService(DEFINITION, f"sqlite:///{tmp_path / 'approval.db'}", event_prefix, nats_url,
                                tmp_path / "data", extra_env=env) as s:
        s.stub = approval_pb2_grpc.ApprovalServiceStub(s.channel)
        yield s


def hs256_with(secret: bytes, claims: dict) -> str:
    """An HS256 token made by hand (PyJWT refuses an asymmetric key as HMAC secret, as it should)."""
    encode = jwt.utils.base64url_encode
    signing_input = encode(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "rsa-1"}).encode()) + b"." + \
        encode(json.dumps(claims).encode())
    return (signing_input + b"." + encode(hmac.new(secret, signing_input, hashlib.sha256).digest())).decode()


def bearer(token: str):
    return [("authorization", f"Bearer {token}")]


async def test_identity_provider_tokens_and_every_forged_variant(svc, jwks):
    read = svc.stub.GetApprovalFlow(pb.GetApprovalFlowRequest(), metadata=bearer(jwks.token("rsa-1")))
    assert (await read) is not None
    # Roles come from the group claim: engineers write, admins administer.
    denied = await rpc_error(svc.stub.UpdateApprovalFlow(pb.UpdateApprovalFlowRequest(enabled=True),
                                                         metadata=bearer(jwks.token("ec-1"))))
    assert denied.code() == grpc.StatusCode.PERMISSION_DENIED and "dana" in denied.details()
    flow = await svc.stub.UpdateApprovalFlow(pb.UpdateApprovalFlowRequest(enabled=True), metadata=bearer(
        jwks.token("ec-1", sub="erin", groups=["everyone", "platform-admins"])))
    assert flow.enabled and flow.updated_by == "erin"
    # The provider rotates its keys: a token of the new key is accepted (the JWKS is fetched again).
    jwks.keys["rsa-2"] = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    await svc.stub.GetApprovalFlow(pb.GetApprovalFlowRequest(), metadata=bearer(jwks.token("rsa-2")))
    # Local tokens keep working beside them.
    await svc.stub.GetApprovalFlow(pb.GetApprovalFlowRequest(), metadata=svc.metadata(Role.READ, "local"))

    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public_pem = jwks.keys["rsa-1"].public_key().public_bytes(serialization.Encoding.PEM,
                                                              serialization.PublicFormat.SubjectPublicKeyInfo)
    valid = jwks.token("rsa-1")
    head, body, signature = valid.split(".")
    tampered_body = jwt.utils.base64url_encode(json.dumps({**jwt.decode(valid, options={"verify_signature": False}),
                                                           "groups": ["platform-admins"]}).encode()).decode()
    forged = {
        "TOKEN_EXPIRED": jwks.token("rsa-1", exp=int(time.time()) - 3600),
        "TOKEN_WRONG_ISSUER": jwks.token("rsa-1", iss="https://evil.test"),
        "TOKEN_WRONG_AUDIENCE": jwks.token("rsa-1", aud="someone-else"),
        "TOKEN_UNKNOWN_KEY": jwks.token("rsa-9", key=stranger),
        "TOKEN_ALGORITHM_REFUSED": jwt.encode({"iss": ISSUER, "aud": AUDIENCE, "sub": "mallory",
                                               "exp": int(time.time()) + 300}, None, algorithm="none"),
        # HS/RS confusion: HMAC "signed" with the provider's public key.
        "TOKEN_INVALID": hs256_with(public_pem, {"iss": ISSUER, "aud": AUDIENCE, "sub": "mallory",
                                                 "groups": ["platform-admins"], "exp": int(time.time()) + 300}),
        "TOKEN_NO_ROLE": jwks.token("rsa-1", groups=["interns"]),
    }
    forged["tampered"] = f"{head}.{tampered_body}.{signature}"
    for want, token in forged.items():
        err = await rpc_error(svc.stub.GetApprovalFlow(pb.GetApprovalFlowRequest(), metadata=bearer(token)))
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED, (want, err.code(), err.details())
        assert reason(err) == ("TOKEN_INVALID" if want == "tampered" else want), want


async def test_services_prove_who_they_are_and_act_only_where_allowed(tmp_path, event_prefix, nats_url):
    """A service's call carries a token signed with its own key: accepted from
    a service allowed to act for users towards the callee, refused when
    forged, expired, meant for another service, or from a service not allowed.
    With IK_LOCAL_TOKENS=off the service holds no key that mints a user's token."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from services.common.identities import ServiceIdentity
    data = tmp_path / "data"
    async with InProcessService(DEFINITION, f"sqlite:///{tmp_path / 'approval.db'}", event_prefix, nats_url, data,
                                extra_env={"IK_LOCAL_TOKENS": "off"}) as svc:
        stub = approval_pb2_grpc.ApprovalServiceStub(svc.channel)
        resource = ServiceIdentity.from_settings("resource", {}, data)
        flow = await stub.UpdateApprovalFlow(pb.UpdateApprovalFlowRequest(enabled=True), metadata=bearer(
            resource.token("approval", "olivia", Role.ADMIN)))
        assert flow.updated_by == "olivia", "the service acts for the user it names"
        blueprint = ServiceIdentity.from_settings("blueprint", {}, data)
        impostor = ServiceIdentity("resource", Ed25519PrivateKey.generate(), data / "service-keys")
        expired = jwt.encode({"iss": "service:resource", "aud": "approval", "sub": "olivia", "role": "admin",
                              "exp": int(time.time()) - 600}, resource._private, algorithm="EdDSA",
                             headers={"kid": "resource"})
        cases = {
            ("PERMISSION_DENIED", "SERVICE_NOT_ALLOWED"): blueprint.token("approval", "olivia", Role.ADMIN),
            ("UNAUTHENTICATED", "TOKEN_INVALID"): impostor.token("approval", "olivia", Role.ADMIN),
            ("UNAUTHENTICATED", "TOKEN_WRONG_AUDIENCE"): resource.token("executor", "olivia", Role.ADMIN),
            ("UNAUTHENTICATED", "TOKEN_EXPIRED"): expired,
            ("UNAUTHENTICATED", "SERVICE_UNKNOWN"): ServiceIdentity("mallory", Ed25519PrivateKey.generate(),
                                                                    data / "service-keys").token(
                "approval", "olivia", Role.ADMIN),
            ("UNAUTHENTICATED", "LOCAL_TOKENS_OFF"): svc.metadata(Role.ADMIN)[0][1].removeprefix("Bearer "),
        }
        for (code, why), token in cases.items():
            err = await rpc_error(stub.GetApprovalFlow(pb.GetApprovalFlowRequest(), metadata=bearer(token)))
            assert (err.code().name, reason(err)) == (code, why)
    assert not (data / "auth-secret").exists(), "no key that mints a user's token was made"
