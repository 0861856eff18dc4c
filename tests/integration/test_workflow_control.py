"""Staying in control of a running workflow, through gRPC with real
terraform and NATS: cancel (during an apply, and racing a completion),
the continue_independent failure policy, retries of transient failures, and
expiry."""
from __future__ import annotations

import asyncio
import datetime as dt
from dataclasses import replace

import grpc
import pytest
from google.protobuf import duration_pb2

from infrakitchen.approval.v1 import approval_pb2 as ap
from infrakitchen.blueprint.v1 import blueprint_pb2 as bp
from infrakitchen.common.v1 import retry_pb2
from infrakitchen.executor.v1 import executor_pb2 as ep
from infrakitchen.resource.v1 import resource_pb2 as rp
from infrakitchen.workflow.v1 import workflow_pb2 as wp
from tests.integration.test_resource_approvals import set_flow
from tests.integration.test_workflows import by_template, overrides, run, shared, wait_workflow
from tests.support.grpc_asserts import field_violations, precondition_violations, rpc_error
from tests.support.platform import Platform
from tests.support.waiting import eventually

ENDED = (wp.WORKFLOW_STATUS_DONE, wp.WORKFLOW_STATUS_ERROR)


@pytest.fixture
async def p(tmp_path, event_prefix, nats_url):
    async with Platform(tmp_path, event_prefix, nats_url) as platform:
        yield platform


async def get(p, workflow_id: str) -> wp.Workflow:
    return await p.workflow.GetWorkflow(wp.GetWorkflowRequest(id=workflow_id), metadata=p.md)


async def job_reached(p, workflow_id: str, template: str, status: int, timeout: float = 60,
                      interval: float = 0.05) -> str:
    """The id of the step's job once it has this status."""
    async def reached():
        step = by_template(p, await get(p, workflow_id))[template]
        if not step.job_id:
            return None
        job = await p.executor.GetJob(ep.GetJobRequest(id=step.job_id), metadata=p.md)
        return job.id if job.status == status else None
    return await eventually(reached, timeout=timeout, interval=interval)


async def job_running(p, workflow_id: str, template: str) -> str:
    """The id of the step's job once it runs."""
    return await job_reached(p, workflow_id, template, ep.JOB_STATUS_RUNNING)


async def test_cancel_during_an_apply_stops_it_and_a_later_execute_finishes_the_step(p):
    gate = p.shared / "open"
    gate.write_text("open")
    blueprint = await p.blueprint_of("cancel", {"network": {"cidr": "10.0.0.0/16"}, "gated": {}}, [])
    w = await p.workflow.CreateWorkflow(wp.CreateWorkflowRequest(
        blueprint_id=blueprint.id, variable_overrides=overrides(p, gated={"gate": str(gate), "seconds": 60}),
        **shared(p)), metadata=p.md)
    await p.workflow.ExecuteWorkflow(wp.ExecuteWorkflowRequest(id=w.id), metadata=p.md)
    job_id = await job_running(p, w.id, "gated")
    await asyncio.sleep(2)  # inside its 60 s local-exec
    cancelling = await p.workflow.CancelWorkflow(wp.CancelWorkflowRequest(id=w.id), metadata=p.md)
    assert cancelling.cancelled_by == "alice"
    again = await p.workflow.CancelWorkflow(wp.CancelWorkflowRequest(id=w.id), metadata=p.md)
    assert again.cancelled_by == "alice", "cancelling twice while it winds down changes nothing"
    ended = await wait_workflow(p, w.id, ENDED, timeout=60)
    assert ended.status == wp.WORKFLOW_STATUS_ERROR and ended.error_message == "cancelled by alice"
    steps = by_template(p, ended)
    assert steps["gated"].status == wp.STEP_STATUS_ERROR and steps["gated"].error_message == "cancelled by alice"
    job = await p.executor.GetJob(ep.GetJobRequest(id=job_id), metadata=p.md)
    assert job.status == ep.JOB_STATUS_CANCELLED, "the apply was interrupted, not waited for"
    late = await rpc_error(p.workflow.CancelWorkflow(wp.CancelWorkflowRequest(id=w.id), metadata=p.md))
    assert late.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert [v[0] for v in precondition_violations(late)] == ["WORKFLOW_NOT_RUNNING"]
    # The state was not corrupted: executed again (faster), the same resource finishes.
    await p.workflow.UpdateWorkflow(wp.UpdateWorkflowRequest(workflow=wp.Workflow(
        id=w.id, variable_overrides=overrides(p, gated={"gate": str(gate), "seconds": 0}))), metadata=p.md)
    done = await run(p, ended)
    assert done.status == wp.WORKFLOW_STATUS_DONE, done.error_message
    resumed = by_template(p, done)["gated"]
    assert resumed.resource_id == steps["gated"].resource_id
    # (the resource service applies the same job event on its own, maybe a moment later)
    await p.wait(resumed.resource_id, rp.RESOURCE_STATE_PROVISIONED, rp.RESOURCE_STATUS_DONE)


async def test_cancelling_a_workflow_that_waits_for_approval_withdraws_the_request(p):
    await set_flow(p, True)
    blueprint = await p.blueprint_of("waits", {"network": {"cidr": "10.0.0.0/16"}}, [])
    w = await p.workflow.CreateWorkflow(wp.CreateWorkflowRequest(blueprint_id=blueprint.id, **shared(p)),
                                        metadata=p.md)
    await p.workflow.ExecuteWorkflow(wp.ExecuteWorkflowRequest(id=w.id), metadata=p.md)

    async def pending():
        step = (await get(p, w.id)).steps[0]
        if not step.resource_id:
            return None
        listed = await p.approval.ListApprovalRequests(ap.ListApprovalRequestsRequest(
            resource_id=step.resource_id, status=ap.APPROVAL_STATUS_PENDING), metadata=p.md)
        return listed.approval_requests[0] if listed.approval_requests else None
    request = await eventually(pending, timeout=30)
    cancelled = await p.workflow.CancelWorkflow(wp.CancelWorkflowRequest(id=w.id), metadata=p.md)
    # Nothing was running: it ends at once.
    assert cancelled.status == wp.WORKFLOW_STATUS_ERROR and cancelled.error_message == "cancelled by alice"
    assert cancelled.steps[0].status == wp.STEP_STATUS_ERROR

    async def withdrawn():
        got = await p.approval.GetApprovalRequest(ap.GetApprovalRequestRequest(id=request.id), metadata=p.md)
        return got.status == ap.APPROVAL_STATUS_CANCELLED
    await eventually(withdrawn, timeout=20)


async def test_a_cancel_racing_the_last_completion_has_exactly_one_outcome(p):
    blueprint = await p.blueprint_of("race", {"network": {"cidr": "10.0.0.0/16"}}, [])
    w = await p.workflow.CreateWorkflow(wp.CreateWorkflowRequest(blueprint_id=blueprint.id, **shared(p)),
                                        metadata=p.md)
    await p.workflow.ExecuteWorkflow(wp.ExecuteWorkflowRequest(id=w.id), metadata=p.md)

    async def finished():  # the job has ended at the executor; its event races the cancel
        step = (await get(p, w.id)).steps[0]
        job = await p.executor.GetJob(ep.GetJobRequest(id=step.job_id), metadata=p.md) if step.job_id else None
        return job is not None and job.status == ep.JOB_STATUS_SUCCEEDED
    await eventually(finished, timeout=60, interval=0.01)
    try:
        await p.workflow.CancelWorkflow(wp.CancelWorkflowRequest(id=w.id), metadata=p.md)
    except grpc.aio.AioRpcError as err:  # the completion won
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    ended = await wait_workflow(p, w.id, ENDED, timeout=60)
    # The job finished first: its step is done (never also failed), the workflow done, one apply ran.
    assert ended.status == wp.WORKFLOW_STATUS_DONE, ended.error_message
    assert ended.steps[0].status == wp.STEP_STATUS_DONE and not ended.steps[0].error_message
    jobs = await p.executor.ListJobs(ep.ListJobsRequest(workflow_id=w.id), metadata=p.md)
    assert [j.action for j in jobs.jobs] == [ep.JOB_ACTION_APPLY]


async def test_continue_independent_keeps_unrelated_steps_going_and_holds_the_failed_steps_dependents(p):
    # network -> app -> tail, and network -> gated (fails: its gate is closed) -> leaf (also after app).
    # One step at a time, in position order (App before Gated), so tail starts only after the failure.
    blueprint = await p.blueprint_of(
        "independent", {"network": {"cidr": "10.0.0.0/16"}, "app": {}, "gated": {}, "leaf": {}, "tail": {}},
        [("network", "vpc_id", "app", "vpc_id"), ("app", "endpoint", "tail", "upstream"),
         ("gated", "gate", "leaf", "upstream")])
    request = wp.CreateWorkflowRequest(
        blueprint_id=blueprint.id, variable_overrides=overrides(p, gated={"gate": "/closed"}), max_parallel_steps=1,
        on_failure=wp.FAILURE_POLICY_CONTINUE_INDEPENDENT, **shared(p))
    w = await p.workflow.CreateWorkflow(request, metadata=p.md)
    assert w.on_failure == wp.FAILURE_POLICY_CONTINUE_INDEPENDENT
    ended = await run(p, w)
    assert ended.status == wp.WORKFLOW_STATUS_ERROR and "step Gated failed" in ended.error_message
    steps = by_template(p, ended)
    assert steps["gated"].status == wp.STEP_STATUS_ERROR
    assert {steps[t].status for t in ("network", "app", "tail")} == {wp.STEP_STATUS_DONE}
    assert steps["tail"].start_time.ToDatetime() > steps["gated"].completion_time.ToDatetime()
    assert steps["leaf"].status == wp.STEP_STATUS_PENDING
    assert steps["leaf"].waiting_reason == "waits for failed step Gated"
    # The default stops at the failure: the same DAG leaves tail (and leaf) pending.
    request.on_failure = wp.FAILURE_POLICY_UNSPECIFIED
    stopped = by_template(p, await run(p, await p.workflow.CreateWorkflow(request, metadata=p.md)))
    assert (stopped["tail"].status, stopped["leaf"].status) == (wp.STEP_STATUS_PENDING, wp.STEP_STATUS_PENDING)


def retries(attempts: int, patterns: list[str], backoff: float = 1) -> retry_pb2.RetryPolicy:
    return retry_pb2.RetryPolicy(max_attempts=attempts, transient_patterns=patterns,
                                 initial_backoff=duration_pb2.Duration(seconds=int(backoff)))


async def backing_off(p, blueprint_id: str, gate, backoff: int) -> tuple[wp.Workflow, wp.Step]:
    """A one-step workflow whose step failed transiently (its gate closed) and waits for its next attempt."""
    w = await p.workflow.CreateWorkflow(wp.CreateWorkflowRequest(
        blueprint_id=blueprint_id, variable_overrides=overrides(p, gated={"gate": str(gate)}),
        retry_policy=retries(3, ["gate closed"], backoff=backoff), **shared(p)), metadata=p.md)
    await p.workflow.ExecuteWorkflow(wp.ExecuteWorkflowRequest(id=w.id), metadata=p.md)

    async def retrying():
        step = (await get(p, w.id)).steps[0]
        return step if step.HasField("retry_time") else None
    return w, await eventually(retrying, timeout=60)


async def test_a_transient_failure_is_retried_on_the_same_resource_and_a_permanent_one_is_not(p):
    gate = p.shared / "later"
    blueprint = await p.blueprint_of("retry", {"gated": {}}, [])
    transient, waiting = await backing_off(p, blueprint.id, gate, backoff=3)
    assert waiting.status == wp.STEP_STATUS_IN_PROGRESS and waiting.attempts == 1
    assert "transient" in waiting.waiting_reason and "gate closed" in waiting.waiting_reason
    gate.write_text("open")  # the cloud recovers before the next attempt
    done = await wait_workflow(p, transient.id, ENDED, timeout=90)
    assert done.status == wp.WORKFLOW_STATUS_DONE, done.error_message
    step = done.steps[0]
    assert step.attempts == 2 and len(set(step.attempt_job_ids)) == 2 and step.job_id == step.attempt_job_ids[-1]
    jobs = {j.id: j for j in (await p.executor.ListJobs(ep.ListJobsRequest(workflow_id=transient.id),
                                                        metadata=p.md)).jobs}
    assert [jobs[j].status for j in step.attempt_job_ids] == [ep.JOB_STATUS_FAILED, ep.JOB_STATUS_SUCCEEDED]
    assert {jobs[j].correlation.resource_id for j in step.attempt_job_ids} == {step.resource_id}

    # The owner provisions the step's resource during the backoff: their job is not the step's.
    # The step moves only at its next attempt, which finds the resource provisioned.
    owners = p.shared / "owners-gate"
    own, waiting = await backing_off(p, blueprint.id, owners, backoff=12)
    owners.write_text("open")
    # The resource service applies the failed job's end on its own (maybe after the workflow did).
    await p.wait(waiting.resource_id, rp.RESOURCE_STATE_PROVISION, rp.RESOURCE_STATUS_ERROR)
    await p.resource.ProvisionResource(rp.ProvisionResourceRequest(id=waiting.resource_id), metadata=p.md)
    provisioned = await p.wait(waiting.resource_id, rp.RESOURCE_STATE_PROVISIONED, rp.RESOURCE_STATUS_DONE)
    await asyncio.sleep(1)  # its end event reached the workflow service too
    still = (await get(p, own.id)).steps[0]
    assert (still.status, still.attempts) == (wp.STEP_STATUS_IN_PROGRESS, 1) and still.HasField("retry_time")
    done = await wait_workflow(p, own.id, ENDED, timeout=90)
    assert done.status == wp.WORKFLOW_STATUS_DONE, done.error_message
    step = done.steps[0]
    assert step.attempts == 2 and step.job_id == provisioned.last_job_id
    assert step.completion_time.ToDatetime() >= waiting.retry_time.ToDatetime()

    # Not transient by the policy's patterns: it stops after the first attempt.
    permanent = await run(p, await p.workflow.CreateWorkflow(wp.CreateWorkflowRequest(
        blueprint_id=blueprint.id, variable_overrides=overrides(p, gated={"gate": "/never"}),
        retry_policy=retries(3, ["rate limit"]), **shared(p)), metadata=p.md))
    assert permanent.status == wp.WORKFLOW_STATUS_ERROR
    assert permanent.steps[0].attempts == 1 and "after" not in permanent.steps[0].error_message
    # Transient every time: it stops when the attempts run out, and says how many ran. Here the
    # policy is the template's default (the workflow sets none).
    bad = await rpc_error(p.blueprint.UpdateTemplate(bp.UpdateTemplateRequest(
        template=bp.Template(id=p.catalog.templates["gated"], retry_policy=retries(11, ["(", r"(a)\1"])),
        update_mask=["retry_policy"]), metadata=p.admin))
    # A back-reference is refused: patterns are RE2, matched in linear time.
    assert set(field_violations(bad)) == {"template.retry_policy.max_attempts",
                                          "template.retry_policy.transient_patterns[0]",
                                          "template.retry_policy.transient_patterns[1]"}
    await p.blueprint.UpdateTemplate(bp.UpdateTemplateRequest(
        template=bp.Template(id=p.catalog.templates["gated"], retry_policy=retries(2, ["gate closed"])),
        update_mask=["retry_policy"]), metadata=p.admin)
    exhausted = await run(p, await p.workflow.CreateWorkflow(wp.CreateWorkflowRequest(
        blueprint_id=blueprint.id, variable_overrides=overrides(p, gated={"gate": "/never"}), **shared(p)),
        metadata=p.md))
    assert exhausted.status == wp.WORKFLOW_STATUS_ERROR
    assert exhausted.steps[0].attempts == 2 and exhausted.steps[0].error_message.endswith("(after 2 attempts)")


async def test_an_expired_workflow_is_torn_down_and_its_expiry_can_be_extended(p):
    blueprint = await p.blueprint_of("expiring", {"network": {"cidr": "10.0.0.0/16"}}, [])
    bad = await rpc_error(p.workflow.CreateWorkflow(wp.CreateWorkflowRequest(
        blueprint_id=blueprint.id, ttl=duration_pb2.Duration(seconds=5), **shared(p)), metadata=p.md))
    assert bad.code() == grpc.StatusCode.INVALID_ARGUMENT and "ttl" in field_violations(bad)
    w = await p.workflow.CreateWorkflow(wp.CreateWorkflowRequest(
        blueprint_id=blueprint.id, ttl=duration_pb2.Duration(seconds=3600), **shared(p)), metadata=p.md)
    expires = w.expire_time.ToDatetime(dt.timezone.utc)
    assert dt.timedelta(minutes=59) < expires - dt.datetime.now(dt.timezone.utc) <= dt.timedelta(hours=1)
    done = await run(p, w)
    assert done.status == wp.WORKFLOW_STATUS_DONE, done.error_message
    later = wp.Workflow(id=w.id)
    later.expire_time.FromDatetime(expires + dt.timedelta(days=1))
    extended = await p.workflow.UpdateWorkflow(wp.UpdateWorkflowRequest(workflow=later, update_mask=["expire_time"]),
                                               metadata=p.md)
    assert extended.expire_time.ToDatetime(dt.timezone.utc) == expires + dt.timedelta(days=1)
    # Time passes (the stored expiry is moved into the past), and the reconciler acts.
    service = p.inner["workflow"].runtime
    async with service.uow() as uow:
        current = await uow.workflows.get(w.id)
        await uow.workflows.update(replace(current, expire_time=dt.datetime.now(dt.timezone.utc)
                                           - dt.timedelta(seconds=1), version=current.version + 1), current.version)
        await uow.commit()
    await service.workflows.reconcile(older_than_seconds=30)
    torn = await get(p, w.id)
    assert torn.expired and torn.teardown_status in (wp.TEARDOWN_STATUS_IN_PROGRESS, wp.TEARDOWN_STATUS_DONE)

    async def gone():
        current = await get(p, w.id)
        return current if current.teardown_status == wp.TEARDOWN_STATUS_DONE else None
    gone_w = await eventually(gone, timeout=90)
    resource = await p.get(gone_w.steps[0].resource_id)
    assert resource.state == rp.RESOURCE_STATE_DESTROYED
    too_late = await rpc_error(p.workflow.UpdateWorkflow(wp.UpdateWorkflowRequest(
        workflow=later, update_mask=["expire_time"]), metadata=p.md))
    assert too_late.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_an_integration_capped_at_one_job_runs_its_steps_one_after_another_and_others_are_unaffected(
        tmp_path, event_prefix, nats_url):
    async with Platform(tmp_path, event_prefix, nats_url, extra_env={"IK_EXECUTOR_WORKERS": "4",
                                                                      "IK_EXECUTOR_CAP_RETRY": "0.5"}) as p:
        capped = await p.executor.CreateIntegration(ep.CreateIntegrationRequest(
            integration=ep.Integration(name="capped", provider=ep.INTEGRATION_PROVIDER_GENERIC,
                                       max_concurrent_jobs=1), credentials={"ACCOUNT": "one"}), metadata=p.admin)
        assert capped.max_concurrent_jobs == 1
        bad = await rpc_error(p.executor.UpdateIntegration(ep.UpdateIntegrationRequest(
            integration=ep.Integration(id=capped.id, max_concurrent_jobs=-1), update_mask=["max_concurrent_jobs"]),
            metadata=p.admin))
        assert "integration.max_concurrent_jobs" in field_violations(bad)
        gate = p.shared / "open"
        gate.write_text("open")
        blueprint = await p.blueprint_of("one", {"gated": {}}, [])
        values = overrides(p, gated={"gate": str(gate), "seconds": 3})
        capped_runs, free_runs = [], []
        for integration, runs in ((capped.id, capped_runs), (p.catalog.integration, free_runs)):
            for _ in range(3):  # three steps at once on each integration
                w = await p.workflow.CreateWorkflow(wp.CreateWorkflowRequest(
                    blueprint_id=blueprint.id, variable_overrides=values, integration_ids=[integration],
                    storage_id=p.catalog.storage), metadata=p.md)
                runs.append(w.id)
        for w in capped_runs + free_runs:
            await p.workflow.ExecuteWorkflow(wp.ExecuteWorkflowRequest(id=w), metadata=p.md)
        reasons = set()

        async def jobs_of(runs):
            return [j for w in runs for j in (await p.executor.ListJobs(ep.ListJobsRequest(workflow_id=w),
                                                                          metadata=p.md)).jobs]

        async def ended():
            reasons.update(j.queue_reason for j in await jobs_of(capped_runs) if j.queue_reason)
            return all([(await get(p, w)).status in ENDED for w in capped_runs + free_runs])
        await eventually(ended, timeout=120, interval=0.2)
        for w in capped_runs + free_runs:
            assert (await get(p, w)).status == wp.WORKFLOW_STATUS_DONE

        def spans(jobs):
            return sorted((j.start_time.ToDatetime(), j.end_time.ToDatetime()) for j in jobs
                          if j.action == ep.JOB_ACTION_APPLY)
        capped_spans, free_spans = spans(await jobs_of(capped_runs)), spans(await jobs_of(free_runs))
        assert len(capped_spans) == 3 and all(a[1] <= b[0] for a, b in zip(capped_spans, capped_spans[1:])), \
            "one job at a time on the capped integration"
        assert any(a[1] > b[0] for a, b in zip(free_spans, free_spans[1:])), "the other integration runs in parallel"
        assert any("capped runs 1 of at most 1 jobs" in r for r in reasons), reasons
