"""The resource service's reactions: executor job events move resources
through their states; approval decisions let waiting operations run (or not);
the approval flow flag is kept locally."""
from __future__ import annotations

import asyncio
import logging

from services.common import confirm
from services.common.consumer import ConsumerSpec
from services.common.events import Envelope, body_of
from services.common.uow import utcnow
from services.resource.adapters.remote import job_info
from services.resource.app.lifecycle import FLAG_KEY, OPERATION_OF_APPROVAL

log = logging.getLogger(__name__)

_DECISIONS = {"approval_approved": "approved", "approval_rejected": "rejected", "approval_cancelled": "cancelled"}


def consumers(runtime) -> list[ConsumerSpec]:
    lifecycle = runtime.lifecycle

    async def on_job(uow, env: Envelope) -> None:
        kind, body = body_of(env)
        if kind == "job_queued":
            return
        await lifecycle.on_job_event(uow, job_info(body), body.correlation.resource_id,
                                     body.correlation.temporary_state_id, env.actor or "system:executor")

    async def on_approval(uow, env: Envelope) -> None:
        kind, body = body_of(env)
        if kind == "approval_flow_changed":
            await uow.settings.set(FLAG_KEY, bool(body.enabled), utcnow())
            return
        if kind in _DECISIONS and body.operation in OPERATION_OF_APPROVAL:  # a workflow plan's is the workflow's
            await lifecycle.on_approval(uow, _DECISIONS[kind], OPERATION_OF_APPROVAL[body.operation],
                                        body.resource_id, body.temporary_state_id, body.approval_request_id,
                                        body.decided_by or env.actor)

    return [
        # Short first retries: a job event can overtake the submitter recording the job id.
        # A job's end as the executor reports it, a decision and the flow as the approval service does.
        ConsumerSpec(durable="resource-job-events", context="executor", filter_subject="ik.executor.job.>",
                     handler=on_job, retry_delays=[0.2, 0.5, 1, 2, 5, 10],
                     wants=lambda env: env.type != "ik.executor.job.queued",
                     confirm=confirm.job_ends(lifecycle.remote.job_detail)),
        ConsumerSpec(durable="resource-approval-events", context="approval", filter_subject="ik.approval.>",
                     handler=on_approval,
                     confirm=confirm.approval_decisions(lifecycle.remote.approval_request,
                                                        lifecycle.remote.approval_flow)),
    ]


async def reconciler(runtime) -> None:
    """Background task: learns the approval flag if no event told it yet, then
    reconciles resources whose operation has not moved for a while."""
    lifecycle = runtime.lifecycle
    interval = float(runtime.settings.env.get("IK_RESOURCE_RECONCILE_INTERVAL", "5"))
    known = False
    while True:
        if not known:
            known = await _learn_flag(runtime)
        try:
            async with runtime.db.leading("resource-reconciler") as mine:
                if mine:  # one replica per round
                    await lifecycle.reconcile(older_than_seconds=interval)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - e.g. the executor is down: next round
            log.warning("reconciliation failed: %s", exc)
        await asyncio.sleep(interval)


async def _learn_flag(runtime) -> bool:
    async with runtime.uow() as uow:
        if await uow.settings.get(FLAG_KEY) is not None:
            return True
    try:
        enabled = await runtime.lifecycle.remote.approval_flow()
    except Exception:  # noqa: BLE001 - the approval service may not be up yet
        return False
    async with runtime.uow() as uow:
        if await uow.settings.get(FLAG_KEY) is None:
            await uow.settings.set(FLAG_KEY, enabled, utcnow())
            await uow.commit()
    return True
