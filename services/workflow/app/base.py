"""What the families of workflow use cases share (events, reading, the
own-or-caller unit of work). The use cases live beside this file, one module
per family (create and update, execution, teardown, reconciliation), and
`workflows.Workflows` puts them together.

Use cases of workflows (workflows.md) and the scheduler that advances them.

Scheduling is a ready queue: a step starts as soon as its own dependencies
are done (not its whole BFS level), within the workflow's parallelism limit.
Marking a step in_progress is one version-guarded update, so two executions or
two events never start it twice; creating and provisioning its resource
happens after that commit and is idempotent (the step id is the resource's
request id), so it can be repeated after a crash. Executor completion events
(correlated to the step) advance the workflow."""
from __future__ import annotations

import logging
import re

from infrakitchen.blueprint.v1 import blueprint_pb2 as bp
from infrakitchen.events.v1 import events_pb2
from services.common import metrics
from services.common.errors import FailedPrecondition, NotFound, PreconditionViolation
from services.common.events import Correlation, new_event
from services.workflow.adapters.remote import Remote, ResourceInfo
from services.workflow.domain.model import DONE, ERROR, IN_PROGRESS, PENDING, Step, Workflow, resolve_variables

log = logging.getLogger(__name__)

SOURCE = "workflow"
_WF_STATUS = {PENDING: 1, IN_PROGRESS: 2, DONE: 3, ERROR: 4}
_TEARDOWN_STATUS = {"": 0, PENDING: 1, IN_PROGRESS: 2, DONE: 3, ERROR: 4}
_NEEDS_INPUT = (bp.VARIABLE_ORIGIN_RUNTIME_INPUT, bp.VARIABLE_ORIGIN_UNRESOLVED)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-") or "step"


class WorkflowsBase:
    def __init__(self, remote: Remote, uow_factory, hash_key: bytes = b"", level_barrier: bool = False):
        self.remote = remote
        self.uow_factory = uow_factory
        self.hash_key = hash_key  # keys the digests of plan inputs (see inputs_hash)
        # IK_WORKFLOW_SCHEDULE=level: the level-by-level schedule, for the benchmark's comparison only.
        self.level_barrier = level_barrier
        # Plan approval requests this process opened: the reconciler opens
        # again only what it cannot know was opened (after a restart, once).
        self.opened_approvals: set[str] = set()
        # Step starts running beside the event consumer that completed their upstream step.
        self.starting: set = set()

    # --- events --------------------------------------------------------------------

    async def _workflow_event(self, uow, field: str, w: Workflow, actor: str) -> None:
        if field in ("workflow_completed", "workflow_failed"):
            outcome, took = "done" if field == "workflow_completed" else "error", metrics.seconds_between(
                w.start_time, w.completion_time)
            metrics.after_commit(uow, lambda: metrics.WORKFLOWS.labels(outcome).observe(took))
        await uow.emit(new_event(SOURCE, field, events_pb2.WorkflowChanged(
            workflow_id=w.id, blueprint_id=w.blueprint_id, status=_WF_STATUS[w.status],
            error_message=w.error_message, teardown_status=_TEARDOWN_STATUS[w.teardown_status],
            teardown_error_message=w.teardown_error_message, plan_id=w.plan_id,
            plan_approval_request_id=w.plan_approval_request_id), actor=actor, correlation=Correlation(workflow_id=w.id,
                                                                                blueprint_id=w.blueprint_id)))

    async def _step_event(self, uow, field: str, st: Step, actor: str) -> None:
        if field in ("step_completed", "step_failed"):
            outcome, took = "done" if field == "step_completed" else "error", metrics.seconds_between(
                st.start_time, st.completion_time)
            metrics.after_commit(uow, lambda: metrics.STEPS.labels(outcome).observe(took))
        await uow.emit(new_event(SOURCE, field, events_pb2.StepChanged(
            workflow_id=st.workflow_id, step_id=st.id, template_id=st.template_id, resource_id=st.resource_id,
            status=_WF_STATUS[st.status], error_message=st.error_message, waiting_reason=st.waiting_reason,
            teardown_status=_TEARDOWN_STATUS[st.teardown_status], teardown_error_message=st.teardown_error_message),
            actor=actor, correlation=Correlation(workflow_id=st.workflow_id, step_id=st.id,
                                                 resource_id=st.resource_id)))

    # --- reading --------------------------------------------------------------------------

    async def get(self, uow, id_: str) -> Workflow:
        w = await uow.workflows.get(id_) if id_ else None
        if w is None:
            raise NotFound("workflow", id_)
        return w

    async def _in_uow(self, uow, apply) -> None:
        """Runs `apply` in the caller's unit of work (an event handler's,
        committed with its inbox record), or in one of its own, committed when
        `apply` changed something."""
        if uow is not None:
            await apply(uow)
            return
        async with self.uow_factory() as own:
            if await apply(own):
                await own.commit()

    @staticmethod
    def external_upstream(w: Workflow, stand_ins: dict[str, ResourceInfo]) -> dict[str, Step]:
        """External templates' resources as done upstream steps, for wiring."""
        return {tid: Step(id="", workflow_id=w.id, template_id=tid, template_name="", position=-1, status=DONE,
                          resource_id=r.id, job_id=r.last_job_id, outputs=dict(r.outputs),
                          sensitive_outputs=list(r.sensitive_outputs)) for tid, r in stand_ins.items()}

    async def _external_sources(self, w: Workflow, st: Step, upstream: dict[str, Step]) -> dict[str, Step]:
        """The resources of external templates (parent overrides) whose
        outputs are wired into this step, read now, as done upstream steps."""
        sources = {r.source_template_id for r in w.wiring if r.target_template_id == st.template_id
                   and r.source_template_id not in upstream and w.parent_overrides.get(r.source_template_id)}
        found = {}
        for tid in sorted(sources):
            resource = await self.remote.find_resource(w.parent_overrides[tid][0])
            if resource is None or resource.state != "provisioned":
                raise FailedPrecondition(f"the resource standing for external template {tid} is not provisioned",
                                         [PreconditionViolation("EXTERNAL_NOT_PROVISIONED",
                                                                f"resources/{w.parent_overrides[tid][0]}",
                                                                "provision it, or point the workflow at another "
                                                                "resource with UpdateWorkflow")])
            found[tid] = resource
        return self.external_upstream(w, found)

    async def _step_inputs(self, w: Workflow, st: Step, steps: list[Step]):
        """(upstream steps by template, whether external resources feed it,
        its variables with wired outputs in clear, its sensitive variable
        names) as the step's job sees them now: done steps and external
        resources, their sensitive outputs read from the executor."""
        upstream = {s.template_id: s for s in steps if s.status == DONE}
        externals = await self._external_sources(w, st, upstream)
        upstream.update(externals)
        for s in upstream.values():
            if s.sensitive_outputs and s.job_id:
                s.outputs = {**s.outputs, **await self.remote.sensitive_outputs(s.job_id)}
        return upstream, bool(externals), resolve_variables(st, w.wiring, upstream), self._sensitive(st, w, upstream)

    @staticmethod
    def _sensitive(st: Step, w: Workflow, upstream: dict[str, Step]) -> list[str]:
        """The step's sensitive variables: its version's, and those wired from sensitive outputs."""
        wired = [r.target_variable for r in w.wiring if r.target_template_id == st.template_id
                 and r.source_output in getattr(upstream.get(r.source_template_id), "sensitive_outputs", ())]
        return sorted({*st.sensitive_variables, *wired})
