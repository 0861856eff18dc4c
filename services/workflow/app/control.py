"""Staying in control of a running workflow: cancel it, decide what a failed
step stops, retry transient failures, and tear it down when it expires.

- Cancel marks the workflow (cancelled_by); from then on no step starts.
  A step whose job may run has it cancelled (SIGINT first, by the executor)
  and ends in error when the job's end arrives; a step doing nothing (waiting
  for an approval, a retry or its plan) ends in error at once, and its open
  approval requests are cancelled. The workflow ends in error "cancelled by
  <user>" when no step runs any more; a job that finished first keeps its
  outcome (its step is done): exactly one outcome per step.
- A failed step's job is retried when its error output matches the retry
  policy's transient patterns and attempts are left: the step stays running,
  waits for its backoff (retry_time, kept in the database, so a restart or
  the reconciler picks it up) and starts again on the same resource.
- With continue_independent, a failure stops only the failed step's
  dependents (they stay pending, saying which failed step they wait for).
- An expired workflow is torn down by the existing teardown (a running one is
  cancelled first and torn down once it has stopped)."""
from __future__ import annotations

import asyncio
import datetime as dt
from dataclasses import replace

from services.common.auth import Principal, Role
from services.common.clients import RemoteError
from services.common.errors import DomainError, FailedPrecondition, PreconditionViolation
from services.common.uow import utcnow
from services.workflow.domain.controls import RetryPolicy, blocked_by
from services.workflow.domain.model import DONE, ERROR, IN_PROGRESS, PENDING, PLANNING, Step, Workflow
from services.workflow.app.base import WorkflowsBase, log

EXPIRY_ACTOR = "system:expiry"


class Control(WorkflowsBase):
    # --- cancel -----------------------------------------------------------------------------

    async def cancel(self, uow, principal: Principal, id_: str) -> Workflow:
        w = await self.get(uow, id_)
        if w.status != IN_PROGRESS:
            raise FailedPrecondition(f"workflow {w.id} is not running (it is {w.status})", [PreconditionViolation(
                "WORKFLOW_NOT_RUNNING", f"workflows/{w.id}", "only a running workflow can be cancelled")])
        if w.cancelled_by:
            return w  # it is winding down already
        now = utcnow()
        cancelling = replace(w, cancelled_by=principal.user, update_time=now, version=w.version + 1)
        await uow.workflows.update(cancelling, w.version)
        await self._workflow_event(uow, "workflow_cancel_requested", cancelling, principal.user)
        message = f"cancelled by {principal.user}"
        jobs, approvals = [], []
        if w.plan_approval_status == PENDING and w.plan_approval_request_id:
            approvals.append(w.plan_approval_request_id)
        for st in await uow.steps.of(w.id):
            if st.status != IN_PROGRESS:
                continue
            idle = bool(st.waiting_reason) or st.retry_time is not None
            if st.plan.get("approval_request_id") and not st.plan.get("approved"):
                approvals.append(st.plan["approval_request_id"])
            if st.waiting_reason and st.resource_id:
                approvals.append(("resource", st.resource_id))
            if idle:
                await self._end_step(uow, st, message, principal.user)
                if st.plan.get("status") == PLANNING and st.plan.get("job_id"):
                    jobs.append(st.plan["job_id"])  # its (re)plan: no job of the workflow outlives it
            elif st.job_id:
                jobs.append(st.job_id)
            # (a step being started records its job later; start_step cancels it then)
        uow.after_commit(lambda: self._cancel_elsewhere(w.id, jobs, approvals, principal.user))
        await self._end_if_stopped(uow, cancelling, principal.user)
        return cancelling

    async def _end_step(self, uow, st: Step, message: str, actor: str) -> None:
        ended = replace(st, status=ERROR, error_message=message, waiting_reason="", retry_time=None,
                        completion_time=utcnow(), version=st.version + 1)
        if await uow.steps.update(ended, st.version):
            await self._step_event(uow, "step_failed", ended, actor)

    async def _cancel_elsewhere(self, workflow_id: str, jobs: list[str], approvals: list, actor: str) -> None:
        """The running jobs (the executor interrupts them) and the open
        approval requests of a cancelled workflow. Failures are logged: a job
        that ended meanwhile brings its own outcome. The steps are read again
        once the cancel committed: a job a step start recorded while the
        cancel was being decided is cancelled too."""
        async with self.uow_factory() as uow:
            recorded = [st.job_id for st in await uow.steps.of(workflow_id)
                        if st.status == IN_PROGRESS and st.job_id and st.job_id not in jobs]
        for job_id in [*jobs, *recorded]:
            await self.cancel_job(job_id, actor)
        for request in approvals:
            if isinstance(request, tuple):  # the request a step's resource waits for
                try:
                    resource = await self.remote.find_resource(request[1])
                except RemoteError as exc:
                    log.warning("reading resource %s of a cancelled workflow: %s", request[1], exc.describe())
                    continue
                request = resource.approval_request_id if resource and resource.status == "approval_pending" else ""
                # The resource named its request before the approval service opened it (from the
                # resource's event): a cancel right then finds none, and the request opened a moment
                # later would hold the resource for good. So it is asked for again, a few seconds.
                await self.withdraw_approval(request, actor, attempts=8)
            else:
                await self.withdraw_approval(request, actor)

    async def withdraw_approval(self, request_id: str, actor: str, attempts: int = 1) -> None:
        """Withdraws an open approval request of a cancelled workflow; a
        failure is logged (the request may have been decided meanwhile). A
        request not found is asked for again `attempts` times in all, after
        0.1, 0.2, 0.4... s."""
        if not request_id:
            return
        delay = 0.1
        for attempt in range(attempts):
            try:
                if await self.remote.cancel_approval(actor, request_id, f"workflow cancelled by {actor}"):
                    return
            except RemoteError as exc:
                log.warning("cancelling approval request %s: %s", request_id, exc.describe())
                return
            if attempt + 1 < attempts:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
        if attempts > 1:
            log.warning("cancelling approval request %s: the approval service never opened it", request_id)

    async def reconcile_cancelled(self, w: Workflow, steps: list[Step], cutoff) -> None:
        """A cancelled workflow's steps that still run after a while: their
        jobs are cancelled (one submitted only after the cancel, the executor
        having been unreachable; one whose start raced the cancel exactly),
        an approval one waits for is withdrawn and the step ended, and a step
        whose resource runs nothing any more ends, so the workflow ends once
        no job of it runs."""
        actor = w.cancelled_by
        for st in steps:
            if st.status != IN_PROGRESS or (st.start_time and st.start_time > cutoff):
                continue
            if not st.resource_id:
                await self.start_step(st.id, w.executor or w.creator)  # records what exists, starts nothing
                continue
            resource = await self.remote.find_resource(st.resource_id)
            if resource is None:
                await self.step_failed(st.id, f"cancelled by {actor}", "system:reconciler")
            else:
                await self._stop_cancelled_start(st, resource, actor, "system:reconciler")

    async def cancel_job(self, job_id: str, actor: str) -> None:
        try:
            await self.remote.cancel_job(actor, job_id)
        except RemoteError as exc:
            log.warning("cancelling job %s of a cancelled workflow: %s", job_id, exc.describe())

    async def _end_if_stopped(self, uow, w: Workflow, actor: str) -> bool:
        """A cancelled workflow, or one whose failure policy let independent
        steps go on, ends in error once no step runs and none can start."""
        steps = await uow.steps.of(w.id)
        if any(s.status == IN_PROGRESS for s in steps):
            return False
        if steps and all(s.status == DONE for s in steps):  # the last jobs finished before the cancel reached them
            await self._complete(uow, w, actor)
            return True
        if w.cancelled_by:
            message = f"cancelled by {w.cancelled_by}"
        else:
            failed = [s for s in steps if s.status == ERROR]
            if not failed:
                return False
            message = "; ".join(f"step {s.template_name} failed: {s.error_message}" for s in failed)[:2000]
        now = utcnow()
        ended = replace(w, status=ERROR, error_message=message, completion_time=now, update_time=now,
                        version=w.version + 1)
        await uow.workflows.update(ended, w.version)
        await self._workflow_event(uow, "workflow_failed", ended, actor)
        return True

    # --- what a failure stops ----------------------------------------------------------------

    async def continue_independent(self, uow, w: Workflow, failed: Step, actor: str) -> None:
        """The failed step's dependents (transitively) stay pending and say
        why; independent steps keep starting; the workflow ends once nothing
        more can run."""
        steps = await uow.steps.of(w.id)
        depends_on = {s.id: s.depends_on for s in steps}
        failed_ids = {s.id for s in steps if s.status == ERROR}
        names = {s.id: s.template_name for s in steps}
        for st in steps:
            if st.status != PENDING:
                continue
            if (upstream := blocked_by(st.id, failed_ids, depends_on)) and \
                    st.waiting_reason != (why := f"waits for failed step {names[upstream]}"):
                if await uow.steps.update(replace(st, waiting_reason=why, version=st.version + 1), st.version):
                    await self._step_event(uow, "step_waiting", replace(st, waiting_reason=why), actor)
        await self.schedule(uow, w.id, actor)

    # --- retries ----------------------------------------------------------------------------------

    async def retry_later(self, uow, w: Workflow, st: Step, message: str, actor: str) -> bool:
        """Whether the failed attempt is retried (the step then waits for its backoff)."""
        policy = RetryPolicy.from_json(w.retry_policy).over(RetryPolicy.from_json(st.retry_default))
        if w.cancelled_by or st.attempts >= policy.attempts or not (pattern := policy.transient(message)):
            return False
        wait = policy.backoff(st.attempts)
        when = utcnow() + dt.timedelta(seconds=wait)
        waiting = replace(st, retry_time=when, version=st.version + 1, waiting_reason=(
            f"attempt {st.attempts} of {policy.attempts} failed with a transient error (/{pattern}/): "
            f"{message}"[:1500] + f"; next attempt in {wait:.0f}s"))
        if not await uow.steps.update(waiting, st.version):
            return False
        await self._step_event(uow, "step_retrying", waiting, actor)
        uow.after_commit(lambda: self._retry_after(st.id, wait, actor))
        return True

    async def _retry_after(self, step_id: str, seconds: float, actor: str) -> None:
        async def later():
            await asyncio.sleep(seconds)
            try:
                await self.retry_step(step_id, actor)
            except Exception:  # noqa: BLE001 - the reconciler tries again
                log.exception("retrying step %s", step_id)
        asyncio.get_running_loop().create_task(later())

    async def retry_step(self, step_id: str, actor: str) -> None:
        """Starts the next attempt of a step whose backoff has passed (once:
        a version-guarded update takes the retry)."""
        async with self.uow_factory() as uow:
            st = await uow.steps.get(step_id)
            if st is None or st.status != IN_PROGRESS or st.retry_time is None or st.retry_time > utcnow():
                return
            w = await uow.workflows.get(st.workflow_id)
            if w is None or w.status != IN_PROGRESS or w.cancelled_by:
                return
            again = replace(st, retry_time=None, attempts=st.attempts + 1, waiting_reason="",
                            version=st.version + 1)
            if not await uow.steps.update(again, st.version):
                return
            await uow.commit()
        await self.start_step(step_id, w.executor or w.creator)

    # --- expiry -------------------------------------------------------------------------------

    async def expire_due(self) -> None:
        """Workflows whose expire_time passed: cancelled if running, then torn down."""
        async with self.uow_factory() as uow:
            due = await uow.workflows.expired(utcnow())
        for w in due:
            try:
                async with self.uow_factory() as uow:
                    await self._expire(uow, await self.get(uow, w.id))
                    await uow.commit()
            except DomainError as exc:
                log.warning("expiring workflow %s: %s", w.id, exc.message)

    async def _expire(self, uow, w: Workflow) -> None:
        if w.expired or w.expire_time is None or w.expire_time > utcnow():
            return
        if w.status == IN_PROGRESS:
            if not w.cancelled_by:  # torn down once it has stopped (a next round)
                await self.cancel(uow, Principal(EXPIRY_ACTOR, Role.ADMIN), w.id)
            return
        expired = replace(w, expired=True, update_time=utcnow(), version=w.version + 1)
        await uow.workflows.update(expired, w.version)
        await self._workflow_event(uow, "workflow_expired", expired, EXPIRY_ACTOR)
        if not any(s.resource_id for s in await uow.steps.of(w.id)) or w.teardown_status == DONE:
            return  # nothing was ever created, or it is gone already
        try:
            await self.teardown(uow, Principal(EXPIRY_ACTOR, Role.ADMIN), w.id)
        except FailedPrecondition as exc:  # e.g. resources outside depend on it: say so, an admin decides
            current = await uow.workflows.get(w.id)
            await uow.workflows.update(replace(current, teardown_error_message=f"expired; {exc.message}"[:2000],
                                               version=current.version + 1), current.version)
