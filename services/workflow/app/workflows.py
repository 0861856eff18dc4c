"""Use cases of workflows (workflows.md) and the scheduler that advances them.

Scheduling is a ready queue: a step starts as soon as its own dependencies
are done (not its whole BFS level), within the workflow's parallelism limit.
Marking a step in_progress is one version-guarded update, so two executions or
two events never start it twice; creating and provisioning its resource
happens after that commit and is idempotent (the step id is the resource's
request id), so it can be repeated after a crash. Executor completion events
(correlated to the step) advance the workflow."""
from __future__ import annotations

import datetime as dt
import logging
import re
import uuid
from dataclasses import replace

from infrakitchen.blueprint.v1 import blueprint_pb2 as bp
from infrakitchen.events.v1 import events_pb2
from infrakitchen.resource.v1 import resource_pb2 as rp
from services.common.auth import Principal
from services.common.clients import RemoteError
from services.common.errors import (Aborted, DomainError, FailedPrecondition, FieldViolation, InvalidArgument,
                                    NotFound, PreconditionViolation, Unavailable)
from services.common.events import Correlation, new_event
from services.common.paging import paginate
from services.common.uow import utcnow
from services.common.values import from_struct, to_struct
from services.workflow.adapters.remote import Remote, ResourceInfo
from services.workflow.domain.model import (DONE, ERROR, IN_PROGRESS, PENDING, Step, TeardownItem, WiringRule,
                                            Workflow, masked, ready_steps, resolve_variables, teardown_order,
                                            teardown_ready)

log = logging.getLogger(__name__)

SOURCE = "workflow"
_WF_STATUS = {PENDING: 1, IN_PROGRESS: 2, DONE: 3, ERROR: 4}
_TEARDOWN_STATUS = {"": 0, PENDING: 1, IN_PROGRESS: 2, DONE: 3, ERROR: 4}
_NEEDS_INPUT = (bp.VARIABLE_ORIGIN_RUNTIME_INPUT, bp.VARIABLE_ORIGIN_UNRESOLVED)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-") or "step"


class Workflows:
    def __init__(self, remote: Remote, uow_factory):
        self.remote = remote
        self.uow_factory = uow_factory

    # --- events --------------------------------------------------------------------

    async def _workflow_event(self, uow, field: str, w: Workflow, actor: str) -> None:
        await uow.emit(new_event(SOURCE, field, events_pb2.WorkflowChanged(
            workflow_id=w.id, blueprint_id=w.blueprint_id, status=_WF_STATUS[w.status],
            error_message=w.error_message, teardown_status=_TEARDOWN_STATUS[w.teardown_status],
            teardown_error_message=w.teardown_error_message), actor=actor, correlation=Correlation(workflow_id=w.id,
                                                                                blueprint_id=w.blueprint_id)))

    async def _step_event(self, uow, field: str, st: Step, actor: str) -> None:
        await uow.emit(new_event(SOURCE, field, events_pb2.StepChanged(
            workflow_id=st.workflow_id, step_id=st.id, template_id=st.template_id, resource_id=st.resource_id,
            status=_WF_STATUS[st.status], error_message=st.error_message, waiting_reason=st.waiting_reason,
            teardown_status=_TEARDOWN_STATUS[st.teardown_status], teardown_error_message=st.teardown_error_message),
            actor=actor, correlation=Correlation(workflow_id=st.workflow_id, step_id=st.id,
                                                 resource_id=st.resource_id)))

    # --- create -------------------------------------------------------------------------

    async def create(self, uow, principal: Principal, blueprint_id: str, variable_overrides: dict[str, dict],
                     version_overrides: dict[str, str], parent_overrides: dict[str, list[str]],
                     integration_ids: list[str], secret_ids: list[str], storage_id: str, max_parallel: int,
                     request_id: str = "") -> Workflow:
        if (existing := await uow.find_request("CreateWorkflow", request_id)) is not None:
            return await self.get(uow, existing)
        if not blueprint_id:
            raise InvalidArgument.of("blueprint_id", "must not be empty")
        got = await self.remote.blueprint_and_plan(blueprint_id)
        if got is None:
            raise InvalidArgument.of("blueprint_id", f"unknown blueprint {blueprint_id!r}")
        blueprint, plan = got
        members = {t.template_id: t for t in blueprint.templates}
        violations: list[FieldViolation] = []
        for field, keys in (("variable_overrides", variable_overrides), ("source_code_version_overrides",
                                                                         version_overrides),
                            ("parent_overrides", parent_overrides)):
            for tid in keys:
                if tid not in members:
                    violations.append(FieldViolation(f"{field}[{tid}]", "is not a template of the blueprint"))
        bad_versions = set()
        for tid, vid in version_overrides.items():
            if tid in members and not await self.remote.version_exists(vid, tid):
                bad_versions.add(tid)
                violations.append(FieldViolation(f"source_code_version_overrides[{tid}]",
                                                 f"{vid!r} is not a source code version of the template"))
        if max_parallel < 0:
            violations.append(FieldViolation("max_parallel_steps", "must not be negative"))

        now = utcnow()
        w = Workflow(id=str(uuid.uuid4()), blueprint_id=blueprint.id, blueprint_revision=blueprint.revision,
                     wiring=[WiringRule(r.source_template_id, r.source_output, r.target_template_id,
                                        r.target_variable) for r in blueprint.wiring_rules],
                     variable_overrides=variable_overrides, version_overrides=version_overrides,
                     parent_overrides=parent_overrides, integration_ids=integration_ids, secret_ids=secret_ids,
                     storage_id=storage_id, max_parallel_steps=max_parallel, creator=principal.user,
                     create_time=now, update_time=now)
        external = {tid for tid, t in members.items() if t.external}
        step_ids = {p.template_id: str(uuid.uuid4()) for p in plan.steps if p.template_id not in external}
        steps = []
        for planned in plan.steps:
            tid = planned.template_id
            if tid in external:
                if not parent_overrides.get(tid):
                    violations.append(FieldViolation(f"parent_overrides[{tid}]",
                                                     f"external template {planned.template_name} needs the "
                                                     "resource that stands for it"))
                continue
            overrides = variable_overrides.get(tid, {})
            for pv in planned.variables:
                if pv.required and pv.origin in _NEEDS_INPUT and pv.name not in overrides:
                    violations.append(FieldViolation(f"variable_overrides[{tid}].{pv.name}",
                                                     f"{planned.template_name} needs {pv.name} at execution time"))
            template = await self.remote.template(tid)
            in_blueprint = [p for p in template.parent_template_ids if p in step_ids]
            external_parents = [r for p in template.parent_template_ids if p in external
                                for r in parent_overrides.get(p, [])]
            own = parent_overrides.get(tid, []) if tid not in external else []
            version_id = version_overrides.get(tid) or members[tid].source_code_version_id
            steps.append(Step(
                sensitive_variables=[] if tid in bad_versions else await self.remote.sensitive_variables(version_id),
                id=step_ids[tid], workflow_id=w.id, template_id=tid, template_name=planned.template_name,
                position=planned.position,
                depends_on=[step_ids[d] for d in planned.depends_on_template_ids if d in step_ids],
                source_code_version_id=version_id,
                defaults=from_struct(members[tid].default_variables), overrides=dict(overrides),
                parent_template_ids=in_blueprint, parent_resource_ids=[*external_parents, *own]))
        if violations:
            raise InvalidArgument("invalid workflow", violations)
        for st in steps:
            st.resolved_variables = masked(resolve_variables(st, w.wiring, {}), st.sensitive_variables)
        await uow.workflows.add(w)
        for st in steps:
            await uow.steps.add(st)
        await uow.remember_request("CreateWorkflow", request_id, w.id)
        await self._workflow_event(uow, "workflow_created", w, principal.user)
        return w

    # --- reading --------------------------------------------------------------------------

    async def get(self, uow, id_: str) -> Workflow:
        w = await uow.workflows.get(id_) if id_ else None
        if w is None:
            raise NotFound("workflow", id_)
        return w

    async def list(self, uow, page_size: int, page_token: str, blueprint_id: str = "", status: str = ""):
        return await paginate(lambda o, n: uow.workflows.list(o, n, blueprint_id, status), page_size, page_token)

    async def delete(self, uow, principal: Principal, id_: str) -> None:
        w = await self.get(uow, id_)
        await uow.workflows.delete(w.id)
        await self._workflow_event(uow, "workflow_deleted", w, principal.user)

    # --- execute and advance -----------------------------------------------------------------

    async def execute(self, uow, principal: Principal, id_: str) -> Workflow:
        w = await self.get(uow, id_)
        if w.teardown_status:
            raise FailedPrecondition(f"workflow {w.id} was torn down", [PreconditionViolation(
                "WORKFLOW_TORN_DOWN", f"workflows/{w.id}", "its resources are (being) destroyed; create a new "
                                                           "workflow from the blueprint")])
        if w.status not in (PENDING, ERROR):
            raise FailedPrecondition(f"workflow {w.id} is {w.status}", [PreconditionViolation(
                "WORKFLOW_NOT_EXECUTABLE", f"workflows/{w.id}", "execute needs status pending (or error, to retry)")])
        steps = await uow.steps.of(w.id)
        for st in steps:
            if st.status == ERROR:  # retried; its resource (if any) is reused
                reset = replace(st, status=PENDING, error_message="", waiting_reason="", completion_time=None,
                                version=st.version + 1)
                await uow.steps.update(reset, st.version)
        now = utcnow()
        started = replace(w, status=IN_PROGRESS, start_time=w.start_time or now, completion_time=None,
                          error_message="", executor=principal.user, update_time=now, version=w.version + 1)
        await uow.workflows.update(started, w.version)
        await self._workflow_event(uow, "workflow_started", started, principal.user)
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
        if completed is not None and w.max_parallel_steps == 0:
            if await uow.steps.count_not_done(w.id) == 0:
                return await self._complete(uow, w, actor)
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
            upstream = {s.template_id: s for s in steps if s.status == DONE}
            ready = ready_steps(w, steps)
        for st in ready:
            await self._start_ready(uow, w, st, upstream, actor)

    async def _complete(self, uow, w: Workflow, actor: str) -> None:
        now = utcnow()
        done = replace(w, status=DONE, completion_time=now, update_time=now, version=w.version + 1)
        await uow.workflows.update(done, w.version)
        await self._workflow_event(uow, "workflow_completed", done, actor)

    async def _start_ready(self, uow, w: Workflow, st: Step, upstream: dict[str, Step], actor: str) -> None:
        now = utcnow()
        resolved = resolve_variables(st, w.wiring, upstream)
        wired_secret = [name for name in resolved if any(
            r.target_template_id == st.template_id and r.target_variable == name
            and r.source_output in upstream.get(r.source_template_id, st).sensitive_outputs for r in w.wiring)]
        sensitive = sorted({*st.sensitive_variables, *wired_secret})
        running = replace(st, status=IN_PROGRESS, start_time=now, resolved_variables=masked(resolved, sensitive),
                          sensitive_variables=sensitive, version=st.version + 1)
        if not await uow.steps.update(running, st.version):
            return  # someone else started it
        await self._step_event(uow, "step_started", running, actor)
        # Resources are created on behalf of whoever executed the workflow
        # (they own them), whatever event triggered this step.
        uow.after_commit(lambda step=running, user=w.executor or w.creator, done=list(upstream.values()):
                         self.start_step(step.id, user, loaded=(step, w, done)))

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
            upstream = {s.template_id: s for s in steps if s.status == DONE}
            for s in upstream.values():
                if s.sensitive_outputs and s.job_id:
                    s.outputs = {**s.outputs, **await self.remote.sensitive_outputs(s.job_id)}
            variables = resolve_variables(st, w.wiring, upstream)
            parents = [upstream[t].resource_id for t in st.parent_template_ids if t in upstream]
            resource = await self.remote.create_resource(actor, rp.CreateResourceRequest(
                resource=rp.Resource(name=f"{_slug(st.template_name)}-{w.id[:8]}", template_id=st.template_id,
                                     source_code_version_id=st.source_code_version_id,
                                     variables=to_struct(variables), parent_ids=[*parents, *st.parent_resource_ids],
                                     integration_ids=w.integration_ids, secret_ids=w.secret_ids,
                                     storage_id=w.storage_id),
                request_id=st.id, workflow_id=w.id, step_id=st.id, provision=True))
            await self._record(st.id, resource_id=resource.id, job_id=resource.last_job_id)
            if resource.state == "provisioned" and resource.status == "done":
                await self.step_succeeded(st.id, resource.id, resource.last_job_id, resource.outputs,
                                          list(resource.sensitive_outputs), actor)
            elif resource.status == "approval_pending":
                await self.step_waiting(st.id, f"resource {resource.id} waits for an owner's approval", actor)
            elif resource.status in ("ready", "error", "unknown", "pending") and resource.state == "provision":
                provisioned = await self.remote.provision(actor, resource.id)
                await self._record(st.id, job_id=provisioned.last_job_id)
                if provisioned.status == "approval_pending":
                    await self.step_waiting(st.id, f"resource {resource.id} waits for an owner's approval", actor)
            elif resource.status == "rejected":
                await self.step_failed(st.id, f"the approval of resource {resource.id} was rejected", actor)
        except Unavailable as exc:
            # A service on the way is down or restarting: the step stays in
            # progress and the reconciler starts it again (idempotently).
            log.warning("starting step %s: %s; the reconciler retries", step_id, exc.message)
        except (DomainError, RemoteError) as exc:
            message = exc.message if isinstance(exc, DomainError) else exc.details
            await self.step_failed(step_id, f"could not start: {message}", actor)
        except Exception as exc:  # noqa: BLE001 - never leave a step silently in_progress
            log.exception("starting step %s failed", step_id)
            await self.step_failed(step_id, f"could not start: {type(exc).__name__}", actor)

    async def _record(self, step_id: str, **fields) -> None:
        for _ in range(5):
            async with self.uow_factory() as uow:
                st = await uow.steps.get(step_id)
                if st is None:
                    return
                changes = {k: v for k, v in fields.items() if v and getattr(st, k) != v}
                if not changes:
                    return
                if await uow.steps.update(replace(st, **changes, version=st.version + 1), st.version):
                    await uow.commit()
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

    async def step_failed(self, step_id: str, message: str, actor: str, uow=None) -> None:
        await self._in_uow(uow, lambda u: self._fail(u, step_id, message, actor))

    async def _fail(self, uow, step_id: str, message: str, actor: str) -> bool:
        """The step and the workflow go to error; steps not started stay
        pending, running siblings finish, nothing is rolled back."""
        st = await uow.steps.get(step_id)
        if st is None or st.status != IN_PROGRESS:
            return False
        now = utcnow()
        failed = replace(st, status=ERROR, error_message=message, waiting_reason="", completion_time=now,
                         version=st.version + 1)
        if not await uow.steps.update(failed, st.version):
            return False
        await self._step_event(uow, "step_failed", failed, actor)
        w = await uow.workflows.get(st.workflow_id)
        if w is not None and w.status == IN_PROGRESS:
            errored = replace(w, status=ERROR, error_message=f"step {st.template_name} failed: {message}",
                              completion_time=now, update_time=now, version=w.version + 1)
            await uow.workflows.update(errored, w.version)
            await self._workflow_event(uow, "workflow_failed", errored, actor)
        return True

    # --- teardown ------------------------------------------------------------------------------

    async def _teardown_plan(self, steps: list[Step]) -> tuple[list[TeardownItem], dict[str, list[str]]]:
        """Steps whose resources still exist, in reverse dependency order, and
        per step the resources outside the workflow that depend on them."""
        ours = {s.resource_id for s in steps if s.resource_id}
        remaining, external = [], {}
        for st in steps:
            if not st.resource_id:
                continue
            resource = await self.remote.find_resource(st.resource_id)
            if resource is None or (resource.state, resource.status) == ("destroyed", "done"):
                continue
            remaining.append(st)
            external[st.id] = [c.id for c in await self.remote.children(st.resource_id)
                               if c.id not in ours and c.state != "destroyed"]
        return teardown_order(remaining), external

    async def preview_teardown(self, uow, id_: str) -> tuple[list[TeardownItem], dict[str, list[str]]]:
        w = await self.get(uow, id_)
        return await self._teardown_plan(await uow.steps.of(w.id))

    async def teardown(self, uow, principal: Principal, id_: str) -> Workflow:
        """Destroys the workflow's resources, dependents first. Retrying after
        a failed teardown destroys what is left."""
        w = await self.get(uow, id_)
        if w.status == IN_PROGRESS:
            raise FailedPrecondition(f"workflow {w.id} is executing", [PreconditionViolation(
                "WORKFLOW_RUNNING", f"workflows/{w.id}", "tear down once the execution has ended")])
        if w.teardown_status == IN_PROGRESS:
            raise FailedPrecondition(f"workflow {w.id} is being torn down", [PreconditionViolation(
                "TEARDOWN_RUNNING", f"workflows/{w.id}", "a teardown is under way")])
        steps = await uow.steps.of(w.id)
        plan, external = await self._teardown_plan(steps)
        blockers = [PreconditionViolation("DEPENDENT_OUTSIDE_WORKFLOW", f"resources/{rid}",
                                          f"depends on the resource of step {item.step.template_name} "
                                          f"({item.step.resource_id}); destroy it first")
                    for item in plan for rid in external[item.step.id]]
        if blockers:
            raise FailedPrecondition(f"resources outside workflow {w.id} depend on its resources", blockers,
                                     reason="DEPENDENTS_OUTSIDE_WORKFLOW")
        if not plan and w.teardown_status == DONE:
            raise FailedPrecondition(f"workflow {w.id} is torn down already", [PreconditionViolation(
                "ALREADY_TORN_DOWN", f"workflows/{w.id}", "none of its resources is left")])
        to_destroy = {item.step.id for item in plan}
        for st in steps:
            status = PENDING if st.id in to_destroy else (DONE if st.resource_id else "")
            if (st.teardown_status, st.teardown_error_message) != (status, ""):
                changed = replace(st, teardown_status=status, teardown_error_message="", version=st.version + 1)
                if not await uow.steps.update(changed, st.version):
                    raise Aborted(f"workflow {w.id} changed at the same moment; read it again and retry",
                                  reason="CONCURRENT_CHANGE")
        now = utcnow()
        started = replace(w, teardown_status=IN_PROGRESS, teardown_error_message="", torn_down_by=principal.user,
                          teardown_start_time=now, teardown_completion_time=None, update_time=now,
                          version=w.version + 1)
        await uow.workflows.update(started, w.version)
        await self._workflow_event(uow, "workflow_teardown_started", started, principal.user)
        await self.schedule_teardown(uow, w.id, principal.user)
        return started

    async def schedule_teardown(self, uow, workflow_id: str, actor: str) -> None:
        """Destroys every resource whose dependents are destroyed; ends the
        teardown when all are."""
        w = await uow.workflows.get(workflow_id)
        if w is None or w.teardown_status != IN_PROGRESS:
            return
        steps = await uow.steps.of(w.id)
        if all(s.teardown_status in ("", DONE) for s in steps):
            now = utcnow()
            done = replace(w, teardown_status=DONE, teardown_completion_time=now, update_time=now,
                           version=w.version + 1)
            await uow.workflows.update(done, w.version)
            await self._workflow_event(uow, "workflow_torn_down", done, actor)
            return
        for st in teardown_ready(w, steps):
            running = replace(st, teardown_status=IN_PROGRESS, teardown_start_time=utcnow(), waiting_reason="",
                              version=st.version + 1)
            if not await uow.steps.update(running, st.version):
                continue
            await self._step_event(uow, "step_teardown_started", running, actor)
            uow.after_commit(lambda step_id=st.id, user=w.torn_down_by or actor: self.destroy_step(step_id, user))

    async def destroy_step(self, step_id: str, actor: str) -> None:
        """Asks the resource service to destroy the step's resource; the
        destroy job's completion event moves the teardown on."""
        async with self.uow_factory() as uow:
            st = await uow.steps.get(step_id)
        if st is None or st.teardown_status != IN_PROGRESS:
            return
        try:
            resource = await self.remote.destroy(actor, st.resource_id)
        except RemoteError as exc:
            resource = await self._resource_after_refusal(st, exc, actor)
            if resource is None:
                return
        except Unavailable as exc:  # the reconciler asks again
            log.warning("destroying the resource of step %s: %s; the reconciler retries", step_id, exc.message)
            return
        except Exception as exc:  # noqa: BLE001 - never leave a teardown step silently in_progress
            log.exception("destroying the resource of step %s failed", step_id)
            await self.teardown_step_failed(step_id, f"could not start the destroy: {type(exc).__name__}", actor)
            return
        if resource.status == "approval_pending":
            await self.step_waiting(step_id, f"the destroy of resource {resource.id} waits for an owner's approval",
                                    actor)
        elif resource.state == "destroyed" and resource.status == "done":
            await self.teardown_step_done(step_id, resource.last_job_id, actor)

    async def _resource_after_refusal(self, st: Step, exc: RemoteError, actor: str) -> ResourceInfo | None:
        """A refused destroy may be one already under way or done (a repeat
        after a crash): then the teardown goes on; otherwise the step fails."""
        resource = await self.remote.find_resource(st.resource_id)
        if resource is None:
            await self.teardown_step_done(st.id, "", actor)
            return None
        if resource.state == "destroyed" or (resource.state == "destroy" and resource.status in (
                "queued", "in_progress", "approval_pending")):
            return resource
        await self.teardown_step_failed(st.id, f"could not start the destroy: {exc.details}", actor)
        return None

    async def teardown_step_done(self, step_id: str, job_id: str, actor: str, uow=None) -> None:
        async def apply(u) -> bool:
            st = await u.steps.get(step_id)
            if st is None or st.teardown_status != IN_PROGRESS:
                return False
            done = replace(st, teardown_status=DONE, teardown_job_id=job_id or st.teardown_job_id,
                           waiting_reason="", version=st.version + 1)
            if not await u.steps.update(done, st.version):
                return False
            await self._step_event(u, "step_torn_down", done, actor)
            await self.schedule_teardown(u, st.workflow_id, actor)
            return True
        await self._in_uow(uow, apply)

    async def teardown_step_failed(self, step_id: str, message: str, actor: str, job_id: str = "",
                                   uow=None) -> None:
        """The step and the teardown go to error; destroys under way finish,
        the rest waits for a retry."""
        async def apply(u) -> bool:
            st = await u.steps.get(step_id)
            if st is None or st.teardown_status != IN_PROGRESS:
                return False
            failed = replace(st, teardown_status=ERROR, teardown_error_message=message, waiting_reason="",
                             teardown_job_id=job_id or st.teardown_job_id, version=st.version + 1)
            if not await u.steps.update(failed, st.version):
                return False
            await self._step_event(u, "step_teardown_failed", failed, actor)
            w = await u.workflows.get(st.workflow_id)
            if w is not None and w.teardown_status == IN_PROGRESS:
                now = utcnow()
                errored = replace(w, teardown_status=ERROR, update_time=now, teardown_completion_time=now,
                                  teardown_error_message=f"destroying the resource of step {st.template_name} "
                                                         f"failed: {message}", version=w.version + 1)
                await u.workflows.update(errored, w.version)
                await self._workflow_event(u, "workflow_teardown_failed", errored, actor)
            return True
        await self._in_uow(uow, apply)

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

    # --- reconciliation -----------------------------------------------------------------------

    async def reconcile(self, older_than_seconds: float) -> None:
        """Steps of running workflows that have not moved for a while: a start
        that never happened is repeated; an outcome whose event was missed is
        read from the resource service."""
        cutoff = utcnow() - dt.timedelta(seconds=older_than_seconds)
        async with self.uow_factory() as uow:
            running = [(w, await uow.steps.of(w.id)) for w in await uow.workflows.in_progress()]
        for w, steps in running:
            if w.teardown_status == IN_PROGRESS:
                await self._reconcile_teardown(w, steps, cutoff)
                continue
            for st in steps:
                if st.status != IN_PROGRESS or (st.start_time and st.start_time > cutoff):
                    continue
                if not st.resource_id:
                    await self.start_step(st.id, w.executor or w.creator)
                    continue
                resource: ResourceInfo = await self.remote.get_resource(st.resource_id)
                if resource.state == "provisioned" and resource.status == "done":
                    await self.step_succeeded(st.id, resource.id, resource.last_job_id, resource.outputs,
                                              list(resource.sensitive_outputs), "system:reconciler")
                elif resource.status in ("error", "rejected", "unknown"):
                    await self.step_failed(st.id, resource.error_message or f"resource is {resource.status}",
                                           "system:reconciler")
                elif resource.status == "ready" and resource.state == "provision":
                    await self.start_step(st.id, w.executor or w.creator)

    async def _reconcile_teardown(self, w: Workflow, steps: list[Step], cutoff: dt.datetime) -> None:
        actor = "system:reconciler"
        for st in steps:
            if st.teardown_status != IN_PROGRESS or (st.teardown_start_time and st.teardown_start_time > cutoff):
                continue
            resource = await self.remote.find_resource(st.resource_id)
            if resource is None or (resource.state, resource.status) == ("destroyed", "done"):
                await self.teardown_step_done(st.id, resource.last_job_id if resource else "", actor)
            elif resource.state == "destroy" and resource.status in ("error", "rejected", "unknown"):
                await self.teardown_step_failed(st.id, resource.error_message or f"resource is {resource.status}",
                                                actor)
            elif resource.state == "provisioned" and st.waiting_reason:  # its destroy was rejected
                await self.teardown_step_failed(st.id, f"the destroy of resource {resource.id} was not approved",
                                                actor)
            elif resource.state == "provisioned":  # the destroy call was lost (a crash before it was made)
                await self.destroy_step(st.id, w.torn_down_by or actor)
