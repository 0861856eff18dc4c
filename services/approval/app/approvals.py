"""Use cases of approvals, one function per command. Each runs in the unit of
work it is given; the caller commits."""
from __future__ import annotations

import uuid
from dataclasses import replace

from services.approval.domain.model import (APPROVED, CANCELLED, OPERATIONS, PENDING, REJECTED, UPDATE,
                                            WORKFLOW_PLAN, ApprovalFlow, ApprovalRequest, Decision, may_cancel,
                                            may_decide)
from services.common.auth import Principal, Role
from services.common.errors import (AlreadyExists, FailedPrecondition, FieldViolation, InvalidArgument, NotFound,
                                    PermissionDenied, PreconditionViolation)
from services.common.paging import by_creation, paginate
from services.common.uow import utcnow

SOURCE = "approval"
_EVENT = {PENDING: "approval_requested", APPROVED: "approval_approved", REJECTED: "approval_rejected",
          CANCELLED: "approval_cancelled"}


async def _emit(uow, r: ApprovalRequest, actor: str, comment: str = "") -> None:
    from services.approval.api.convert import approval_changed  # api owns proto conversion
    from services.common.events import Correlation, new_event
    await uow.emit(new_event(SOURCE, _EVENT[r.status], approval_changed(r, actor if r.status != PENDING else "",
                                                                        comment),
                             actor=actor, correlation=Correlation(
                                 resource_id=r.resource_id, approval_request_id=r.id, workflow_id=r.workflow_id,
                                 temporary_state_id=r.temporary_state_id)))


async def create_request(uow, principal: Principal, r: ApprovalRequest, request_id: str = "") -> ApprovalRequest:
    if (existing := await uow.find_request("CreateApprovalRequest", request_id)) is not None:
        return await get_request(uow, existing)
    if r.operation == WORKFLOW_PLAN:
        return await _create_workflow_plan_request(uow, principal, r, request_id)
    violations = []
    if not r.resource_id:
        violations.append(FieldViolation("approval_request.resource_id", "must not be empty"))
    if r.operation not in OPERATIONS:
        violations.append(FieldViolation("approval_request.operation",
                                         "must be PROVISION, UPDATE, DESTROY or WORKFLOW_PLAN"))
    if r.operation == UPDATE and not r.temporary_state_id:
        violations.append(FieldViolation("approval_request.temporary_state_id",
                                         "an update request names the temporary state under review"))
    if violations:
        raise InvalidArgument("invalid approval request", violations)
    if r.id and await uow.requests.get(r.id) is not None:
        raise AlreadyExists("approval request", r.id)
    pending = await uow.requests.pending_for(resource_id=r.resource_id)
    if pending:
        raise AlreadyExists("approval request", pending[0].id,
                            f"resource {r.resource_id} already has a pending approval request {pending[0].id}")
    owners = await uow.owners.get(r.resource_id)
    now = utcnow()
    r = replace(r, id=r.id or str(uuid.uuid4()), requester=principal.user, status=PENDING, decisions=[],
                owners=owners if owners is not None else [], create_time=now, update_time=now,
                version=1, workflow_plan_id="", step_id="", planned_steps=[])
    await uow.requests.add(r)
    await uow.remember_request("CreateApprovalRequest", request_id, r.id)
    await _emit(uow, r, principal.user)
    return r


async def _create_workflow_plan_request(uow, principal: Principal, r: ApprovalRequest,
                                        request_id: str) -> ApprovalRequest:
    """A workflow's plan (or one step's new plan) under review. Only the
    workflow service opens one, naming who may decide besides admins: a user
    could otherwise name themself and approve their own plan for another."""
    if principal.via != "workflow":
        raise PermissionDenied("approval requests of workflow plans are opened by the workflow service")
    violations = [FieldViolation(f"approval_request.{name}", "must not be empty")
                  for name in ("workflow_id", "workflow_plan_id") if not getattr(r, name)]
    if r.resource_id or r.temporary_state_id:
        violations.append(FieldViolation("approval_request.resource_id",
                                         "a workflow plan's request names no resource or temporary state"))
    if not r.planned_steps:
        violations.append(FieldViolation("approval_request.planned_steps", "must list the steps' plans"))
    if violations:
        raise InvalidArgument("invalid approval request", violations)
    if r.id and await uow.requests.get(r.id) is not None:
        raise AlreadyExists("approval request", r.id)
    for pending in await uow.requests.pending_for(workflow_id=r.workflow_id):
        if pending.step_id == r.step_id:
            raise AlreadyExists("approval request", pending.id,
                                f"workflow {r.workflow_id} already has a pending plan approval {pending.id}")
    now = utcnow()
    r = replace(r, id=r.id or str(uuid.uuid4()), requester=principal.user, status=PENDING, decisions=[],
                owners=sorted(set(r.owners)), create_time=now, update_time=now, version=1)
    await uow.requests.add(r)
    await uow.remember_request("CreateApprovalRequest", request_id, r.id)
    await _emit(uow, r, principal.user)
    return r


async def get_request(uow, id_: str) -> ApprovalRequest:
    r = await uow.requests.get(id_) if id_ else None
    if r is None:
        raise NotFound("approval request", id_)
    return r


async def list_requests(uow, principal: Principal, page_size: int, page_token: str, resource_id: str = "",
                        status: str = "", awaiting_my_decision: bool = False):
    if awaiting_my_decision:
        decider = (principal.user, principal.role >= Role.ADMIN)
        return await paginate(lambda a, n: uow.requests.list(a, n, resource_id, PENDING, decider),
                              page_size, page_token, {"list": "approval_requests", "resource_id": resource_id,
                                                      "awaiting": decider}, by_creation)
    return await paginate(lambda a, n: uow.requests.list(a, n, resource_id, status), page_size, page_token,
                          {"list": "approval_requests", "resource_id": resource_id, "status": status}, by_creation)


async def _current_owners(uow, r: ApprovalRequest) -> list[str]:
    """Owners now (the projection follows owners added or removed later); the
    request's snapshot if the resource service never told us about it."""
    if r.operation == WORKFLOW_PLAN:  # named by the workflow service when it asked
        return r.owners
    owners = await uow.owners.get(r.resource_id)
    return owners if owners is not None else r.owners


def _must_be_pending(r: ApprovalRequest) -> None:
    if not r.pending:
        raise FailedPrecondition(f"approval request {r.id} is already {r.status}", [PreconditionViolation(
            f"REQUEST_{r.status.upper()}", f"approval_requests/{r.id}", f"the request is {r.status}, not pending")])


async def decide(uow, principal: Principal, id_: str, outcome: str, comment: str = "") -> ApprovalRequest:
    r = await get_request(uow, id_)
    _must_be_pending(r)
    owners = await _current_owners(uow, r)
    if not may_decide(principal.user, principal.role >= Role.ADMIN, owners):
        subject = f"the plan of workflow {r.workflow_id}" if r.operation == WORKFLOW_PLAN else \
            f"resource {r.resource_id}"
        raise PermissionDenied(f"only an owner of {subject} or an admin may "
                               f"{'approve' if outcome == APPROVED else 'reject'} this request")
    return await _close(uow, principal, r, outcome, comment)


async def cancel(uow, principal: Principal, id_: str, comment: str = "") -> ApprovalRequest:
    r = await get_request(uow, id_)
    _must_be_pending(r)
    owners = await _current_owners(uow, r)
    if not may_cancel(principal.user, principal.role >= Role.ADMIN, owners, r.requester):
        raise PermissionDenied("only the requester, an owner or an admin may cancel this request")
    return await _close(uow, principal, r, CANCELLED, comment)


async def _close(uow, principal: Principal, r: ApprovalRequest, outcome: str, comment: str) -> ApprovalRequest:
    now = utcnow()
    closed = replace(r, status=outcome, decisions=[*r.decisions, Decision(principal.user, outcome, comment, now)],
                     update_time=now, version=r.version + 1)
    await uow.requests.update(closed, r.version)
    await _emit(uow, closed, principal.user, comment)
    return closed


async def cancel_pending(uow, actor: str, reason: str, resource_id: str = "", temporary_state_id: str = "",
                         workflow_id: str = "") -> int:
    """What a discarded temporary state, a deleted resource or a workflow's
    newer plan leaves behind."""
    count = 0
    for r in await uow.requests.pending_for(resource_id, temporary_state_id, workflow_id):
        await _close(uow, Principal(actor or "system", Role.ADMIN), r, CANCELLED, reason)
        count += 1
    return count


async def get_flow(uow) -> ApprovalFlow:
    return await uow.flow.get()


async def set_flow(uow, principal: Principal, enabled: bool) -> ApprovalFlow:
    from infrakitchen.events.v1 import events_pb2
    from services.common.events import new_event
    current = await uow.flow.get()
    if current.update_time is not None and current.enabled == enabled:
        return current
    flow = ApprovalFlow(enabled, principal.user, utcnow())
    await uow.flow.set(flow)
    await uow.emit(new_event(SOURCE, "approval_flow_changed",
                             events_pb2.ApprovalFlowChanged(enabled=enabled, updated_by=principal.user),
                             actor=principal.user))
    return flow
