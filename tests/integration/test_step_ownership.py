"""One owner of every step: a step's job starts only when the workflow service
starts that step, so cancel, the failure policy and the approval flow hold
whatever the timing, and cancel and teardown leave nothing behind. Real
services, NATS and terraform."""
from __future__ import annotations

import asyncio
import random

import grpc
import pytest

from infrakitchen.approval.v1 import approval_pb2 as ap
from infrakitchen.executor.v1 import executor_pb2 as ep
from infrakitchen.resource.v1 import resource_pb2 as rp
from infrakitchen.workflow.v1 import workflow_pb2 as wp
from tests.integration.test_resource_approvals import set_flow
from tests.integration.test_workflow_control import job_reached
from tests.integration.test_workflows import by_template, overrides, run, shared, wait_workflow
from tests.support.grpc_asserts import rpc_error
from tests.support.platform import Platform
from tests.support.waiting import eventually

ENDED = (wp.WORKFLOW_STATUS_DONE, wp.WORKFLOW_STATUS_ERROR)
RUNNING_JOB = (ep.JOB_STATUS_QUEUED, ep.JOB_STATUS_RUNNING)


@pytest.fixture
async def p(tmp_path, event_prefix, nats_url):
    async with Platform(tmp_path, event_prefix, nats_url, extra_env={"IK_EXECUTOR_WORKERS": "4"}) as platform:
        yield platform


async def get(p, workflow_id: str) -> wp.Workflow:
    return await p.workflow.GetWorkflow(wp.GetWorkflowRequest(id=workflow_id), metadata=p.md)


async def jobs_of(p, workflow_id: str) -> list[ep.Job]:
    return list((await p.executor.ListJobs(ep.ListJobsRequest(workflow_id=workflow_id, page_size=100),
                                           metadata=p.md)).jobs)


async def resources_of(p, workflow_id: str) -> list[rp.Resource]:
    return list((await p.resource.ListResources(rp.ListResourcesRequest(workflow_id=workflow_id, page_size=100),
                                                metadata=p.md)).resources)


async def job_succeeded(p, workflow_id: str, template: str) -> None:
    await job_reached(p, workflow_id, template, ep.JOB_STATUS_SUCCEEDED, timeout=90, interval=0.01)


async def assert_ended_with_nothing_running(p, ended: wp.Workflow) -> None:
    """No job of an ended workflow still runs, and every resource it created
    is recorded on its step (a teardown finds it there)."""
    assert ended.status in ENDED
    assert [j.id for j in await jobs_of(p, ended.id) if j.status in RUNNING_JOB] == [], \
        "a workflow ended while a job it started still ran"
    recorded = {s.resource_id for s in ended.steps if s.resource_id}
    assert {r.id for r in await resources_of(p, ended.id)} <= recorded, "a resource of the workflow outside its step"


async def tear_down(p, workflow_id: str) -> wp.Workflow:
    await p.workflow.TeardownWorkflow(wp.TeardownWorkflowRequest(id=workflow_id), metadata=p.admin)

    async def finished():
        w = await get(p, workflow_id)
        return w if w.teardown_status in (wp.TEARDOWN_STATUS_DONE, wp.TEARDOWN_STATUS_ERROR) else None
    return await eventually(finished, timeout=120, interval=0.1)


async def nothing_left(p, workflow_id: str) -> None:
    """Every resource of the workflow is destroyed (or, never having run, deleted). The
    resource service applies the destroy jobs' events on its own: a moment's lag is allowed."""
    left = []

    async def none():
        left[:] = [(r.name, rp.ResourceState.Name(r.state), rp.ResourceStatus.Name(r.status))
                   for r in await resources_of(p, workflow_id)
                   if (r.state, r.status) != (rp.RESOURCE_STATE_DESTROYED, rp.RESOURCE_STATUS_DONE)]
        return not left
    try:
        await eventually(none, timeout=15)
    except AssertionError:
        raise AssertionError(f"left behind: {left}") from None


async def test_a_cancel_as_an_upstream_finishes_then_a_teardown_leaves_no_resource_behind(p):
    """20 rounds, the cancel landing at a jittered moment right after the
    upstream's job succeeded (before, during or after the dependent's start):
    the workflow ends only once no job of it runs, and its teardown leaves no
    resource that is not destroyed (or, never having run, deleted)."""
    blueprint = await p.blueprint_of("chain", {"network": {"cidr": "10.0.0.0/16"}, "app": {}, "tail": {}},
                                     [("network", "vpc_id", "app", "vpc_id"), ("app", "endpoint", "tail", "upstream")])
    rng = random.Random(27)

    async def one_round(i: int) -> None:
        w = await p.workflow.CreateWorkflow(wp.CreateWorkflowRequest(blueprint_id=blueprint.id, **shared(p)),
                                            metadata=p.md)
        await p.workflow.ExecuteWorkflow(wp.ExecuteWorkflowRequest(id=w.id), metadata=p.md)
        await job_succeeded(p, w.id, rng.choice(["network", "app"]))
        await asyncio.sleep(rng.uniform(0, 0.25))
        try:
            await p.workflow.CancelWorkflow(wp.CancelWorkflowRequest(id=w.id), metadata=p.md)
        except grpc.aio.AioRpcError as err:  # the whole chain finished first
            assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
        ended = await wait_workflow(p, w.id, ENDED, timeout=120)
        await assert_ended_with_nothing_running(p, ended)
        torn = await tear_down(p, w.id)
        assert torn.teardown_status == wp.TEARDOWN_STATUS_DONE, (i, torn.teardown_error_message)
        await nothing_left(p, w.id)

    for batch in range(5):  # four workflows at a time
        await asyncio.gather(*(one_round(batch * 4 + k) for k in range(4)))


async def test_a_stop_policy_failure_starts_no_further_job_and_a_fixed_rerun_applies_the_new_inputs(p):
    """Under on_failure stop, a sibling's failure while a chain's upstream
    runs: the upstream finishes, its dependent never starts (no job, no
    resource). Fixed with UpdateWorkflow and executed again, the dependent's
    only job applies the new inputs."""
    # gated (slow, succeeds) -> leaf, wired; tail fails at once beside them (sleep -1).
    gate = p.shared / "open"
    gate.write_text("open")
    blueprint = await p.blueprint_of("stop", {"gated": {}, "leaf": {}, "tail": {}},
                                     [("gated", "gate", "leaf", "upstream")])
    w = await p.workflow.CreateWorkflow(wp.CreateWorkflowRequest(
        blueprint_id=blueprint.id, variable_overrides=overrides(
            p, gated={"gate": str(gate), "seconds": 4}, tail={"upstream": "x", "seconds": -1}), **shared(p)),
        metadata=p.md)
    ended = await run(p, w)
    assert ended.status == wp.WORKFLOW_STATUS_ERROR and "step Tail failed" in ended.error_message
    # It ended only once the running sibling had finished (a workflow never ends while a job runs).
    await assert_ended_with_nothing_running(p, ended)
    await job_succeeded(p, w.id, "gated")  # the running sibling finished ...
    await asyncio.sleep(2)  # ... and nothing starts after it, now or a moment later
    steps = by_template(p, await get(p, w.id))
    assert steps["gated"].status == wp.STEP_STATUS_DONE
    assert (steps["leaf"].status, steps["leaf"].resource_id, steps["leaf"].job_id) == (wp.STEP_STATUS_PENDING, "", "")
    assert sorted(j.correlation.step_id for j in await jobs_of(p, w.id)) == sorted(
        [steps["gated"].id, steps["tail"].id])
    assert not [r for r in await resources_of(p, w.id) if r.step_id == steps["leaf"].id]

    await p.workflow.UpdateWorkflow(wp.UpdateWorkflowRequest(workflow=wp.Workflow(
        id=w.id, variable_overrides=overrides(p, tail={"upstream": "x", "seconds": 0}, leaf={"seconds": 1}))),
        metadata=p.md)
    done = await run(p, await get(p, w.id))
    assert done.status == wp.WORKFLOW_STATUS_DONE, done.error_message
    leaf = by_template(p, done)["leaf"]
    leaf_jobs = [j for j in await jobs_of(p, w.id) if j.correlation.step_id == leaf.id]
    assert len(leaf_jobs) == 1 and leaf_jobs[0].variables["seconds"] == 1
    assert leaf_jobs[0].variables["upstream"] == str(gate)
    assert (await p.get(leaf.resource_id)).variables["seconds"] == 1


async def test_an_approval_flow_turned_on_while_the_upstream_runs_gives_the_next_step_an_approval_request(p):
    blueprint = await p.blueprint_of("approve-next", {"leaf": {}, "tail": {}}, [("leaf", "seen", "tail", "upstream")])
    w = await p.workflow.CreateWorkflow(wp.CreateWorkflowRequest(
        blueprint_id=blueprint.id, variable_overrides=overrides(p, leaf={"upstream": "x", "seconds": 3}),
        **shared(p)), metadata=p.md)
    await p.workflow.ExecuteWorkflow(wp.ExecuteWorkflowRequest(id=w.id), metadata=p.md)

    async def leaf_running():
        step = by_template(p, await get(p, w.id))["leaf"]
        return bool(step.job_id)
    await eventually(leaf_running, timeout=60)
    await set_flow(p, True)

    async def tail_waits():
        step = by_template(p, await get(p, w.id))["tail"]
        return step if step.resource_id and "approval" in step.waiting_reason else None
    tail = await eventually(tail_waits, timeout=90)
    requests = await p.approval.ListApprovalRequests(ap.ListApprovalRequestsRequest(
        resource_id=tail.resource_id, status=ap.APPROVAL_STATUS_PENDING), metadata=p.md)
    assert len(requests.approval_requests) == 1
    assert [j for j in await jobs_of(p, w.id) if j.correlation.step_id == tail.id] == [], "applied unapproved"
    await p.workflow.CancelWorkflow(wp.CancelWorkflowRequest(id=w.id), metadata=p.md)
    ended = await wait_workflow(p, w.id, ENDED, timeout=60)
    await assert_ended_with_nothing_running(p, ended)
    await set_flow(p, False)
    # Its provisioning never ran: the teardown deletes its record and destroys the leaf.
    torn = await tear_down(p, w.id)
    assert torn.teardown_status == wp.TEARDOWN_STATUS_DONE, torn.teardown_error_message
    gone = await rpc_error(p.resource.GetResource(rp.GetResourceRequest(id=tail.resource_id), metadata=p.md))
    assert gone.code() == grpc.StatusCode.NOT_FOUND
    leaf = by_template(p, ended)["leaf"]
    assert (await p.get(leaf.resource_id)).state == rp.RESOURCE_STATE_DESTROYED


async def test_the_approval_flow_is_checked_when_the_job_is_submitted(p):
    """Provisioning queued while the flow was off, its job submitted only
    later (the executor was down), after the flow was turned on: the
    resource waits for an owner's approval instead of running."""
    network = await p.create("network", "late-net", variables={"cidr": "10.1.0.0/16"})
    await p.inner.stop("executor")
    try:
        await p.resource.ProvisionResource(rp.ProvisionResourceRequest(id=network.id), metadata=p.md)
        queued = await p.get(network.id)
        assert queued.status == rp.RESOURCE_STATUS_QUEUED and not queued.last_job_id
        await set_flow(p, True)
    finally:
        await p.restart("executor")
    await p.inner["resource"].runtime.lifecycle.reconcile(older_than_seconds=0)
    waiting = await p.get(network.id)
    assert (waiting.state, waiting.status) == (rp.RESOURCE_STATE_PROVISION, rp.RESOURCE_STATUS_APPROVAL_PENDING)
    assert not waiting.last_job_id

    async def opened():
        listed = await p.approval.ListApprovalRequests(ap.ListApprovalRequestsRequest(
            resource_id=network.id, status=ap.APPROVAL_STATUS_PENDING), metadata=p.md)
        return listed.approval_requests[0] if listed.approval_requests else None
    request = await eventually(opened, timeout=30)
    await p.approval.ApproveRequest(ap.ApproveRequestRequest(id=request.id), metadata=p.as_("alice"))
    await p.wait(network.id, rp.RESOURCE_STATE_PROVISIONED, rp.RESOURCE_STATUS_DONE)


async def test_a_teardown_destroys_a_failed_provisioning_with_its_state(p):
    """A step whose apply failed half-way (its null_resource created, then
    its provisioner failed: the state holds a tainted resource) is destroyed
    with that state by the teardown, not left in provision/error."""
    blueprint = await p.blueprint_of("half", {"network": {"cidr": "10.0.0.0/16"}, "gated": {}},
                                     [("network", "cidr", "gated", "gate")])
    w = await p.workflow.CreateWorkflow(wp.CreateWorkflowRequest(blueprint_id=blueprint.id, **shared(p)),
                                        metadata=p.md)
    ended = await run(p, w)
    assert ended.status == wp.WORKFLOW_STATUS_ERROR
    gated = by_template(p, ended)["gated"]
    failed = await p.get(gated.resource_id)
    assert (failed.state, failed.status) == (rp.RESOURCE_STATE_PROVISION, rp.RESOURCE_STATUS_ERROR)
    torn = await tear_down(p, w.id)
    assert torn.teardown_status == wp.TEARDOWN_STATUS_DONE, torn.teardown_error_message
    destroyed = await p.get(gated.resource_id)
    assert (destroyed.state, destroyed.status) == (rp.RESOURCE_STATE_DESTROYED, rp.RESOURCE_STATUS_DONE)
    destroy = await p.executor.GetJob(ep.GetJobRequest(id=destroyed.last_job_id), metadata=p.md)
    assert destroy.action == ep.JOB_ACTION_DESTROY and destroy.status == ep.JOB_STATUS_SUCCEEDED
    text = [line.text async for chunk in p.executor.StreamJobLogs(ep.StreamJobLogsRequest(job_id=destroy.id),
                                                                 metadata=p.md) for line in chunk.lines]
    assert any("1 destroyed" in line for line in text), "the tainted resource was destroyed with its state"


async def test_a_cancel_while_the_executor_is_unreachable_cancels_the_job_submitted_later(p, monkeypatch):
    """The step's resource is queued but its job cannot be submitted (the
    executor is unreachable from the resource service: a network fault,
    injected at that one call) when the workflow is cancelled: the workflow
    does not end while that job may still come; once the job is submitted,
    it is cancelled, and only then the workflow ends, with nothing running."""
    from services.common.errors import Unavailable
    remote = p.inner["resource"].runtime.lifecycle.remote
    submit_job, reachable = remote.submit_job, asyncio.Event()

    async def flaky_submit(*args, **kwargs):
        if not reachable.is_set():
            raise Unavailable("the executor is not reachable (injected)")
        return await submit_job(*args, **kwargs)
    monkeypatch.setattr(remote, "submit_job", flaky_submit)
    blueprint = await p.blueprint_of("unreachable", {"leaf": {}}, [])
    w = await p.workflow.CreateWorkflow(wp.CreateWorkflowRequest(
        blueprint_id=blueprint.id, variable_overrides=overrides(p, leaf={"upstream": "x", "seconds": 30}),
        **shared(p)), metadata=p.md)
    await p.workflow.ExecuteWorkflow(wp.ExecuteWorkflowRequest(id=w.id), metadata=p.md)

    async def queued():
        step = (await get(p, w.id)).steps[0]
        return step.resource_id and (await p.get(step.resource_id)).status == rp.RESOURCE_STATUS_QUEUED
    await eventually(queued, timeout=30)
    cancelling = await p.workflow.CancelWorkflow(wp.CancelWorkflowRequest(id=w.id), metadata=p.md)
    assert cancelling.status == wp.WORKFLOW_STATUS_IN_PROGRESS, "ended while its job may still be submitted"
    await p.inner["workflow"].runtime.workflows.reconcile(older_than_seconds=0)
    assert (await get(p, w.id)).status == wp.WORKFLOW_STATUS_IN_PROGRESS
    reachable.set()
    await p.inner["resource"].runtime.lifecycle.reconcile(older_than_seconds=0)  # submits the job now
    await p.inner["workflow"].runtime.workflows.reconcile(older_than_seconds=0)  # and this cancels it
    ended = await wait_workflow(p, w.id, ENDED, timeout=90)
    assert ended.status == wp.WORKFLOW_STATUS_ERROR and ended.error_message == "cancelled by alice"
    await assert_ended_with_nothing_running(p, ended)
    [job] = await jobs_of(p, w.id)
    assert job.status == ep.JOB_STATUS_CANCELLED, "the 30 s apply was interrupted"


async def test_a_teardown_destroys_a_failed_resource_queued_again_and_never_run(p):
    """A first apply failed half-way (its state holds a tainted resource);
    executed again with the approval flow on, the step waits for approval,
    and the workflow is cancelled (the request withdrawn): the resource is
    provision/ready, its last job gone, but its state is not empty. The
    teardown destroys it with its state instead of deleting its record."""
    blueprint = await p.blueprint_of("again", {"gated": {}}, [])
    w = await p.workflow.CreateWorkflow(wp.CreateWorkflowRequest(
        blueprint_id=blueprint.id, variable_overrides=overrides(p, gated={"gate": "/closed"}), **shared(p)),
        metadata=p.md)
    failed = await run(p, w)
    assert failed.status == wp.WORKFLOW_STATUS_ERROR
    resource_id = failed.steps[0].resource_id
    await set_flow(p, True)
    await p.workflow.ExecuteWorkflow(wp.ExecuteWorkflowRequest(id=w.id), metadata=p.md)

    async def waits():
        return "approval" in (await get(p, w.id)).steps[0].waiting_reason
    await eventually(waits, timeout=60)
    await p.workflow.CancelWorkflow(wp.CancelWorkflowRequest(id=w.id), metadata=p.md)
    ended = await wait_workflow(p, w.id, ENDED, timeout=60)
    await assert_ended_with_nothing_running(p, ended)
    await set_flow(p, False)
    left = await eventually(lambda: _not_waiting(p, resource_id), timeout=30)
    assert left.state == rp.RESOURCE_STATE_PROVISION and left.status != rp.RESOURCE_STATUS_APPROVAL_PENDING
    torn = await tear_down(p, w.id)
    assert torn.teardown_status == wp.TEARDOWN_STATUS_DONE, torn.teardown_error_message
    destroyed = await p.get(resource_id)
    assert (destroyed.state, destroyed.status) == (rp.RESOURCE_STATE_DESTROYED, rp.RESOURCE_STATUS_DONE)
    destroy = await p.executor.GetJob(ep.GetJobRequest(id=destroyed.last_job_id), metadata=p.md)
    assert destroy.action == ep.JOB_ACTION_DESTROY and destroy.status == ep.JOB_STATUS_SUCCEEDED


async def _not_waiting(p, resource_id: str):
    r = await p.get(resource_id)
    return r if r.status != rp.RESOURCE_STATUS_APPROVAL_PENDING else None
