"""The workflow service's reactions: executor completion events advance the
step they carry (correlation workflow_id / step_id); resource events tell a
step that its resource waits for approval, or that it was rejected or failed
before any job ran."""
from __future__ import annotations

import asyncio
import logging

from infrakitchen.executor.v1 import executor_pb2
from infrakitchen.resource.v1 import resource_pb2
from services.common import confirm
from services.common.consumer import ConsumerSpec
from services.common.events import Envelope, body_of
from services.common.values import from_value
from services.workflow.domain.model import awaiting_approval

_JOB_ENDED_BADLY = ("job_failed", "job_cancelled", "job_timed_out")
_DECISIONS = {"approval_approved": "approved", "approval_rejected": "rejected", "approval_cancelled": "cancelled"}


def _decides_a_plan(env: Envelope) -> bool:
    """Only decisions on workflow plans (they carry the workflow; a resource's
    request made by a workflow step carries it too, but names the resource)."""
    return bool(env.correlation.workflow_id) and not env.correlation.resource_id \
        and env.type in {"ik.approval.request.approved", "ik.approval.request.rejected",
                         "ik.approval.request.cancelled"}
_JOB_ENDED = {f"ik.executor.job.{kind[4:]}" for kind in ("job_succeeded", *_JOB_ENDED_BADLY)}

log = logging.getLogger(__name__)


def _moves_a_step(env: Envelope) -> bool:
    """A step's resource changed in a way the step reacts to: a resource that
    reached done moves nothing here (its job's completion event does), unless
    a destroy was turned back (a teardown step fails); a job queued or started
    moves nothing either (decided without a transaction: two per step), unless
    it ends a wait for approval (the step's waiting_reason is cleared)."""
    if not env.correlation.step_id:
        return False
    body = env.resource_status_changed
    if body.status in (resource_pb2.RESOURCE_STATUS_QUEUED, resource_pb2.RESOURCE_STATUS_IN_PROGRESS):
        return body.previous_status == resource_pb2.RESOURCE_STATUS_APPROVAL_PENDING
    return body.status != resource_pb2.RESOURCE_STATUS_DONE or body.previous_state == resource_pb2.RESOURCE_STATE_DESTROY


def consumers(runtime) -> list[ConsumerSpec]:
    workflows = runtime.workflows

    async def on_job(uow, env: Envelope) -> None:
        kind, body = body_of(env)
        step_id = body.correlation.step_id
        if not step_id:
            return
        actor = env.actor or "system:executor"
        if body.action == executor_pb2.JOB_ACTION_DESTROY:  # a teardown destroying the step's resource
            if kind == "job_succeeded":
                await workflows.teardown_step_done(step_id, body.job_id, actor, uow=uow)
            elif kind in _JOB_ENDED_BADLY:
                await workflows.teardown_step_failed(step_id, body.error_message or f"the job ended {kind[4:]}",
                                                     actor, job_id=body.job_id, uow=uow)
            return
        if body.action == executor_pb2.JOB_ACTION_PLAN:  # a step's part of PlanWorkflow
            await workflows.step_plan_ended(step_id, body.job_id, kind[4:], actor, summary=body.plan_summary,
                                            error=body.error_message, uow=uow)
            return
        if body.action != executor_pb2.JOB_ACTION_APPLY:
            return
        st = await uow.steps.get(step_id)
        if st is not None and st.retry_time is not None and body.job_id not in st.attempt_job_ids:
            # The step waits for its next attempt: no job of its runs now. This is
            # someone else's (an owner's ProvisionResource on the step's resource);
            # the next attempt reads the resource as that job left it.
            log.info("step %s waits for its next attempt: job %s is not one of its, ignored", step_id, body.job_id)
            return
        if kind == "job_succeeded":
            await workflows.step_succeeded(
                step_id, body.correlation.resource_id, body.job_id,
                {o.name: from_value(o.value) for o in body.outputs},
                [o.name for o in body.outputs if o.sensitive], actor, uow=uow)
        elif kind in _JOB_ENDED_BADLY:
            await workflows.step_failed(step_id, body.error_message or f"the job ended {kind[4:]}", actor, uow=uow,
                                        job_failed=kind == "job_failed", resource_id=body.correlation.resource_id)

    async def on_resource(uow, env: Envelope) -> None:
        kind, body = body_of(env)
        step_id = env.correlation.step_id
        if not step_id or kind != "resource_status_changed":
            return
        st = await uow.steps.get(step_id)
        if st is None:
            return
        if body.status in (resource_pb2.RESOURCE_STATUS_QUEUED, resource_pb2.RESOURCE_STATUS_IN_PROGRESS):
            await workflows.step_waiting(step_id, "", env.actor, uow=uow)  # its job runs: no longer waiting
        elif st.teardown_status == "in_progress":
            await on_teardown_resource(uow, step_id, body, env.actor, env.correlation.approval_request_id)
        elif body.status == resource_pb2.RESOURCE_STATUS_APPROVAL_PENDING:
            await workflows.step_waiting(step_id, awaiting_approval(body.resource_id,
                                                                    env.correlation.approval_request_id),
                                         env.actor, uow=uow, resource_id=body.resource_id)
        elif body.status == resource_pb2.RESOURCE_STATUS_REJECTED:
            await workflows.step_failed(step_id, f"the approval of resource {body.resource_id} was rejected",
                                        env.actor, uow=uow, resource_id=body.resource_id)
        elif body.status == resource_pb2.RESOURCE_STATUS_ERROR and not body.job_id:
            await workflows.step_failed(step_id, body.error_message or "the resource failed", env.actor, uow=uow,
                                        resource_id=body.resource_id)

    async def on_teardown_resource(uow, step_id: str, body, actor: str, approval_request_id: str = "") -> None:
        if body.status == resource_pb2.RESOURCE_STATUS_APPROVAL_PENDING:
            await workflows.step_waiting(step_id, awaiting_approval(body.resource_id, approval_request_id,
                                                                    destroy=True), actor, uow=uow)
        elif body.previous_state == resource_pb2.RESOURCE_STATE_DESTROY and body.state in (
                resource_pb2.RESOURCE_STATE_PROVISIONED, resource_pb2.RESOURCE_STATE_PROVISION):
            await workflows.teardown_step_failed(step_id, f"the destroy of resource {body.resource_id} was rejected "
                                                          "or withdrawn", actor, uow=uow)
        elif body.status == resource_pb2.RESOURCE_STATUS_ERROR and not body.job_id:
            await workflows.teardown_step_failed(step_id, body.error_message or "the destroy failed", actor,
                                                 uow=uow)

    async def on_approval(uow, env: Envelope) -> None:
        kind, body = body_of(env)
        await workflows.on_plan_decision(uow, body.workflow_id, body.step_id, body.approval_request_id,
                                         _DECISIONS[kind], body.decided_by or env.actor, body.comment)

    return [
        # Decisions on workflow plans (a resource's own approvals are the resource service's).
        ConsumerSpec(durable="workflow-approval-events", context="approval", filter_subject="ik.approval.request.>",
                     handler=on_approval, wants=_decides_a_plan,
                     confirm=confirm.approval_decisions(workflows.remote.approval_request)),
        # Only a job's end moves a step; queued and started change nothing here. It
        # moves it as the executor reports the job (status, outputs), not as the event says.
        ConsumerSpec(durable="workflow-job-events", context="executor", filter_subject="ik.executor.job.>",
                     handler=on_job, wants=lambda env: bool(env.correlation.step_id) and env.type in _JOB_ENDED,
                     confirm=confirm.job_ends(workflows.remote.job)),
        ConsumerSpec(durable="workflow-resource-events", context="resource",
                     filter_subject="ik.resource.resource.status_changed", handler=on_resource,
                     wants=_moves_a_step),
    ]


async def reconciler(runtime) -> None:
    interval = float(runtime.settings.env.get("IK_WORKFLOW_RECONCILE_INTERVAL", "5"))
    while True:
        await asyncio.sleep(interval)
        try:
            async with runtime.db.leading("workflow-reconciler") as mine:
                if mine:  # one replica per round
                    await runtime.workflows.reconcile(older_than_seconds=interval)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a dependency may be down: next round
            log.warning("workflow reconciliation failed: %s", exc)
