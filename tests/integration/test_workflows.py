"""WorkflowService through gRPC, with the other four services, real NATS and
real terraform in this event loop: creation (snapshot, positions, validation),
execution advancing on executor completion events, the variable precedence,
a failing middle step and its re-execution, ready-queue scheduling, the
approval flow, a restart mid-run and the permission table."""
from __future__ import annotations

import asyncio

import grpc
import pytest

from infrakitchen.approval.v1 import approval_pb2 as ap
from infrakitchen.executor.v1 import executor_pb2 as ep
from infrakitchen.resource.v1 import resource_pb2 as rp
from infrakitchen.workflow.v1 import workflow_pb2 as wp
from services.common.auth import Role
from tests.support.grpc_asserts import field_violations, rpc_error
from tests.support.platform import Platform, struct
from tests.support.waiting import eventually

DONE, ERROR, PENDING = wp.STEP_STATUS_DONE, wp.STEP_STATUS_ERROR, wp.STEP_STATUS_PENDING


@pytest.fixture
async def p(tmp_path, event_prefix, nats_url):
    async with Platform(tmp_path, event_prefix, nats_url) as platform:
        yield platform


@pytest.fixture(params=["sqlite", "postgres"])
async def any_db(request, tmp_path, event_prefix, nats_url, postgres):
    """The platform on SQLite files, and with the workflow, resource and executor on PostgreSQL."""
    urls = {} if request.param == "sqlite" else {n: postgres.create() for n in ("workflow", "resource", "executor")}
    async with Platform(tmp_path, event_prefix, nats_url, database_urls=urls) as platform:
        yield platform


def shared(p) -> dict:
    return {"integration_ids": [p.catalog.integration], "storage_id": p.catalog.storage}


def by_template(p, w: wp.Workflow) -> dict[str, wp.Step]:
    keys = {v: k for k, v in p.catalog.templates.items()}
    return {keys[s.template_id]: s for s in w.steps}


def overrides(p, **per_template) -> list[wp.TemplateVariables]:
    return [wp.TemplateVariables(template_id=p.catalog.templates[k], variables=struct(**v))
            for k, v in per_template.items()]


async def run(p, w: wp.Workflow, until=(wp.WORKFLOW_STATUS_DONE, wp.WORKFLOW_STATUS_ERROR), timeout=120):
    await p.workflow.ExecuteWorkflow(wp.ExecuteWorkflowRequest(id=w.id), metadata=p.md)
    return await wait_workflow(p, w.id, until, timeout)


async def wait_workflow(p, workflow_id, until, timeout=120) -> wp.Workflow:
    async with asyncio.timeout(timeout):
        async for change in p.workflow.WatchWorkflow(wp.WatchWorkflowRequest(id=workflow_id), metadata=p.md):
            if change.workflow.status in until:
                return change.workflow
    return await p.workflow.GetWorkflow(wp.GetWorkflowRequest(id=workflow_id), metadata=p.md)


async def test_steps_follow_the_graph_and_wired_outputs_flow_downstream(any_db):
    p = any_db
    blueprint = await p.blueprint_of("stack", {"network": {"cidr": "10.0.0.0/16"}, "app": {"vpc_id": "default"}},
                                     [("network", "vpc_id", "app", "vpc_id")])
    w = await p.workflow.CreateWorkflow(wp.CreateWorkflowRequest(blueprint_id=blueprint.id, **shared(p)),
                                        metadata=p.md)
    assert w.status == wp.WORKFLOW_STATUS_PENDING and w.blueprint_revision == blueprint.revision
    steps = by_template(p, w)
    assert (steps["network"].position, steps["app"].position) == (0, 1)
    assert list(steps["app"].depends_on_step_ids) == [steps["network"].id]
    assert len(w.wiring_snapshot) == 1 and w.creator == "alice"
    done = await run(p, w)
    assert done.status == wp.WORKFLOW_STATUS_DONE, done.error_message
    steps = by_template(p, done)
    # The resource service applies the executor's events on its own: it may be a moment behind.
    net = await p.wait(steps["network"].resource_id, rp.RESOURCE_STATE_PROVISIONED, rp.RESOURCE_STATUS_DONE)
    app = await p.wait(steps["app"].resource_id, rp.RESOURCE_STATE_PROVISIONED, rp.RESOURCE_STATUS_DONE)
    vpc_id = {o.name: o.value.string_value for o in net.outputs}["vpc_id"]
    assert steps["app"].resolved_variables["vpc_id"] == vpc_id and app.variables["vpc_id"] == vpc_id
    assert list(app.parent_ids) == [net.id] and app.workflow_id == done.id
    assert (net.state, net.status, app.state, app.status) == (rp.RESOURCE_STATE_PROVISIONED, rp.RESOURCE_STATUS_DONE,
                                                              rp.RESOURCE_STATE_PROVISIONED, rp.RESOURCE_STATUS_DONE)
    assert done.start_time.seconds and done.completion_time.seconds and done.create_time.seconds
    assert all(s.status == DONE and s.start_time.seconds and s.completion_time.seconds and s.job_id
               for s in done.steps)


async def test_variable_precedence_overrides_over_wired_over_defaults(p):
    blueprint = await p.blueprint_of("stack", {"network": {"cidr": "10.0.0.0/16"},
                                               "app": {"vpc_id": "default-vpc", "size": 1}},
                                     [("network", "vpc_id", "app", "vpc_id")])
    w = await p.workflow.CreateWorkflow(wp.CreateWorkflowRequest(
        blueprint_id=blueprint.id, variable_overrides=overrides(p, app={"size": 5}, network={"cidr": "10.7.0.0/16"}),
        **shared(p)), metadata=p.md)
    done = await run(p, w)
    steps = by_template(p, done)
    assert steps["network"].resolved_variables["cidr"] == "10.7.0.0/16"  # override over default
    assert steps["app"].resolved_variables["size"] == 5  # override over default
    assert steps["app"].resolved_variables["vpc_id"].startswith("vpc-")  # wired over default
    secret = await p.workflow.CreateWorkflow(wp.CreateWorkflowRequest(
        blueprint_id=blueprint.id, variable_overrides=overrides(p, app={"password": "hunter2-override"}),
        **shared(p)), metadata=p.md)
    assert by_template(p, secret)["app"].resolved_variables["password"] == "***"
    assert "hunter2-override" not in str(secret)
    forced = await p.workflow.CreateWorkflow(wp.CreateWorkflowRequest(
        blueprint_id=blueprint.id, variable_overrides=overrides(p, app={"vpc_id": "forced-vpc"}), **shared(p)),
        metadata=p.md)
    done = await run(p, forced)
    assert by_template(p, done)["app"].resolved_variables["vpc_id"] == "forced-vpc"  # override over wired


async def test_a_failing_middle_step_then_a_fix_and_re_execution(p):
    gate = p.shared / "gate"
    blueprint = await p.blueprint_of("chain", {"network": {"cidr": "10.0.0.0/16"}, "gated": {"gate": str(gate)},
                                               "leaf": {}},
                                     [("gated", "gate", "leaf", "upstream")])
    w = await p.workflow.CreateWorkflow(wp.CreateWorkflowRequest(blueprint_id=blueprint.id, **shared(p)),
                                        metadata=p.md)
    failed = await run(p, w)
    assert failed.status == wp.WORKFLOW_STATUS_ERROR and "gated" in failed.error_message.lower()
    steps = by_template(p, failed)
    assert (steps["network"].status, steps["gated"].status, steps["leaf"].status) == (DONE, ERROR, PENDING)
    assert "local-exec" in steps["gated"].error_message and not steps["leaf"].resource_id
    network_resource = steps["network"].resource_id
    gate.write_text("open")  # the fix
    again = await run(p, failed)
    assert again.status == wp.WORKFLOW_STATUS_DONE, again.error_message
    steps = by_template(p, again)
    assert steps["network"].resource_id == network_resource
    assert steps["leaf"].resolved_variables["upstream"] == str(gate)
    jobs = await p.executor.ListJobs(ep.ListJobsRequest(workflow_id=w.id), metadata=p.md)
    applies = [j for j in jobs.jobs if j.action == ep.JOB_ACTION_APPLY]
    per_resource = {}
    for j in applies:
        per_resource[j.correlation.resource_id] = per_resource.get(j.correlation.resource_id, 0) + 1
    assert per_resource[network_resource] == 1  # done steps were skipped
    assert per_resource[steps["gated"].resource_id] == 2


async def test_an_unrelated_branch_is_not_held_back_by_a_slow_sibling(any_db):
    p = any_db
    gate = p.shared / "open"
    gate.write_text("open")
    blueprint = await p.blueprint_of(
        "branches", {"network": {"cidr": "10.0.0.0/16"}, "gated": {"gate": str(gate), "seconds": 10},
                     "app": {}, "tail": {}},
        [("network", "vpc_id", "app", "vpc_id"), ("app", "endpoint", "tail", "upstream")])
    w = await p.workflow.CreateWorkflow(wp.CreateWorkflowRequest(blueprint_id=blueprint.id, **shared(p)),
                                        metadata=p.md)
    steps = by_template(p, w)
    assert (steps["gated"].position, steps["app"].position, steps["tail"].position) == (1, 1, 2)
    done = await run(p, w)
    assert done.status == wp.WORKFLOW_STATUS_DONE, done.error_message
    steps = by_template(p, done)
    tail_start = steps["tail"].start_time.ToDatetime()
    assert tail_start < steps["gated"].completion_time.ToDatetime(), "the tail waited for its whole level"


async def test_with_the_approval_flow_steps_wait_for_owners(p):
    await p.approval.UpdateApprovalFlow(ap.UpdateApprovalFlowRequest(enabled=True), metadata=p.admin)

    async def known():
        async with p.inner["resource"].runtime.uow() as uow:
            return await uow.settings.get("approval_flow") is True
    await eventually(known)
    blueprint = await p.blueprint_of("stack", {"network": {"cidr": "10.0.0.0/16"}, "app": {}},
                                     [("network", "vpc_id", "app", "vpc_id")])
    w = await p.workflow.CreateWorkflow(wp.CreateWorkflowRequest(blueprint_id=blueprint.id, **shared(p)),
                                        metadata=p.md)
    await p.workflow.ExecuteWorkflow(wp.ExecuteWorkflowRequest(id=w.id), metadata=p.md)
    for key in ("network", "app"):
        async def waiting():
            got = await p.workflow.GetWorkflow(wp.GetWorkflowRequest(id=w.id), metadata=p.md)
            step = by_template(p, got)[key]
            return step.waiting_reason and step
        step = await eventually(waiting, timeout=60)
        assert "approval" in step.waiting_reason and step.status == wp.STEP_STATUS_IN_PROGRESS
        assert not [j for j in (await p.executor.ListJobs(ep.ListJobsRequest(resource_id=step.resource_id),
                                                          metadata=p.md)).jobs]
        async def opened(resource_id=step.resource_id):  # the approval service opens it from the resource's event
            found = await p.approval.ListApprovalRequests(ap.ListApprovalRequestsRequest(
                resource_id=resource_id, status=ap.APPROVAL_STATUS_PENDING), metadata=p.md)
            return found.approval_requests[0] if found.approval_requests else None
        request = await eventually(opened, timeout=30)
        assert f"(request {request.id})" in step.waiting_reason  # what to approve
        await p.approval.ApproveRequest(ap.ApproveRequestRequest(id=request.id), metadata=p.md)
    done = await wait_workflow(p, w.id, (wp.WORKFLOW_STATUS_DONE, wp.WORKFLOW_STATUS_ERROR))
    assert done.status == wp.WORKFLOW_STATUS_DONE, done.error_message


async def test_a_workflow_service_restart_mid_run_loses_nothing_and_starts_nothing_twice(p):
    gate = p.shared / "open"
    gate.write_text("open")
    blueprint = await p.blueprint_of("chain", {"network": {"cidr": "10.0.0.0/16"},
                                               "gated": {"gate": str(gate), "seconds": 4}, "leaf": {}},
                                     [("gated", "gate", "leaf", "upstream")])
    w = await p.workflow.CreateWorkflow(wp.CreateWorkflowRequest(blueprint_id=blueprint.id, **shared(p)),
                                        metadata=p.md)
    await p.workflow.ExecuteWorkflow(wp.ExecuteWorkflowRequest(id=w.id), metadata=p.md)

    async def gated_running():
        got = await p.workflow.GetWorkflow(wp.GetWorkflowRequest(id=w.id), metadata=p.md)
        return by_template(p, got)["gated"].status == wp.STEP_STATUS_IN_PROGRESS
    await eventually(gated_running, timeout=60)
    await p.inner.stop("workflow")
    await asyncio.sleep(6)  # the gated job finishes while the workflow service is down
    await p.restart("workflow")
    done = await wait_workflow(p, w.id, (wp.WORKFLOW_STATUS_DONE, wp.WORKFLOW_STATUS_ERROR))
    assert done.status == wp.WORKFLOW_STATUS_DONE, done.error_message
    jobs = (await p.executor.ListJobs(ep.ListJobsRequest(workflow_id=w.id), metadata=p.md)).jobs
    assert sorted(j.correlation.step_id for j in jobs) == sorted(s.id for s in done.steps)


async def test_validation_and_permissions(p):
    blueprint = await p.blueprint_of("needs-input", {"network": {}}, [])
    missing = await rpc_error(p.workflow.CreateWorkflow(wp.CreateWorkflowRequest(blueprint_id=blueprint.id,
                                                                                  **shared(p)), metadata=p.md))
    assert missing.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"variable_overrides[{p.catalog.templates['network']}].cidr" in field_violations(missing)
    stray = await rpc_error(p.workflow.CreateWorkflow(wp.CreateWorkflowRequest(
        blueprint_id=blueprint.id, variable_overrides=overrides(p, app={"size": 1}, network={"cidr": "x"})),
        metadata=p.md))
    assert f"variable_overrides[{p.catalog.templates['app']}]" in field_violations(stray)
    unknown = await rpc_error(p.workflow.CreateWorkflow(wp.CreateWorkflowRequest(blueprint_id="nope"),
                                                        metadata=p.md))
    assert "blueprint_id" in field_violations(unknown)
    assert not (await p.workflow.ListWorkflows(wp.ListWorkflowsRequest(), metadata=p.md)).workflows

    w = await p.workflow.CreateWorkflow(wp.CreateWorkflowRequest(
        blueprint_id=blueprint.id, variable_overrides=overrides(p, network={"cidr": "10.0.0.0/16"}), **shared(p)),
        metadata=p.md)
    reader = p.as_("rita", Role.READ)
    assert (await p.workflow.GetWorkflow(wp.GetWorkflowRequest(id=w.id), metadata=reader)).id == w.id
    denied = await rpc_error(p.workflow.ExecuteWorkflow(wp.ExecuteWorkflowRequest(id=w.id), metadata=reader))
    assert denied.code() == grpc.StatusCode.PERMISSION_DENIED
    # Executing twice at once starts nothing twice.
    results = await asyncio.gather(*[p.workflow.ExecuteWorkflow(wp.ExecuteWorkflowRequest(id=w.id),
                                                                metadata=p.md) for _ in range(3)],
                                   return_exceptions=True)
    assert sum(isinstance(r, wp.Workflow) for r in results) == 1
    done = await wait_workflow(p, w.id, (wp.WORKFLOW_STATUS_DONE, wp.WORKFLOW_STATUS_ERROR))
    assert done.status == wp.WORKFLOW_STATUS_DONE
    assert len((await p.executor.ListJobs(ep.ListJobsRequest(workflow_id=w.id), metadata=p.md)).jobs) == 1
    again = await rpc_error(p.workflow.ExecuteWorkflow(wp.ExecuteWorkflowRequest(id=w.id), metadata=p.md))
    assert again.code() == grpc.StatusCode.FAILED_PRECONDITION
    writer = await rpc_error(p.workflow.DeleteWorkflow(wp.DeleteWorkflowRequest(id=w.id), metadata=p.md))
    assert writer.code() == grpc.StatusCode.PERMISSION_DENIED
    await p.workflow.DeleteWorkflow(wp.DeleteWorkflowRequest(id=w.id), metadata=p.admin)
    gone = await rpc_error(p.workflow.GetWorkflow(wp.GetWorkflowRequest(id=w.id), metadata=p.md))
    assert gone.code() == grpc.StatusCode.NOT_FOUND


async def wait_teardown(p, workflow_id, timeout=120) -> wp.Workflow:
    async with asyncio.timeout(timeout):
        async for change in p.workflow.WatchWorkflow(wp.WatchWorkflowRequest(id=workflow_id), metadata=p.md):
            if change.workflow.teardown_status in (wp.TEARDOWN_STATUS_DONE, wp.TEARDOWN_STATUS_ERROR):
                return change.workflow
    return await p.workflow.GetWorkflow(wp.GetWorkflowRequest(id=workflow_id), metadata=p.md)


async def test_teardown_destroys_dependents_first_and_waits_for_outside_dependents(p):
    blueprint = await p.blueprint_of(
        "stack", {"network": {"cidr": "10.0.0.0/16"}, "app": {}, "tail": {}},
        [("network", "vpc_id", "app", "vpc_id"), ("app", "endpoint", "tail", "upstream")])
    w = await p.workflow.CreateWorkflow(wp.CreateWorkflowRequest(blueprint_id=blueprint.id, **shared(p)),
                                        metadata=p.md)
    done = await run(p, w)
    assert done.status == wp.WORKFLOW_STATUS_DONE, done.error_message
    steps = by_template(p, done)
    resource_of = {k: s.resource_id for k, s in steps.items()}
    for rid in resource_of.values():
        await p.wait(rid, rp.RESOURCE_STATE_PROVISIONED, rp.RESOURCE_STATUS_DONE)

    # A resource outside the workflow whose parent is the workflow's app.
    outsider = await p.provisioned("tail", "outsider", [resource_of["app"]], variables={"upstream": "x"})
    preview = await p.workflow.PreviewWorkflowTeardown(wp.PreviewWorkflowTeardownRequest(id=w.id), metadata=p.md)
    planned = {s.resource_id: s for s in preview.steps}
    assert [(planned[resource_of[k]].level) for k in ("tail", "app", "network")] == [0, 1, 2]
    assert list(planned[resource_of["network"]].blocked_by_resource_ids) == [resource_of["app"]]
    assert list(planned[resource_of["app"]].blocked_by_resource_ids) == [resource_of["tail"]]
    assert list(planned[resource_of["app"]].external_dependent_resource_ids) == [outsider.id]

    denied = await rpc_error(p.workflow.TeardownWorkflow(wp.TeardownWorkflowRequest(id=w.id), metadata=p.md))
    assert denied.code() == grpc.StatusCode.PERMISSION_DENIED
    blocked = await rpc_error(p.workflow.TeardownWorkflow(wp.TeardownWorkflowRequest(id=w.id), metadata=p.admin))
    assert blocked.code() == grpc.StatusCode.FAILED_PRECONDITION and outsider.id in str(blocked.details()) + str(
        blocked.trailing_metadata())
    untouched = await p.workflow.GetWorkflow(wp.GetWorkflowRequest(id=w.id), metadata=p.md)
    assert untouched.teardown_status == wp.TEARDOWN_STATUS_UNSPECIFIED
    assert all(s.teardown_status == wp.TEARDOWN_STATUS_UNSPECIFIED for s in untouched.steps)
    assert (await p.get(resource_of["app"])).state == rp.RESOURCE_STATE_PROVISIONED

    await p.resource.DestroyResource(rp.DestroyResourceRequest(id=outsider.id), metadata=p.admin)
    await p.wait(outsider.id, rp.RESOURCE_STATE_DESTROYED, rp.RESOURCE_STATUS_DONE)
    started = await p.workflow.TeardownWorkflow(wp.TeardownWorkflowRequest(id=w.id), metadata=p.admin)
    assert started.teardown_status == wp.TEARDOWN_STATUS_IN_PROGRESS and started.status == wp.WORKFLOW_STATUS_DONE
    torn = await wait_teardown(p, w.id)
    assert torn.teardown_status == wp.TEARDOWN_STATUS_DONE, torn.teardown_error_message
    assert torn.teardown_start_time.seconds and torn.teardown_completion_time.seconds
    assert all(s.teardown_status == wp.TEARDOWN_STATUS_DONE and s.teardown_job_id for s in torn.steps)
    for rid in resource_of.values():
        await p.wait(rid, rp.RESOURCE_STATE_DESTROYED, rp.RESOURCE_STATUS_DONE)

    # Dependents went first: each destroy started after its dependent's destroy ended.
    jobs = (await p.executor.ListJobs(ep.ListJobsRequest(workflow_id=w.id), metadata=p.md)).jobs
    destroys = {j.correlation.step_id: j for j in jobs if j.action == ep.JOB_ACTION_DESTROY}
    order = [destroys[steps[k].id] for k in ("tail", "app", "network")]
    assert all(a.end_time.ToDatetime() <= b.start_time.ToDatetime() for a, b in zip(order, order[1:]))
    assert {j.id for j in order} == {s.teardown_job_id for s in torn.steps}

    again = await rpc_error(p.workflow.TeardownWorkflow(wp.TeardownWorkflowRequest(id=w.id), metadata=p.admin))
    assert again.code() == grpc.StatusCode.FAILED_PRECONDITION
    rerun = await rpc_error(p.workflow.ExecuteWorkflow(wp.ExecuteWorkflowRequest(id=w.id), metadata=p.md))
    assert rerun.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert not (await p.workflow.PreviewWorkflowTeardown(wp.PreviewWorkflowTeardownRequest(id=w.id),
                                                         metadata=p.md)).steps


async def test_with_the_approval_flow_a_teardown_waits_for_owners_and_a_rejection_fails_it(p):
    blueprint = await p.blueprint_of("single", {"network": {"cidr": "10.0.0.0/16"}}, [])
    w = await p.workflow.CreateWorkflow(wp.CreateWorkflowRequest(blueprint_id=blueprint.id, **shared(p)),
                                        metadata=p.md)
    done = await run(p, w)
    [step] = done.steps
    await p.wait(step.resource_id, rp.RESOURCE_STATE_PROVISIONED, rp.RESOURCE_STATUS_DONE)
    await p.approval.UpdateApprovalFlow(ap.UpdateApprovalFlowRequest(enabled=True), metadata=p.admin)

    async def known():
        async with p.inner["resource"].runtime.uow() as uow:
            return await uow.settings.get("approval_flow") is True
    await eventually(known)

    async def waiting_request():
        got = await p.workflow.GetWorkflow(wp.GetWorkflowRequest(id=w.id), metadata=p.md)
        requests = await p.approval.ListApprovalRequests(ap.ListApprovalRequestsRequest(
            resource_id=step.resource_id, status=ap.APPROVAL_STATUS_PENDING), metadata=p.md)
        return got.steps[0].waiting_reason and requests.approval_requests and (got, requests.approval_requests[0])

    await p.workflow.TeardownWorkflow(wp.TeardownWorkflowRequest(id=w.id), metadata=p.admin)
    got, request = await eventually(waiting_request, timeout=60)
    assert "approval" in got.steps[0].waiting_reason and f"(request {request.id})" in got.steps[0].waiting_reason
    assert got.steps[0].teardown_status == wp.TEARDOWN_STATUS_IN_PROGRESS
    assert request.operation == ap.APPROVAL_OPERATION_DESTROY
    await p.approval.RejectRequest(ap.RejectRequestRequest(id=request.id, comment="not yet"), metadata=p.admin)
    failed = await wait_teardown(p, w.id)
    assert failed.teardown_status == wp.TEARDOWN_STATUS_ERROR and "rejected" in failed.teardown_error_message
    assert failed.steps[0].teardown_status == wp.TEARDOWN_STATUS_ERROR
    await p.wait(step.resource_id, rp.RESOURCE_STATE_PROVISIONED, rp.RESOURCE_STATUS_DONE)
    destroys = [j for j in (await p.executor.ListJobs(ep.ListJobsRequest(workflow_id=w.id), metadata=p.md)).jobs
                if j.action == ep.JOB_ACTION_DESTROY]
    assert not destroys

    # Retried, and approved this time.
    await p.workflow.TeardownWorkflow(wp.TeardownWorkflowRequest(id=w.id), metadata=p.admin)
    _, request = await eventually(waiting_request, timeout=60)
    await p.approval.ApproveRequest(ap.ApproveRequestRequest(id=request.id), metadata=p.md)
    torn = await wait_teardown(p, w.id)
    assert torn.teardown_status == wp.TEARDOWN_STATUS_DONE, torn.teardown_error_message
    await p.wait(step.resource_id, rp.RESOURCE_STATE_DESTROYED, rp.RESOURCE_STATUS_DONE)


async def test_watches_and_log_streams_follow_commits_not_the_poll(p, monkeypatch):
    """A stream wakes when its service commits a change to what it follows:
    with the fallback poll a minute long, each still follows a run to its end
    and shows the steps in progress on the way."""
    for constant in ("services.workflow.api.servicer.WATCH_POLL_SECONDS",
                     "services.resource.api.servicer.WATCH_POLL_SECONDS",
                     "services.executor.api.servicer.LOG_POLL_SECONDS"):
        monkeypatch.setattr(constant, 60.0)
    blueprint = await p.blueprint_of("stack", {"network": {"cidr": "10.0.0.0/16"}, "app": {}},
                                     [("network", "vpc_id", "app", "vpc_id")])
    w = await p.workflow.CreateWorkflow(wp.CreateWorkflowRequest(blueprint_id=blueprint.id, **shared(p)),
                                        metadata=p.md)
    seen, watching = [], asyncio.Event()

    async def watch() -> None:
        async for change in p.workflow.WatchWorkflow(wp.WatchWorkflowRequest(id=w.id), metadata=p.md):
            seen.append((change.workflow.status, tuple(s.status for s in change.workflow.steps)))
            watching.set()

    async with asyncio.timeout(45):
        watcher = asyncio.create_task(watch())
        await watching.wait()
        await p.workflow.ExecuteWorkflow(wp.ExecuteWorkflowRequest(id=w.id), metadata=p.md)
        await watcher
    assert seen[-1] == (wp.WORKFLOW_STATUS_DONE, (DONE, DONE))
    assert any(wp.STEP_STATUS_IN_PROGRESS in steps for _, steps in seen[1:-1])

    net = await p.create("network", "n", variables={"cidr": "10.1.0.0/16"})
    states, watching = [], asyncio.Event()

    async def watch_resource() -> None:
        async for change in p.resource.WatchResource(rp.WatchResourceRequest(id=net.id), metadata=p.md):
            states.append((change.resource.state, change.resource.status))
            watching.set()
            if states[-1] == (rp.RESOURCE_STATE_PROVISIONED, rp.RESOURCE_STATUS_DONE):
                return

    async with asyncio.timeout(45):
        watcher = asyncio.create_task(watch_resource())
        await watching.wait()
        started = await p.resource.ProvisionResource(rp.ProvisionResourceRequest(id=net.id), metadata=p.md)
        chunks = [c async for c in p.executor.StreamJobLogs(ep.StreamJobLogsRequest(job_id=started.last_job_id),
                                                            metadata=p.md)]
        await watcher
    assert chunks[-1].final_status == ep.JOB_STATUS_SUCCEEDED and any(c.lines for c in chunks)
    assert states[0] == (rp.RESOURCE_STATE_PROVISION, rp.RESOURCE_STATUS_READY) and len(states) >= 3


async def test_one_workflows_slow_step_start_does_not_hold_up_the_others(p):
    """A step's dependents are started beside the consumer of executor
    completion events: while one workflow's next step is stuck on its way to
    the resource service, other workflows' completion events still move
    their steps."""
    blueprint = await p.blueprint_of("pair", {"network": {"cidr": "10.0.0.0/16"}, "app": {}},
                                     [("network", "vpc_id", "app", "vpc_id")])
    stuck, other = [await p.workflow.CreateWorkflow(wp.CreateWorkflowRequest(blueprint_id=blueprint.id, **shared(p)),
                                                    metadata=p.md) for _ in range(2)]
    stuck_app = by_template(p, stuck)["app"].id
    workflows = p.inner["workflow"].runtime.workflows
    original = workflows.remote.create_resource
    reached, release = asyncio.Event(), asyncio.Event()

    async def create_resource(user, request):
        if request.step_id == stuck_app:  # the resource service "hangs" for this one step
            reached.set()
            await release.wait()
        return await original(user, request)
    workflows.remote.create_resource = create_resource
    try:
        await p.workflow.ExecuteWorkflow(wp.ExecuteWorkflowRequest(id=stuck.id), metadata=p.md)
        async with asyncio.timeout(60):
            await reached.wait()
        done = await run(p, other, timeout=60)
        assert done.status == wp.WORKFLOW_STATUS_DONE, done.error_message
        waiting = await p.workflow.GetWorkflow(wp.GetWorkflowRequest(id=stuck.id), metadata=p.md)
        assert by_template(p, waiting)["app"].status == wp.STEP_STATUS_IN_PROGRESS
        assert not by_template(p, waiting)["app"].resource_id
    finally:
        release.set()
        workflows.remote.create_resource = original
    ended = await wait_workflow(p, stuck.id, (wp.WORKFLOW_STATUS_DONE, wp.WORKFLOW_STATUS_ERROR))
    assert ended.status == wp.WORKFLOW_STATUS_DONE, ended.error_message


async def test_a_stop_during_a_step_start_leaves_the_step_to_the_reconciler_not_failed(p):
    """A graceful stop while a step's start (beside the event consumer) is
    still on its way to the resource service: the start gets the shutdown
    grace, then is cancelled; the step stays in progress, never failed for
    a closing connection, and the restarted service's reconciler starts it."""
    blueprint = await p.blueprint_of("pair", {"network": {"cidr": "10.0.0.0/16"}, "app": {}},
                                     [("network", "vpc_id", "app", "vpc_id")])
    w = await p.workflow.CreateWorkflow(wp.CreateWorkflowRequest(blueprint_id=blueprint.id, **shared(p)),
                                        metadata=p.md)
    app = by_template(p, w)["app"].id
    workflows = p.inner["workflow"].runtime.workflows
    original = workflows.remote.create_resource
    reached = asyncio.Event()

    async def create_resource(user, request):
        if request.step_id == app:  # the resource service never answers this one
            reached.set()
            await asyncio.Event().wait()
        return await original(user, request)
    workflows.remote.create_resource = create_resource
    await p.workflow.ExecuteWorkflow(wp.ExecuteWorkflowRequest(id=w.id), metadata=p.md)
    async with asyncio.timeout(60):
        await reached.wait()
    await p.restart("workflow")
    assert not workflows.starting, "the start was cancelled at the stop"
    waiting = await p.workflow.GetWorkflow(wp.GetWorkflowRequest(id=w.id), metadata=p.md)
    assert by_template(p, waiting)["app"].status == wp.STEP_STATUS_IN_PROGRESS
    ended = await wait_workflow(p, w.id, (wp.WORKFLOW_STATUS_DONE, wp.WORKFLOW_STATUS_ERROR), timeout=90)
    assert ended.status == wp.WORKFLOW_STATUS_DONE, ended.error_message
