"""Planning a whole workflow before anything is applied (PlanWorkflow),
through gRPC with real terraform: steps whose inputs are known are planned by
terraform, the others are deferred naming what they wait for; planning
creates no resource and no state; a failed workflow is planned again with the
real outputs of its done steps; planning a running or done workflow is
refused."""
from __future__ import annotations

import asyncio
from dataclasses import replace

import grpc
import pytest

from infrakitchen.approval.v1 import approval_pb2 as ap
from infrakitchen.executor.v1 import executor_pb2 as ep
from infrakitchen.resource.v1 import resource_pb2 as rp
from infrakitchen.workflow.v1 import workflow_pb2 as wp
from tests.integration.test_resource_approvals import set_flow
from tests.integration.test_workflows import by_template, overrides, run, shared, wait_workflow
from tests.support.grpc_asserts import precondition_violations, reason, rpc_error
from tests.support.waiting import eventually
from tests.support.platform import Platform

PLANNED, DEFERRED = wp.STEP_PLAN_STATUS_PLANNED, wp.STEP_PLAN_STATUS_DEFERRED


@pytest.fixture
async def p(tmp_path, event_prefix, nats_url):
    async with Platform(tmp_path, event_prefix, nats_url) as platform:
        yield platform


async def planned(p, workflow_id: str, timeout: float = 120) -> wp.Workflow:
    """Follows the workflow until its plan has ended."""
    async with asyncio.timeout(timeout):
        while True:
            w = await p.workflow.GetWorkflow(wp.GetWorkflowRequest(id=workflow_id), metadata=p.md)
            if w.plan_status in (wp.PLAN_STATUS_DONE, wp.PLAN_STATUS_ERROR):
                return w
            await asyncio.sleep(0.2)


async def test_known_steps_are_planned_the_others_deferred_and_nothing_is_created(p):
    gate = p.shared / "open"
    gate.write_text("open")
    # network -> app (wired vpc_id: deferred); network -> gated (hierarchy only, gate given: planned);
    # gated -> leaf (wired upstream: deferred).
    blueprint = await p.blueprint_of("four", {"network": {"cidr": "10.0.0.0/16"}, "app": {}, "gated": {},
                                              "leaf": {}},
                                     [("network", "vpc_id", "app", "vpc_id"), ("gated", "gate", "leaf", "upstream")])
    w = await p.workflow.CreateWorkflow(wp.CreateWorkflowRequest(
        blueprint_id=blueprint.id, variable_overrides=overrides(p, gated={"gate": str(gate)}), **shared(p)),
        metadata=p.md)
    started = await p.workflow.PlanWorkflow(wp.PlanWorkflowRequest(id=w.id), metadata=p.md)
    assert started.plan_status == wp.PLAN_STATUS_IN_PROGRESS
    again = await rpc_error(p.workflow.PlanWorkflow(wp.PlanWorkflowRequest(id=w.id), metadata=p.md))
    assert again.code() == grpc.StatusCode.FAILED_PRECONDITION  # a plan is under way
    done = await planned(p, w.id)
    assert done.plan_status == wp.PLAN_STATUS_DONE, done.plan_error_message
    steps = by_template(p, done)
    assert (steps["network"].plan.status, steps["gated"].plan.status) == (PLANNED, PLANNED)
    assert (steps["app"].plan.status, steps["leaf"].plan.status) == (DEFERRED, DEFERRED)
    net = steps["network"].plan
    assert (net.add, net.change, net.destroy) == (1, 0, 0) and net.job_id and len(net.inputs_hash) == 64
    assert [(c.address, c.action) for c in net.changes] == [("null_resource.vpc", "create")]
    [waits] = steps["app"].plan.deferred_inputs
    assert (waits.variable, waits.source_step_id, waits.source_output) == ("vpc_id", steps["network"].id, "vpc_id")
    [waits] = steps["leaf"].plan.deferred_inputs
    assert (waits.variable, waits.source_step_id, waits.source_output) == ("upstream", steps["gated"].id, "gate")
    job = await p.executor.GetJob(ep.GetJobRequest(id=net.job_id), metadata=p.md)
    assert job.action == ep.JOB_ACTION_PLAN and job.correlation.step_id == steps["network"].id
    # Planning created nothing: no resource, no state file, and the workflow is still pending.
    listed = await p.resource.ListResources(rp.ListResourcesRequest(workflow_id=w.id), metadata=p.md)
    assert not listed.resources and done.status == wp.WORKFLOW_STATUS_PENDING
    assert not list((p.tmp_path / "states").rglob("terraform.tfstate"))
    # Then it runs as usual; a done workflow is not planned.
    ran = await run(p, done)
    assert ran.status == wp.WORKFLOW_STATUS_DONE, ran.error_message
    err = await rpc_error(p.workflow.PlanWorkflow(wp.PlanWorkflowRequest(id=w.id), metadata=p.md))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert [v[0] for v in precondition_violations(err)] == ["WORKFLOW_NOT_PLANNABLE"]


async def test_a_failed_workflow_is_planned_again_with_the_real_outputs_of_its_done_steps(p):
    blueprint = await p.blueprint_of("wired-gate", {"network": {"cidr": "10.0.0.0/16"}, "gated": {}},
                                     [("network", "cidr", "gated", "gate")])
    w = await p.workflow.CreateWorkflow(wp.CreateWorkflowRequest(blueprint_id=blueprint.id, **shared(p)),
                                        metadata=p.md)
    failed = await run(p, w)  # the gate "10.0.0.0/16" is no file: gated fails
    assert failed.status == wp.WORKFLOW_STATUS_ERROR
    await p.workflow.PlanWorkflow(wp.PlanWorkflowRequest(id=w.id), metadata=p.md)
    done = await planned(p, w.id)
    steps = by_template(p, done)
    assert not steps["network"].HasField("plan"), "a done step is not part of the plan"
    gated = steps["gated"].plan
    # Planned against the state its failed resource left (a tainted instance): a replace, honestly.
    resource = await p.get(steps["gated"].resource_id)
    assert gated.status == PLANNED and (gated.add, gated.destroy) == (1, 1)
    assert [c.action for c in gated.changes] == ["replace"]
    assert gated.state_path == resource.storage_path and gated.state_serial >= 1
    job = await p.executor.GetJob(ep.GetJobRequest(id=gated.job_id), metadata=p.md)
    assert job.variables["gate"] == "10.0.0.0/16", "the done step's real output, not a placeholder"
    assert job.plan_summary.state_serial == gated.state_serial and job.plan_summary.state_lineage


# --- executing a plan ------------------------------------------------------------------------------

async def plan_request(p, workflow_id: str, step_id: str = "") -> ap.ApprovalRequest:
    """The pending approval request of the workflow's plan (or of one step's new plan)."""
    async def found():
        listed = await p.approval.ListApprovalRequests(ap.ListApprovalRequestsRequest(
            status=ap.APPROVAL_STATUS_PENDING, awaiting_my_decision=True), metadata=p.md)
        return next((r for r in listed.approval_requests if r.workflow_id == workflow_id and r.step_id == step_id
                     and r.operation == ap.APPROVAL_OPERATION_WORKFLOW_PLAN), None)
    return await eventually(found, timeout=30)


async def jobs_of_workflow(p, workflow_id: str) -> list[ep.Job]:
    return list((await p.executor.ListJobs(ep.ListJobsRequest(workflow_id=workflow_id, page_size=100),
                                           metadata=p.md)).jobs)


async def test_an_approved_plan_is_applied_exactly_and_a_deferred_step_that_only_creates_goes_on(p):
    await set_flow(p, True)
    blueprint = await p.blueprint_of("net-app", {"network": {"cidr": "10.0.0.0/16"}, "app": {}},
                                     [("network", "vpc_id", "app", "vpc_id")])
    w = await p.workflow.CreateWorkflow(wp.CreateWorkflowRequest(blueprint_id=blueprint.id, **shared(p)),
                                        metadata=p.md)
    await p.workflow.PlanWorkflow(wp.PlanWorkflowRequest(id=w.id), metadata=p.md)
    first = await planned(p, w.id)
    # A newer plan replaces it: executing the older one is refused, and nothing starts.
    await p.workflow.PlanWorkflow(wp.PlanWorkflowRequest(id=w.id), metadata=p.md)
    done = await planned(p, w.id)
    assert done.plan_status == wp.PLAN_STATUS_DONE and done.plan_id != first.plan_id
    old = await rpc_error(p.workflow.ExecuteWorkflow(wp.ExecuteWorkflowRequest(id=w.id, plan_id=first.plan_id),
                                                     metadata=p.md))
    assert old.code() == grpc.StatusCode.ABORTED and reason(old) == "PLAN_NOT_LATEST"

    started = await p.workflow.ExecuteWorkflow(wp.ExecuteWorkflowRequest(id=w.id, plan_id=done.plan_id),
                                               metadata=p.md)
    assert started.executed_plan_id == done.plan_id and started.plan_approval_status == "pending"
    # One approval for the whole plan, listing every step's plan; nothing starts before it.
    request = await plan_request(p, w.id)
    steps = by_template(p, done)
    listed = {s.step_id: s for s in request.planned_steps}
    assert listed[steps["network"].id].status == "planned"
    assert listed[steps["network"].id].plan_job_id == steps["network"].plan.job_id
    assert listed[steps["network"].id].changes == ["null_resource.vpc create"]
    assert listed[steps["app"].id].status == "deferred" and not listed[steps["app"].id].plan_job_id
    assert request.owners == ["alice"] and request.workflow_plan_id == done.plan_id
    # The reconciler does not ask again for an approval this process opened.
    workflows = p.inner["workflow"].runtime.workflows
    asked = []
    original = workflows.remote.request_plan_approval
    workflows.remote.request_plan_approval = lambda *a, **kw: asked.append(a) or original(*a, **kw)
    try:
        await workflows.reconcile(older_than_seconds=0)
        await workflows.reconcile(older_than_seconds=0)
    finally:
        workflows.remote.request_plan_approval = original
    assert asked == []
    assert not (await p.resource.ListResources(rp.ListResourcesRequest(workflow_id=w.id), metadata=p.md)).resources
    # Approvers are admins and the listed owners: another writer is not one.
    denied = await rpc_error(p.approval.ApproveRequest(ap.ApproveRequestRequest(id=request.id),
                                                       metadata=p.as_("mallory")))
    assert denied.code() == grpc.StatusCode.PERMISSION_DENIED
    await p.approval.ApproveRequest(ap.ApproveRequestRequest(id=request.id), metadata=p.md)

    ended = await wait_workflow(p, w.id, (wp.WORKFLOW_STATUS_DONE, wp.WORKFLOW_STATUS_ERROR))
    assert ended.status == wp.WORKFLOW_STATUS_DONE, ended.error_message
    after = by_template(p, ended)
    app_plan = after["app"].plan
    assert app_plan.status == PLANNED and app_plan.replan_reason.startswith("its inputs are known now")
    assert not app_plan.approval_request_id, "a deferred step that only creates needs no new approval"
    # Every apply applied a saved plan: the approved one for network, the new one for app.
    applies = [j for j in await jobs_of_workflow(p, w.id) if j.action == ep.JOB_ACTION_APPLY]
    assert sorted(j.plan_job_id for j in applies) == sorted([steps["network"].plan.job_id, app_plan.job_id])
    assert all(j.status == ep.JOB_STATUS_SUCCEEDED for j in applies)
    # The approved plan stood in for each resource's own provision approval.
    for template in ("network", "app"):
        r = await p.get(after[template].resource_id)
        assert r.storage_path == f"workflows/{w.id}/{after[template].id}"
        listed = await p.approval.ListApprovalRequests(ap.ListApprovalRequestsRequest(resource_id=r.id),
                                                       metadata=p.md)
        assert not listed.approval_requests


async def test_a_stale_plan_is_planned_again_approved_again_and_never_applied(p):
    """The step's state moved between plan and execute (a direct provision of
    its resource): its saved plan is never applied; it is planned again and,
    with the approval flow on, approved again."""
    gate = p.shared / "stale-gate"
    blueprint = await p.blueprint_of("net-gated", {"network": {"cidr": "10.0.0.0/16"}, "gated": {}}, [])
    w = await p.workflow.CreateWorkflow(wp.CreateWorkflowRequest(
        blueprint_id=blueprint.id, variable_overrides=overrides(p, gated={"gate": str(gate)}), **shared(p)),
        metadata=p.md)
    failed = await run(p, w)  # the gate is closed: gated fails, leaving a tainted instance
    assert failed.status == wp.WORKFLOW_STATUS_ERROR
    await p.workflow.PlanWorkflow(wp.PlanWorkflowRequest(id=w.id), metadata=p.md)
    done = await planned(p, w.id)
    stale = by_template(p, done)["gated"]
    assert stale.plan.status == PLANNED
    # The state moves: a direct provision of the step's resource (failing again) writes a new serial.
    await p.resource.ProvisionResource(rp.ProvisionResourceRequest(id=stale.resource_id), metadata=p.md)
    await p.wait(stale.resource_id, rp.RESOURCE_STATE_PROVISION, rp.RESOURCE_STATUS_ERROR)
    gate.write_text("open")

    await set_flow(p, True)
    await p.workflow.ExecuteWorkflow(wp.ExecuteWorkflowRequest(id=w.id, plan_id=done.plan_id), metadata=p.md)
    whole = await plan_request(p, w.id)
    assert [s.plan_job_id for s in whole.planned_steps] == [stale.plan.job_id]
    await p.approval.ApproveRequest(ap.ApproveRequestRequest(id=whole.id), metadata=p.md)
    # Planned again; with the approval flow on, its new plan is asked for again.
    again = await plan_request(p, w.id, step_id=stale.id)
    [new] = again.planned_steps
    assert new.plan_job_id and new.plan_job_id != stale.plan.job_id
    step = by_template(p, await p.workflow.GetWorkflow(wp.GetWorkflowRequest(id=w.id), metadata=p.md))["gated"]
    assert step.plan.replan_reason.startswith("STALE_PLAN") and "serial" in step.plan.replan_reason
    assert "waits for approval" in step.waiting_reason
    await p.approval.ApproveRequest(ap.ApproveRequestRequest(id=again.id), metadata=p.md)
    ended = await wait_workflow(p, w.id, (wp.WORKFLOW_STATUS_DONE, wp.WORKFLOW_STATUS_ERROR))
    assert ended.status == wp.WORKFLOW_STATUS_DONE, ended.error_message
    applies = [j for j in await jobs_of_workflow(p, w.id) if j.action == ep.JOB_ACTION_APPLY and j.plan_job_id]
    assert [j.plan_job_id for j in applies] == [new.plan_job_id], "the stale plan was never applied"


async def test_plans_are_applied_only_through_the_workflow_service(p):
    """A user cannot open a workflow plan's approval (naming themself as its
    approver) nor hand a resource a plan to apply."""
    blueprint = await p.blueprint_of("net-only", {"network": {"cidr": "10.0.0.0/16"}}, [])
    w = await p.workflow.CreateWorkflow(wp.CreateWorkflowRequest(blueprint_id=blueprint.id, **shared(p)),
                                        metadata=p.md)
    await p.workflow.PlanWorkflow(wp.PlanWorkflowRequest(id=w.id), metadata=p.md)
    step = by_template(p, await planned(p, w.id))["network"]
    forged = await rpc_error(p.approval.CreateApprovalRequest(ap.CreateApprovalRequestRequest(
        approval_request=ap.ApprovalRequest(operation=ap.APPROVAL_OPERATION_WORKFLOW_PLAN, workflow_id=w.id,
                                            workflow_plan_id="x", owners=["alice"],
                                            planned_steps=[ap.PlannedStep(step_id=step.id,
                                                                          plan_job_id=step.plan.job_id)])),
        metadata=p.md))
    assert forged.code() == grpc.StatusCode.PERMISSION_DENIED
    request = p.new("network", "direct", variables={"cidr": "10.0.0.0/16"})
    request.provision = True
    request.reviewed_plan.plan_job_id = step.plan.job_id
    smuggled = await rpc_error(p.resource.CreateResource(request, metadata=p.md))
    assert smuggled.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_the_reconciler_finishes_a_plan_whose_job_event_was_lost_or_never_submitted(p):
    blueprint = await p.blueprint_of("net-gated-lost", {"network": {"cidr": "10.0.0.0/16"}, "gated": {}}, [])
    w = await p.workflow.CreateWorkflow(wp.CreateWorkflowRequest(
        blueprint_id=blueprint.id, variable_overrides=overrides(p, gated={"gate": "/nowhere"}), **shared(p)),
        metadata=p.md)
    await p.workflow.PlanWorkflow(wp.PlanWorkflowRequest(id=w.id), metadata=p.md)
    done = await planned(p, w.id)
    steps = by_template(p, done)
    service = p.inner["workflow"].runtime
    # As if the network plan job's completion event never came, and the
    # gated step's plan job was never submitted (a crash right after commit).
    async with service.uow() as uow:
        wf = await uow.workflows.get(w.id)
        await uow.workflows.update(replace(wf, plan_status="in_progress", version=wf.version + 1), wf.version)
        for template, plan in (("network", {"status": "planning", "job_id": steps["network"].plan.job_id,
                                            "request_id": "lost-event"}),
                               ("gated", {"status": "planning", "request_id": f"plan-resubmit-{w.id}"})):
            st = await uow.steps.get(steps[template].id)
            await uow.steps.update(replace(st, plan=plan, version=st.version + 1), st.version)
        await uow.commit()
    await service.workflows.reconcile(older_than_seconds=0)
    again = await planned(p, w.id)
    assert again.plan_status == wp.PLAN_STATUS_DONE, again.plan_error_message
    after = by_template(p, again)
    assert after["network"].plan.status == PLANNED and after["network"].plan.job_id == steps["network"].plan.job_id
    assert after["gated"].plan.status == PLANNED and after["gated"].plan.job_id != steps["gated"].plan.job_id
