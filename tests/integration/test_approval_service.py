"""ApprovalService through gRPC with real NATS, on SQLite and PostgreSQL: the
role table, approve/reject for provision, update and destroy, cancellation,
double decisions, listings, the approval flow flag, and the reactions to
resource events (owners, requests opened by a pending operation, discards)."""
from __future__ import annotations

import asyncio
import uuid

import grpc
import pytest

from infrakitchen.approval.v1 import approval_pb2 as pb
from infrakitchen.approval.v1 import approval_pb2_grpc
from infrakitchen.events.v1 import events_pb2
from infrakitchen.resource.v1 import resource_pb2
from services.approval.__main__ import DEFINITION
from services.common.auth import Role
from services.common.events import Correlation, new_event
from tests.support.events import publish_as, read_events
from tests.support.grpc_asserts import field_violations, precondition_violations, rpc_error
from tests.support.inprocess import InProcessService
from tests.support.waiting import eventually

PROVISION, UPDATE, DESTROY = (pb.APPROVAL_OPERATION_PROVISION, pb.APPROVAL_OPERATION_UPDATE,
                              pb.APPROVAL_OPERATION_DESTROY)


@pytest.fixture
async def svc(database_url, event_prefix, nats_url, tmp_path):
    async with InProcessService(DEFINITION, database_url, event_prefix, nats_url, tmp_path / "data") as s:
        s.stub = approval_pb2_grpc.ApprovalServiceStub(s.channel)
        s.as_ = lambda user, role=Role.WRITE: s.metadata(role, user)
        yield s


async def publish_resource_event(svc, field: str, body, actor: str = "carol") -> str:
    """What the resource service publishes; the approval service consumes it."""
    env = new_event("resource", field, body, actor=actor, correlation=Correlation(resource_id=body.resource_id))
    await publish_as("resource", svc.runtime, env)
    return env.event_id


async def owned_resource(svc, owners=("olivia",)) -> str:
    resource_id = f"res-{uuid.uuid4().hex[:8]}"
    await publish_resource_event(svc, "resource_created", events_pb2.ResourceChanged(
        resource_id=resource_id, name="vpc", owners=list(owners), state=resource_pb2.RESOURCE_STATE_PROVISION,
        status=resource_pb2.RESOURCE_STATUS_READY))

    async def known():
        async with svc.runtime.uow() as uow:
            return await uow.owners.get(resource_id) == list(owners)
    await eventually(known)
    return resource_id


async def request(svc, resource_id, operation=PROVISION, user="wendy", **kw) -> pb.ApprovalRequest:
    return await svc.stub.CreateApprovalRequest(pb.CreateApprovalRequestRequest(approval_request=pb.ApprovalRequest(
        resource_id=resource_id, resource_name="vpc", operation=operation, revision=1, **kw)),
        metadata=svc.as_(user))


# --- the role table ---------------------------------------------------------------

async def test_role_table(svc):
    resource_id = await owned_resource(svc, owners=["olivia"])
    # Write may request; read may not.
    denied = await rpc_error(svc.stub.CreateApprovalRequest(
        pb.CreateApprovalRequestRequest(approval_request=pb.ApprovalRequest(resource_id=resource_id,
                                                                            operation=PROVISION)),
        metadata=svc.as_("rita", Role.READ)))
    assert denied.code() == grpc.StatusCode.PERMISSION_DENIED
    r = await request(svc, resource_id, user="wendy")
    assert (r.requester, list(r.owners), r.status) == ("wendy", ["olivia"], pb.APPROVAL_STATUS_PENDING)
    # Read may view.
    seen = await svc.stub.GetApprovalRequest(pb.GetApprovalRequestRequest(id=r.id), metadata=svc.as_("rita", Role.READ))
    assert seen.id == r.id
    # The requester (write, not an owner) cannot approve or reject, not even their own request.
    for call in (svc.stub.ApproveRequest, svc.stub.RejectRequest):
        err = await rpc_error(call(pb.ApproveRequestRequest(id=r.id) if call == svc.stub.ApproveRequest
                                   else pb.RejectRequestRequest(id=r.id), metadata=svc.as_("wendy")))
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    # Another writer neither, nor a reader who owns nothing.
    assert (await rpc_error(svc.stub.ApproveRequest(pb.ApproveRequestRequest(id=r.id), metadata=svc.as_("walt")))
            ).code() == grpc.StatusCode.PERMISSION_DENIED
    assert (await rpc_error(svc.stub.ApproveRequest(pb.ApproveRequestRequest(id=r.id),
                                                    metadata=svc.as_("rita", Role.READ)))
            ).code() == grpc.StatusCode.PERMISSION_DENIED
    unchanged = await svc.stub.GetApprovalRequest(pb.GetApprovalRequestRequest(id=r.id), metadata=svc.as_("wendy"))
    assert unchanged.status == pb.APPROVAL_STATUS_PENDING and not unchanged.decisions
    # The owner approves: ownership counts, not the platform role (olivia only reads).
    approved = await svc.stub.ApproveRequest(pb.ApproveRequestRequest(id=r.id, comment="lgtm"),
                                             metadata=svc.as_("olivia", Role.READ))
    assert approved.status == pb.APPROVAL_STATUS_APPROVED
    assert [(d.user, d.outcome, d.comment) for d in approved.decisions] == \
        [("olivia", pb.DECISION_OUTCOME_APPROVED, "lgtm")]
    # An admin who owns nothing decides too.
    second = await request(svc, resource_id, DESTROY)
    rejected = await svc.stub.RejectRequest(pb.RejectRequestRequest(id=second.id, comment="not now"),
                                            metadata=svc.as_("root", Role.ADMIN))
    assert rejected.status == pb.APPROVAL_STATUS_REJECTED


async def test_an_owner_who_requests_may_approve_and_owners_added_later_count(svc):
    resource_id = await owned_resource(svc, owners=["olivia"])
    own = await request(svc, resource_id, user="olivia")
    assert (await svc.stub.ApproveRequest(pb.ApproveRequestRequest(id=own.id), metadata=svc.as_("olivia"))
            ).status == pb.APPROVAL_STATUS_APPROVED
    r = await request(svc, resource_id, DESTROY)
    await publish_resource_event(svc, "resource_updated", events_pb2.ResourceChanged(
        resource_id=resource_id, name="vpc", owners=["olivia", "oscar"]))

    async def oscar_owns():
        async with svc.runtime.uow() as uow:
            return "oscar" in (await uow.owners.get(resource_id))
    await eventually(oscar_owns)
    assert (await svc.stub.ApproveRequest(pb.ApproveRequestRequest(id=r.id), metadata=svc.as_("oscar"))
            ).status == pb.APPROVAL_STATUS_APPROVED


# --- decisions on every operation, events ----------------------------------------------

@pytest.mark.parametrize("operation", [PROVISION, UPDATE, DESTROY])
@pytest.mark.parametrize("outcome", ["approve", "reject"])
async def test_approve_and_reject_each_operation_emit_events(svc, operation, outcome):
    resource_id = await owned_resource(svc)
    extra = {"temporary_state_id": "ts-1", "plan_job_id": "job-9", "plan_add": 1} if operation == UPDATE else {}
    r = await request(svc, resource_id, operation, **extra)
    if outcome == "approve":
        done = await svc.stub.ApproveRequest(pb.ApproveRequestRequest(id=r.id), metadata=svc.as_("olivia"))
    else:
        done = await svc.stub.RejectRequest(pb.RejectRequestRequest(id=r.id, comment="no"), metadata=svc.as_("olivia"))
    expected = pb.APPROVAL_STATUS_APPROVED if outcome == "approve" else pb.APPROVAL_STATUS_REJECTED
    assert done.status == expected
    envs = await read_events(svc.runtime.bus, "approval", 2, subject="ik.approval.request.>")
    assert [e.type for e in envs] == ["ik.approval.request.created",
                                      "ik.approval.request.approved" if outcome == "approve"
                                      else "ik.approval.request.rejected"]
    decided = envs[1].approval_approved if outcome == "approve" else envs[1].approval_rejected
    assert (decided.approval_request_id, decided.resource_id, decided.operation, decided.decided_by) == \
        (r.id, resource_id, operation, "olivia")
    assert envs[1].correlation.approval_request_id == r.id and envs[1].correlation.resource_id == resource_id
    if operation == UPDATE:
        assert decided.temporary_state_id == "ts-1" and decided.plan_job_id == "job-9"
        assert envs[1].correlation.temporary_state_id == "ts-1"


async def test_deciding_twice_or_a_cancelled_request_changes_nothing(svc):
    resource_id = await owned_resource(svc)
    r = await request(svc, resource_id)
    await svc.stub.ApproveRequest(pb.ApproveRequestRequest(id=r.id), metadata=svc.as_("olivia"))
    again = await rpc_error(svc.stub.RejectRequest(pb.RejectRequestRequest(id=r.id), metadata=svc.as_("olivia")))
    assert again.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert precondition_violations(again)[0][0] == "REQUEST_APPROVED"
    cancelled = await request(svc, resource_id, DESTROY)
    withdrawn = await svc.stub.CancelApprovalRequest(pb.CancelApprovalRequestRequest(id=cancelled.id, comment="oops"),
                                                     metadata=svc.as_("wendy"))
    assert withdrawn.status == pb.APPROVAL_STATUS_CANCELLED
    late = await rpc_error(svc.stub.ApproveRequest(pb.ApproveRequestRequest(id=cancelled.id),
                                                   metadata=svc.as_("olivia")))
    assert late.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert precondition_violations(late)[0][0] == "REQUEST_CANCELLED"
    final = await svc.stub.GetApprovalRequest(pb.GetApprovalRequestRequest(id=r.id), metadata=svc.as_("wendy"))
    assert len(final.decisions) == 1 and final.status == pb.APPROVAL_STATUS_APPROVED
    stranger = await request(svc, resource_id, DESTROY)
    denied = await rpc_error(svc.stub.CancelApprovalRequest(pb.CancelApprovalRequestRequest(id=stranger.id),
                                                            metadata=svc.as_("walt")))
    assert denied.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_bad_requests_and_one_pending_request_per_resource(svc):
    err = await rpc_error(svc.stub.CreateApprovalRequest(pb.CreateApprovalRequestRequest(
        approval_request=pb.ApprovalRequest(operation=UPDATE)), metadata=svc.as_("wendy")))
    assert set(field_violations(err)) == {"approval_request.resource_id", "approval_request.temporary_state_id"}
    resource_id = await owned_resource(svc)
    first = await request(svc, resource_id)
    dup = await rpc_error(request(svc, resource_id, DESTROY))
    assert dup.code() == grpc.StatusCode.ALREADY_EXISTS and first.id in dup.details()
    missing = await rpc_error(svc.stub.ApproveRequest(pb.ApproveRequestRequest(id="nope"), metadata=svc.as_("olivia")))
    assert missing.code() == grpc.StatusCode.NOT_FOUND


# --- listings ---------------------------------------------------------------------

async def test_listing_mine_by_resource_by_status_with_pages(svc):
    mine = await owned_resource(svc, owners=["olivia"])
    theirs = await owned_resource(svc, owners=["oscar"])
    a = await request(svc, mine)
    b = await request(svc, theirs)
    awaiting = await svc.stub.ListApprovalRequests(pb.ListApprovalRequestsRequest(awaiting_my_decision=True),
                                                   metadata=svc.as_("olivia"))
    assert [r.id for r in awaiting.approval_requests] == [a.id]
    admin = await svc.stub.ListApprovalRequests(pb.ListApprovalRequestsRequest(awaiting_my_decision=True),
                                                metadata=svc.as_("root", Role.ADMIN))
    assert [r.id for r in admin.approval_requests] == [a.id, b.id]
    await svc.stub.ApproveRequest(pb.ApproveRequestRequest(id=a.id), metadata=svc.as_("olivia"))
    assert not (await svc.stub.ListApprovalRequests(pb.ListApprovalRequestsRequest(awaiting_my_decision=True),
                                                    metadata=svc.as_("olivia"))).approval_requests
    by_resource = await svc.stub.ListApprovalRequests(pb.ListApprovalRequestsRequest(resource_id=theirs),
                                                      metadata=svc.as_("rita", Role.READ))
    assert [r.id for r in by_resource.approval_requests] == [b.id]
    approved = await svc.stub.ListApprovalRequests(pb.ListApprovalRequestsRequest(status=pb.APPROVAL_STATUS_APPROVED),
                                                   metadata=svc.as_("rita", Role.READ))
    assert [r.id for r in approved.approval_requests] == [a.id]
    page1 = await svc.stub.ListApprovalRequests(pb.ListApprovalRequestsRequest(page_size=1),
                                                metadata=svc.as_("rita", Role.READ))
    page2 = await svc.stub.ListApprovalRequests(pb.ListApprovalRequestsRequest(page_size=1,
                                                                               page_token=page1.next_page_token),
                                                metadata=svc.as_("rita", Role.READ))
    assert [r.id for r in [*page1.approval_requests, *page2.approval_requests]] == [a.id, b.id]
    assert not page2.next_page_token


# --- the flag ---------------------------------------------------------------------

async def test_the_approval_flow_flag(svc):
    flow = await svc.stub.GetApprovalFlow(pb.GetApprovalFlowRequest(), metadata=svc.as_("rita", Role.READ))
    assert not flow.enabled
    denied = await rpc_error(svc.stub.UpdateApprovalFlow(pb.UpdateApprovalFlowRequest(enabled=True),
                                                         metadata=svc.as_("wendy")))
    assert denied.code() == grpc.StatusCode.PERMISSION_DENIED
    on = await svc.stub.UpdateApprovalFlow(pb.UpdateApprovalFlowRequest(enabled=True),
                                           metadata=svc.as_("root", Role.ADMIN))
    assert on.enabled and on.updated_by == "root"
    again = await svc.stub.UpdateApprovalFlow(pb.UpdateApprovalFlowRequest(enabled=True),
                                              metadata=svc.as_("admin2", Role.ADMIN))
    assert again.updated_by == "root"  # no change, no event
    await svc.stub.UpdateApprovalFlow(pb.UpdateApprovalFlowRequest(enabled=False),
                                      metadata=svc.as_("root", Role.ADMIN))
    envs = await read_events(svc.runtime.bus, "approval", 3, subject="ik.approval.flow.changed", timeout=5)
    assert [e.approval_flow_changed.enabled for e in envs] == [True, False]


# --- reactions to resource events -----------------------------------------------------

async def test_a_resource_waiting_for_approval_opens_one_request_and_a_discard_cancels_it(svc):
    resource_id = await owned_resource(svc, owners=["olivia"])
    pending = events_pb2.ResourceChanged(
        resource_id=resource_id, name="vpc", owners=["olivia"], revision=2,
        state=resource_pb2.RESOURCE_STATE_PROVISIONED, status=resource_pb2.RESOURCE_STATUS_APPROVAL_PENDING,
        awaiting_approval=UPDATE, temporary_state_id="ts-7", plan_job_id="job-7")
    pending.plan_summary.add, pending.plan_summary.change = 1, 2
    env = new_event("resource", "resource_status_changed", pending, actor="wendy",
                    correlation=Correlation(resource_id=resource_id))
    # Delivered twice (a redelivery after a crash): one request.
    await publish_as("resource", svc.runtime, env)
    await publish_as("resource", svc.runtime, env, msg_id=env.event_id + "-again")

    async def opened():
        return (await svc.stub.ListApprovalRequests(pb.ListApprovalRequestsRequest(resource_id=resource_id),
                                                    metadata=svc.as_("olivia"))).approval_requests
    found = await eventually(opened)
    r = found[0]
    await asyncio.sleep(1)  # the second delivery has been handled by now
    assert len(await opened()) == 1
    assert (r.operation, r.requester, r.temporary_state_id, r.plan_job_id, r.plan_add, r.plan_change, r.revision) == \
        (UPDATE, "wendy", "ts-7", "job-7", 1, 2, 2)
    await publish_resource_event(svc, "temporary_state_discarded", events_pb2.TemporaryStateChanged(
        temporary_state_id="ts-7", resource_id=resource_id), actor="wendy")

    async def cancelled():
        got = await svc.stub.GetApprovalRequest(pb.GetApprovalRequestRequest(id=r.id), metadata=svc.as_("olivia"))
        return got.status == pb.APPROVAL_STATUS_CANCELLED and got
    got = await eventually(cancelled)
    assert got.decisions[0].comment == "the temporary state was discarded"
