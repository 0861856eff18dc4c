"""The approval flow end to end with the real resource, approval, executor and
blueprint services: with the flag on nothing is provisioned, updated or
destroyed before an owner approves; rejections stop the operation; a discard
cancels its request; a decision made while the resource service is down is
applied when it returns. Plus the reconciler finishing a resource whose
completion event it never saw."""
from __future__ import annotations

import asyncio

import grpc
import pytest

from infrakitchen.approval.v1 import approval_pb2 as ap
from infrakitchen.events.v1 import events_pb2
from infrakitchen.executor.v1 import executor_pb2 as ep
from infrakitchen.resource.v1 import resource_pb2 as rp
from services.common.auth import Role
from services.common.events import new_event
from tests.support.grpc_asserts import rpc_error
from tests.support.platform import Platform, struct
from tests.support.waiting import eventually

PROVISION, PROVISIONED, DESTROY, DESTROYED = (rp.RESOURCE_STATE_PROVISION, rp.RESOURCE_STATE_PROVISIONED,
                                              rp.RESOURCE_STATE_DESTROY, rp.RESOURCE_STATE_DESTROYED)
READY, DONE, APPROVAL_PENDING, REJECTED = (rp.RESOURCE_STATUS_READY, rp.RESOURCE_STATUS_DONE,
                                           rp.RESOURCE_STATUS_APPROVAL_PENDING, rp.RESOURCE_STATUS_REJECTED)


@pytest.fixture
async def p(tmp_path, event_prefix, nats_url):
    async with Platform(tmp_path, event_prefix, nats_url) as platform:
        await set_flow(platform, True)
        yield platform


async def set_flow(p, enabled: bool) -> None:
    await p.approval.UpdateApprovalFlow(ap.UpdateApprovalFlowRequest(enabled=enabled), metadata=p.admin)

    async def known():
        async with p.inner["resource"].runtime.uow() as uow:
            return await uow.settings.get("approval_flow") == enabled
    await eventually(known, timeout=20)


async def pending_request(p, resource_id: str) -> ap.ApprovalRequest:
    async def found():
        listed = await p.approval.ListApprovalRequests(ap.ListApprovalRequestsRequest(
            resource_id=resource_id, status=ap.APPROVAL_STATUS_PENDING), metadata=p.md)
        return listed.approval_requests[0] if listed.approval_requests else None
    return await eventually(found, timeout=20)


async def jobs_of(p, resource_id: str):
    return (await p.executor.ListJobs(ep.ListJobsRequest(resource_id=resource_id), metadata=p.md)).jobs


async def test_create_waits_for_the_owner_and_runs_when_approved(p):
    net = await p.create("network", "n", variables={"cidr": "10.0.0.0/16"})
    assert (net.state, net.status) == (PROVISION, APPROVAL_PENDING)
    request = await pending_request(p, net.id)
    assert (request.operation, request.requester, list(request.owners)) == \
        (ap.APPROVAL_OPERATION_PROVISION, "alice", ["alice"])
    busy = await rpc_error(p.resource.ProvisionResource(rp.ProvisionResourceRequest(id=net.id), metadata=p.md))
    assert busy.code() == grpc.StatusCode.FAILED_PRECONDITION
    # A writer who does not own it cannot approve; nothing runs meanwhile.
    denied = await rpc_error(p.approval.ApproveRequest(ap.ApproveRequestRequest(id=request.id),
                                                       metadata=p.as_("walt")))
    assert denied.code() == grpc.StatusCode.PERMISSION_DENIED
    await asyncio.sleep(1)
    assert not await jobs_of(p, net.id)
    assert (await p.get(net.id)).status == APPROVAL_PENDING
    await p.approval.ApproveRequest(ap.ApproveRequestRequest(id=request.id), metadata=p.md)
    done = await p.wait(net.id, PROVISIONED, DONE)
    assert done.approval_request_id == request.id and done.outputs


async def test_a_rejected_create_is_rejected_and_can_be_recreated(p):
    net = await p.create("network", "n", variables={"cidr": "10.0.0.0/16"})
    request = await pending_request(p, net.id)
    await p.approval.RejectRequest(ap.RejectRequestRequest(id=request.id, comment="wrong cidr"),
                                   metadata=p.as_("root", Role.ADMIN))
    rejected = await p.wait(net.id, PROVISION, REJECTED)
    assert not await jobs_of(p, net.id) and rejected.approval_request_id == request.id
    again = await p.resource.RecreateResource(rp.RecreateResourceRequest(id=net.id), metadata=p.md)
    assert (again.state, again.status) == (PROVISION, APPROVAL_PENDING)
    assert again.revision == 2, "recreate increments the revision (resource-workflows.md)"
    second = await pending_request(p, net.id)
    assert second.id != request.id
    await p.approval.ApproveRequest(ap.ApproveRequestRequest(id=second.id), metadata=p.md)
    provisioned = await p.wait(net.id, PROVISIONED, DONE)
    assert provisioned.revision == 2


async def approved_network(p, name="n"):
    net = await p.create("network", name, variables={"cidr": "10.0.0.0/16"})
    await p.approval.ApproveRequest(ap.ApproveRequestRequest(id=(await pending_request(p, net.id)).id),
                                    metadata=p.md)
    return await p.wait(net.id, PROVISIONED, DONE)


async def test_an_update_waits_for_approval_of_the_reviewed_plan(p):
    net = await approved_network(p)
    ts = await p.resource.CreateTemporaryState(rp.CreateTemporaryStateRequest(temporary_state=rp.TemporaryState(
        resource_id=net.id, variables=struct(cidr="10.1.0.0/16"))), metadata=p.md)
    ts = await p.resource.DryRunTemporaryState(rp.DryRunTemporaryStateRequest(id=ts.id), metadata=p.md)

    async def planned():
        t = await p.resource.GetTemporaryState(rp.GetTemporaryStateRequest(id=ts.id), metadata=p.md)
        return t.plan_add and t
    await eventually(planned, timeout=60)
    waiting = await p.resource.SubmitTemporaryState(rp.SubmitTemporaryStateRequest(id=ts.id), metadata=p.md)
    assert waiting.status == rp.TEMPORARY_STATE_STATUS_APPROVAL_PENDING
    assert (await p.get(net.id)).status == APPROVAL_PENDING
    request = await pending_request(p, net.id)
    assert (request.operation, request.temporary_state_id, request.plan_job_id, request.plan_add) == \
        (ap.APPROVAL_OPERATION_UPDATE, ts.id, ts.dry_run_job_id, 1)
    applies_before = len([j for j in await jobs_of(p, net.id) if j.action == ep.JOB_ACTION_APPLY])
    await p.approval.ApproveRequest(ap.ApproveRequestRequest(id=request.id), metadata=p.md)
    updated = await p.wait(net.id, PROVISIONED, DONE)
    assert updated.revision == 2 and updated.variables["cidr"] == "10.1.0.0/16"
    applies = [j for j in await jobs_of(p, net.id) if j.action == ep.JOB_ACTION_APPLY]
    assert len(applies) == applies_before + 1 and applies[-1].plan_job_id == ts.dry_run_job_id


async def test_a_rejected_update_and_a_discarded_one(p):
    net = await approved_network(p)
    ts = await p.resource.CreateTemporaryState(rp.CreateTemporaryStateRequest(temporary_state=rp.TemporaryState(
        resource_id=net.id, variables=struct(cidr="10.1.0.0/16"))), metadata=p.md)
    await p.resource.SubmitTemporaryState(rp.SubmitTemporaryStateRequest(id=ts.id), metadata=p.md)
    request = await pending_request(p, net.id)
    await p.approval.RejectRequest(ap.RejectRequestRequest(id=request.id), metadata=p.md)
    back = await p.wait(net.id, PROVISIONED, DONE)
    assert back.revision == 1 and back.variables["cidr"] == "10.0.0.0/16"
    t = await p.resource.GetTemporaryState(rp.GetTemporaryStateRequest(id=ts.id), metadata=p.md)
    assert t.status == rp.TEMPORARY_STATE_STATUS_REJECTED

    other = await p.resource.CreateTemporaryState(rp.CreateTemporaryStateRequest(temporary_state=rp.TemporaryState(
        resource_id=net.id, variables=struct(cidr="10.2.0.0/16"))), metadata=p.md)
    await p.resource.SubmitTemporaryState(rp.SubmitTemporaryStateRequest(id=other.id), metadata=p.md)
    request = await pending_request(p, net.id)
    await p.resource.DiscardTemporaryState(rp.DiscardTemporaryStateRequest(id=other.id), metadata=p.md)

    async def cancelled():
        r = await p.approval.GetApprovalRequest(ap.GetApprovalRequestRequest(id=request.id), metadata=p.md)
        return r.status == ap.APPROVAL_STATUS_CANCELLED
    await eventually(cancelled, timeout=20)
    late = await rpc_error(p.approval.ApproveRequest(ap.ApproveRequestRequest(id=request.id), metadata=p.md))
    assert late.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert (await p.get(net.id)).status == DONE


async def test_destroy_waits_for_approval_and_a_rejection_keeps_the_resource(p):
    net = await approved_network(p)
    waiting = await p.resource.DestroyResource(rp.DestroyResourceRequest(id=net.id), metadata=p.admin)
    assert (waiting.state, waiting.status) == (DESTROY, APPROVAL_PENDING)
    request = await pending_request(p, net.id)
    assert request.operation == ap.APPROVAL_OPERATION_DESTROY
    await p.approval.RejectRequest(ap.RejectRequestRequest(id=request.id), metadata=p.md)
    await p.wait(net.id, PROVISIONED, DONE)
    await p.resource.DestroyResource(rp.DestroyResourceRequest(id=net.id), metadata=p.admin)
    await p.approval.ApproveRequest(ap.ApproveRequestRequest(id=(await pending_request(p, net.id)).id),
                                    metadata=p.md)
    await p.wait(net.id, DESTROYED, DONE)
    # CancelResourceDestroy returns a waiting destroy to provisioned.
    await p.resource.RecreateResource(rp.RecreateResourceRequest(id=net.id), metadata=p.md)
    await p.approval.ApproveRequest(ap.ApproveRequestRequest(id=(await pending_request(p, net.id)).id),
                                    metadata=p.md)
    await p.wait(net.id, PROVISIONED, DONE)
    await p.resource.DestroyResource(rp.DestroyResourceRequest(id=net.id), metadata=p.admin)
    request = await pending_request(p, net.id)
    kept = await p.resource.CancelResourceDestroy(rp.CancelResourceDestroyRequest(id=net.id), metadata=p.admin)
    assert (kept.state, kept.status) == (PROVISIONED, DONE)

    async def cancelled():
        r = await p.approval.GetApprovalRequest(ap.GetApprovalRequestRequest(id=request.id), metadata=p.md)
        return r.status == ap.APPROVAL_STATUS_CANCELLED
    await eventually(cancelled, timeout=20)

    # Destroy again at once; the first request's cancellation arrives late
    # (under load it did): it must not cancel the new request's destroy.
    again = await p.resource.DestroyResource(rp.DestroyResourceRequest(id=net.id), metadata=p.admin)
    assert again.approval_request_id and again.approval_request_id != request.id, "set while pending"
    second = await pending_request(p, net.id)
    assert second.id == again.approval_request_id
    bus = p.inner["approval"].runtime.bus
    late = new_event("approval", "approval_cancelled", events_pb2.ApprovalChanged(
        approval_request_id=request.id, resource_id=net.id, operation=ap.APPROVAL_OPERATION_DESTROY,
        status=ap.APPROVAL_STATUS_CANCELLED))
    await bus.publish(bus.names.subject(late.type), late.SerializeToString(), msg_id=late.event_id)
    await p.approval.ApproveRequest(ap.ApproveRequestRequest(id=second.id), metadata=p.md)
    destroyed = await p.wait(net.id, DESTROYED, DONE)
    assert destroyed.approval_request_id == second.id


async def test_an_approval_made_while_the_resource_service_is_down_is_applied_when_it_returns(p):
    net = await p.create("network", "n", variables={"cidr": "10.0.0.0/16"})
    request = await pending_request(p, net.id)
    await p.inner.stop("resource")
    await p.approval.ApproveRequest(ap.ApproveRequestRequest(id=request.id), metadata=p.md)
    await asyncio.sleep(1)
    assert not await jobs_of(p, net.id)
    await p.restart("resource")
    await p.wait(net.id, PROVISIONED, DONE)
    assert len(await jobs_of(p, net.id)) == 1


async def test_the_reconciler_finishes_a_resource_whose_events_were_lost(tmp_path, event_prefix, nats_url):
    async with Platform(tmp_path, event_prefix, nats_url, {"IK_RESOURCE_RECONCILE_INTERVAL": "1"}) as p:
        for consumer, _ in p.inner["resource"].runtime.consumers:
            if consumer.spec.durable == "resource-job-events":
                consumer.stop()
        net = await p.create("network", "n", variables={"cidr": "10.0.0.0/16"})
        await p.resource.ProvisionResource(rp.ProvisionResourceRequest(id=net.id), metadata=p.md)
        done = await p.wait(net.id, PROVISIONED, DONE)
        trail = await p.resource.ListResourceEvents(rp.ListResourceEventsRequest(resource_id=net.id), metadata=p.md)
        assert "system:reconciler" in {e.actor for e in trail.entries} and done.outputs


async def test_a_job_the_executor_lost_leaves_the_resource_unknown_not_stuck(tmp_path, event_prefix, nats_url):
    from dataclasses import replace
    async with Platform(tmp_path, event_prefix, nats_url, {"IK_RESOURCE_RECONCILE_INTERVAL": "1"}) as p:
        net = await p.provisioned("network", "n", variables={"cidr": "10.0.0.0/16"})
        # As if the executor's database had been replaced: the resource waits
        # for a job nobody knows.
        lifecycle = p.inner["resource"].runtime.lifecycle
        async with p.inner["resource"].runtime.uow() as uow:
            r = await uow.resources.get(net.id)
            await uow.resources.update(replace(r, status="in_progress", last_job_id="lost-job",
                                               pending_operation="update", version=r.version + 1), r.version)
            await uow.commit()
        unknown = await p.wait(net.id, PROVISIONED, rp.RESOURCE_STATUS_UNKNOWN, timeout=30)
        assert "no record of the job" in unknown.error_message
        assert lifecycle is not None
