"""Defence behind signed events: a consumer applies an outcome only as the
service that owns it reports it (ConsumerSpec.confirm). A job's end is
applied only for a job the executor reports in that very state, with the
executor's outputs, plan summary and error (never the event's); an approval
decision only for a request the approval service reports decided so; a
change of the approval flow only when the approval service reports the flow
so. An event that says otherwise (forged with a leaked signing key, say)
changes nothing."""
from __future__ import annotations

from collections.abc import Awaitable, Callable

from infrakitchen.approval.v1 import approval_pb2 as ap
from infrakitchen.executor.v1 import executor_pb2 as ep
from services.common.events import Envelope

JOB_ENDS = {"job_succeeded": ep.JOB_STATUS_SUCCEEDED, "job_failed": ep.JOB_STATUS_FAILED,
            "job_cancelled": ep.JOB_STATUS_CANCELLED, "job_timed_out": ep.JOB_STATUS_TIMED_OUT}
DECISIONS = {"approval_approved": ap.APPROVAL_STATUS_APPROVED, "approval_rejected": ap.APPROVAL_STATUS_REJECTED,
             "approval_cancelled": ap.APPROVAL_STATUS_CANCELLED}


def job_ends(get_job: Callable[[str], Awaitable]) -> Callable[[Envelope], Awaitable[Envelope | None]]:
    """`get_job(id)`: the executor's Job message, or None."""
    async def confirm(env: Envelope) -> Envelope | None:
        kind = env.WhichOneof("body")
        if kind not in JOB_ENDS:
            return env
        body = getattr(env, kind)
        job = await get_job(body.job_id)
        if job is None or job.status != JOB_ENDS[kind] or job.action != body.action:
            return None
        confirmed = Envelope()
        confirmed.CopyFrom(env)
        told = getattr(confirmed, kind)
        del told.outputs[:]
        told.outputs.extend(job.outputs)
        told.plan_summary.CopyFrom(job.plan_summary)
        told.error_message, told.status, told.exit_code = job.error_message, job.status, job.exit_code
        told.correlation.CopyFrom(job.correlation)
        return confirmed
    return confirm


def approval_decisions(get_request: Callable[[str], Awaitable],
                       get_flow: Callable[[], Awaitable[bool]] | None = None
                       ) -> Callable[[Envelope], Awaitable[Envelope | None]]:
    """`get_request(id)`: the approval service's ApprovalRequest, or None;
    `get_flow()`: whether the approval flow is on (for flow changes)."""
    async def confirm(env: Envelope) -> Envelope | None:
        kind = env.WhichOneof("body")
        if kind in DECISIONS:
            request = await get_request(getattr(env, kind).approval_request_id)
            if request is None or request.status != DECISIONS[kind]:
                return None
            # What the decision is about, as the approval service keeps it (not as the event says).
            confirmed = Envelope()
            confirmed.CopyFrom(env)
            told = getattr(confirmed, kind)
            told.resource_id, told.operation, told.status = request.resource_id, request.operation, request.status
            told.temporary_state_id, told.revision, told.plan_job_id = (request.temporary_state_id, request.revision,
                                                                         request.plan_job_id)
            told.workflow_id, told.workflow_plan_id, told.step_id = (request.workflow_id, request.workflow_plan_id,
                                                                     request.step_id)
            return confirmed
        if kind == "approval_flow_changed" and get_flow is not None:
            return env if await get_flow() == env.approval_flow_changed.enabled else None
        return env
    return confirm
