"""Use cases of jobs, one function per command. Each runs in the unit of work
it is given; the caller commits."""
from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import replace

from services.common.auth import Principal
from services.common.errors import (AlreadyExists, FailedPrecondition, FieldViolation, InvalidArgument, NotFound,
                                    PreconditionViolation)
from services.common.events import Correlation as EventCorrelation
from services.common.git import check_repository_url
from services.common.events import new_event
from services.common.paging import by_creation, newest_first, paginate
from services.common.uow import utcnow
from services.executor.domain.model import (ACTIONS, APPLY, PLAN, QUEUED, RUNNING, SUCCEEDED, Job,
                                            StatePathClaim, stale_plan_reason, valid_state_path)
from services.executor.domain.model import cap_reason as integration_cap_reason

SOURCE = "executor"
DISPATCH_SUBJECT = "ik.dispatch.job"  # the work-queue stream's subject (not an event)

# Which event announces which status.
STATUS_EVENT = {"queued": "job_queued", "running": "job_started", "succeeded": "job_succeeded",
                "failed": "job_failed", "cancelled": "job_cancelled", "timed_out": "job_timed_out"}

MAX_CORRELATION_ID = 64  # the ids a job's correlation names (their columns' width)


async def emit_job_event(uow, job: Job, actor: str = "") -> None:
    """The job's current status as an event; payload conversion lives in the api layer."""
    from services.executor.api.convert import job_changed  # api owns proto conversion
    c = job.correlation
    await uow.emit(new_event(SOURCE, STATUS_EVENT[job.status], job_changed(job), actor=actor,
                             correlation=EventCorrelation(workflow_id=c.workflow_id, step_id=c.step_id,
                                                          resource_id=c.resource_id, job_id=job.id,
                                                          temporary_state_id=c.temporary_state_id)))


async def submit_job(uow, principal: Principal, job: Job, default_timeout: float, request_id: str = "",
                     start_as: tuple[str, float] | None = None, current_state=None) -> tuple[Job, bool]:
    """(the job, whether this call created it). With `start_as` (worker id,
    lease seconds) the job is stored already claimed by that worker, which
    runs it once this commits; otherwise it goes on the work queue.
    `current_state(storage, state_path)` reads the (serial, lineage) of a
    state where the service can (None where it cannot)."""
    if (existing := await uow.find_request("SubmitJob", request_id)) is not None:
        return await get_job(uow, existing), False
    violations = []
    if job.action not in ACTIONS:
        violations.append(FieldViolation("action", "must be plan, apply or destroy"))
    if job.plan_job_id and job.action != APPLY:
        violations.append(FieldViolation("plan_job_id", "only an apply job can apply a saved plan"))
    if not job.plan_job_id:
        if problem := check_repository_url(job.source.repository_url):
            violations.append(FieldViolation("source.repository_url", problem))
        if not job.source.ref.strip():
            violations.append(FieldViolation("source.ref", "must name a tag, branch or commit"))
    # The same rule as the blueprint service's: a folder inside the checkout.
    if job.source.path.startswith("/") or ".." in job.source.path.split("/"):
        violations.append(FieldViolation("source.path", "must be a folder inside the repository"))
    if not valid_state_path(job.state_path):
        violations.append(FieldViolation("state_path", "must be a relative path of letters, digits, '.', '_', '-' "
                                                       "and '/', without '..'"))
    for i, name in enumerate(job.sensitive_variables):
        if name not in job.variables:
            violations.append(FieldViolation(f"sensitive_variables[{i}]", f"{name!r} is not one of the variables"))
    if job.timeout_seconds < 0:
        violations.append(FieldViolation("timeout", "must not be negative"))
    for name in ("resource_id", "workflow_id", "step_id", "temporary_state_id", "template_id"):
        if len(getattr(job.correlation, name)) > MAX_CORRELATION_ID:
            violations.append(FieldViolation(f"correlation.{name}", f"at most {MAX_CORRELATION_ID} characters"))
    # Held (PostgreSQL: FOR KEY SHARE) until this submission commits, so a
    # delete at the same moment waits for it and then sees its job (see
    # credentials._refuse_if_used).
    held = await uow.jobs.hold_named(job.integration_ids, job.secret_ids, job.storage_id)
    for i, id_ in enumerate(job.integration_ids):
        if ("integration", id_) not in held:
            violations.append(FieldViolation(f"integration_ids[{i}]", f"unknown integration {id_!r}"))
    for i, id_ in enumerate(job.secret_ids):
        if ("secret", id_) not in held:
            violations.append(FieldViolation(f"secret_ids[{i}]", f"unknown secret {id_!r}"))
    if job.storage_id and ("storage", job.storage_id) not in held:
        violations.append(FieldViolation("storage_id", f"unknown storage {job.storage_id!r}"))
    if violations:
        raise InvalidArgument("invalid job", violations)

    now = utcnow()
    job = replace(job, id=str(uuid.uuid4()), status=QUEUED, creator=principal.user, via=principal.via,
                  create_time=now, timeout_seconds=job.timeout_seconds or default_timeout, attempt=0, worker="")
    if job.plan_job_id:
        job = await _from_saved_plan(uow, job, current_state)
    elif job.action == PLAN and not job.correlation.resource_id:
        await _plan_reads_no_claimed_state(uow, job)
    if job.correlation.resource_id:
        await claim_state_path(uow, job.storage_id, job.state_path, job.correlation.resource_id)
    await emit_job_event(uow, job, principal.user)  # queued
    if start_as is not None and (reason := await cap_reason(uow, job, held.caps)):
        start_as, job = None, replace(job, queue_reason=reason)  # it waits on the work queue
    if start_as is None:
        await uow.jobs.add(job)
        await uow.enqueue(DISPATCH_SUBJECT, job.id.encode(), f"dispatch-{job.id}")
    else:
        worker, lease = start_as
        job = replace(job, status=RUNNING, worker=worker, attempt=1, lease_until=lease_deadline(lease))
        await uow.jobs.add(job)
        await emit_job_event(uow, job)  # started
    await uow.remember_request("SubmitJob", request_id, job.id)
    return job, True


async def cap_reason(uow, job: Job, read: dict[str, tuple[str, int]] | None = None) -> str:
    """Why the job may not start now (an integration it uses is at its cap
    of concurrent jobs), or "". Checked in the transaction that starts it;
    on PostgreSQL the integrations' rows are locked (FOR NO KEY UPDATE) so
    two executors never both take the last slot (SQLite serializes writers
    anyway). `read`: the caps (id -> (name, cap)) this transaction read
    already (SubmitJob's hold_named); when none of the job's integrations
    has a cap there, nothing more is read or locked, as no slot is taken."""
    if not job.integration_ids:
        return ""
    if read is not None and all(id_ in read and not read[id_][1] for id_ in job.integration_ids):
        return ""
    caps = await uow.integrations.caps(job.integration_ids, lock=True)
    if not any(cap for _, cap in caps.values()):
        return ""
    return integration_cap_reason(job.integration_ids, caps, await uow.jobs.running_integrations(job.id))


async def _plan_reads_no_claimed_state(uow, job: Job) -> None:
    """A plan for no resource (a step of a workflow plan, before its resource
    exists) must not read the state of a resource it is not for."""
    if (claim := await uow.storages.claim(job.storage_id, job.state_path)) is not None:
        raise AlreadyExists("state path", f"{job.storage_id or 'default'}:{job.state_path}",
                            f"state path {job.state_path!r} belongs to resource {claim.resource_id}; "
                            f"a plan of it must name that resource")


async def _from_saved_plan(uow, job: Job, current_state=None) -> Job:
    """An apply of a reviewed plan runs exactly what the plan job planned:
    same commit, same variables, same state; refused when the state moved
    (STALE_PLAN). The run checks the state again right before it applies."""
    plan = await uow.jobs.get(job.plan_job_id)
    if plan is None:
        raise InvalidArgument.of("plan_job_id", f"unknown job {job.plan_job_id!r}")
    problems = []
    if plan.action != PLAN:
        problems.append(PreconditionViolation("JOB_NOT_A_PLAN", f"jobs/{plan.id}", "the job is not a plan job"))
    elif plan.status != SUCCEEDED:
        problems.append(PreconditionViolation("PLAN_NOT_SUCCEEDED", f"jobs/{plan.id}",
                                              f"the plan job is {plan.status}, not succeeded"))
    if (plan.storage_id, plan.state_path) != (job.storage_id, job.state_path):
        problems.append(PreconditionViolation("PLAN_OF_OTHER_STATE", f"jobs/{plan.id}",
                                              "the plan was made for another storage or state path"))
    if not problems and plan.start_time is not None:
        moved = await uow.jobs.state_changed_since(plan.storage_id, plan.state_path, plan.start_time)
        problems += [PreconditionViolation("STATE_CHANGED_SINCE_PLAN", f"jobs/{m}",
                                           "this job changed the state after the plan was made; plan again")
                     for m in moved]
    if not problems and plan.plan_summary is not None and current_state is not None:
        storage = await uow.storages.get(plan.storage_id) if plan.storage_id else None
        now = current_state(storage, plan.state_path)
        planned = (plan.plan_summary.state_serial, plan.plan_summary.state_lineage)
        if now is not None and (why := stale_plan_reason(planned, now)):
            problems.append(PreconditionViolation("STALE_PLAN", f"jobs/{plan.id}", f"{why}; plan again"))
    if problems:
        raise FailedPrecondition(f"cannot apply the saved plan of job {plan.id}", problems)
    return replace(job, source=plan.source, commit=plan.commit, variables=dict(plan.variables),
                   sensitive_variables=list(plan.sensitive_variables),
                   integration_ids=job.integration_ids or plan.integration_ids,
                   secret_ids=job.secret_ids or plan.secret_ids)


async def claim_state_path(uow, storage_id: str, state_path: str, resource_id: str) -> StatePathClaim:
    existing = await uow.storages.claim(storage_id, state_path)
    if existing is not None:
        if existing.resource_id != resource_id:
            raise AlreadyExists("state path", f"{storage_id or 'default'}:{state_path}",
                                f"state path {state_path!r} of this storage belongs to another resource")
        return existing
    claim = StatePathClaim(storage_id, state_path, resource_id, utcnow())
    await uow.storages.add_claim(claim)
    return claim


async def get_job(uow, id_: str) -> Job:
    job = await uow.jobs.get(id_) if id_ else None
    if job is None:
        raise NotFound("job", id_)
    return job


async def list_jobs(uow, page_size: int, page_token: str, resource_id: str = "", workflow_id: str = "",
                    status: str = "", order_by: str = "") -> tuple[list[Job], str]:
    desc = newest_first(order_by)
    return await paginate(lambda a, n: uow.jobs.list(a, n, resource_id, workflow_id, status, desc), page_size,
                          page_token, {"list": "jobs", "resource_id": resource_id, "workflow_id": workflow_id,
                                       "status": status, "desc": desc}, by_creation)


async def cancel_job(uow, principal: Principal, id_: str) -> Job:
    """A queued job is cancelled at once; a running one is asked to stop and
    its worker interrupts terraform (the job then ends cancelled). Cancelling
    an ended job answers FAILED_PRECONDITION."""
    job = await uow.jobs.get(id_) if id_ else None
    if job is None:
        raise NotFound("job", id_)
    # Conditional updates, not read-modify-write: a worker may claim the job
    # between our read and our write.
    reason = f"cancelled by {principal.user} before it started"
    if await uow.jobs.cancel_if_queued(id_, reason, utcnow()):
        job = await uow.jobs.get(id_)
        await emit_job_event(uow, job, principal.user)
        return job
    if await uow.jobs.request_cancel_if_running(id_):
        return await uow.jobs.get(id_)
    job = await uow.jobs.get(id_)
    raise FailedPrecondition(f"job {id_} already ended {job.status}",
                             [PreconditionViolation("JOB_ENDED", f"jobs/{id_}", f"status is {job.status}")])


def lease_deadline(seconds: float) -> dt.datetime:
    return utcnow() + dt.timedelta(seconds=seconds)
