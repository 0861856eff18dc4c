"""NATS with identities (issue 28): a nats-server with the platform's
authorization block refuses anonymous clients; each service's identity
publishes only its own subjects, consumes only what it consumes and deletes
no stream; and the five services, each logged in as itself, provision a
resource through the approval flow and run a workflow on it."""
from __future__ import annotations


import nats
import pytest
from nats.errors import NoServersError
from nats.js.api import AckPolicy, ConsumerConfig
from nats.js.errors import APIError

from infrakitchen.approval.v1 import approval_pb2 as ap
from infrakitchen.resource.v1 import resource_pb2 as rp
from infrakitchen.workflow.v1 import workflow_pb2 as wp
from services.common import nats_identities
from services.common.bus import EventBus
from tests.support.nats_cluster import NatsCluster
from tests.support.platform import Platform
from tests.support.waiting import eventually


@pytest.fixture
def server(tmp_path, event_prefix):
    nats = NatsCluster(tmp_path / "nats", size=1, identities=tmp_path / "data" / "nats-identities",
                       prefix=event_prefix)
    nats.start(timeout=30)
    yield nats
    nats.stop()


async def connect(server: NatsCluster, identity: str, errors: list | None = None) -> nats.NATS:
    async def error_cb(exc):
        if errors is not None:
            errors.append(str(exc))
    return await nats.connect(server.node_url(0), connect_timeout=2, max_reconnect_attempts=0, error_cb=error_cb,
                              inbox_prefix=nats_identities.inbox_prefix(identity).encode(),
                              **server.connect_options(identity))


async def test_anonymous_refused_and_each_identity_limited_to_its_own(server, event_prefix):
    with pytest.raises((NoServersError, nats.errors.Error, OSError)):
        await nats.connect(server.node_url(0), connect_timeout=2, max_reconnect_attempts=0, allow_reconnect=False)
    admin = EventBus(server.node_url(0), event_prefix, connect_options=server.connect_options())
    await admin.connect(attempts=3)
    await admin.ensure_event_streams()
    errors: list[str] = []
    executor = await connect(server, "executor", errors)
    try:
        js = executor.jetstream(timeout=3)
        # Its own events reach its stream.
        ack = await js.publish(admin.names.subject("ik.executor.job.succeeded"), b"x")
        assert ack.stream == admin.names.context_stream("executor")
        # Another service's subject: refused by the server (no ack ever comes).
        with pytest.raises((nats.errors.TimeoutError, nats.errors.NoRespondersError)):
            await js.publish(admin.names.subject("ik.approval.request.approved"), b"x", timeout=2)
        # No stream can be deleted or purged; no consumer made on a stream it does not consume.
        for attempt in (js.delete_stream(admin.names.context_stream("approval")),
                        js.purge_stream(admin.names.context_stream("approval")),
                        js.pull_subscribe(admin.names.subject("ik.approval.>"), durable="spy",
                                          stream=admin.names.context_stream("approval"))):
            with pytest.raises((nats.errors.TimeoutError, nats.errors.NoRespondersError, APIError)):
                await attempt
        # Nor may it listen to the platform's subjects directly.
        await executor.subscribe(admin.names.subject("ik.>"))
        # The workflow service: not the resource service's consumer, not another's stream.
        workflow = await connect(server, "workflow")
        try:
            wjs = workflow.jetstream(timeout=3)
            await admin.js.add_consumer(admin.names.context_stream("executor"), ConsumerConfig(
                durable_name="resource-job-events", ack_policy=AckPolicy.EXPLICIT))
            sealed = (await admin.js.stream_info(admin.names.context_stream("approval"))).config
            sealed.sealed, sealed.max_msgs = True, 1
            for attempt in (wjs.pull_subscribe_bind("resource-job-events", admin.names.context_stream("executor")),
                            wjs.delete_consumer(admin.names.context_stream("executor"), "resource-job-events"),
                            wjs.update_stream(sealed)):
                with pytest.raises((nats.errors.TimeoutError, nats.errors.NoRespondersError, APIError)):
                    sub = await attempt
                    await sub.fetch(1, timeout=2)  # binding alone asks nothing: the pull is what is refused
            assert not (await admin.js.stream_info(admin.names.context_stream("approval"))).config.sealed
            await admin.js.consumer_info(admin.names.context_stream("executor"), "resource-job-events")
        finally:
            await workflow.close()
        await eventually(lambda: any("permissions violation" in e.lower() for e in errors), timeout=5)
        names = {s.config.name for s in await admin.js.streams_info()}
        assert admin.names.context_stream("approval") in names
        approval_info = await admin.js.stream_info(admin.names.context_stream("approval"))
        assert approval_info.state.messages == 0, "nothing was published on the approval service's subjects"
    finally:
        await executor.close()
        await admin.close()


async def test_the_services_run_with_their_own_identities(tmp_path, event_prefix, server):
    async with Platform(tmp_path, event_prefix, server.node_url(0)) as p:
        for name in nats_identities.SERVICES:
            assert p.inner[name].runtime.bus.nc.is_connected
        # The approval flow's events (approval -> resource), the job's (executor -> resource).
        await p.approval.UpdateApprovalFlow(ap.UpdateApprovalFlowRequest(enabled=True), metadata=p.admin)

        async def flow_on():
            async with p.inner["resource"].runtime.uow() as uow:
                return await uow.settings.get("approval_flow") is True
        await eventually(flow_on, timeout=20)
        team, region = await p.base()
        net = await p.create("network", "n", parents=[team.id, region.id], variables={"cidr": "10.0.0.0/16"})

        async def request():
            listed = await p.approval.ListApprovalRequests(ap.ListApprovalRequestsRequest(
                resource_id=net.id, status=ap.APPROVAL_STATUS_PENDING), metadata=p.md)
            return listed.approval_requests[0] if listed.approval_requests else None
        pending = await eventually(request, timeout=20)
        await p.approval.ApproveRequest(ap.ApproveRequestRequest(id=pending.id), metadata=p.md)
        await p.wait(net.id, rp.RESOURCE_STATE_PROVISIONED, rp.RESOURCE_STATUS_DONE)
        await p.approval.UpdateApprovalFlow(ap.UpdateApprovalFlowRequest(enabled=False), metadata=p.admin)
        await eventually(lambda: _flow_off(p), timeout=20)
        # A workflow: its steps move on executor and resource events.
        blueprint = await p.blueprint_of("stack", {"network": {"cidr": "10.1.0.0/16"}, "app": {"vpc_id": "default"}},
                                         [("network", "vpc_id", "app", "vpc_id")])
        w = await p.workflow.CreateWorkflow(wp.CreateWorkflowRequest(
            blueprint_id=blueprint.id, integration_ids=[p.catalog.integration], storage_id=p.catalog.storage),
            metadata=p.md)
        await p.workflow.ExecuteWorkflow(wp.ExecuteWorkflowRequest(id=w.id), metadata=p.md)

        async def done():
            got = await p.workflow.GetWorkflow(wp.GetWorkflowRequest(id=w.id), metadata=p.md)
            return got if got.status in (wp.WORKFLOW_STATUS_DONE, wp.WORKFLOW_STATUS_ERROR) else None
        finished = await eventually(done, timeout=120)
        assert finished.status == wp.WORKFLOW_STATUS_DONE, [s.error_message for s in finished.steps]


async def _flow_off(p) -> bool:
    async with p.inner["resource"].runtime.uow() as uow:
        return await uow.settings.get("approval_flow") is False
