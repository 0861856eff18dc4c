"""Execution: the ready queue that starts steps, and the step outcomes that advance it."""
from __future__ import annotations

import asyncio
from dataclasses import replace

from infrakitchen.resource.v1 import resource_pb2 as rp
from services.common.auth import Principal
from services.common.clients import RemoteError
from services.common.errors import Aborted, DomainError, FailedPrecondition, PreconditionViolation, Unavailable
from services.common.uow import utcnow
from services.common.values import to_struct
from services.workflow.domain.controls import CONTINUE_INDEPENDENT
from services.workflow.domain.model import (DONE, ERROR, IN_PROGRESS, PENDING, Step, Workflow, awaiting_approval,
                                            masked, ready_steps, resolve_variables)
from services.workflow.app.base import WorkflowsBase, _slug, log


class Execution(WorkflowsBase):
    # --- execute and advance -----------------------------------------------------------------

    async def execute(self, uow, principal: Principal, id_: str, plan_id: str = "") -> Workflow:
        """`plan_id`: apply that plan (see plan_execution); it must be the
        workflow's latest, and done."""
        w = await self.get(uow, id_)
        if w.teardown_status:
            raise FailedPrecondition(f"workflow {w.id} was torn down", [PreconditionViolation(
                "WORKFLOW_TORN_DOWN", f"workflows/{w.id}", "its resources are (being) destroyed; create a new "
                                                           "workflow from the blueprint")])
        if w.status not in (PENDING, ERROR):
            raise FailedPrecondition(f"workflow {w.id} is {w.status}", [PreconditionViolation(
                "WORKFLOW_NOT_EXECUTABLE", f"workflows/{w.id}", "execute needs status pending (or error, to retry)")])
        if w.plan_status == IN_PROGRESS:
            raise FailedPrecondition(f"workflow {w.id} is being planned", [PreconditionViolation(
                "PLAN_IN_PROGRESS", f"workflows/{w.id}", "execute once the plan is done")])
        if plan_id and plan_id != w.plan_id:
            raise Aborted(f"plan {plan_id} is not the latest plan of workflow {w.id}; read the workflow and review "
                          f"its plan {w.plan_id or '(none)'}", reason="PLAN_NOT_LATEST")
        if plan_id and w.plan_status != DONE:
            raise FailedPrecondition(f"the plan of workflow {w.id} is {w.plan_status}", [PreconditionViolation(
                "PLAN_NOT_READY", f"workflows/{w.id}", "execute a plan once it is done (plan again after an error)")])
        flow_on = await self.remote.approval_flow() if plan_id else False
        steps = await uow.steps.of(w.id)
        for st in steps:
            if st.status == ERROR or (st.status == PENDING and st.waiting_reason):
                # retried (its resource, if any, is reused), or no longer waiting for a failed step
                reset = replace(st, status=PENDING, error_message="", waiting_reason="", completion_time=None,
                                retry_time=None, version=st.version + 1)
                await uow.steps.update(reset, st.version)
        now = utcnow()
        started = replace(w, status=IN_PROGRESS, start_time=w.start_time or now, completion_time=None,
                          error_message="", executor=principal.user, update_time=now, version=w.version + 1,
                          executed_plan_id=plan_id, plan_approval_request_id="", plan_approval_status="",
                          cancelled_by="")
        await uow.workflows.update(started, w.version)
        await self._workflow_event(uow, "workflow_started", started, principal.user)
        if flow_on:  # nothing starts before the whole plan is approved
            return await self.ask_plan_approval(uow, started, principal.user)
        await self.schedule(uow, started.id, principal.user)
        return started

    async def schedule(self, uow, workflow_id: str, actor: str, completed: Step | None = None) -> None:
        """Starts every step that is ready; ends the workflow when all are done.
        After a step completed (`completed`), only its dependents can have
        become ready, so without a parallelism limit only they and their own
        dependencies are read, not the whole workflow."""
        w = await uow.workflows.get(workflow_id)
        if w is None or w.status != IN_PROGRESS:
            return
        if w.cancelled_by:  # nothing starts any more; it ends once nothing runs
            await self._end_if_stopped(uow, w, actor)
            return
        if completed is not None and w.max_parallel_steps == 0 and w.on_failure != CONTINUE_INDEPENDENT \
                and not self.level_barrier:
            not_done, failed = await uow.steps.not_done_and_failed(w.id)
            if not_done == 0:
                return await self._complete(uow, w, actor)
            if failed:  # stopped by a failure: nothing starts; it ends once nothing runs
                await self._end_if_stopped(uow, w, actor)
                return
            ready, upstream = [], {}
            for candidate in await uow.steps.pending_dependents(w.id, completed.id):
                deps = await uow.steps.get_many(candidate.depends_on)
                if len(deps) == len(candidate.depends_on) and all(d.status == DONE for d in deps):
                    ready.append(candidate)
                    upstream.update({d.template_id: d for d in deps})
            ready.sort(key=lambda s: (s.position, s.template_name))
        else:
            steps = await uow.steps.of(w.id)
            if steps and all(s.status == DONE for s in steps) or not steps:
                return await self._complete(uow, w, actor)
            if w.on_failure != CONTINUE_INDEPENDENT and any(s.status == ERROR for s in steps):
                await self._end_if_stopped(uow, w, actor)  # stopped by a failure: ends once nothing runs
                return
            upstream = {s.template_id: s for s in steps if s.status == DONE}
            ready = ready_steps(w, steps, self.level_barrier)
            if not ready and not any(s.status == IN_PROGRESS for s in steps):
                await self._end_if_stopped(uow, w, actor)  # failed steps leave nothing that can run
                return
        starts = []
        for st in ready:
            if (start := await self._start_ready(uow, w, st, upstream, actor)) is not None:
                starts.append(start)
        if starts:
            uow.after_commit(lambda: self._start_steps(starts, beside=completed is not None))

    async def _complete(self, uow, w: Workflow, actor: str) -> None:
        now = utcnow()
        done = replace(w, status=DONE, completion_time=now, update_time=now, version=w.version + 1)
        await uow.workflows.update(done, w.version)
        await self._workflow_event(uow, "workflow_completed", done, actor)

    async def _start_steps(self, starts, beside: bool) -> None:
        """Creates and provisions the resources of the steps just marked in
        progress, one after the other. `beside`: after a step completed (an
        executor event) this runs beside the event's consumer, which goes on
        with the next event at once; awaited there, every other workflow's
        completion event arriving meanwhile would wait behind this step's
        CreateResource and SubmitJob, and a hanging call would stop them all
        for up to its deadline. A crash in between loses nothing: the
        reconciler starts again, idempotently, a step in progress that has no
        resource; a graceful stop lets them finish (finish_starting)."""
        async def run() -> None:
            for start in starts:
                await start()
        if not beside:
            await run()
            return
        task = asyncio.get_running_loop().create_task(run(), name="workflow-start-steps")
        self.starting.add(task)  # kept until done: the loop holds tasks weakly
        task.add_done_callback(self.starting.discard)

    async def finish_starting(self, timeout: float) -> None:
        """At a graceful stop, before the database closes: the step starts
        under way beside the consumer finish; past `timeout` they are
        cancelled (their steps stay in progress, and the reconciler starts
        them again), never failed for a closing connection."""
        if not self.starting:
            return
        _, late = await asyncio.wait(set(self.starting), timeout=timeout)
        for task in late:
            task.cancel()
        if late:
            await asyncio.wait(late, timeout=1)

    async def _start_ready(self, uow, w: Workflow, st: Step, upstream: dict[str, Step], actor: str):
        """Marks a ready step in progress; returns what starts it once this
        commits (None when someone else started it)."""
        now = utcnow()
        resolved = resolve_variables(st, w.wiring, upstream)
        sensitive = self._sensitive(st, w, upstream)
        running = replace(st, status=IN_PROGRESS, start_time=now, resolved_variables=masked(resolved, sensitive),
                          sensitive_variables=sensitive, attempts=1, attempt_job_ids=[], retry_time=None,
                          waiting_reason="", version=st.version + 1)
        if not await uow.steps.update(running, st.version):
            return None  # someone else started it
        await self._step_event(uow, "step_started", running, actor)
        # Resources are created on behalf of whoever executed the workflow
        # (they own them), whatever event triggered this step.
        return lambda step=running, user=w.executor or w.creator, done=list(upstream.values()): \
            self.start_step(step.id, user, loaded=(step, w, done))

    async def start_step(self, step_id: str, actor: str,
                         loaded: tuple[Step, Workflow, list[Step]] | None = None) -> None:
        """Creates (idempotently) and provisions the step's resource. Failures
        fail the step; the workflow goes to error. `loaded` is (step,
        workflow, done steps) as the scheduler just committed them, which
        spares reading them again on the way to the step's job."""
        if loaded is not None:
            st, w, steps = loaded
        else:
            async with self.uow_factory() as uow:
                st = await uow.steps.get(step_id)
                w = await uow.workflows.get(st.workflow_id) if st else None
                steps = await uow.steps.of(st.workflow_id) if st else []
        if st is None or w is None or st.status != IN_PROGRESS:
            return
        try:
            upstream, externals, variables, sensitive = await self._step_inputs(w, st, steps)
            if externals:  # shown with what the external resources' outputs wire in
                await self._record(st.id, resolved_variables=masked(variables, sensitive))
            reviewed = None
            if w.executed_plan_id:  # apply the step's plan, never a fresh apply
                if (reviewed := await self.reviewed_plan(st, w, variables, actor)) is None:
                    return  # (re)planned now, or its new plan waits for approval
            parents = list(dict.fromkeys([*(upstream[t].resource_id for t in st.parent_template_ids
                                            if t in upstream), *st.parent_resource_ids]))
            # A cancel that came after the step was marked in progress: no job
            # starts. The create still runs (without provisioning), so that a
            # resource an earlier attempt of this very start created (the
            # create is idempotent by the step id) is recorded on the step and
            # its job cancelled, and a teardown finds whatever exists.
            cancelled_by = await self._cancelled_by(w.id)
            rerun = bool(st.resource_id)  # its resource exists from an earlier execution of the step
            resource = await self.remote.create_resource(actor, rp.CreateResourceRequest(
                resource=rp.Resource(name=f"{_slug(st.template_name)}-{w.id[:8]}", template_id=st.template_id,
                                     source_code_version_id=st.source_code_version_id,
                                     variables=to_struct(variables), parent_ids=parents,
                                     integration_ids=w.integration_ids, secret_ids=w.secret_ids,
                                     storage_id=w.storage_id,
                                     storage_path=st.plan.get("state_path", "") if reviewed else ""),
                request_id=st.id, workflow_id=w.id, step_id=st.id, provision=not cancelled_by,
                sensitive_variables=sensitive, reviewed_plan=None if cancelled_by else reviewed))
            # Recorded with the cancel mark read in the same transaction: a
            # cancel committed meanwhile is seen here (or it saw the job).
            cancelled_by = await self._record(st.id, w.id, resource_id=resource.id,
                                              job_id=resource.last_job_id) or cancelled_by
            if cancelled_by:
                await self._stop_cancelled_start(st, resource, cancelled_by, actor)
                return
            if not rerun and resource.state == "provision" and resource.status == "error":
                # Created now, and its job could not be submitted: the step
                # fails (its error event says so too); never provisioned again here.
                await self.step_failed(st.id, resource.error_message or "the resource failed", actor,
                                       resource_id=resource.id)
                return
            if resource.state == "provision" and resource.status in ("ready", "error"):
                # The step runs again (a re-execution, perhaps after
                # UpdateWorkflow): its resource, never provisioned, takes the
                # step's inputs as they are now (no change: nothing happens).
                resource = await self.remote.update_inputs(actor, resource.id, variables,
                                                           st.source_code_version_id, parents)
            if resource.state == "provisioned" and resource.status == "done":
                await self.step_succeeded(st.id, resource.id, resource.last_job_id, resource.outputs,
                                          list(resource.sensitive_outputs), actor)
            elif resource.status == "approval_pending":
                await self.step_waiting(st.id, awaiting_approval(resource.id, resource.approval_request_id), actor)
            elif resource.status in ("ready", "error", "unknown", "pending") and resource.state == "provision":
                provisioned = await self.remote.provision(actor, resource.id, reviewed)
                if cancelled_by := await self._record(st.id, w.id, job_id=provisioned.last_job_id):
                    await self._stop_cancelled_start(st, provisioned, cancelled_by, actor)
                    return
                if provisioned.status == "approval_pending":
                    await self.step_waiting(st.id, awaiting_approval(resource.id, provisioned.approval_request_id),
                                            actor)
            elif resource.status == "rejected":
                await self.step_failed(st.id, f"the approval of resource {resource.id} was rejected", actor)
        except Unavailable as exc:
            # A service on the way is down or restarting: the step stays in
            # progress and the reconciler starts it again (idempotently).
            log.warning("starting step %s: %s; the reconciler retries", step_id, exc.message)
        except (DomainError, RemoteError) as exc:
            # The callee's field violations say what to fix: keep them.
            message = exc.message if isinstance(exc, DomainError) else exc.describe()
            log.warning("step %s could not start: %s", step_id, message)
            await self.step_failed(step_id, f"could not start: {message}", actor)
        except Exception as exc:  # noqa: BLE001 - never leave a step silently in_progress
            log.exception("starting step %s failed", step_id)
            await self.step_failed(step_id, f"could not start: {type(exc).__name__}", actor)

    async def _stop_cancelled_start(self, st: Step, resource, cancelled_by: str, actor: str) -> None:
        """The step of a cancelled workflow found its resource (created now,
        without a job, by an earlier attempt of this start, or read by the
        reconciler's round over cancelled workflows): a job that
        runs is cancelled and its end ends the step, so the workflow does not
        end while it runs (a job queued but not yet submitted, the executor
        being unreachable, is cancelled by the reconciler once it has an id);
        an approval it waits for is withdrawn; otherwise the step ends now."""
        if resource.status in ("queued", "in_progress"):
            if resource.last_job_id:
                await self.cancel_job(resource.last_job_id, cancelled_by)
            return
        if resource.state == "provisioned" and resource.status == "done":  # it finished before the cancel
            await self.step_succeeded(st.id, resource.id, resource.last_job_id, resource.outputs,
                                      list(resource.sensitive_outputs), actor)
            return
        if resource.status == "approval_pending":
            await self.withdraw_approval(resource.approval_request_id, cancelled_by, attempts=8)
        await self.step_failed(st.id, f"cancelled by {cancelled_by}", actor)

    async def _cancelled_by(self, workflow_id: str) -> str:
        async with self.uow_factory() as uow:
            w = await uow.workflows.get(workflow_id)
        return w.cancelled_by if w is not None else ""

    async def _record(self, step_id: str, workflow_id: str = "", **fields) -> str:
        """Records the step's resource and job; returns the workflow's cancel
        mark (`cancelled_by`), read in the same transaction, when
        `workflow_id` is given. A cancel committed before is seen here; one
        committed after re-reads the steps once it committed and finds the
        recorded job; one racing it exactly (neither sees the other) is
        caught by the reconciler's round over cancelled workflows."""
        for _ in range(5):
            async with self.uow_factory() as uow:
                st = await uow.steps.get(step_id)
                w = await uow.workflows.get(workflow_id) if workflow_id else None
                cancelled_by = w.cancelled_by if w is not None else ""
                if st is None:
                    return cancelled_by
                changes = {k: v for k, v in fields.items() if v and getattr(st, k) != v}
                if not changes:
                    return cancelled_by
                if changes.get("job_id") and changes["job_id"] not in st.attempt_job_ids:
                    changes["attempt_job_ids"] = [*st.attempt_job_ids, changes["job_id"]]
                if await uow.steps.update(replace(st, **changes, version=st.version + 1), st.version):
                    await uow.commit()
                    return cancelled_by
        return 

    async def step_waiting(self, step_id: str, reason: str, actor: str, uow=None, resource_id: str = "") -> None:
        """A running step (or one whose resource a teardown is destroying)
        waits, e.g. for an approval; an empty reason says it moves again."""
        async def apply(u) -> bool:
            st = await u.steps.get(step_id)
            if st is None or IN_PROGRESS not in (st.status, st.teardown_status) or st.waiting_reason == reason:
                return False
            changed = replace(st, waiting_reason=reason, resource_id=resource_id or st.resource_id,
                              version=st.version + 1)
            if not await u.steps.update(changed, st.version):
                return False
            if reason:
                await self._step_event(u, "step_waiting", changed, actor)
            return True
        await self._in_uow(uow, apply)

    async def step_succeeded(self, step_id: str, resource_id: str, job_id: str, outputs: dict,
                             sensitive_outputs: list[str], actor: str, uow=None) -> None:
        await self._in_uow(uow, lambda u: self._succeed(u, step_id, resource_id, job_id, outputs, sensitive_outputs,
                                                        actor))

    async def _succeed(self, uow, step_id, resource_id, job_id, outputs, sensitive_outputs, actor) -> bool:
        st = await uow.steps.get(step_id)
        if st is None or st.status != IN_PROGRESS:
            return False
        done = replace(st, status=DONE, resource_id=resource_id or st.resource_id, job_id=job_id or st.job_id,
                       outputs=dict(outputs), sensitive_outputs=list(sensitive_outputs), waiting_reason="",
                       completion_time=utcnow(), version=st.version + 1)
        if not await uow.steps.update(done, st.version):
            return False
        await self._step_event(uow, "step_completed", done, actor)
        await self.schedule(uow, st.workflow_id, actor, completed=done)
        return True

    async def step_failed(self, step_id: str, message: str, actor: str, uow=None, job_failed: bool = False,
                          resource_id: str = "") -> None:
        """`job_failed`: the step's job failed (its error output may make it
        a transient failure, retried by the workflow's retry policy).
        `resource_id`: the resource the failed job ran for, recorded on the
        step even when its start had not recorded it yet (a teardown destroys
        what the step's resource holds)."""
        await self._in_uow(uow, lambda u: self._fail(u, step_id, message, actor, job_failed, resource_id))

    async def _fail(self, uow, step_id: str, message: str, actor: str, job_failed: bool = False,
                    resource_id: str = "") -> bool:
        """The step goes to error, and what else stops follows the workflow's
        failure policy: with stop (the default) the workflow goes to error,
        steps not started stay pending and running siblings finish; nothing
        is rolled back. A transient failure with attempts left is retried
        instead (see control)."""
        st = await uow.steps.get(step_id)
        if st is None or st.status != IN_PROGRESS:
            return False
        w = await uow.workflows.get(st.workflow_id)
        running = w is not None and w.status == IN_PROGRESS
        if job_failed and running and await self.retry_later(uow, w, st, message, actor):
            return True
        if running and w.cancelled_by:
            message = f"cancelled by {w.cancelled_by}"
        elif st.attempts > 1:
            message = f"{message} (after {st.attempts} attempts)"
        now = utcnow()
        failed = replace(st, status=ERROR, error_message=message, waiting_reason="", completion_time=now,
                         retry_time=None, resource_id=st.resource_id or resource_id, version=st.version + 1)
        if not await uow.steps.update(failed, st.version):
            return False
        await self._step_event(uow, "step_failed", failed, actor)
        if not running:
            return True
        if w.on_failure == CONTINUE_INDEPENDENT and not w.cancelled_by:
            await self.continue_independent(uow, w, failed, actor)
        else:
            # Cancelled, or stopped by this failure: no step starts any more,
            # and the workflow ends in error once no step runs (running
            # siblings finish first: a workflow never ends while a job it
            # started still runs).
            await self._end_if_stopped(uow, w, actor)
        return True

