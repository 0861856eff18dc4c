"""proto <-> approval domain."""
from __future__ import annotations

from infrakitchen.approval.v1 import approval_pb2 as pb
from infrakitchen.events.v1 import events_pb2
from services.approval.domain.model import (APPROVED, CANCELLED, DESTROY, PENDING, PROVISION, REJECTED, UPDATE,
                                            WORKFLOW_PLAN, ApprovalFlow, ApprovalRequest)
from services.common.values import to_timestamp

OPERATION = {pb.APPROVAL_OPERATION_PROVISION: PROVISION, pb.APPROVAL_OPERATION_UPDATE: UPDATE,
             pb.APPROVAL_OPERATION_DESTROY: DESTROY, pb.APPROVAL_OPERATION_WORKFLOW_PLAN: WORKFLOW_PLAN}
_STEP_FIELDS = ("step_id", "template_name", "status", "plan_job_id", "add", "change", "destroy")
OPERATION_PB = {v: k for k, v in OPERATION.items()}
STATUS = {pb.APPROVAL_STATUS_PENDING: PENDING, pb.APPROVAL_STATUS_APPROVED: APPROVED,
          pb.APPROVAL_STATUS_REJECTED: REJECTED, pb.APPROVAL_STATUS_CANCELLED: CANCELLED}
STATUS_PB = {v: k for k, v in STATUS.items()}
OUTCOME_PB = {APPROVED: pb.DECISION_OUTCOME_APPROVED, REJECTED: pb.DECISION_OUTCOME_REJECTED,
              CANCELLED: pb.DECISION_OUTCOME_CANCELLED}


def request_from_pb(r: pb.ApprovalRequest) -> ApprovalRequest:
    # Only a workflow plan's request comes with its id (chosen by the workflow
    # service, which waits for exactly that request; checked in create_request).
    return ApprovalRequest(id=r.id if r.operation == pb.APPROVAL_OPERATION_WORKFLOW_PLAN else "",
                           resource_id=r.resource_id, resource_name=r.resource_name,
                           operation=OPERATION.get(r.operation, ""), requester="", revision=r.revision,
                           temporary_state_id=r.temporary_state_id, plan_job_id=r.plan_job_id, plan_add=r.plan_add,
                           plan_change=r.plan_change, plan_destroy=r.plan_destroy, workflow_id=r.workflow_id,
                           owners=list(r.owners), workflow_plan_id=r.workflow_plan_id, step_id=r.step_id,
                           planned_steps=[{**{f: getattr(s, f) for f in _STEP_FIELDS}, "changes": list(s.changes)}
                                          for s in r.planned_steps])


def request_to_pb(r: ApprovalRequest) -> pb.ApprovalRequest:
    return pb.ApprovalRequest(
        id=r.id, resource_id=r.resource_id, resource_name=r.resource_name, operation=OPERATION_PB[r.operation],
        requester=r.requester, revision=r.revision, temporary_state_id=r.temporary_state_id,
        plan_job_id=r.plan_job_id, plan_add=r.plan_add, plan_change=r.plan_change, plan_destroy=r.plan_destroy,
        status=STATUS_PB[r.status], owners=r.owners, workflow_id=r.workflow_id,
        decisions=[pb.Decision(user=d.user, outcome=OUTCOME_PB[d.outcome], comment=d.comment,
                               time=to_timestamp(d.time)) for d in r.decisions],
        create_time=to_timestamp(r.create_time), update_time=to_timestamp(r.update_time), etag=r.etag,
        workflow_plan_id=r.workflow_plan_id, step_id=r.step_id,
        planned_steps=[pb.PlannedStep(**s) for s in r.planned_steps])


def approval_changed(r: ApprovalRequest, decided_by: str = "", comment: str = "") -> events_pb2.ApprovalChanged:
    return events_pb2.ApprovalChanged(
        approval_request_id=r.id, resource_id=r.resource_id, operation=OPERATION_PB[r.operation],
        status=STATUS_PB[r.status], temporary_state_id=r.temporary_state_id, revision=r.revision,
        plan_job_id=r.plan_job_id, decided_by=decided_by, comment=comment, owners=r.owners,
        workflow_id=r.workflow_id, workflow_plan_id=r.workflow_plan_id, step_id=r.step_id)


def flow_to_pb(f: ApprovalFlow) -> pb.ApprovalFlow:
    return pb.ApprovalFlow(enabled=f.enabled, updated_by=f.updated_by, update_time=to_timestamp(f.update_time))
