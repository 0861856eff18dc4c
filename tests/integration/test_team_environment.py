"""The Team Environment example on the test cloud (tests/testcloud): real
objects with values the cloud computes, reached with short-lived OIDC tokens
only (the cloud knows no static token), a transient cloud error retried by the
workflow's retry policy (the built-in patterns), plans that tell an in-place
update from a replacement, and a teardown that leaves nothing in the cloud."""
from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from google.protobuf import duration_pb2

from examples.catalog import publish_modules
from examples.team_environment import register
from infrakitchen.common.v1 import retry_pb2
from infrakitchen.executor.v1 import executor_pb2 as ep
from infrakitchen.resource.v1 import resource_pb2 as rp
from infrakitchen.workflow.v1 import workflow_pb2 as wp
from services.common.values import from_value
from tests.support.platform import Platform, struct
from tests.support.processes import free_port
from tests.testcloud.cloud import CloudServer, jwks_verifier

DONE = wp.WORKFLOW_STATUS_DONE


@pytest.fixture
def cloud():
    with CloudServer() as server:  # no static token: jobs' OIDC tokens only
        yield server


@pytest.fixture
async def p(tmp_path, event_prefix, nats_url, cloud):
    issuer = f"http://127.0.0.1:{free_port()}"
    async with Platform(tmp_path, event_prefix, nats_url,
                        extra_env={"IK_EXECUTOR_EGRESS_ALLOW": f"127.0.0.1:{cloud.port}",
                                   "IK_EXECUTOR_OIDC_PORT": issuer.rsplit(":", 1)[1]}) as platform:
        cloud.cloud.verifier = jwks_verifier(f"{issuer}/jwks", issuer, "testcloud")
        yield platform


async def _workflow(p, id_: str, until, timeout: float = 240) -> wp.Workflow:
    deadline = time.monotonic() + timeout
    while True:
        w = await p.workflow.GetWorkflow(wp.GetWorkflowRequest(id=id_), metadata=p.md)
        if until(w):
            return w
        if time.monotonic() > deadline:
            raise AssertionError(f"workflow still {wp.WorkflowStatus.Name(w.status)}: {w.error_message}; steps "
                                 f"{[(s.template_name, wp.StepStatus.Name(s.status), s.error_message) for s in w.steps]}")
        await asyncio.sleep(0.2)


async def _dry_run(p, resource_id: str, **variables) -> tuple[rp.TemporaryState, ep.Job]:
    ts = await p.resource.CreateTemporaryState(rp.CreateTemporaryStateRequest(temporary_state=rp.TemporaryState(
        resource_id=resource_id, variables=struct(**variables))), metadata=p.md)
    ts = await p.resource.DryRunTemporaryState(rp.DryRunTemporaryStateRequest(id=ts.id), metadata=p.md)
    for _ in range(600):
        ts = await p.resource.GetTemporaryState(rp.GetTemporaryStateRequest(id=ts.id), metadata=p.md)
        if ts.dry_run.status not in (rp.DRY_RUN_STATUS_UNSPECIFIED, rp.DRY_RUN_STATUS_QUEUED,
                                     rp.DRY_RUN_STATUS_RUNNING):
            break
        await asyncio.sleep(0.1)
    assert ts.dry_run.status == rp.DRY_RUN_STATUS_SUCCEEDED, ts.dry_run
    return ts, await p.executor.GetJob(ep.GetJobRequest(id=ts.dry_run_job_id), metadata=p.md)


async def test_the_team_environment_in_the_test_cloud(p, cloud, tmp_path):
    url = publish_modules(tmp_path / "example-modules")
    with grpc.insecure_channel(p.inner.services["blueprint"].target) as channel:
        example = await asyncio.to_thread(register, channel, p.admin, url)
    integration = await p.executor.CreateIntegration(ep.CreateIntegrationRequest(
        integration=ep.Integration(name="testcloud", provider=ep.INTEGRATION_PROVIDER_OIDC, oidc=ep.OidcFederation(
            cloud="generic", audience="testcloud", token_file_env="TESTCLOUD_TOKEN_FILE")),
        credentials={"TESTCLOUD_ENDPOINT": cloud.url}), metadata=p.admin)

    # The cloud is busy for the database's first create: a 503 with Retry-After.
    cloud.fail_next(1, 503, kind="databases", method="POST")
    w = await p.workflow.CreateWorkflow(wp.CreateWorkflowRequest(
        blueprint_id=example.blueprint.id, integration_ids=[integration.id],
        retry_policy=retry_pb2.RetryPolicy(max_attempts=3, initial_backoff=duration_pb2.Duration(seconds=1))),
        metadata=p.md)
    await p.workflow.ExecuteWorkflow(wp.ExecuteWorkflowRequest(id=w.id), metadata=p.md)
    w = await _workflow(p, w.id, lambda w: w.status in (DONE, wp.WORKFLOW_STATUS_ERROR))
    assert w.status == DONE, w.error_message
    steps = {s.template_name: s for s in w.steps}
    assert steps["Team Database"].attempts == 2 and len(steps["Team Database"].attempt_job_ids) == 2
    first_try = await p.executor.GetJob(ep.GetJobRequest(id=steps["Team Database"].attempt_job_ids[0]),
                                        metadata=p.md)
    assert "HTTP 503" in first_try.error_message and "retry after" in first_try.error_message
    assert steps["Team Network"].attempts == steps["Team Bucket"].attempts == 1

    # Real objects; every value wired or shown is the cloud's own.
    network, = cloud.objects("networks")
    database, = cloud.objects("databases")
    bucket, = cloud.objects("buckets")
    assert database["network_id"] == bucket["network_id"] == network["id"]
    # Each made with a token naming its own resource (the resource service submitted the jobs).
    assert [o["owner_resource"] for o in (network, database, bucket)] == [
        steps[t].resource_id for t in ("Team Network", "Team Database", "Team Bucket")]
    db = await p.get(steps["Team Database"].resource_id)
    outputs = {o.name: from_value(o.value) for o in db.outputs}
    assert outputs["endpoint"] == database["endpoint"] and outputs["password"] == "***"
    assert db.variables["network_id"] == network["id"]

    # A new engine replaces the database; a new size changes it in place.
    engine, engine_plan = await _dry_run(p, db.id, engine="mysql")
    assert (engine.plan_add, engine.plan_change, engine.plan_destroy) == (1, 0, 1)
    assert [(c.address, sorted(c.actions)) for c in engine_plan.plan_summary.resource_changes] == [
        ("testcloud_database.this", ["create", "delete"])]
    await p.resource.DiscardTemporaryState(rp.DiscardTemporaryStateRequest(id=engine.id), metadata=p.md)
    resize, resize_plan = await _dry_run(p, db.id, size=20)
    assert (resize.plan_add, resize.plan_change, resize.plan_destroy) == (0, 1, 0)
    assert [(c.address, list(c.actions)) for c in resize_plan.plan_summary.resource_changes] == [
        ("testcloud_database.this", ["update"])]
    await p.resource.SubmitTemporaryState(rp.SubmitTemporaryStateRequest(id=resize.id), metadata=p.md)
    db = await p.wait(db.id, rp.RESOURCE_STATE_PROVISIONED, rp.RESOURCE_STATUS_DONE, timeout=180)
    assert db.revision == 2
    resized, = cloud.objects("databases")
    assert (resized["id"], resized["size"]) == (database["id"], 20)  # the same database, bigger

    # Teardown: nothing of the team is left in the cloud.
    await p.workflow.TeardownWorkflow(wp.TeardownWorkflowRequest(id=w.id), metadata=p.admin)
    w = await _workflow(p, w.id, lambda w: w.teardown_status in (wp.TEARDOWN_STATUS_DONE,
                                                                 wp.TEARDOWN_STATUS_ERROR))
    assert w.teardown_status == wp.TEARDOWN_STATUS_DONE, w.teardown_error_message
    assert cloud.objects() == []
