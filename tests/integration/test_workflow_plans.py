"""Planning a whole workflow before anything is applied (PlanWorkflow),
through gRPC with real terraform: steps whose inputs are known are planned by
terraform, the others are deferred naming what they wait for; planning
creates no resource and no state; a failed workflow is planned again with the
real outputs of its done steps; planning a running or done workflow is
refused."""
from __future__ import annotations

import asyncio

import grpc
import pytest

from infrakitchen.executor.v1 import executor_pb2 as ep
from infrakitchen.resource.v1 import resource_pb2 as rp
from infrakitchen.workflow.v1 import workflow_pb2 as wp
from tests.integration.test_workflows import by_template, overrides, run, shared
from tests.support.grpc_asserts import precondition_violations, rpc_error
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
    assert gated.status == PLANNED and (gated.add, gated.destroy) == (1, 0)
    job = await p.executor.GetJob(ep.GetJobRequest(id=gated.job_id), metadata=p.md)
    assert job.variables["gate"] == "10.0.0.0/16", "the done step's real output, not a placeholder"
