"""Short-lived cloud credentials: an OIDC integration, the executor as an
OIDC issuer (discovery document and JWKS on a port of its own), a token per
job attempt, and the test cloud accepting only such tokens (verified against
the executor's JWKS) for the resource they name, until they expire."""
from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import urllib.error
import urllib.request

import jwt
import pytest

from infrakitchen.executor.v1 import executor_pb2 as pb
from tests.support.gitrepos import ModuleRepo
from tests.support.jobs import all_logs, log_text, start_executor, submit_request, wait_job
from tests.support.processes import free_port
from tests.testcloud.cloud import CloudServer, jwks_verifier

NETWORK = '''
terraform {
  required_providers {
    testcloud = { source = "infrakitchen.test/ik/testcloud" }
    null      = { source = "hashicorp/null" }
  }
}
variable "name" {
  type = string
}
variable "shared" {
  type = string
}
resource "testcloud_network" "this" {
  name = var.name
  cidr = "10.30.0.0/16"
}
# Shows what the job holds: its token (copied out for the test) and the file's mode.
resource "null_resource" "show" {
  triggers = { network = testcloud_network.this.id }
  provisioner "local-exec" {
    command = "cp \\"$TESTCLOUD_TOKEN_FILE\\" ${var.shared}/${var.name}.jwt && stat -c %a \\"$TESTCLOUD_TOKEN_FILE\\" > ${var.shared}/${var.name}.mode && echo \\"$TESTCLOUD_TOKEN_FILE\\" > ${var.shared}/${var.name}.path && sleep 4"
  }
}
output "network_id" {
  value = testcloud_network.this.id
}
'''
# Another job, trying to read the first one's token while it runs.
PRYING = '''
variable "shared" {
  type = string
}
resource "null_resource" "pry" {
  provisioner "local-exec" {
    command = "for i in $(seq 100); do [ -s ${var.shared}/a.path ] && break; sleep 0.1; done; cat \\"$(cat ${var.shared}/a.path)\\" > ${var.shared}/pry.out 2>&1 || echo refused >> ${var.shared}/pry.out"
  }
}
'''
AUDIENCE = "testcloud"


@pytest.fixture
def cloud():
    with CloudServer() as server:  # no static token: only the executor's tokens
        yield server


@pytest.fixture
def modules(tmp_path):
    repo = ModuleRepo(tmp_path / "modules")
    repo.write("network/main.tf", NETWORK)
    repo.write("prying/main.tf", PRYING)
    repo.commit("modules", tag="v1")
    return repo


@pytest.fixture
async def executor(tmp_path, event_prefix, nats_url, cloud):
    shared = tmp_path / "shared"
    shared.mkdir()
    port = free_port()
    svc = await start_executor(f"sqlite:///{tmp_path / 'executor.db'}", event_prefix, nats_url, tmp_path / "data",
                               IK_EXECUTOR_OIDC_PORT=str(port), IK_EXECUTOR_EGRESS_ALLOW=f"127.0.0.1:{cloud.port}",
                               IK_EXECUTOR_SANDBOX_BIND=str(shared))
    svc.shared, svc.issuer = shared, f"http://127.0.0.1:{port}"
    cloud.cloud.verifier = jwks_verifier(f"{svc.issuer}/jwks", svc.issuer, AUDIENCE)
    yield svc
    await svc.__aexit__(None, None, None)


def _get(url: str, token: str = "") -> tuple[int, dict]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


async def _integration(svc, cloud) -> str:
    return (await svc.stub.CreateIntegration(pb.CreateIntegrationRequest(
        integration=pb.Integration(name="testcloud-oidc", provider=pb.INTEGRATION_PROVIDER_OIDC,
                                   oidc=pb.OidcFederation(cloud="generic", audience=AUDIENCE,
                                                          token_file_env="TESTCLOUD_TOKEN_FILE")),
        credentials={"TESTCLOUD_ENDPOINT": cloud.url}), metadata=svc.admin)).id


async def _submit(svc, repo, module: str, name: str, resource_id: str, integration_ids=(), timeout=120,
                  metadata=None) -> pb.Job:
    """A resource's job as the resource service submits it (unless `metadata` says who else)."""
    return await svc.stub.SubmitJob(submit_request(
        repo, module, f"state/{name}", timeout=timeout, variables={"name": name, "shared": str(svc.shared)},
        integration_ids=list(integration_ids), correlation=pb.JobCorrelation(
            resource_id=resource_id, template_id="template-net", workflow_id="workflow-1")),
        metadata=metadata or svc.as_resource)


async def test_a_job_reaches_the_cloud_with_a_token_of_its_own(executor, cloud, modules):
    svc = executor
    integration = await _integration(svc, cloud)
    shown = await svc.stub.GetIntegration(pb.GetIntegrationRequest(id=integration), metadata=svc.md)
    assert shown.provider == pb.INTEGRATION_PROVIDER_OIDC and shown.oidc.audience == AUDIENCE

    a = await _submit(svc, modules, "network", "a", "resource-a", [integration])
    pry = await _submit(svc, modules, "prying", "pry", "resource-p", metadata=svc.md)  # beside it, by a user
    a, pry = await asyncio.gather(wait_job(svc.stub, a.id, svc.md, timeout=180),
                                  wait_job(svc.stub, pry.id, svc.md, timeout=180))
    text = log_text(await all_logs(svc.stub, a.id, svc.md))
    assert a.status == pb.JOB_STATUS_SUCCEEDED, a.error_message + text[-1500:]
    token = (svc.shared / "a.jwt").read_text()
    assert token not in text  # never in the log

    # The cloud took it (no static token exists) and tagged what it made with the token's resource.
    network, = cloud.objects("networks")
    assert network["owner_resource"] == "resource-a"

    # The token verifies against the issuer's published keys and says what ran, for how long.
    status, discovery = _get(f"{svc.issuer}/.well-known/openid-configuration")
    assert status == 200 and discovery["issuer"] == svc.issuer
    keys = jwt.PyJWKClient(discovery["jwks_uri"])
    claims = jwt.decode(token, keys.get_signing_key_from_jwt(token).key, algorithms=["RS256"], audience=AUDIENCE,
                        issuer=svc.issuer)
    assert {k: claims[k] for k in ("sub", "integration_id", "resource_id", "template_id", "workflow_id", "job_id",
                                   "attempt", "operation", "owner")} == {
        "sub": f"integration:{integration}:resource:resource-a", "integration_id": integration,
        "resource_id": "resource-a", "template_id": "template-net", "workflow_id": "workflow-1", "job_id": a.id,
        "attempt": 1, "operation": "apply", "owner": "alice"}
    assert claims["exp"] - claims["iat"] == 120  # the job's timeout

    # Only its own job could read it: mode 600, in the job's own directory, gone with it.
    assert (svc.shared / "a.mode").read_text().strip() == "600"
    assert pry.status == pb.JOB_STATUS_SUCCEEDED, pry.error_message
    pried = (svc.shared / "pry.out").read_text()
    assert "refused" in pried and token not in pried
    path = (svc.shared / "a.path").read_text().strip()
    assert not os.path.exists(path)

    # For another resource's objects, the token is refused.
    cloud.cloud.objects["net-other"] = {"id": "net-other", "kind": "networks", "name": "other",
                                        "tags": {}, "owner_resource": "resource-b"}
    status, body = _get(f"{cloud.url}/v1/networks/net-other", token)
    assert status == 403 and "resource-a" in body["error"]
    assert _get(f"{cloud.url}/v1/networks/{network['id']}", token)[0] == 200


async def test_a_users_own_job_gets_a_token_for_the_job_not_for_the_resource_it_names(executor, cloud, modules):
    """Only the resource service's word makes a job a resource's: a user who
    calls SubmitJob naming someone else's resource gets a token for that job."""
    svc = executor
    integration = await _integration(svc, cloud)
    mine = await _submit(svc, modules, "network", "m", "resource-of-someone-else", [integration], metadata=svc.md)
    mine = await wait_job(svc.stub, mine.id, svc.md, timeout=180)
    assert mine.status == pb.JOB_STATUS_SUCCEEDED, mine.error_message
    claims = jwt.decode((svc.shared / "m.jwt").read_text(), options={"verify_signature": False})
    assert claims["sub"] == f"integration:{integration}:job:{mine.id}"
    assert (claims["resource_id"], claims["template_id"], claims["workflow_id"]) == ("", "", "")


async def test_an_expired_token_is_refused(executor, cloud):
    svc = executor
    issuer = svc.runtime.oidc
    expired = await issuer.mint(svc.runtime.uow, {"sub": "resource:r", "aud": AUDIENCE, "resource_id": "r"}, 1,
                                dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5))
    status, body = _get(f"{cloud.url}/v1/networks", expired)
    assert status == 401 and "Expired" in body["error"]
    fresh = await issuer.mint(svc.runtime.uow, {"sub": "resource:r", "aud": AUDIENCE, "resource_id": "r"}, 60,
                              dt.datetime.now(dt.timezone.utc))
    assert _get(f"{cloud.url}/v1/networks", fresh)[0] == 200
    wrong = await issuer.mint(svc.runtime.uow, {"sub": "resource:r", "aud": "another-cloud"}, 60,
                              dt.datetime.now(dt.timezone.utc))
    assert _get(f"{cloud.url}/v1/networks", wrong)[0] == 401


async def test_oidc_integrations_are_checked(executor):
    svc = executor
    from tests.support.grpc_asserts import field_violations, rpc_error
    bad = await rpc_error(svc.stub.CreateIntegration(pb.CreateIntegrationRequest(integration=pb.Integration(
        name="bad", provider=pb.INTEGRATION_PROVIDER_OIDC, oidc=pb.OidcFederation(cloud="aws"))),
        metadata=svc.admin))
    assert "integration.oidc.role_arn" in field_violations(bad)
    mixed = await rpc_error(svc.stub.CreateIntegration(pb.CreateIntegrationRequest(
        integration=pb.Integration(name="mixed", provider=pb.INTEGRATION_PROVIDER_AWS,
                                   oidc=pb.OidcFederation(cloud="aws")), credentials={"ACCESS_KEY_ID": "x"}),
        metadata=svc.admin))
    assert "integration.oidc" in field_violations(mixed)
    long = await rpc_error(svc.stub.CreateIntegration(pb.CreateIntegrationRequest(integration=pb.Integration(
        name="long", provider=pb.INTEGRATION_PROVIDER_OIDC,
        oidc=pb.OidcFederation(cloud="generic", audience="x" * 600))), metadata=svc.admin))
    assert "integration.oidc.audience" in field_violations(long)
