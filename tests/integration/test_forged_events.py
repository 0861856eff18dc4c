"""Forged events change nothing (issue 28: signed events, and the defence
behind them). With the real five services and terraform, a NATS client that
is not the subject's owner (an anonymous one, another service's identity, one
with the right name but its own key) and one holding the owner's leaked key
publish what module code once could: "job succeeded" for a running apply with
outputs of its choice, "approval approved" for a request that waits for its
owner, and "approval flow off". The first three are rejected unread (bad
signatures); the leaked key's are signed right but not confirmed by the
executor or the approval service. Each is counted by every consumer that acts
on such an event (one that ignores it acks it unread); the resources go on as
the real events say."""
from __future__ import annotations

import asyncio

from infrakitchen.approval.v1 import approval_pb2 as ap
from infrakitchen.events.v1 import events_pb2
from infrakitchen.executor.v1 import executor_pb2 as ep
from infrakitchen.resource.v1 import resource_pb2 as rp
from services.common import metrics
from services.common.bus import EventBus
from services.common.events import Correlation, new_event
from services.common.identities import ServiceIdentity
from services.common.signing import EventSigner
from services.common.values import to_value
from tests.support.platform import Platform
from tests.support.waiting import eventually

PROVISION, PROVISIONED = rp.RESOURCE_STATE_PROVISION, rp.RESOURCE_STATE_PROVISIONED
IN_PROGRESS, DONE, APPROVAL_PENDING = (rp.RESOURCE_STATUS_IN_PROGRESS, rp.RESOURCE_STATUS_DONE,
                                       rp.RESOURCE_STATUS_APPROVAL_PENDING)


def rejected(consumer: str, reason: str) -> float:
    return metrics.EVENTS_REJECTED.labels(consumer, reason)._value.get()


async def forgers(p: Platform, owner: str, tmp_path) -> list[tuple[EventBus, str]]:
    """Clients publishing on `owner`'s subjects without being it, and the
    reason each is refused for."""
    runtime = p.inner["resource"].runtime
    other = "resource" if owner != "resource" else "approval"
    buses = [
        (EventBus(runtime.bus.nats_url, runtime.bus.names.prefix), "unsigned"),
        (EventBus(runtime.bus.nats_url, runtime.bus.names.prefix, signer=EventSigner(ServiceIdentity.from_settings(
            other, runtime.settings.env, runtime.settings.data_dir))), "wrong_signer"),
        (EventBus(runtime.bus.nats_url, runtime.bus.names.prefix, signer=EventSigner(ServiceIdentity.from_settings(
            owner, {}, tmp_path / f"impostor-{owner}"))), "bad_signature"),
        # The owner's own key, leaked: signed right, but the owner does not report it so.
        (EventBus(runtime.bus.nats_url, runtime.bus.names.prefix, signer=EventSigner(ServiceIdentity.from_settings(
            owner, runtime.settings.env, runtime.settings.data_dir))), "unconfirmed"),
    ]
    for bus, _ in buses:
        await bus.connect(attempts=3)
    return buses


async def publish_all(buses, env: events_pb2.Envelope) -> None:
    for bus, _ in buses:
        copy = events_pb2.Envelope()
        copy.CopyFrom(env)
        copy.event_id = f"{env.event_id}-{id(bus)}"
        await bus.publish(bus.names.subject(env.type), copy.SerializeToString(), msg_id=copy.event_id)


async def test_forged_job_approval_and_flow_events_change_nothing(tmp_path, event_prefix, nats_url):
    async with Platform(tmp_path, event_prefix, nats_url) as p:
        team, region = await p.base()
        net = await p.provisioned("network", "n", parents=[team.id, region.id], variables={"cidr": "10.0.0.0/16"})
        gate = p.shared / "open"
        gate.write_text("")
        # A running apply, and a forged "job succeeded" for it with outputs of the forger's choice.
        slow = await p.create("gated", "slow", parents=[net.id], variables={"gate": str(gate), "seconds": 6})
        await p.resource.ProvisionResource(rp.ProvisionResourceRequest(id=slow.id), metadata=p.md)
        running = await p.wait(slow.id, PROVISION, IN_PROGRESS, timeout=60)
        job_forgers = await forgers(p, "executor", tmp_path)
        before = {c: {r: rejected(c, r) for _, r in job_forgers}
                  for c in ("resource-job-events", "workflow-job-events")}
        forged_outputs = events_pb2.JobChanged(job_id=running.last_job_id, action=ep.JOB_ACTION_APPLY,
                                               status=ep.JOB_STATUS_SUCCEEDED)
        forged_outputs.outputs.add(name="gate", value=to_value("forged"))
        # A step id, so the workflow service's consumer looks at it too.
        forged_outputs.correlation.resource_id, forged_outputs.correlation.step_id = slow.id, "step-of-nobody"
        await publish_all(job_forgers, new_event("executor", "job_succeeded", forged_outputs,
                                                 correlation=Correlation(resource_id=slow.id, step_id="step-of-nobody",
                                                                         job_id=running.last_job_id)))

        async def all_rejected(counts, forged, times=None):
            """`times`: (consumer, reason) -> how many, 1 when not said."""
            return all(rejected(c, r) - counts[c][r] >= (times or {}).get((c, r), 1) for c in counts
                       for _, r in forged)
        await eventually(lambda: all_rejected(before, job_forgers), timeout=20)
        assert (await p.get(slow.id)).status == IN_PROGRESS, "a forged end must not end the running job"
        done = await p.wait(slow.id, PROVISIONED, DONE, timeout=90)
        assert {o.name: o.value.string_value for o in done.outputs}["gate"] == str(gate), \
            "the real job's outputs, never the forged ones"

        # The approval flow on: a create waits for its owner; a forged
        # decision and a forged "flow off" change nothing.
        await p.approval.UpdateApprovalFlow(ap.UpdateApprovalFlowRequest(enabled=True), metadata=p.admin)

        async def flow_is(enabled: bool):
            async with p.inner["resource"].runtime.uow() as uow:
                return await uow.settings.get("approval_flow") == enabled
        await eventually(lambda: flow_is(True), timeout=20)
        waiting = await p.create("gated", "waits", parents=[net.id], variables={"gate": str(gate)})
        assert waiting.status == APPROVAL_PENDING

        async def request():
            listed = await p.approval.ListApprovalRequests(ap.ListApprovalRequestsRequest(
                resource_id=waiting.id, status=ap.APPROVAL_STATUS_PENDING), metadata=p.md)
            return listed.approval_requests[0] if listed.approval_requests else None
        pending = await eventually(request, timeout=20)
        approval_forgers = await forgers(p, "approval", tmp_path)
        consumers = ("resource-approval-events", "workflow-approval-events")
        before = {c: {r: rejected(c, r) for _, r in approval_forgers} for c in consumers}
        await publish_all(approval_forgers, new_event("approval", "approval_approved", events_pb2.ApprovalChanged(
            approval_request_id=pending.id, resource_id=waiting.id, operation=ap.APPROVAL_OPERATION_PROVISION,
            status=ap.APPROVAL_STATUS_APPROVED, decided_by="admin"), correlation=Correlation(resource_id=waiting.id)))
        await publish_all(approval_forgers, new_event("approval", "approval_flow_changed",
                                                      events_pb2.ApprovalFlowChanged(enabled=False)))
        # The resource service consumes both forgeries, the workflow service decisions on
        # workflow plans only: it acks a decision on a resource unread (no signature check,
        # nothing counted), and asks nobody.
        times = {("resource-approval-events", r): 2 for _, r in approval_forgers}
        times.update({("workflow-approval-events", r): 0 for _, r in approval_forgers})
        await eventually(lambda: all_rejected(before, approval_forgers, times), timeout=20)
        await asyncio.sleep(1)
        assert await flow_is(True), "a forged 'flow off' must not turn the flow off"
        assert (await p.get(waiting.id)).status == APPROVAL_PENDING
        assert not (await p.executor.ListJobs(ep.ListJobsRequest(resource_id=waiting.id), metadata=p.md)).jobs
        still = await p.approval.GetApprovalRequest(ap.GetApprovalRequestRequest(id=pending.id), metadata=p.md)
        assert still.status == ap.APPROVAL_STATUS_PENDING
        # The next create still asks its owner: the flow is on.
        second = await p.create("gated", "asks", parents=[net.id], variables={"gate": str(gate)})
        assert second.status == APPROVAL_PENDING
        for bus, _ in job_forgers + approval_forgers:
            await bus.close()
