"""Planning a whole workflow before anything is applied (PlanWorkflow).

Every step that is not done is either planned (all its inputs are known:
runtime overrides, blueprint defaults, outputs of done steps or of external
resources) by a terraform plan job, or deferred, naming each wired input it
waits for and where it comes from. A step's plan is made against the state
its resource will have (`workflows/<workflow>/<step>`, which the resource
then gets) or already has (a step run before): that saved plan is exactly
what executing the plan applies (plan_execution). Planning creates no
resource record and changes no state; plan jobs take the workflow's
parallelism limit. The plan jobs' completion events (the same consumer as
the applies') fill in each step's plan; the workflow's plan is done when no
step is planning any more, or in error when a plan failed."""
from __future__ import annotations

import uuid
from dataclasses import replace

from infrakitchen.executor.v1 import executor_pb2 as ep
from services.common.auth import Principal
from services.common.clients import RemoteError
from services.common.errors import Aborted, DomainError, FailedPrecondition, PreconditionViolation, Unavailable
from services.common.uow import utcnow
from services.common.values import to_struct
from services.workflow.domain.model import (DEFERRED, DONE, ERROR, IN_PROGRESS, PENDING, PLANNED, PLANNING, Step,
                                            Workflow, deferred_inputs, inputs_hash, plan_action,
                                            step_state_path)
from services.workflow.app.plan_execution import PlanExecution
from services.workflow.app.base import log


class Planning(PlanExecution):
    async def plan(self, uow, principal: Principal, id_: str) -> Workflow:
        w = await self.get(uow, id_)
        if w.teardown_status or w.status not in (PENDING, ERROR) or w.plan_status == IN_PROGRESS:
            why = ("it is being planned" if w.plan_status == IN_PROGRESS else "it was torn down"
                   if w.teardown_status else f"it is {w.status}")
            raise FailedPrecondition(f"workflow {w.id} cannot be planned: {why}", [PreconditionViolation(
                "WORKFLOW_NOT_PLANNABLE", f"workflows/{w.id}",
                "plan needs status pending or error, no teardown and no plan under way")])
        steps = await uow.steps.of(w.id)
        by_template = {s.template_id: s for s in steps}
        now = utcnow()
        plan_id = str(uuid.uuid4())
        to_plan = []
        for st in steps:
            if st.status == DONE:
                plan = {}
            elif unknown := deferred_inputs(st, w.wiring, by_template):
                plan = {"status": DEFERRED, "deferred_inputs": unknown}
            else:
                # Plan jobs take the workflow's parallelism limit: the others
                # wait for a free slot (queued), taken as plans end.
                queued = 0 < w.max_parallel_steps <= len(to_plan)
                plan = {"status": PLANNING, "request_id": f"plan-{st.id}-{plan_id}", "queued": queued}
                if not queued:
                    to_plan.append(st.id)
            changed = replace(st, plan=plan, version=st.version + 1)
            if not await uow.steps.update(changed, st.version):
                raise Aborted(f"workflow {w.id} changed at the same moment; read it again and retry",
                              reason="CONCURRENT_CHANGE")
            if plan.get("status") == DEFERRED:
                await self._step_event(uow, "step_plan_deferred", changed, principal.user)
        started = replace(w, plan_status=IN_PROGRESS, plan_error_message="", plan_start_time=now,
                          plan_completion_time=None, plan_id=plan_id, executed_plan_id="",
                          plan_approval_request_id="", plan_approval_status="", update_time=now,
                          version=w.version + 1)
        await uow.workflows.update(started, w.version)
        await self._workflow_event(uow, "workflow_plan_started", started, principal.user)
        if not to_plan:  # (a queued step implies a full planning slot list)
            return await self._plan_ended(uow, started, principal.user)
        for step_id in to_plan:
            uow.after_commit(lambda step_id=step_id, user=principal.user: self.plan_step(step_id, user))
        return started

    async def plan_step(self, step_id: str, actor: str) -> None:
        """Submits the step's plan job, with the inputs known now, against
        the state its resource has (or will have): that saved plan is what
        the execution applies. The request id (kept on the step's plan)
        makes a repeat, e.g. by the reconciler, submit nothing new."""
        async with self.uow_factory() as uow:
            st = await uow.steps.get(step_id)
            w = await uow.workflows.get(st.workflow_id) if st else None
            steps = await uow.steps.of(st.workflow_id) if st else []
        if st is None or w is None or st.plan.get("status") != PLANNING or st.plan.get("queued"):
            return
        if w.cancelled_by and w.status == IN_PROGRESS:  # a cancelled execution plans nothing more
            return
        try:
            _, _, variables, sensitive = await self._step_inputs(w, st, steps)
            # A step run before has its resource (never provisioned, or it
            # would be done): its plan reads that resource's state.
            resource = await self.remote.get_resource(st.resource_id) if st.resource_id else None
            state_path = resource.storage_path if resource is not None else step_state_path(w.id, st.id)
            job_id = await self.remote.submit_plan(actor, ep.SubmitJobRequest(
                action=ep.JOB_ACTION_PLAN, source=await self.remote.version_source(st.source_code_version_id),
                variables=to_struct(variables), sensitive_variables=[n for n in sensitive if n in variables],
                integration_ids=w.integration_ids, secret_ids=w.secret_ids, storage_id=w.storage_id,
                state_path=state_path,
                correlation=ep.JobCorrelation(workflow_id=w.id, step_id=st.id, resource_id=st.resource_id,
                                              template_id=st.template_id),
                request_id=st.plan.get("request_id") or f"plan-{st.id}-{w.plan_id}"))
        except Unavailable as exc:
            log.warning("planning step %s: %s", step_id, exc.message)
            await self.step_plan_ended(step_id, "", "error", actor, error=f"could not plan: {exc.message}")
            return
        except (DomainError, RemoteError) as exc:
            message = exc.message if isinstance(exc, DomainError) else exc.describe()
            await self.step_plan_ended(step_id, "", "error", actor, error=f"could not plan: {message}")
            return
        await self._record_plan(step_id, job_id, inputs_hash(st.source_code_version_id, variables, self.hash_key),
                                state_path)
        # A cancel committed while the plan job was being submitted: no job of
        # the workflow outlives it (the cancel may have ended this step already).
        async with self.uow_factory() as uow:
            now = await uow.workflows.get(w.id)
        if now is not None and now.cancelled_by and (now.status == IN_PROGRESS or not w.cancelled_by):
            await self.cancel_job(job_id, now.cancelled_by)

    async def _record_plan(self, step_id: str, job_id: str, hashed: str, state_path: str) -> None:
        """Records the plan job and the inputs it was made from. The job's
        completion event may come first (and end the step's plan): the hash
        is still recorded then, on that same job."""
        for _ in range(5):  # the job's completion event may be changing the step at the same moment
            async with self.uow_factory() as uow:
                st = await uow.steps.get(step_id)
                if st is None or st.plan.get("inputs_hash") or st.plan.get("job_id") not in (None, "", job_id) \
                        or not st.plan.get("status"):
                    return
                changed = replace(st, plan={**st.plan, "job_id": job_id, "inputs_hash": hashed,
                                            "state_path": state_path}, version=st.version + 1)
                if await uow.steps.update(changed, st.version):
                    await uow.commit()
                    return

    async def step_plan_ended(self, step_id: str, job_id: str, outcome: str, actor: str, summary=None,
                              error: str = "", uow=None) -> None:
        """A plan job ended (`outcome` is the job's status) or could not start."""
        async def apply(u) -> bool:
            st = await u.steps.get(step_id)
            if st is None or st.plan.get("status") != PLANNING:
                return False
            if job_id and st.plan.get("job_id") not in ("", None, job_id):
                return False  # an older plan's job
            plan = {**st.plan, "job_id": job_id or st.plan.get("job_id", "")}
            if outcome == "succeeded":
                plan.update(status=PLANNED, add=summary.add, change=summary.change, destroy=summary.destroy,
                            changes=[[c.address, plan_action(c.actions)] for c in summary.resource_changes],
                            state_serial=summary.state_serial)
            else:
                plan.update(status=ERROR, error_message=error or f"the plan job ended {outcome}")
            changed = replace(st, plan=plan, version=st.version + 1)
            if not await u.steps.update(changed, st.version):
                return False
            await self._step_event(u, "step_planned" if outcome == "succeeded" else "step_plan_failed", changed,
                                   actor)
            w = await u.workflows.get(st.workflow_id)
            if w is not None and st.status == IN_PROGRESS and w.status == IN_PROGRESS:
                await self.step_replanned(u, w, changed, actor)  # planned again during the execution
            elif w is not None and w.plan_status == IN_PROGRESS:
                steps = await u.steps.of(w.id)
                if not any(s.plan.get("status") == PLANNING for s in steps):
                    await self._plan_ended(u, w, actor, steps)
                else:
                    await self._next_planning_slot(u, steps, actor)
            return True
        await self._in_uow(uow, apply)

    async def _next_planning_slot(self, uow, steps: list[Step], actor: str) -> None:
        """A plan job ended: a step waiting for a planning slot takes it."""
        if not (waiting := [s for s in steps if s.plan.get("status") == PLANNING and s.plan.get("queued")]):
            return
        nxt = min(waiting, key=lambda s: (s.position, s.template_name))
        if await uow.steps.update(replace(nxt, plan={**nxt.plan, "queued": False}, version=nxt.version + 1),
                                  nxt.version):
            uow.after_commit(lambda: self.plan_step(nxt.id, actor))

    async def _plan_ended(self, uow, w: Workflow, actor: str, steps: list[Step] | None = None) -> Workflow:
        steps = steps if steps is not None else await uow.steps.of(w.id)
        failed = [s for s in steps if s.plan.get("status") == ERROR]
        now = utcnow()
        ended = replace(w, plan_status=ERROR if failed else DONE, plan_completion_time=now, update_time=now,
                        plan_error_message="; ".join(f"step {s.template_name}: {s.plan.get('error_message', '')}"
                                                     for s in failed)[:2000], version=w.version + 1)
        await uow.workflows.update(ended, w.version)
        await self._workflow_event(uow, "workflow_plan_failed" if failed else "workflow_planned", ended, actor)
        return ended
