"""A workflow's next step prepared ahead, with the five services, real NATS
and real terraform: while a step's job runs, the resource of the step that
waits only for it is prepared (hidden) and its job waits at the executor,
which starts it with the wired outputs the moment the upstream succeeds;
nobody sees the resource before its job starts or the step starts; a failed
or cancelled upstream leaves no trace of it."""
from __future__ import annotations

import asyncio

import grpc
import pytest

from infrakitchen.executor.v1 import executor_pb2 as ep
from infrakitchen.resource.v1 import resource_pb2 as rp
from infrakitchen.workflow.v1 import workflow_pb2 as wp
from services.common.values import from_value
from tests.integration.test_workflows import by_template, run, shared, wait_workflow
from tests.support.grpc_asserts import rpc_error
from tests.support.platform import Platform
from tests.support.waiting import eventually

PENDING = wp.STEP_STATUS_PENDING


@pytest.fixture
async def p(tmp_path, event_prefix, nats_url):
    async with Platform(tmp_path, event_prefix, nats_url) as platform:
        yield platform


async def gated_then_leaf(p, gate, seconds: int) -> wp.Workflow:
    """network -> gated (sleeps `seconds`, fails while `gate` is missing) -> leaf (wired from gated)."""
    blueprint = await p.blueprint_of("prepared", {"network": {"cidr": "10.0.0.0/16"},
                                                  "gated": {"gate": str(gate), "seconds": seconds}, "leaf": {}},
                                     [("gated", "gate", "leaf", "upstream")])
    return await p.workflow.CreateWorkflow(wp.CreateWorkflowRequest(blueprint_id=blueprint.id, **shared(p)),
                                           metadata=p.md)


async def jobs_of(p, workflow_id: str) -> list[ep.Job]:
    return list((await p.executor.ListJobs(ep.ListJobsRequest(workflow_id=workflow_id, page_size=100),
                                           metadata=p.md)).jobs)


async def waiting_job(p, w: wp.Workflow, template: str) -> ep.Job:
    """The job prepared ahead for the step of `template`, once it waits at the executor."""
    step_id = by_template(p, w)[template].id

    async def found():
        waiting = [j for j in await jobs_of(p, w.id) if j.status == ep.JOB_STATUS_WAITING
                   and j.correlation.step_id == step_id]
        return waiting[0] if waiting else None
    return await eventually(found, timeout=60)


async def leaf_waiting(p, seconds: int) -> tuple[wp.Workflow, ep.Job]:
    """gated_then_leaf with the gate open, executed: the workflow, once the leaf's prepared job waits."""
    gate = p.shared / "open"
    gate.write_text("open")
    w = await gated_then_leaf(p, gate, seconds)
    await p.workflow.ExecuteWorkflow(wp.ExecuteWorkflowRequest(id=w.id), metadata=p.md)
    return w, await waiting_job(p, w, "leaf")


async def resources_of(p, workflow_id: str) -> list[rp.Resource]:
    return list((await p.resource.ListResources(rp.ListResourcesRequest(workflow_id=workflow_id),
                                                metadata=p.md)).resources)


async def test_the_next_step_waits_hidden_at_the_executor_and_starts_when_its_upstream_succeeds(p):
    w, waiting = await leaf_waiting(p, seconds=4)
    gate = p.shared / "open"
    steps = by_template(p, await p.workflow.GetWorkflow(wp.GetWorkflowRequest(id=w.id), metadata=p.md))
    assert waiting.correlation.step_id == steps["leaf"].id and steps["leaf"].status == PENDING
    gated_job = next(j for j in await jobs_of(p, w.id) if j.correlation.step_id == steps["gated"].id)
    assert waiting.after_job_id == gated_job.id
    assert [(x.variable, x.output, x.type) for x in waiting.wired_variables] == [("upstream", "gate", "string")]
    # Nobody sees the prepared resource yet: not listed, not readable, not watchable.
    assert waiting.correlation.resource_id not in {r.id for r in await resources_of(p, w.id)}
    for call in (p.resource.GetResource(rp.GetResourceRequest(id=waiting.correlation.resource_id), metadata=p.md),
                 p.resource.GetResourceTree(rp.GetResourceTreeRequest(id=waiting.correlation.resource_id),
                                            metadata=p.md)):
        assert (await rpc_error(call)).code() == grpc.StatusCode.NOT_FOUND

    done = await wait_workflow(p, w.id, (wp.WORKFLOW_STATUS_DONE, wp.WORKFLOW_STATUS_ERROR))
    assert done.status == wp.WORKFLOW_STATUS_DONE, done.error_message
    steps = by_template(p, done)
    jobs = {j.id: j for j in await jobs_of(p, w.id)}
    leaf_job, gated_job = jobs[steps["leaf"].job_id], jobs[steps["gated"].job_id]
    assert leaf_job.id == waiting.id and leaf_job.after_job_id == gated_job.id  # the step adopted the prepared job
    assert leaf_job.attempt == 1 and leaf_job.start_time.ToDatetime() >= gated_job.end_time.ToDatetime()
    assert from_value(leaf_job.variables.fields["upstream"]) == str(gate)  # wired by the executor
    assert steps["leaf"].resolved_variables["upstream"] == str(gate)
    leaf = await p.wait(steps["leaf"].resource_id, rp.RESOURCE_STATE_PROVISIONED, rp.RESOURCE_STATUS_DONE)
    assert leaf.id == waiting.correlation.resource_id and leaf.variables["upstream"] == str(gate)
    assert gated_job.id and steps["gated"].resource_id in leaf.parent_ids
    # Shown once its upstream's job ended: created after it, recorded as a create that provisioned.
    assert leaf.create_time.ToDatetime() >= gated_job.end_time.ToDatetime()
    audit = await p.resource.ListResourceEvents(rp.ListResourceEventsRequest(resource_id=leaf.id), metadata=p.md)
    assert [e.action for e in audit.entries][:2] == ["create", "provision"]
    assert sorted(r.id for r in await resources_of(p, w.id)) == sorted(s.resource_id for s in done.steps)


async def test_a_failed_upstream_leaves_no_trace_of_the_prepared_step_and_a_retry_prepares_it_again(p):
    gate = p.shared / "gate"  # closed: gated fails
    w = await gated_then_leaf(p, gate, seconds=2)
    await p.workflow.ExecuteWorkflow(wp.ExecuteWorkflowRequest(id=w.id), metadata=p.md)
    first = await waiting_job(p, w, "leaf")
    failed = await wait_workflow(p, w.id, (wp.WORKFLOW_STATUS_DONE, wp.WORKFLOW_STATUS_ERROR))
    assert failed.status == wp.WORKFLOW_STATUS_ERROR
    steps = by_template(p, failed)
    assert steps["leaf"].status == PENDING and not steps["leaf"].resource_id
    first = await p.executor.GetJob(ep.GetJobRequest(id=first.id), metadata=p.md)
    assert first.status == ep.JOB_STATUS_CANCELLED and first.attempt == 0  # never ran
    async def dropped():
        return first.correlation.resource_id not in {r.id for r in await resources_of(p, w.id)} and \
            len(await resources_of(p, w.id)) == 2
    await eventually(dropped)
    gate.write_text("open")  # the fix
    again = await run(p, failed)
    assert again.status == wp.WORKFLOW_STATUS_DONE, again.error_message
    leaf_job = await p.executor.GetJob(ep.GetJobRequest(id=by_template(p, again)["leaf"].job_id), metadata=p.md)
    assert leaf_job.id != first.id and leaf_job.after_job_id == by_template(p, again)["gated"].job_id
    assert len(await resources_of(p, w.id)) == 3  # one resource per step, the dropped one never shown


async def test_cancelling_the_workflow_cancels_the_job_prepared_for_its_next_step(p):
    w, waiting = await leaf_waiting(p, seconds=30)
    await p.workflow.CancelWorkflow(wp.CancelWorkflowRequest(id=w.id), metadata=p.md)
    ended = await wait_workflow(p, w.id, (wp.WORKFLOW_STATUS_DONE, wp.WORKFLOW_STATUS_ERROR), timeout=90)
    assert ended.status == wp.WORKFLOW_STATUS_ERROR and "cancelled" in ended.error_message
    waiting = await p.executor.GetJob(ep.GetJobRequest(id=waiting.id), metadata=p.md)
    assert waiting.status == ep.JOB_STATUS_CANCELLED and waiting.attempt == 0
    assert by_template(p, ended)["leaf"].status == PENDING
    await asyncio.sleep(0.5)  # the drop is the resource service's reaction to the job's event
    assert waiting.correlation.resource_id not in {r.id for r in await resources_of(p, w.id)}


async def test_only_the_workflow_service_prepares_a_resource_ahead(p):
    request = p.new("leaf", "by-hand", variables={"upstream": "x"})
    request.provision, request.workflow_id, request.step_id = True, "w", "s"
    request.after_job_id = "some-job"
    for metadata in (p.md, p.admin):
        denied = await rpc_error(p.resource.CreateResource(request, metadata=metadata))
        assert denied.code() == grpc.StatusCode.PERMISSION_DENIED
