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


class KnownOwners:
    """The owners this consumer last stored per resource, so that the many
    resource events that change neither owners nor approvals are acked
    without a transaction (handling them would change nothing)."""

    LIMIT = 10_000

    def __init__(self) -> None:
        self._owners: dict[str, tuple[str, ...]] = {}

    def remember(self, resource_id: str, owners: tuple[str, ...]) -> None:
        if len(self._owners) >= self.LIMIT:
            self._owners.clear()
        self._owners[resource_id] = owners

    def forget(self, resource_id: str) -> None:
        self._owners.pop(resource_id, None)

    def wants(self, env: Envelope) -> bool:
        kind = env.WhichOneof("body")
        if kind not in _PLAIN_CHANGES:
            return True
        body = getattr(env, kind)
        if resource_pb2.RESOURCE_STATUS_APPROVAL_PENDING in (body.status, body.previous_status):
            return True
        return self._owners.get(body.resource_id) != tuple(body.owners)


_PLAIN_CHANGES = ("resource_created", "resource_status_changed", "resource_provisioned", "resource_updated",
                  "resource_destroyed", "resource_failed")


async def on_resource_event(uow, env: Envelope, known: KnownOwners | None = None) -> None:
    kind, body = body_of(env)
    if kind == "resource_deleted":
        await approvals.cancel_pending(uow, env.actor, "the resource was deleted", resource_id=body.resource_id)
        await uow.owners.forget(body.resource_id)
        if known is not None:
            known.forget(body.resource_id)
        return
    if kind == "temporary_state_discarded":
        await approvals.cancel_pending(uow, env.actor, "the temporary state was discarded",
                                       temporary_state_id=body.temporary_state_id)
        return
    if not kind.startswith("resource_"):
        return
    if body.owners and await uow.owners.get(body.resource_id) != list(body.owners):
        await uow.owners.set(body.resource_id, list(body.owners), utcnow())
    if body.owners and known is not None:
        owners = tuple(body.owners)

        async def remember() -> None:
            known.remember(body.resource_id, owners)
        uow.after_commit(remember)
    if (body.previous_status == resource_pb2.RESOURCE_STATUS_APPROVAL_PENDING
            and body.status != resource_pb2.RESOURCE_STATUS_APPROVAL_PENDING):
        # The operation stopped waiting without a decision (e.g. a destroy was
        # cancelled); a decision leaves nothing pending, so this cancels only
        # what nobody decided.
        await approvals.cancel_pending(uow, env.actor, "the resource no longer waits for this approval",
                                       resource_id=body.resource_id)
    if body.status == resource_pb2.RESOURCE_STATUS_APPROVAL_PENDING and body.awaiting_approval:
        request = ApprovalRequest(
            # The resource service named the request it waits for.
            id=env.correlation.approval_request_id, resource_id=body.resource_id, resource_name=body.name,
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
    known = KnownOwners()

    async def handle(uow, env: Envelope) -> None:
        await on_resource_event(uow, env, known)
    return [ConsumerSpec(durable="approval-resource-events", context="resource", filter_subject="ik.resource.>",
                         handler=handle, wants=known.wants)]
