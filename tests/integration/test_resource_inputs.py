"""The inputs of a resource, through gRPC with the real services: the
platform team's default on a source code version is used; a resource never
provisioned takes new inputs directly (validated as a create); moving a
resource to another version never takes a name another resource has there
(a check answers ALREADY_EXISTS before anything changes, not the unique index
at commit)."""
from __future__ import annotations

import grpc
import pytest
from google.protobuf import struct_pb2

from infrakitchen.blueprint.v1 import blueprint_pb2 as bp
from infrakitchen.resource.v1 import resource_pb2 as rp
from tests.support.gitrepos import ModuleRepo
from tests.support.grpc_asserts import field_violations, rpc_error
from tests.support.platform import MODULES, Platform, struct

PROVISION, PROVISIONED = rp.RESOURCE_STATE_PROVISION, rp.RESOURCE_STATE_PROVISIONED
READY, DONE = rp.RESOURCE_STATUS_READY, rp.RESOURCE_STATUS_DONE


@pytest.fixture
async def p(tmp_path, event_prefix, nats_url):
    async with Platform(tmp_path, event_prefix, nats_url) as platform:
        yield platform


async def second_version(p, key: str, configs=()) -> str:
    """Another source code version of the template (same module, another tag)."""
    repo = ModuleRepo(p.tmp_path / f"modules-{key}")
    for path, text in MODULES.items():
        repo.write(path, text)
    repo.commit("modules", tag="v2")
    v = await p.blueprint.CreateSourceCodeVersion(bp.CreateSourceCodeVersionRequest(
        template_id=p.catalog.templates[key], source=bp.ModuleSource(repository_url=repo.url, ref="v2", path=key),
        variable_configs=list(configs)), metadata=p.admin)
    return v.id


async def test_the_platform_teams_default_is_the_resources_value(p):
    version = await second_version(p, "app", [bp.VariableConfig(name="size", default=struct_pb2.Value(
        number_value=3))])
    app = await p.create("app", "sized", variables={"vpc_id": "vpc-1"}, source_code_version_id=version)
    assert app.variables["size"] == 3, "the version's configured default, not the module's 1"
    given = await p.create("app", "given", variables={"vpc_id": "vpc-1", "size": 2}, source_code_version_id=version)
    assert given.variables["size"] == 2
    plain = await p.create("app", "plain", variables={"vpc_id": "vpc-1"})
    assert "size" not in plain.variables, "the module's own default is terraform's business"


async def test_a_resource_never_provisioned_takes_new_inputs_directly(p):
    net = await p.create("network", "edit-me", variables={"cidr": "10.0.0.0/16"})
    assert (net.state, net.status, net.revision) == (PROVISION, READY, 1)
    bad = await rpc_error(p.resource.UpdateResource(rp.UpdateResourceRequest(
        resource=rp.Resource(id=net.id, variables=struct(cidr=5, nope="x")), update_mask=["variables"]),
        metadata=p.md))
    assert bad.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert set(field_violations(bad)) == {"resource.variables.cidr", "resource.variables.nope"}
    fixed = await p.resource.UpdateResource(rp.UpdateResourceRequest(
        resource=rp.Resource(id=net.id, variables=struct(cidr="10.5.0.0/16")), update_mask=["variables"]),
        metadata=p.md)
    assert fixed.variables["cidr"] == "10.5.0.0/16" and fixed.revision == 2
    same = await p.resource.UpdateResource(rp.UpdateResourceRequest(
        resource=rp.Resource(id=net.id, variables=struct(cidr="10.5.0.0/16")), update_mask=["variables"]),
        metadata=p.md)
    assert same.revision == 2, "no change, no revision"
    audit = await p.resource.ListResourceEvents(rp.ListResourceEventsRequest(resource_id=net.id), metadata=p.md)
    assert [e.action for e in audit.entries].count("inputs_updated") == 1
    await p.resource.ProvisionResource(rp.ProvisionResourceRequest(id=net.id), metadata=p.md)
    provisioned = await p.wait(net.id, PROVISIONED, DONE)
    assert provisioned.variables["cidr"] == "10.5.0.0/16"
    late = await rpc_error(p.resource.UpdateResource(rp.UpdateResourceRequest(
        resource=rp.Resource(id=net.id, variables=struct(cidr="10.6.0.0/16")), update_mask=["variables"]),
        metadata=p.md))
    assert late.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "temporary state" in field_violations(late)["resource.variables"]


async def test_moving_to_a_version_where_the_name_is_taken_is_already_exists(p):
    v2 = await second_version(p, "network")
    net = await p.provisioned("network", "dup", variables={"cidr": "10.0.0.0/16"})
    ts = await p.resource.CreateTemporaryState(rp.CreateTemporaryStateRequest(temporary_state=rp.TemporaryState(
        resource_id=net.id, source_code_version_id=v2)), metadata=p.md)
    # Meanwhile another resource takes the name at that version.
    await p.create("network", "dup", variables={"cidr": "10.1.0.0/16"}, source_code_version_id=v2,
                   storage_path="network/dup-at-v2")
    err = await rpc_error(p.resource.SubmitTemporaryState(rp.SubmitTemporaryStateRequest(id=ts.id), metadata=p.md))
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS
    unchanged = await p.get(net.id)
    assert (unchanged.state, unchanged.status, unchanged.revision) == (PROVISIONED, DONE, net.revision)
    kept = await p.resource.GetTemporaryState(rp.GetTemporaryStateRequest(id=ts.id), metadata=p.md)
    assert kept.status == rp.TEMPORARY_STATE_STATUS_PENDING
    err = await rpc_error(p.resource.CreateTemporaryState(rp.CreateTemporaryStateRequest(
        temporary_state=rp.TemporaryState(resource_id=net.id, source_code_version_id=v2)), metadata=p.md))
    assert err.code() in (grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.FAILED_PRECONDITION)


async def test_an_integration_or_secret_in_use_by_resources_cannot_be_deleted(p):
    from infrakitchen.executor.v1 import executor_pb2 as ep
    from tests.support.grpc_asserts import precondition_violations
    secret = await p.executor.CreateSecret(ep.CreateSecretRequest(secret=ep.Secret(
        name="db", exposure=ep.SECRET_EXPOSURE_TF_VAR), values={"password": "pw"}), metadata=p.admin)
    spare = await p.executor.CreateIntegration(ep.CreateIntegrationRequest(integration=ep.Integration(
        name="spare", provider=ep.INTEGRATION_PROVIDER_GENERIC), credentials={"T": "t"}), metadata=p.admin)
    net = await p.create("network", "user-of-both", variables={"cidr": "10.0.0.0/16"}, secret_ids=[secret.id])
    for call, request in ((p.executor.DeleteIntegration, ep.DeleteIntegrationRequest(id=p.catalog.integration)),
                          (p.executor.DeleteSecret, ep.DeleteSecretRequest(id=secret.id))):
        err = await rpc_error(call(request, metadata=p.admin))
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert [(kind, subject) for kind, subject, _ in precondition_violations(err)] == \
            [("IN_USE", f"resources/{net.id}")]
    still = await p.executor.GetIntegration(ep.GetIntegrationRequest(id=p.catalog.integration), metadata=p.admin)
    assert still.id == p.catalog.integration
    await p.executor.DeleteIntegration(ep.DeleteIntegrationRequest(id=spare.id), metadata=p.admin)
    listed = await p.resource.ListResources(rp.ListResourcesRequest(secret_id=secret.id), metadata=p.md)
    assert [r.id for r in listed.resources] == [net.id]
    listed = await p.resource.ListResources(rp.ListResourcesRequest(secret_id=secret.id[:-1]), metadata=p.md)
    assert not listed.resources, "a whole-id match"


async def test_a_job_the_executor_refuses_says_why_on_the_resource(p):
    net = await p.create("network", "refused", variables={"cidr": "10.0.0.0/16"})
    # The storage path was claimed by someone else's job: the executor refuses the submission.
    from infrakitchen.executor.v1 import executor_pb2 as ep
    await p.executor.ClaimStatePath(ep.ClaimStatePathRequest(storage_id=p.catalog.storage,
                                                             state_path=net.storage_path, resource_id="someone-else"),
                                    metadata=p.admin)
    await p.resource.ProvisionResource(rp.ProvisionResourceRequest(id=net.id), metadata=p.md)
    failed = await p.wait(net.id, PROVISION, rp.RESOURCE_STATUS_ERROR)
    assert failed.error_message.startswith("could not start the job: ")
    assert "RemoteError" not in failed.error_message and "state path" in failed.error_message
