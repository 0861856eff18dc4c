"""ResourceService through gRPC with the real blueprint, executor (real
terraform) and approval services and real NATS: every row of the product
document's State Constraints and Status Tracking tables, every validation
check, the destroy guard, temporary states, abstract resources, inheritance,
one operation at a time, redelivered events and the create-after-completion race."""
from __future__ import annotations

import asyncio
import json

import grpc
import pytest

from infrakitchen.executor.v1 import executor_pb2 as ep
from infrakitchen.resource.v1 import resource_pb2 as rp
from services.common.auth import Role
from services.common.grpc_errors import status_details
from services.common.values import from_value, to_value
from tests.support.grpc_asserts import field_violations, precondition_violations, reason, rpc_error
from tests.support.platform import Platform, struct

PROVISION, PROVISIONED, DESTROY, DESTROYED = (rp.RESOURCE_STATE_PROVISION, rp.RESOURCE_STATE_PROVISIONED,
                                              rp.RESOURCE_STATE_DESTROY, rp.RESOURCE_STATE_DESTROYED)
READY, QUEUED, IN_PROGRESS, DONE, ERROR = (rp.RESOURCE_STATUS_READY, rp.RESOURCE_STATUS_QUEUED,
                                           rp.RESOURCE_STATUS_IN_PROGRESS, rp.RESOURCE_STATUS_DONE,
                                           rp.RESOURCE_STATUS_ERROR)


@pytest.fixture
async def p(tmp_path, event_prefix, nats_url):
    async with Platform(tmp_path, event_prefix, nats_url) as platform:
        yield platform


@pytest.fixture(params=["sqlite", "postgres"])
async def any_db(request, tmp_path, event_prefix, nats_url, postgres):
    """The platform on SQLite files, and on PostgreSQL databases."""
    urls = {} if request.param == "sqlite" else {n: postgres.create() for n in ("executor", "approval", "resource")}
    async with Platform(tmp_path, event_prefix, nats_url, database_urls=urls) as platform:
        yield platform


async def watch_states(p, resource_id: str, until: tuple[int, int], seen: list) -> None:
    """What WatchResource shows (it reads the resource when a commit wakes it: statuses committed in
    quick succession may show as one)."""
    async for change in p.resource.WatchResource(rp.WatchResourceRequest(id=resource_id), metadata=p.md):
        pair = (change.resource.state, change.resource.status)
        if not seen or seen[-1] != pair:
            seen.append(pair)
        if pair == until:
            return


async def transitions(p, resource_id: str, count: int) -> list[tuple[int, int]]:
    """(state, status) after each status change, from the resource service's events."""
    from tests.support.events import read_events
    envs = await read_events(p.inner["resource"].runtime.bus, "resource", 500, timeout=3)
    return [(e.resource_status_changed.state, e.resource_status_changed.status) for e in envs
            if e.WhichOneof("body") == "resource_status_changed"
            and e.resource_status_changed.resource_id == resource_id][:count]


# --- create, provision, destroy, recreate, delete ----------------------------------------

async def test_full_lifecycle_moves_through_the_documented_states(any_db):
    p = any_db
    net = await p.create("network", "core", variables={"cidr": "10.0.0.0/16"})
    assert (net.state, net.status, net.revision, list(net.owners), net.creator) == \
        (PROVISION, READY, 1, ["alice"], "alice")
    assert net.storage_path == "network/core" and net.source_code_version_id == p.catalog.versions["network"]

    seen: list = []
    watcher = asyncio.create_task(watch_states(p, net.id, (PROVISIONED, DONE), seen))
    await asyncio.sleep(0.5)
    started = await p.resource.ProvisionResource(rp.ProvisionResourceRequest(id=net.id, etag=net.etag),
                                                 metadata=p.md)
    assert started.status in (QUEUED, IN_PROGRESS) and started.last_job_id
    await asyncio.wait_for(watcher, 90)
    assert seen[0] == (PROVISION, READY) and seen[-1] == (PROVISIONED, DONE)
    assert await transitions(p, net.id, 3) == [(PROVISION, QUEUED), (PROVISION, IN_PROGRESS), (PROVISIONED, DONE)]
    net = await p.get(net.id)
    outputs = {o.name: from_value(o.value) for o in net.outputs}
    assert outputs["cidr"] == "10.0.0.0/16" and outputs["vpc_id"].startswith("vpc-")
    assert net.revision == 1

    # The state lives where the storage says.
    state = json.loads((p.tmp_path / "states" / "network" / "core" / "terraform.tfstate").read_text())
    assert state["resources"][0]["type"] == "null_resource"

    # Destroy: provisioned -> destroy/ready -> ... -> destroyed/done, outputs cleared.
    seen = []
    watcher = asyncio.create_task(watch_states(p, net.id, (DESTROYED, DONE), seen))
    await asyncio.sleep(0.5)
    await p.resource.DestroyResource(rp.DestroyResourceRequest(id=net.id), metadata=p.admin)
    await asyncio.wait_for(watcher, 90)
    assert seen[0] == (PROVISIONED, DONE) and seen[-1] == (DESTROYED, DONE)
    assert (await transitions(p, net.id, 7))[3:] == [(DESTROY, READY), (DESTROY, QUEUED), (DESTROY, IN_PROGRESS),
                                                     (DESTROYED, DONE)]
    net = await p.get(net.id)
    assert not net.outputs

    # Recreate from destroyed/done: provision again, revision increments.
    await p.resource.RecreateResource(rp.RecreateResourceRequest(id=net.id), metadata=p.md)
    net = await p.wait(net.id, PROVISIONED, DONE)
    assert net.revision == 2 and net.outputs
    revisions = await p.resource.ListResourceRevisions(rp.ListResourceRevisionsRequest(resource_id=net.id),
                                                       metadata=p.md)
    assert [r.revision for r in revisions.revisions] == [1, 2]

    # Delete only from destroyed/done.
    early = await rpc_error(p.resource.DeleteResource(rp.DeleteResourceRequest(id=net.id), metadata=p.admin))
    assert early.code() == grpc.StatusCode.FAILED_PRECONDITION
    await p.resource.DestroyResource(rp.DestroyResourceRequest(id=net.id), metadata=p.admin)
    await p.wait(net.id, DESTROYED, DONE)
    await p.resource.DeleteResource(rp.DeleteResourceRequest(id=net.id), metadata=p.admin)
    gone = await rpc_error(p.get(net.id))
    assert gone.code() == grpc.StatusCode.NOT_FOUND
    # The audit trail stays.
    trail = await p.resource.ListResourceEvents(rp.ListResourceEventsRequest(resource_id=net.id), metadata=p.md)
    actions = [e.action for e in trail.entries]
    assert actions[0] == "create" and actions[-1] == "delete" and "provisioned" in actions and "destroyed" in actions
    assert all(e.actor for e in trail.entries)
    # The storage path is free again for a new resource.
    again = await p.create("network", "core2", variables={"cidr": "10.1.0.0/16"}, storage_path="network/core")
    assert again.storage_path == "network/core"


async def test_a_failed_provision_is_error_then_retried(p):
    gate = p.shared / "gate"
    net = await p.provisioned("network", "n", variables={"cidr": "10.0.0.0/16"})
    r = await p.create("gated", "g", parents=[net.id], variables={"gate": str(gate)})
    await p.resource.ProvisionResource(rp.ProvisionResourceRequest(id=r.id), metadata=p.md)
    failed = await p.wait(r.id, PROVISION, ERROR)
    assert "local-exec provisioner error" in " ".join(failed.error_message.split())
    gate.write_text("open")
    await p.resource.ProvisionResource(rp.ProvisionResourceRequest(id=r.id), metadata=p.md)
    done = await p.wait(r.id, PROVISIONED, DONE)
    assert not done.error_message
    # A failed destroy is destroy/error; it can be retried or cancelled back to provisioned.
    gate.unlink()
    # (destroy of a null_resource with a create-time provisioner does not run it; use the guard instead)


# --- validation checks -------------------------------------------------------------------

async def test_create_validation_checks(p):
    team, region = await p.base()
    bad = await rpc_error(p.resource.CreateResource(p.new("network", "", variables={"cidr": 5, "nope": 1},
                                                          integration_ids=[]), metadata=p.md))
    assert bad.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert set(field_violations(bad)) == {"resource.name", "resource.variables.cidr", "resource.variables.nope",
                                          "resource.integration_ids"}
    missing = await rpc_error(p.resource.CreateResource(p.new("network", "x"), metadata=p.md))
    assert field_violations(missing) == {"resource.variables.cidr": "is required"}
    unknown = await rpc_error(p.resource.CreateResource(p.new("network", "x", variables={"cidr": "a"},
                                                              integration_ids=["ghost"]), metadata=p.md))
    assert "resource.integration_ids[0]" in field_violations(unknown)
    no_template = await rpc_error(p.resource.CreateResource(rp.CreateResourceRequest(resource=rp.Resource(
        name="x", template_id="ghost")), metadata=p.md))
    assert "resource.template_id" in field_violations(no_template)

    first = await p.create("network", "dup", parents=[team.id], variables={"cidr": "10.0.0.0/16",
                                                                           "tag_name": "blue"})
    same_name = await rpc_error(p.create("network", "dup", variables={"cidr": "10.2.0.0/16"}))
    assert same_name.code() == grpc.StatusCode.ALREADY_EXISTS
    unique = await rpc_error(p.create("network", "other", variables={"cidr": "10.3.0.0/16", "tag_name": "blue"}))
    assert "must be unique" in field_violations(unique)["resource.variables.tag_name"]
    path = await rpc_error(p.create("network", "third", variables={"cidr": "10.4.0.0/16"},
                                    storage_path=first.storage_path))
    assert path.code() == grpc.StatusCode.ALREADY_EXISTS
    escaping = await rpc_error(p.create("network", "fourth", variables={"cidr": "10.5.0.0/16"},
                                        storage_path="../elsewhere"))
    assert escaping.code() == grpc.StatusCode.INVALID_ARGUMENT and "resource.storage_path" in field_violations(escaping)
    no_storage = await rpc_error(p.create("network", "fifth", variables={"cidr": "10.6.0.0/16"}, storage_id="ghost"))
    assert field_violations(no_storage) == {"resource.storage_id": "unknown storage 'ghost'"}
    # Parents: must exist, be provisioned, and be of the template's parent templates.
    not_ready = await rpc_error(p.create("app", "a", parents=[first.id], variables={"vpc_id": "v"}))
    assert "not provisioned" in field_violations(not_ready)["resource.parent_ids[0]"]
    wrong = await rpc_error(p.create("app", "a", parents=[team.id], variables={"vpc_id": "v"}))
    assert "not a parent template" in field_violations(wrong)["resource.parent_ids[0]"]
    # A disabled template.
    from infrakitchen.blueprint.v1 import blueprint_pb2 as bp
    t = await p.blueprint.GetTemplate(bp.GetTemplateRequest(id=p.catalog.templates["app"]), metadata=p.md)
    await p.blueprint.UpdateTemplate(bp.UpdateTemplateRequest(template=bp.Template(id=t.id, enabled=False),
                                                              update_mask=["enabled"]), metadata=p.admin)
    disabled = await rpc_error(p.create("app", "a", variables={"vpc_id": "v"}))
    assert disabled.code() == grpc.StatusCode.FAILED_PRECONDITION and reason(disabled) == "TEMPLATE_DISABLED"
    # None of it created anything.
    listed = await p.resource.ListResources(rp.ListResourcesRequest(), metadata=p.md)
    assert sorted(r.name for r in listed.resources) == ["dup", "eu", "platform"]
    # Read may not create.
    denied = await rpc_error(p.create("network", "r", variables={"cidr": "x"}, metadata=p.as_("rita", Role.READ)))
    assert denied.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_children_inherit_tags_and_configs_from_two_parents(p):
    team = await p.resource.CreateResource(rp.CreateResourceRequest(resource=rp.Resource(
        name="platform", template_id=p.catalog.templates["team"],
        dependency_tags=[rp.DependencyTag(name="team", value="platform", inherited_by_children=True),
                         rp.DependencyTag(name="private", value="x", inherited_by_children=False)],
        dependency_configs=[rp.DependencyConfig(name="cidr", value=to_value("10.9.0.0/16"),
                                                inherited_by_children=True)])), metadata=p.md)
    region = await p.resource.CreateResource(rp.CreateResourceRequest(resource=rp.Resource(
        name="eu", template_id=p.catalog.templates["region"],
        dependency_tags=[rp.DependencyTag(name="region", value="eu-west-1", inherited_by_children=True)],
        dependency_configs=[rp.DependencyConfig(name="region", value=to_value("eu-central-1"),
                                                inherited_by_children=True)])), metadata=p.md)
    assert (team.state, team.status) == (PROVISIONED, DONE)  # abstract: records only
    child = await p.create("network", "inherits", parents=[team.id, region.id])
    assert {(t.name, t.value) for t in child.dependency_tags} == {("team", "platform"), ("region", "eu-west-1")}
    assert (child.variables["cidr"], child.variables["region"]) == ("10.9.0.0/16", "eu-central-1")
    override = await p.create("network", "overrides", parents=[team.id, region.id], variables={"cidr": "10.1.0.0/16"})
    assert override.variables["cidr"] == "10.1.0.0/16"
    tree = await p.resource.GetResourceTree(rp.GetResourceTreeRequest(id=team.id), metadata=p.md)
    assert sorted(c.name for c in tree.root.children) == ["inherits", "overrides"]
    children = await p.resource.ListResources(rp.ListResourcesRequest(parent_id=region.id), metadata=p.md)
    assert sorted(r.name for r in children.resources) == ["inherits", "overrides"]


# --- one operation at a time ----------------------------------------------------------------

async def test_one_operation_at_a_time(p):
    gate = p.shared / "open-gate"
    gate.write_text("open")
    net = await p.provisioned("network", "n", variables={"cidr": "10.0.0.0/16"})
    r = await p.create("gated", "slow", parents=[net.id], variables={"gate": str(gate), "seconds": 4})
    results = await asyncio.gather(*[p.resource.ProvisionResource(rp.ProvisionResourceRequest(id=r.id),
                                                                  metadata=p.md) for _ in range(3)],
                                   return_exceptions=True)
    started = [x for x in results if isinstance(x, rp.Resource)]
    refused = [x for x in results if isinstance(x, grpc.aio.AioRpcError)]
    assert len(started) == 1 and len(refused) == 2
    assert {e.code() for e in refused} <= {grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.ABORTED}
    busy = await rpc_error(p.resource.ProvisionResource(rp.ProvisionResourceRequest(id=r.id), metadata=p.md))
    assert busy.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert precondition_violations(busy)[0][0] == "OPERATION_IN_PROGRESS"
    await p.wait(r.id, PROVISIONED, DONE)
    jobs = await p.executor.ListJobs(ep.ListJobsRequest(resource_id=r.id), metadata=p.md)
    assert [j.action for j in jobs.jobs] == [ep.JOB_ACTION_APPLY]


# --- the destroy guard -------------------------------------------------------------------------

async def test_destroy_is_refused_while_children_depend_on_the_resource(p):
    net = await p.provisioned("network", "n", variables={"cidr": "10.0.0.0/16"})
    app = await p.provisioned("app", "a", parents=[net.id], variables={"vpc_id": "vpc-1"})
    refused = await rpc_error(p.resource.DestroyResource(rp.DestroyResourceRequest(id=net.id), metadata=p.admin))
    assert refused.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert refused.details() == "Cannot destroy resource: Dependencies exist"
    info = status_details(refused)["ErrorInfo"]
    assert info.reason == "DEPENDENCIES_EXIST"
    assert json.loads(info.metadata["dependencies"]) == [
        {"resource_id": app.id, "resource_name": "a", "state": "provisioned"}]
    assert precondition_violations(refused) == [("DEPENDENCY_EXISTS", f"resources/{app.id}", "a is provisioned")]
    writer = await rpc_error(p.resource.DestroyResource(rp.DestroyResourceRequest(id=app.id), metadata=p.md))
    assert writer.code() == grpc.StatusCode.PERMISSION_DENIED
    unchanged = await p.get(net.id)
    assert (unchanged.state, unchanged.status) == (PROVISIONED, DONE)
    await p.resource.DestroyResource(rp.DestroyResourceRequest(id=app.id), metadata=p.admin)
    await p.wait(app.id, DESTROYED, DONE)
    await p.resource.DestroyResource(rp.DestroyResourceRequest(id=net.id), metadata=p.admin)
    await p.wait(net.id, DESTROYED, DONE)


# --- updates through temporary states ------------------------------------------------------------

async def test_update_through_a_temporary_state(p):
    net = await p.provisioned("network", "n", variables={"cidr": "10.0.0.0/16"})
    app = await p.provisioned("app", "a", parents=[net.id], variables={"vpc_id": "vpc-1", "password": "pw-123456"})
    assert app.variables["password"] == "***"
    assert {o.name: from_value(o.value) for o in app.outputs}["secret_url"] == "***"

    ts = await p.resource.CreateTemporaryState(rp.CreateTemporaryStateRequest(temporary_state=rp.TemporaryState(
        resource_id=app.id, variables=struct(size=3), description="bigger")), metadata=p.md)
    assert ts.status == rp.TEMPORARY_STATE_STATUS_PENDING and ts.base_revision == 1
    ts = await p.resource.UpdateTemporaryState(rp.UpdateTemporaryStateRequest(temporary_state=rp.TemporaryState(
        id=ts.id, variables=struct(size=4)), update_mask=["variables"]), metadata=p.md)
    ts = await p.resource.DryRunTemporaryState(rp.DryRunTemporaryStateRequest(id=ts.id), metadata=p.md)
    assert ts.dry_run_job_id
    for _ in range(300):
        ts = await p.resource.GetTemporaryState(rp.GetTemporaryStateRequest(id=ts.id), metadata=p.md)
        if ts.plan_add:
            break
        await asyncio.sleep(0.1)
    assert (ts.plan_add, ts.plan_destroy) == (1, 1)  # the trigger changed: replace
    assert ts.dry_run.job_id == ts.dry_run_job_id and ts.dry_run.status == rp.DRY_RUN_STATUS_SUCCEEDED
    assert (ts.dry_run.plan_add, ts.dry_run.plan_destroy) == (1, 1) and ts.dry_run.completion_time.seconds
    before = await p.get(app.id)
    assert (before.state, before.status, before.revision) == (PROVISIONED, DONE, 1)  # a dry run changes nothing

    await p.resource.SubmitTemporaryState(rp.SubmitTemporaryStateRequest(id=ts.id), metadata=p.md)
    app = await p.wait(app.id, PROVISIONED, DONE)
    assert app.revision == 2 and app.variables["size"] == 4 and app.description == "bigger"
    assert {o.name: from_value(o.value) for o in app.outputs}["endpoint"] == "app-4.vpc-1"
    merged = await p.resource.GetTemporaryState(rp.GetTemporaryStateRequest(id=ts.id), metadata=p.md)
    assert merged.status == rp.TEMPORARY_STATE_STATUS_MERGED
    job = await p.executor.GetJob(ep.GetJobRequest(id=app.last_job_id), metadata=p.md)
    assert job.plan_job_id == ts.dry_run_job_id  # the apply ran exactly the reviewed plan

    # Frozen variables cannot change; immutable fields cannot be updated.
    frozen = await rpc_error(p.resource.CreateTemporaryState(rp.CreateTemporaryStateRequest(
        temporary_state=rp.TemporaryState(resource_id=net.id, variables=struct(region="us-east-1"))),
        metadata=p.md))
    assert "frozen" in field_violations(frozen)["temporary_state.variables.region"]
    immutable = await rpc_error(p.resource.UpdateResource(rp.UpdateResourceRequest(
        resource=rp.Resource(id=app.id, name="renamed", storage_path="x/y"), update_mask=["name", "storage_path"]),
        metadata=p.md))
    assert field_violations(immutable) == {"resource.name": "is immutable", "resource.storage_path": "is immutable"}
    variables = await rpc_error(p.resource.UpdateResource(rp.UpdateResourceRequest(
        resource=rp.Resource(id=app.id, variables=struct(size=9)), update_mask=["variables"]), metadata=p.md))
    assert "resource.variables" in field_violations(variables)
    labelled = await p.resource.UpdateResource(rp.UpdateResourceRequest(
        resource=rp.Resource(id=app.id, labels=["prod"]), update_mask=["labels"]), metadata=p.md)
    assert list(labelled.labels) == ["prod"]

    # Discard: the temporary state is gone, the resource untouched.
    other = await p.resource.CreateTemporaryState(rp.CreateTemporaryStateRequest(temporary_state=rp.TemporaryState(
        resource_id=app.id, variables=struct(size=7))), metadata=p.md)
    second = await rpc_error(p.resource.CreateTemporaryState(rp.CreateTemporaryStateRequest(
        temporary_state=rp.TemporaryState(resource_id=app.id, variables=struct(size=8))), metadata=p.md))
    assert second.code() == grpc.StatusCode.FAILED_PRECONDITION
    await p.resource.DiscardTemporaryState(rp.DiscardTemporaryStateRequest(id=other.id), metadata=p.md)
    gone = await rpc_error(p.resource.GetTemporaryState(rp.GetTemporaryStateRequest(id=other.id), metadata=p.md))
    assert gone.code() == grpc.StatusCode.NOT_FOUND
    still = await p.get(app.id)
    assert still.variables["size"] == 4 and still.revision == 2


# --- abstract resources ------------------------------------------------------------------------

async def test_abstract_resources_skip_iac(p):
    team = await p.create("team", "platform", variables={})
    assert (team.state, team.status, team.abstract) == (PROVISIONED, DONE, True) and not team.last_job_id
    updated = await p.resource.UpdateResource(rp.UpdateResourceRequest(resource=rp.Resource(
        id=team.id, description="the platform team",
        dependency_tags=[rp.DependencyTag(name="cost-center", value="42", inherited_by_children=True)]),
        update_mask=["description", "dependency_tags"]), metadata=p.md)
    assert updated.description == "the platform team" and updated.dependency_tags[0].value == "42"
    for call, req, md in [(p.resource.ProvisionResource, rp.ProvisionResourceRequest(id=team.id), p.md),
                          (p.resource.DestroyResource, rp.DestroyResourceRequest(id=team.id), p.admin)]:
        err = await rpc_error(call(req, metadata=md))
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and \
            precondition_violations(err)[0][0] == "ABSTRACT_RESOURCE"
    await p.resource.DeleteResource(rp.DeleteResourceRequest(id=team.id), metadata=p.admin)
    jobs = await p.executor.ListJobs(ep.ListJobsRequest(resource_id=team.id), metadata=p.md)
    assert not jobs.jobs


# --- owners --------------------------------------------------------------------------------------

async def test_owners(p):
    team = await p.create("team", "t")
    stranger = await rpc_error(p.resource.AddResourceOwner(rp.AddResourceOwnerRequest(id=team.id, user="eve"),
                                                           metadata=p.as_("mallory")))
    assert stranger.code() == grpc.StatusCode.PERMISSION_DENIED
    added = await p.resource.AddResourceOwner(rp.AddResourceOwnerRequest(id=team.id, user="bob"), metadata=p.md)
    assert list(added.owners) == ["alice", "bob"]
    removed = await p.resource.RemoveResourceOwner(rp.RemoveResourceOwnerRequest(id=team.id, user="alice"),
                                                   metadata=p.as_("bob"))
    assert list(removed.owners) == ["bob"]
    last = await rpc_error(p.resource.RemoveResourceOwner(rp.RemoveResourceOwnerRequest(id=team.id, user="bob"),
                                                          metadata=p.as_("bob")))
    assert last.code() == grpc.StatusCode.FAILED_PRECONDITION


# --- events: redelivery and the create-after-completion race ---------------------------------------

async def test_a_redelivered_completion_event_changes_nothing(p):
    from services.common.events import new_event
    from tests.support.events import read_events
    net = await p.provisioned("network", "n", variables={"cidr": "10.0.0.0/16"})
    bus = p.inner["executor"].runtime.bus
    succeeded = [e for e in await read_events(bus, "executor", 3, subject="ik.executor.job.>")
                 if e.WhichOneof("body") == "job_succeeded"][0]
    # The same event again (a redelivery past the duplicate window) ...
    await bus.publish(bus.names.subject(succeeded.type), succeeded.SerializeToString(),
                      msg_id=succeeded.event_id + "-redelivered")
    # ... and the same fact in a new envelope.
    copy = new_event("executor", "job_succeeded", succeeded.job_succeeded, correlation=succeeded.correlation)
    await bus.publish(bus.names.subject(copy.type), copy.SerializeToString(), msg_id=copy.event_id)
    await asyncio.sleep(2)
    after = await p.get(net.id)
    assert (after.etag, after.revision) == (net.etag, 1)
    revisions = await p.resource.ListResourceRevisions(rp.ListResourceRevisionsRequest(resource_id=net.id),
                                                       metadata=p.md)
    assert len(revisions.revisions) == 1


def hold_back_job_events(p) -> None:
    """From now on the resource service does not see the executor's job events."""
    for consumer, _ in p.inner["resource"].runtime.consumers:
        if consumer.spec.durable == "resource-job-events":
            consumer.stop()


async def job_succeeded(p, job_id: str) -> None:
    for _ in range(600):
        job = await p.executor.GetJob(ep.GetJobRequest(id=job_id), metadata=p.md)
        if job.status == ep.JOB_STATUS_SUCCEEDED:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"job {job_id} is {ep.JobStatus.Name(job.status)}, not succeeded")


async def test_a_child_created_right_after_its_parents_job_finished_is_not_rejected(p):
    hold_back_job_events(p)
    net = await p.create("network", "n", variables={"cidr": "10.0.0.0/16"})
    started = await p.resource.ProvisionResource(rp.ProvisionResourceRequest(id=net.id), metadata=p.md)
    await job_succeeded(p, started.last_job_id)
    assert (await p.get(net.id)).status in (QUEUED, IN_PROGRESS)
    child = await p.create("app", "a", parents=[net.id], variables={"vpc_id": "vpc-1"})
    assert child.state == PROVISION
    parent = await p.get(net.id)
    assert (parent.state, parent.status) == (PROVISIONED, DONE) and parent.outputs


async def test_a_parent_destroy_racing_the_childs_completion_event_is_not_refused(p):
    """DestroyResource of a parent settles a child whose destroy job has just
    finished; when the completion event's consumer applies the same outcome a
    moment earlier, the settle reads its result instead of failing the call."""
    from dataclasses import replace
    net = await p.provisioned("network", "n", variables={"cidr": "10.0.0.0/16"})
    app = await p.provisioned("app", "a", [net.id], variables={"vpc_id": "vpc-1"})
    await p.resource.DestroyResource(rp.DestroyResourceRequest(id=app.id), metadata=p.admin)
    await p.wait(app.id, DESTROYED, DONE)
    runtime = p.inner["resource"].runtime
    async with runtime.uow() as uow:
        applied = await uow.resources.get(app.id)
        # What the parent's destroy read an instant before the consumer committed.
        seen = replace(applied, state="destroy", status="in_progress", pending_operation="destroy",
                       version=applied.version - 1)
        settled = await runtime.lifecycle.settle(uow, seen, "test")
    assert (settled.state, settled.status, settled.version) == ("destroyed", "done", applied.version)
    destroyed = await p.resource.DestroyResource(rp.DestroyResourceRequest(id=net.id), metadata=p.admin)
    assert destroyed.state == DESTROY


async def test_transitions_the_state_table_does_not_allow_are_refused(p):
    net = await p.create("network", "n", variables={"cidr": "10.0.0.0/16"})
    # provision: no destroy, no recreate, no delete, no update.
    for call, req, md in [(p.resource.DestroyResource, rp.DestroyResourceRequest(id=net.id), p.admin),
                          (p.resource.RecreateResource, rp.RecreateResourceRequest(id=net.id), p.md),
                          (p.resource.DeleteResource, rp.DeleteResourceRequest(id=net.id), p.admin),
                          (p.resource.CancelResourceDestroy, rp.CancelResourceDestroyRequest(id=net.id), p.admin)]:
        err = await rpc_error(call(req, metadata=md))
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, call
    ts = await rpc_error(p.resource.CreateTemporaryState(rp.CreateTemporaryStateRequest(
        temporary_state=rp.TemporaryState(resource_id=net.id, variables=struct(cidr="x"))), metadata=p.md))
    assert ts.code() == grpc.StatusCode.FAILED_PRECONDITION
    await p.resource.ProvisionResource(rp.ProvisionResourceRequest(id=net.id), metadata=p.md)
    await p.wait(net.id, PROVISIONED, DONE)
    # provisioned: no provision, no recreate, no delete.
    for call, req, md in [(p.resource.ProvisionResource, rp.ProvisionResourceRequest(id=net.id), p.md),
                          (p.resource.RecreateResource, rp.RecreateResourceRequest(id=net.id), p.md),
                          (p.resource.DeleteResource, rp.DeleteResourceRequest(id=net.id), p.admin)]:
        err = await rpc_error(call(req, metadata=md))
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, call
    stale = await rpc_error(p.resource.DestroyResource(rp.DestroyResourceRequest(id=net.id, etag='"1"'),
                                                       metadata=p.admin))
    assert stale.code() == grpc.StatusCode.ABORTED


async def test_a_child_recreated_before_its_parent_is_pending_then_starts(p):
    net = await p.provisioned("network", "n", variables={"cidr": "10.0.0.0/16"})
    app = await p.provisioned("app", "a", parents=[net.id], variables={"vpc_id": "vpc-1"})
    for r in (app, net):
        await p.resource.DestroyResource(rp.DestroyResourceRequest(id=r.id), metadata=p.admin)
        await p.wait(r.id, DESTROYED, DONE)
    # Rebuild the stack: the child is asked for while its parent is still being provisioned.
    await p.resource.RecreateResource(rp.RecreateResourceRequest(id=net.id), metadata=p.md)
    waiting = await p.resource.RecreateResource(rp.RecreateResourceRequest(id=app.id), metadata=p.md)
    assert (waiting.state, waiting.status) == (PROVISION, rp.RESOURCE_STATUS_PENDING)
    assert not [j for j in (await p.executor.ListJobs(ep.ListJobsRequest(resource_id=app.id), metadata=p.md)).jobs
                if j.status in (ep.JOB_STATUS_QUEUED, ep.JOB_STATUS_RUNNING)]
    await p.wait(net.id, PROVISIONED, DONE)
    app = await p.wait(app.id, PROVISIONED, DONE)
    assert app.revision == 2


async def test_listing_filters_and_pages(p):
    team = await p.create("team", "platform", labels=["core"])
    region = await p.create("region", "eu")
    net = await p.create("network", "n", parents=[team.id], variables={"cidr": "10.0.0.0/16"}, labels=["prod"])

    async def names(**filters):
        listed = await p.resource.ListResources(rp.ListResourcesRequest(**filters), metadata=p.as_("r", Role.READ))
        return sorted(r.name for r in listed.resources)
    assert await names(template_id=p.catalog.templates["team"]) == ["platform"]
    assert await names(state=PROVISION) == ["n"]
    assert await names(status=READY) == ["n"]
    assert await names(state=PROVISIONED, status=DONE) == ["eu", "platform"]
    assert await names(label="prod") == ["n"]
    assert await names(parent_id=team.id) == ["n"]
    first = await p.resource.ListResources(rp.ListResourcesRequest(page_size=2), metadata=p.md)
    second = await p.resource.ListResources(rp.ListResourcesRequest(page_size=2, page_token=first.next_page_token),
                                            metadata=p.md)
    assert [r.id for r in [*first.resources, *second.resources]] == [team.id, region.id, net.id]
    assert not second.next_page_token


async def test_create_and_provision_in_one_call(p):
    request = p.new("network", "now", variables={"cidr": "10.0.0.0/16"})
    request.provision = True
    started = await p.resource.CreateResource(request, metadata=p.md)
    assert started.state == PROVISION and started.status in (QUEUED, IN_PROGRESS) and started.last_job_id
    await p.wait(started.id, PROVISIONED, DONE)


async def test_a_dry_run_plans_without_changing_the_resource(p):
    net = await p.create("network", "n", variables={"cidr": "10.0.0.0/16"})
    assert not net.HasField("last_dry_run")
    planned = await p.resource.DryRunResource(rp.DryRunResourceRequest(id=net.id), metadata=p.md)
    assert (planned.state, planned.status) == (PROVISION, READY)
    # The answer names the plan job; its outcome lands on the resource's last dry run.
    assert planned.last_dry_run.job_id and planned.last_dry_run.start_time.seconds
    assert planned.last_dry_run.status in (rp.DRY_RUN_STATUS_QUEUED, rp.DRY_RUN_STATUS_RUNNING)
    for _ in range(600):
        seen = await p.get(net.id)
        if seen.last_dry_run.status == rp.DRY_RUN_STATUS_SUCCEEDED:
            break
        await asyncio.sleep(0.1)
    dry = seen.last_dry_run
    assert (dry.job_id, dry.plan_add, dry.plan_change, dry.plan_destroy) == (planned.last_dry_run.job_id, 1, 0, 0)
    assert dry.completion_time.seconds and not dry.error_message
    job = await p.executor.GetJob(ep.GetJobRequest(id=dry.job_id), metadata=p.md)
    assert job.action == ep.JOB_ACTION_PLAN and job.plan_summary.add == 1
    assert (seen.state, seen.status, seen.revision) == (PROVISION, READY, 1)
    # Provisioning afterwards runs the current code (not the dry run's plan).
    await p.resource.ProvisionResource(rp.ProvisionResourceRequest(id=net.id), metadata=p.md)
    await p.wait(net.id, PROVISIONED, DONE)


async def test_a_parent_destroyed_right_after_its_childs_destroy_finished_is_not_refused(p):
    team, region = await p.base()
    net = await p.provisioned("network", "n", [team.id, region.id], variables={"cidr": "10.0.0.0/16"})
    app = await p.provisioned("app", "a", [net.id], variables={"vpc_id": "vpc-1"})
    hold_back_job_events(p)
    started = await p.resource.DestroyResource(rp.DestroyResourceRequest(id=app.id), metadata=p.admin)
    await job_succeeded(p, started.last_job_id)
    assert (await p.get(app.id)).state == rp.RESOURCE_STATE_DESTROY
    parent = await p.resource.DestroyResource(rp.DestroyResourceRequest(id=net.id), metadata=p.admin)
    assert parent.state == rp.RESOURCE_STATE_DESTROY
    assert (await p.get(app.id)).state == rp.RESOURCE_STATE_DESTROYED


async def test_the_catalog_is_followed_through_blueprint_events(tmp_path, event_prefix, nats_url):
    """With the catalog cache on (as the services run by default), templates and
    versions come to the resource service in the blueprint service's events:
    it creates resources while the blueprint service is down, and sees a
    template disabled a moment after the change."""
    from infrakitchen.blueprint.v1 import blueprint_pb2 as bp
    from tests.support.waiting import eventually
    async with Platform(tmp_path, event_prefix, nats_url,
                        extra_env={"IK_RESOURCE_CATALOG_CACHE_SECONDS": "300"}) as p:
        versions = p.catalog.versions
        await p.inner.stop("blueprint")
        net = await p.create("network", "while-down", variables={"cidr": "10.0.0.0/16"},
                             source_code_version_id=versions["network"])
        assert net.state == PROVISION and net.source_code_version_id == versions["network"]

        await p.restart("blueprint")
        app = p.catalog.templates["app"]
        await p.blueprint.UpdateTemplate(bp.UpdateTemplateRequest(template=bp.Template(id=app, enabled=False),
                                                                  update_mask=["enabled"]), metadata=p.admin)

        attempts = iter(range(1000))

        async def refused_as_disabled() -> bool:
            try:
                await p.create("app", f"a{next(attempts)}", variables={"vpc_id": "v"},
                               source_code_version_id=versions["app"])
            except grpc.aio.AioRpcError as err:
                return err.code() == grpc.StatusCode.FAILED_PRECONDITION and reason(err) == "TEMPLATE_DISABLED"
            return False
        await eventually(refused_as_disabled, timeout=5)
