"""The approval service's reactions to resource events: it keeps who owns
each resource, opens a request when a resource operation waits for approval,
and cancels what a discarded temporary state or a deleted resource leaves
pending."""
from __future__ import annotations

from infrakitchen.resource.v1 import resource_pb2
from services.approval.api.convert import OPERATION
from services.approval.app import approvals
from services.approval.domain.model import ApprovalRequest
from services.common.auth import Principal, Role
from services.common.consumer import ConsumerSpec
from services.common.errors import AlreadyExists
from services.common.events import Envelope, body_of
from services.common.uow import utcnow


async def on_resource_event(uow, env: Envelope) -> None:
    kind, body = body_of(env)
    if kind == "resource_deleted":
        await approvals.cancel_pending(uow, env.actor, "the resource was deleted", resource_id=body.resource_id)
        await uow.owners.forget(body.resource_id)
        return
    if kind == "temporary_state_discarded":
        await approvals.cancel_pending(uow, env.actor, "the temporary state was discarded",
                                       temporary_state_id=body.temporary_state_id)
        return
    if not kind.startswith("resource_"):
        return
    if body.owners and await uow.owners.get(body.resource_id) != list(body.owners):
        await uow.owners.set(body.resource_id, list(body.owners), utcnow())
    if (body.previous_status == resource_pb2.RESOURCE_STATUS_APPROVAL_PENDING
            and body.status != resource_pb2.RESOURCE_STATUS_APPROVAL_PENDING):
        # The operation stopped waiting without a decision (e.g. a destroy was
        # cancelled); a decision leaves nothing pending, so this cancels only
        # what nobody decided.
        await approvals.cancel_pending(uow, env.actor, "the resource no longer waits for this approval",
                                       resource_id=body.resource_id)
    if body.status == resource_pb2.RESOURCE_STATUS_APPROVAL_PENDING and body.awaiting_approval:
        request = ApprovalRequest(
            id="", resource_id=body.resource_id, resource_name=body.name,
            operation=OPERATION[body.awaiting_approval], requester="", revision=body.revision,
            temporary_state_id=body.temporary_state_id, plan_job_id=body.plan_job_id,
            plan_add=body.plan_summary.add, plan_change=body.plan_summary.change,
            plan_destroy=body.plan_summary.destroy, workflow_id=body.workflow_id, owners=list(body.owners))
        try:
            # The requester is whoever asked the resource service for the operation.
            await approvals.create_request(uow, Principal(env.actor or "system", Role.WRITE), request)
        except AlreadyExists:
            pass  # the same operation is already waiting for a decision


def consumers(runtime) -> list[ConsumerSpec]:
    return [ConsumerSpec(durable="approval-resource-events", context="resource", filter_subject="ik.resource.>",
                         handler=on_resource_event)]
