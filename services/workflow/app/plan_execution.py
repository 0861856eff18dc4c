"""Executing a plan (ExecuteWorkflow with plan_id): what was reviewed is what
is applied.

- With the approval flow on, the whole plan is approved once before any step
  starts (one request listing every step's plan; approvers: admins, whoever
  executes, and the owners of existing resources the plan changes).
- A planned step's resource applies the step's saved plan (never a fresh
  apply), after two checks: its inputs are still those planned (the keyed
  inputs hash) and its state is still the one planned against (the executor
  checks the serial and the applies since: STALE_PLAN). A stale plan is
  planned again and, with the approval flow on, approved again.
- A deferred step is planned when its inputs are known. Its plan goes on by
  itself when it only creates resources; otherwise it waits for an approval
  of that plan.
The resource service checks again that the approval covers the plan it
applies: the workflow service's word alone is not enough."""
from __future__ import annotations

import uuid
from dataclasses import replace

import grpc

from infrakitchen.approval.v1 import approval_pb2 as ap
from infrakitchen.resource.v1 import resource_pb2 as rp
from services.common.clients import RemoteError
from services.common.uow import utcnow
from services.workflow.domain.model import (DEFERRED, IN_PROGRESS, PENDING, PLANNED, PLANNING, Step, Workflow,
                                            inputs_hash, plan_stays_approved)
from services.workflow.app.base import WorkflowsBase, log

APPROVED, REJECTED = "approved", "rejected"


def _changes_text(plan: dict) -> str:
    return f"{plan.get('add', 0)} to add, {plan.get('change', 0)} to change, {plan.get('destroy', 0)} to destroy"


def planned_step_pb(st: Step) -> ap.PlannedStep:
    plan = st.plan
    return ap.PlannedStep(step_id=st.id, template_name=st.template_name, status=plan.get("status", ""),
                          plan_job_id=plan.get("job_id", "") if plan.get("status") == PLANNED else "",
                          add=plan.get("add", 0), change=plan.get("change", 0), destroy=plan.get("destroy", 0),
                          changes=[f"{address} {action}" for address, action in plan.get("changes", [])])


class PlanExecution(WorkflowsBase):
    # --- one approval for the whole plan -------------------------------------------------------

    async def ask_plan_approval(self, uow, w: Workflow, actor: str) -> Workflow:
        """The execution waits for the approval of the whole plan; the request
        is opened after commit (its id chosen here, so a repeat finds it)."""
        asking = replace(w, plan_approval_request_id=str(uuid.uuid4()), plan_approval_status=PENDING,
                         update_time=utcnow(), version=w.version + 1)
        await uow.workflows.update(asking, w.version)
        await self._workflow_event(uow, "workflow_plan_approval_requested", asking, actor)
        uow.after_commit(lambda: self.open_plan_approval(asking.id))
        return asking

    async def open_plan_approval(self, workflow_id: str, step_id: str = "") -> None:
        """Opens the approval request of the whole plan (or of one step's new
        plan). Idempotent; the reconciler repeats it if this was lost."""
        async with self.uow_factory() as uow:
            w = await uow.workflows.get(workflow_id)
            steps = await uow.steps.of(workflow_id) if w else []
        if w is None or w.status != IN_PROGRESS:
            return
        if step_id:
            listed = [s for s in steps if s.id == step_id]
            request_id = listed[0].plan.get("approval_request_id", "") if listed else ""
        else:
            listed = [s for s in steps if s.plan.get("status") in (PLANNED, DEFERRED)]
            request_id = w.plan_approval_request_id if w.plan_approval_status == PENDING else ""
        if not request_id or not listed or request_id in self.opened_approvals:
            return
        owners = {w.executor or w.creator}
        try:
            for s in listed:  # existing resources the plan changes: their owners decide too
                if s.resource_id and (s.plan.get("change") or s.plan.get("destroy")):
                    resource = await self.remote.find_resource(s.resource_id)
                    owners.update(resource.owners if resource else ())
            await self.remote.request_plan_approval(w.executor or w.creator, ap.ApprovalRequest(
                id=request_id, operation=ap.APPROVAL_OPERATION_WORKFLOW_PLAN, workflow_id=w.id,
                workflow_plan_id=w.executed_plan_id, step_id=step_id, resource_name=f"workflow {w.id}",
                owners=sorted(owners), planned_steps=[planned_step_pb(s) for s in listed],
                plan_add=sum(s.plan.get("add", 0) for s in listed),
                plan_change=sum(s.plan.get("change", 0) for s in listed),
                plan_destroy=sum(s.plan.get("destroy", 0) for s in listed)))
            if len(self.opened_approvals) >= 10_000:  # bounded: forgetting only costs one idempotent call
                self.opened_approvals.clear()
            self.opened_approvals.add(request_id)
        except RemoteError as exc:
            if exc.code == grpc.StatusCode.UNAVAILABLE:
                log.warning("opening the plan approval of workflow %s: %s; the reconciler retries", w.id,
                            exc.describe())
                return
            message = f"could not ask for the approval of its plan: {exc.describe()}"
            if step_id:
                await self.step_failed(step_id, message, "system:workflow")
            else:
                await self.fail_workflow(w.id, message, "system:workflow")

    async def on_plan_decision(self, uow, workflow_id: str, step_id: str, request_id: str, decision: str,
                               actor: str, comment: str = "") -> None:
        """The approval service's decision on a plan (of the workflow or of one step)."""
        w = await uow.workflows.get(workflow_id)
        if w is None or w.status != IN_PROGRESS:
            return
        if step_id:
            st = await uow.steps.get(step_id)
            if st is None or st.status != IN_PROGRESS or st.plan.get("approval_request_id") != request_id \
                    or st.plan.get("approved"):
                return
            if decision == APPROVED:
                approved = replace(st, plan={**st.plan, "approved": True}, waiting_reason="", version=st.version + 1)
                if await uow.steps.update(approved, st.version):
                    uow.after_commit(lambda: self.start_step(st.id, w.executor or w.creator))
                return
            why = f"its new plan was {decision} by {actor}" + (f": {comment}" if comment else "")
            await self._fail(uow, step_id, why[:2000], actor)
            return
        if w.plan_approval_request_id != request_id or w.plan_approval_status != PENDING:
            return
        decided = replace(w, plan_approval_status=decision, update_time=utcnow(), version=w.version + 1)
        await uow.workflows.update(decided, w.version)
        if decision == APPROVED:
            await self.schedule(uow, w.id, actor)
            return
        why = f"its plan was {decision} by {actor}" + (f": {comment}" if comment else "")
        await self.fail_workflow(w.id, why[:2000], actor, uow=uow)

    async def fail_workflow(self, workflow_id: str, message: str, actor: str, uow=None) -> None:
        """The execution ends in error before (more) steps start; steps not started stay pending."""
        async def apply(u) -> bool:
            w = await u.workflows.get(workflow_id)
            if w is None or w.status != IN_PROGRESS:
                return False
            now = utcnow()
            failed = replace(w, status="error", error_message=message, completion_time=now, update_time=now,
                             version=w.version + 1)
            await u.workflows.update(failed, w.version)
            await self._workflow_event(u, "workflow_failed", failed, actor)
            return True
        await self._in_uow(uow, apply)

    # --- applying a step's plan ------------------------------------------------------------------

    async def reviewed_plan(self, st: Step, w: Workflow, variables: dict, actor: str) -> rp.ReviewedPlan | None:
        """The step's plan to apply, or None when the step must wait: it is
        (re)planned now (deferred, or its plan went stale), or its new plan
        waits for an approval."""
        plan = st.plan
        if plan.get("status") == PLANNING or (plan.get("approval_request_id") and not plan.get("approved")):
            return None
        if plan.get("status") != PLANNED or not plan.get("job_id"):
            reason = ("its inputs are known now (it was deferred)" if plan.get("status") == DEFERRED
                      else "it had no plan")
            await self.replan(st.id, reason, actor, deferred=plan.get("status") == DEFERRED)
            return None
        if inputs_hash(st.source_code_version_id, variables, self.hash_key) != plan.get("inputs_hash"):
            await self.replan(st.id, "STALE_PLAN: its inputs changed since the plan", actor)
            return None
        try:
            await self.remote.check_saved_plan(actor, plan["job_id"], w.storage_id, plan.get("state_path", ""))
        except RemoteError as exc:
            if exc.code != grpc.StatusCode.FAILED_PRECONDITION:
                raise
            await self.replan(st.id, f"STALE_PLAN: {exc.describe()}"[:1000], actor)
            return None
        return rp.ReviewedPlan(plan_job_id=plan["job_id"],
                               approval_request_id=plan.get("approval_request_id") or w.plan_approval_request_id)

    async def replan(self, step_id: str, reason: str, actor: str, deferred: bool = False) -> None:
        """Plans a running step (again): its plan job runs now, and its end
        (step_replanned) decides whether the step goes on."""
        for _ in range(5):
            async with self.uow_factory() as uow:
                st = await uow.steps.get(step_id)
                if st is None or st.status != IN_PROGRESS or st.plan.get("status") == PLANNING:
                    return
                old = st.plan
                plan = {"status": PLANNING, "request_id": f"plan-{st.id}-{uuid.uuid4()}", "replan_reason": reason,
                        "deferred": deferred or old.get("deferred", False),
                        "approved_changes": old.get("changes", []) if old.get("status") == PLANNED else []}
                stale = reason.startswith("STALE_PLAN")
                changed = replace(st, plan=plan, waiting_reason=f"planning: {reason}"[:2000], version=st.version + 1)
                if not await uow.steps.update(changed, st.version):
                    continue
                await self._step_event(uow, "step_plan_stale" if stale else "step_waiting", changed, actor)
                uow.after_commit(lambda: self.plan_step(step_id, actor))
                await uow.commit()
                return

    async def step_replanned(self, uow, w: Workflow, st: Step, actor: str) -> None:
        """A running step's plan ended: it goes on, waits for an approval of
        its new plan, or fails."""
        plan = st.plan
        if plan.get("status") != PLANNED:
            await self._fail(uow, st.id, f"its plan failed: {plan.get('error_message', '')}"[:2000], actor)
            return
        if not w.plan_approval_request_id or plan_stays_approved(plan):
            uow.after_commit(lambda: self.start_step(st.id, w.executor or w.creator))
            return
        why = plan.get("replan_reason", "")
        asking = replace(st, plan={**plan, "approval_request_id": str(uuid.uuid4()), "approved": False},
                         waiting_reason=f"its new plan ({_changes_text(plan)}) waits for approval: {why}"[:2000],
                         version=st.version + 1)
        if await uow.steps.update(asking, st.version):
            await self._step_event(uow, "step_waiting", asking, actor)
            uow.after_commit(lambda: self.open_plan_approval(w.id, st.id))
