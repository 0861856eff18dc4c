"""A workflow step's reviewed plan: provisioning applies exactly the saved
plan of the step's plan job, and an approved workflow plan stands in for the
resource's own provision approval. Everything is checked here, not taken on
the workflow service's word alone: the plan job must be the step's, and the
approval must cover it."""
from __future__ import annotations

from dataclasses import dataclass

from infrakitchen.approval.v1 import approval_pb2 as ap
from infrakitchen.executor.v1 import executor_pb2 as ep
from services.common.auth import Principal
from services.common.errors import FailedPrecondition, PermissionDenied, PreconditionViolation
from services.resource.domain.model import Resource
from services.resource.app.base import LifecycleBase


@dataclass(frozen=True)
class ReviewedPlan:
    plan_job_id: str
    approval_request_id: str = ""


def _refused(plan: ReviewedPlan, code: str, why: str) -> FailedPrecondition:
    return FailedPrecondition(f"the reviewed plan {plan.plan_job_id} cannot be applied: {why}",
                              [PreconditionViolation(code, f"jobs/{plan.plan_job_id}", why)])


class ReviewedPlans(LifecycleBase):
    async def check_reviewed_plan(self, uow, principal: Principal, r: Resource, plan: ReviewedPlan) -> bool:
        """Raises unless the plan may be applied now: it is the step's, and
        the approval flow is off (False) or an approved workflow plan covers
        it (True), standing in for the resource's own provision approval."""
        if principal.via != "workflow":
            raise PermissionDenied("only the workflow service applies a reviewed step plan")
        job = await self.remote.job_detail(plan.plan_job_id)
        c = job.correlation if job is not None else None
        if job is None or job.action != ep.JOB_ACTION_PLAN or c.workflow_id != r.workflow_id or c.step_id != r.step_id:
            raise _refused(plan, "PLAN_OF_OTHER_STEP", "it is not a plan job of this resource's workflow step")
        if job.status != ep.JOB_STATUS_SUCCEEDED:
            raise _refused(plan, "PLAN_NOT_SUCCEEDED", "the plan job did not succeed")
        if job.state_path != r.storage_path or job.storage_id != r.storage_id:
            raise _refused(plan, "PLAN_OF_OTHER_STATE", "the plan was made for another storage or state path")
        if not await self.approval_flow_on(uow):
            return False
        if not plan.approval_request_id:
            raise _refused(plan, "PLAN_NOT_APPROVED", "the approval flow is on and no approval of the plan is named")
        request = await self.remote.approval_request(plan.approval_request_id)
        if request is None or (request.operation != ap.APPROVAL_OPERATION_WORKFLOW_PLAN
                                   or request.workflow_id != r.workflow_id
                                   or request.status != ap.APPROVAL_STATUS_APPROVED):
            raise _refused(plan, "PLAN_NOT_APPROVED", "the named approval is not an approved plan of this workflow")
        listed = {s.plan_job_id for s in request.planned_steps if s.plan_job_id}
        deferred = {s.step_id for s in request.planned_steps if s.status == "deferred"}
        only_creates = all(list(rc.actions) == ["create"] for rc in job.plan_summary.resource_changes)
        if plan.plan_job_id in listed or (r.step_id in deferred and only_creates):
            return True
        raise _refused(plan, "PLAN_NOT_APPROVED", "the approval does not cover this plan")
