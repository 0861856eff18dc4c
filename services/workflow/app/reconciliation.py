"""Reconciliation: steps of running workflows (and teardowns) that have not
moved for a while, and plans whose jobs' events were missed."""
from __future__ import annotations

import datetime as dt

from infrakitchen.executor.v1 import executor_pb2 as ep
from services.common.uow import utcnow
from services.workflow.adapters.remote import ResourceInfo
from services.workflow.domain.model import IN_PROGRESS, PENDING, PLANNING, Step, Workflow
from services.workflow.app.base import WorkflowsBase


class Reconciliation(WorkflowsBase):
    # --- reconciliation -----------------------------------------------------------------------

    async def reconcile(self, older_than_seconds: float) -> None:
        """Steps of running workflows that have not moved for a while: a start
        that never happened is repeated; an outcome whose event was missed is
        read from the resource service."""
        cutoff = utcnow() - dt.timedelta(seconds=older_than_seconds)
        async with self.uow_factory() as uow:
            running = [(w, await uow.steps.of(w.id)) for w in await uow.workflows.in_progress()]
            planning = [(w, await uow.steps.of(w.id)) for w in await uow.workflows.planning()]
        for w, steps in planning:
            await self._reconcile_plans(w, steps)
        await self.expire_due()
        for w, steps in running:
            if w.teardown_status == IN_PROGRESS:
                await self._reconcile_teardown(w, steps, cutoff)
                continue
            if w.cancelled_by:
                await self.reconcile_cancelled(w, steps, cutoff)
                continue
            if w.executed_plan_id:
                if w.plan_approval_status == PENDING and w.update_time and w.update_time < cutoff:
                    await self.open_plan_approval(w.id)  # its request may never have been opened
                await self._reconcile_plans(w, steps)
            for st in steps:
                if st.status == IN_PROGRESS and st.retry_time is not None:  # waits for its next attempt
                    if st.retry_time <= utcnow():
                        await self.retry_step(st.id, w.executor or w.creator)
                    continue
                if st.status != IN_PROGRESS or (st.start_time and st.start_time > cutoff):
                    continue
                if not st.resource_id:
                    await self.start_step(st.id, w.executor or w.creator)
                    continue
                resource: ResourceInfo = await self.remote.get_resource(st.resource_id)
                if resource.state == "provisioned" and resource.status == "done":
                    await self.step_succeeded(st.id, resource.id, resource.last_job_id, resource.outputs,
                                              list(resource.sensitive_outputs), "system:reconciler")
                elif resource.status in ("error", "rejected", "unknown"):
                    await self.step_failed(st.id, resource.error_message or f"resource is {resource.status}",
                                           "system:reconciler", job_failed=resource.status == "error")
                elif resource.status == "ready" and resource.state == "provision":
                    await self.start_step(st.id, w.executor or w.creator)

    async def _reconcile_plans(self, w: Workflow, steps: list[Step]) -> None:
        """Plan jobs whose completion event was missed, or that were never
        submitted (a crash after the step was marked planning); step plan
        approvals that were never opened."""
        actor = "system:reconciler"
        for st in steps:
            plan = st.plan
            if plan.get("approval_request_id") and not plan.get("approved") and st.status == IN_PROGRESS:
                await self.open_plan_approval(w.id, st.id)
            if plan.get("status") != PLANNING or plan.get("queued"):
                continue
            if not plan.get("job_id"):
                await self.plan_step(st.id, w.executor or w.creator)  # idempotent by its request id
                continue
            job = await self.remote.job(plan["job_id"])
            if job is None:
                await self.step_plan_ended(st.id, plan["job_id"], "failed", actor, error="its plan job is gone")
            elif job.status not in (ep.JOB_STATUS_QUEUED, ep.JOB_STATUS_RUNNING):
                outcome = ep.JobStatus.Name(job.status).lower().removeprefix("job_status_")
                await self.step_plan_ended(st.id, job.id, outcome, actor, summary=job.plan_summary,
                                           error=job.error_message)

    async def _reconcile_teardown(self, w: Workflow, steps: list[Step], cutoff: dt.datetime) -> None:
        actor = "system:reconciler"
        for st in steps:
            if st.teardown_status != IN_PROGRESS or (st.teardown_start_time and st.teardown_start_time > cutoff):
                continue
            resource = await self.remote.find_resource(st.resource_id)
            if resource is None or (resource.state, resource.status) == ("destroyed", "done"):
                await self.teardown_step_done(st.id, resource.last_job_id if resource else "", actor)
            elif resource.state == "destroy" and resource.status in ("error", "rejected", "unknown"):
                await self.teardown_step_failed(st.id, resource.error_message or f"resource is {resource.status}",
                                                actor)
            elif resource.state in ("provisioned", "provision") and st.waiting_reason:  # its destroy was rejected
                await self.teardown_step_failed(st.id, f"the destroy of resource {resource.id} was not approved",
                                                actor)
            elif resource.state in ("provisioned", "provision") and resource.status not in (
                    "queued", "in_progress", "approval_pending"):  # the destroy (or delete) call was lost
                await self.destroy_step(st.id, w.torn_down_by or actor)
