"""Sensitive values stay sensitive wherever they flow: an integration
credential, an ENV secret and a sensitive variable (whose sensitive output is
wired downstream), each a unique canary, go through a workflow and its
teardown; then a reader reads everything there is to read. No canary appears
in an API response to a non-admin, a job log, a service log, a NATS message or
a database file (terraform's own state files excepted: terraform keeps values
in clear there, so a storage is to be protected as the credentials are)."""
from __future__ import annotations

import logging
import uuid

from infrakitchen.approval.v1 import approval_pb2 as ap
from infrakitchen.executor.v1 import executor_pb2 as ep
from infrakitchen.resource.v1 import resource_pb2 as rp
from infrakitchen.workflow.v1 import workflow_pb2 as wp
from services.common.auth import Role
from tests.integration.test_workflows import overrides, run
from tests.support.jobs import all_logs, log_text
from tests.support.platform import Platform


async def nats_messages(bus) -> list[bytes]:
    """Every message of this test's streams."""
    found = []
    for info in await bus.js.streams_info():
        if not info.config.name.startswith(bus.names.stream("IK_")):
            continue
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            try:
                found.append((await bus.js.get_msg(info.config.name, seq)).data or b"")
            except Exception:  # noqa: BLE001 - a deleted message (work queue)
                continue
    return found


async def test_canaries_appear_nowhere_in_plaintext(tmp_path, event_prefix, nats_url, caplog):
    caplog.set_level(logging.DEBUG)
    canary = {kind: f"canary-{kind}-{uuid.uuid4().hex[:10]}" for kind in ("credential", "secret", "variable")}
    async with Platform(tmp_path, event_prefix, nats_url) as p:
        integration = await p.executor.CreateIntegration(ep.CreateIntegrationRequest(
            integration=ep.Integration(name="canary", provider=ep.INTEGRATION_PROVIDER_GENERIC),
            credentials={"CLOUD_TOKEN": canary["credential"]}), metadata=p.admin)
        secret = await p.executor.CreateSecret(ep.CreateSecretRequest(secret=ep.Secret(
            name="canary", exposure=ep.SECRET_EXPOSURE_ENV), values={"SECRET_WORD": canary["secret"]}),
            metadata=p.admin)
        blueprint = await p.blueprint_of("canary-chain", {"network": {"cidr": "10.0.0.0/16"}, "app": {}, "tail": {}},
                                         [("network", "vpc_id", "app", "vpc_id"),
                                          ("app", "secret_url", "tail", "upstream")])
        w = await p.workflow.CreateWorkflow(wp.CreateWorkflowRequest(
            blueprint_id=blueprint.id, variable_overrides=overrides(p, app={"password": canary["variable"]}),
            integration_ids=[integration.id], secret_ids=[secret.id], storage_id=p.catalog.storage),
            metadata=p.md)
        done = await run(p, w)
        assert done.status == wp.WORKFLOW_STATUS_DONE, done.error_message
        resource_ids = [s.resource_id for s in done.steps]
        for rid in resource_ids:
            await p.wait(rid, rp.RESOURCE_STATE_PROVISIONED, rp.RESOURCE_STATUS_DONE)
        await p.workflow.TeardownWorkflow(wp.TeardownWorkflowRequest(id=w.id), metadata=p.admin)

        async def torn_down():
            got = await p.workflow.GetWorkflow(wp.GetWorkflowRequest(id=w.id), metadata=p.md)
            return got.teardown_status in (wp.TEARDOWN_STATUS_DONE, wp.TEARDOWN_STATUS_ERROR)
        from tests.support.waiting import eventually
        await eventually(torn_down, timeout=120)

        reader = p.as_("rita", Role.READ)
        seen: list[str] = [str(await p.workflow.GetWorkflow(wp.GetWorkflowRequest(id=w.id), metadata=reader)),
                           str(await p.workflow.ListWorkflows(wp.ListWorkflowsRequest(), metadata=reader)),
                           str(await p.resource.ListResources(rp.ListResourcesRequest(), metadata=reader)),
                           str(await p.executor.ListIntegrations(ep.ListIntegrationsRequest(), metadata=reader)),
                           str(await p.executor.ListSecrets(ep.ListSecretsRequest(), metadata=reader)),
                           str(await p.approval.ListApprovalRequests(ap.ListApprovalRequestsRequest(),
                                                                     metadata=reader))]
        for rid in resource_ids:
            seen.append(str(await p.resource.GetResource(rp.GetResourceRequest(id=rid), metadata=reader)))
            seen.append(str(await p.resource.ListResourceEvents(rp.ListResourceEventsRequest(resource_id=rid),
                                                                metadata=reader)))
            seen.append(str(await p.resource.ListResourceRevisions(
                rp.ListResourceRevisionsRequest(resource_id=rid), metadata=reader)))
        jobs = (await p.executor.ListJobs(ep.ListJobsRequest(workflow_id=w.id), metadata=reader)).jobs
        assert len(jobs) >= 6, "three applies and three destroys"
        seen.append(str(jobs))
        for job in jobs:
            seen.append(str(await p.executor.GetJob(ep.GetJobRequest(id=job.id), metadata=reader)))
            seen.append(log_text(await all_logs(p.executor, job.id, reader)))
        messages = await nats_messages(p.inner["workflow"].runtime.bus)
        assert len(messages) > 20

    for kind, value in canary.items():
        needle = value.encode()
        assert not [text for text in seen if value in text], f"the {kind} in an answer to a reader"
        assert not [m for m in messages if needle in m], f"the {kind} in a NATS message"
        assert value not in caplog.text, f"the {kind} in a service log"
        for path in tmp_path.rglob("*"):
            if path.is_file() and ".db" in path.name:
                assert needle not in path.read_bytes(), f"the {kind} in {path.name} in plaintext"
