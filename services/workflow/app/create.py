"""Create and update a workflow: the blueprint's steps with their inputs,
validated (workflows.md, "Creating Workflows" and "Error Recovery").

One validation serves both: `_planned_steps` builds every step from the
blueprint (at the workflow's recorded revision) and the workflow's
overrides, collecting every problem as a field violation. Create stores the
steps; update compares them with the stored ones and changes only steps that
have not run (a done step keeps its resource and is never touched)."""
from __future__ import annotations

import uuid
from dataclasses import replace

from services.common.auth import Principal
from services.common.errors import (Aborted, FailedPrecondition, FieldViolation, InvalidArgument,
                                    PreconditionViolation)
from services.common.paging import by_creation, newest_first, paginate
from services.common.uow import utcnow
from services.common.values import from_struct
from services.workflow.adapters.remote import ResourceInfo
from services.workflow.domain.controls import Controls, RetryPolicy
from services.workflow.domain.model import (DONE, ERROR, IN_PROGRESS, MASK, PENDING, Step, WiringRule, Workflow,
                                            masked, resolve_variables)
from services.workflow.app.base import WorkflowsBase, _NEEDS_INPUT

OVERRIDE_FIELDS = ("variable_overrides", "source_code_version_overrides", "parent_overrides")
CONTROL_FIELDS = ("on_failure", "retry_policy")  # while the workflow is not running
UPDATE_FIELDS = (*OVERRIDE_FIELDS, *CONTROL_FIELDS, "expire_time")


def _per_template(current: dict, given: dict) -> dict:
    """Each template the update names gets the given override; an empty one removes it."""
    merged = dict(current)
    for template_id, value in given.items():
        if value:
            merged[template_id] = value
        else:
            merged.pop(template_id, None)
    return merged


KNOWN_NAMES_SHOWN = 30  # a refused override lists the variables there are, at most this many


class CreateCases(WorkflowsBase):
    # --- create -------------------------------------------------------------------------

    async def create(self, uow, principal: Principal, blueprint_id: str, variable_overrides: dict[str, dict],
                     version_overrides: dict[str, str], parent_overrides: dict[str, list[str]],
                     integration_ids: list[str], secret_ids: list[str], storage_id: str, max_parallel: int,
                     request_id: str = "", controls: Controls | None = None) -> Workflow:
        if (existing := await uow.find_request("CreateWorkflow", request_id)) is not None:
            return await self.get(uow, existing)
        if not blueprint_id:
            raise InvalidArgument.of("blueprint_id", "must not be empty")
        got = await self.remote.blueprint_and_plan(blueprint_id)
        if got is None:
            raise InvalidArgument.of("blueprint_id", f"unknown blueprint {blueprint_id!r}")
        blueprint, plan = got
        violations: list[FieldViolation] = []
        if max_parallel < 0:
            violations.append(FieldViolation("max_parallel_steps", "must not be negative"))
        now = utcnow()
        controls = controls or Controls()
        violations += controls.problems(now)
        w = Workflow(id=str(uuid.uuid4()), blueprint_id=blueprint.id, blueprint_revision=blueprint.revision,
                     wiring=[WiringRule(r.source_template_id, r.source_output, r.target_template_id,
                                        r.target_variable) for r in blueprint.wiring_rules],
                     variable_overrides=variable_overrides, version_overrides=version_overrides,
                     parent_overrides=parent_overrides, integration_ids=integration_ids, secret_ids=secret_ids,
                     storage_id=storage_id, max_parallel_steps=max_parallel, creator=principal.user,
                     create_time=now, update_time=now, on_failure=controls.on_failure,
                     retry_policy=controls.retry_policy.to_json(), expire_time=controls.expiry(now))
        steps = await self._planned_steps(w, blueprint, plan, violations)
        if violations:
            raise InvalidArgument("invalid workflow", violations)
        await uow.workflows.add(w)
        for st in steps:
            await uow.steps.add(st)
        await uow.remember_request("CreateWorkflow", request_id, w.id)
        await self._workflow_event(uow, "workflow_created", w, principal.user)
        return w

    async def _planned_steps(self, w: Workflow, blueprint, plan, violations: list[FieldViolation],
                             step_ids: dict[str, str] | None = None) -> list[Step]:
        """One step per non-external template of the blueprint with the
        workflow's overrides; every problem becomes a field violation."""
        members = {t.template_id: t for t in blueprint.templates}
        for field, keys in (("variable_overrides", w.variable_overrides),
                            ("source_code_version_overrides", w.version_overrides),
                            ("parent_overrides", w.parent_overrides)):
            for tid in keys:
                if tid not in members:
                    violations.append(FieldViolation(f"{field}[{tid}]", "is not a template of the blueprint"))
        bad_versions = set()
        for tid, vid in w.version_overrides.items():
            if tid in members and not await self.remote.version_exists(vid, tid):
                bad_versions.add(tid)
                violations.append(FieldViolation(f"source_code_version_overrides[{tid}]",
                                                 f"{vid!r} is not a source code version of the template"))
        external = {tid for tid, t in members.items() if t.external}
        stand_ins = await self._external_resources(w, members, external, violations)
        step_ids = step_ids or {}
        step_ids = {p.template_id: step_ids.get(p.template_id) or str(uuid.uuid4())
                    for p in plan.steps if p.template_id not in external}
        # The catalog in two calls, not two per step (500 steps: 1000 round trips).
        wanted = [p.template_id for p in plan.steps if p.template_id not in external]
        templates = await self.remote.templates(wanted)
        version_of = {tid: w.version_overrides.get(tid) or members[tid].source_code_version_id for tid in wanted}
        declared_of = await self.remote.versions_variables(
            [v for tid, v in version_of.items() if tid not in bad_versions])
        steps = []
        for planned in plan.steps:
            tid = planned.template_id
            if tid in external:
                continue
            overrides = w.variable_overrides.get(tid, {})
            for pv in planned.variables:
                if pv.required and pv.origin in _NEEDS_INPUT and pv.name not in overrides:
                    violations.append(FieldViolation(f"variable_overrides[{tid}].{pv.name}",
                                                     f"{planned.template_name} needs {pv.name} at execution time"))
            template = templates[tid]
            in_blueprint = [p for p in template.parent_template_ids if p in step_ids]
            external_parents = [r for p in template.parent_template_ids if p in external
                                for r in w.parent_overrides.get(p, [])]
            own = w.parent_overrides.get(tid, [])
            version_id = version_of[tid]
            sensitive: list[str] = []
            if tid not in bad_versions:
                declared = declared_of[version_id]
                sensitive = list(declared.sensitive)
                for name in overrides:
                    if name not in declared.names:
                        known = sorted(declared.names)
                        listed = ", ".join(known[:KNOWN_NAMES_SHOWN]) + (", ..." if len(known) > KNOWN_NAMES_SHOWN
                                                                        else "")
                        violations.append(FieldViolation(
                            f"variable_overrides[{tid}].{name}",
                            f"{planned.template_name} has no variable {name!r} at its source code version; "
                            f"its variables: {listed or 'none'}"))
            steps.append(Step(
                sensitive_variables=sensitive, id=step_ids[tid], workflow_id=w.id, template_id=tid,
                template_name=planned.template_name, position=planned.position,
                depends_on=[step_ids[d] for d in planned.depends_on_template_ids if d in step_ids],
                source_code_version_id=version_id,
                defaults=from_struct(members[tid].default_variables), overrides=dict(overrides),
                parent_template_ids=in_blueprint, parent_resource_ids=list(dict.fromkeys([*external_parents, *own])),
                retry_default=RetryPolicy(template.retry_policy.max_attempts,
                                          template.retry_policy.initial_backoff.ToNanoseconds() / 1e9,
                                          tuple(template.retry_policy.transient_patterns)).to_json()))
        upstream = self.external_upstream(w, stand_ins)
        for st in steps:
            st.resolved_variables = masked(resolve_variables(st, w.wiring, upstream), st.sensitive_variables)
        return steps

    async def _external_resources(self, w: Workflow, members: dict, external: set[str],
                                  violations: list[FieldViolation]) -> dict[str, ResourceInfo]:
        """The resources standing for external templates (parent overrides):
        each must exist, be provisioned and be of that template; their outputs
        are wired like a done upstream step's. Returns template id -> the
        first resource (the one whose outputs are wired)."""
        found: dict[str, ResourceInfo] = {}
        for tid in sorted(external):
            ids = w.parent_overrides.get(tid, [])
            if not ids:
                violations.append(FieldViolation(f"parent_overrides[{tid}]",
                                                 "an external template needs the resource that stands for it"))
                continue
            for i, rid in enumerate(ids):
                field = f"parent_overrides[{tid}].resource_ids[{i}]"
                resource = await self.remote.find_resource(rid) if rid else None
                if resource is None:
                    violations.append(FieldViolation(field, f"unknown resource {rid!r}"))
                elif resource.template_id != tid:
                    violations.append(FieldViolation(field, f"resource {rid} is of another template"))
                elif resource.state != "provisioned":
                    violations.append(FieldViolation(field, f"resource {rid} is {resource.state}/{resource.status}, "
                                                            "not provisioned"))
                else:
                    found.setdefault(tid, resource)
        return found

    # --- update (the fix before a re-execution) -------------------------------------------

    async def update(self, uow, principal: Principal, id_: str, variable_overrides: dict[str, dict],
                     version_overrides: dict[str, str], parent_overrides: dict[str, list[str]],
                     mask_: list[str], etag: str, controls: Controls | None = None) -> Workflow:
        w = await self.get(uow, id_)
        if etag and etag != w.etag:
            raise Aborted(f"workflow {w.id} has etag {w.etag}, not {etag}; read it again and retry",
                          reason="STALE_ETAG")
        bad = [f for f in mask_ if f not in UPDATE_FIELDS]
        if bad:
            raise InvalidArgument("invalid workflow update", [FieldViolation(
                f"update_mask[{f}]", f"only {', '.join(UPDATE_FIELDS)} change after create") for f in bad])
        if mask_ == ["expire_time"]:  # the one change a running workflow takes
            return await self._extend(uow, principal, w, (controls or Controls()).expire_time)
        if w.teardown_status or w.status not in (PENDING, ERROR):
            raise FailedPrecondition(f"workflow {w.id} is {w.status}", [PreconditionViolation(
                "WORKFLOW_NOT_EDITABLE", f"workflows/{w.id}",
                "update needs status pending or error, and no teardown")])
        steps = await uow.steps.of(w.id)
        sensitive = {s.template_id: set(s.sensitive_variables) for s in steps}
        variables, versions, parents = w.variable_overrides, w.version_overrides, w.parent_overrides
        if "variable_overrides" in mask_:
            def unmasked(tid: str, values: dict) -> dict:
                """A masked value sent back as it was read keeps the stored one."""
                old = w.variable_overrides.get(tid, {})
                return {k: (old[k] if v == MASK and k in sensitive.get(tid, ()) and k in old else v)
                        for k, v in values.items()}
            variables = _per_template(variables, {tid: unmasked(tid, values)
                                                  for tid, values in variable_overrides.items()})
        if "source_code_version_overrides" in mask_:
            versions = _per_template(versions, version_overrides)
        if "parent_overrides" in mask_:
            parents = _per_template(parents, {tid: list(ids) for tid, ids in parent_overrides.items()})
        changed = replace(w, variable_overrides=variables, version_overrides=versions, parent_overrides=parents)
        changed = self._controls_changed(changed, mask_, controls or Controls())
        got = await self.remote.blueprint_and_plan(w.blueprint_id, w.blueprint_revision)
        if got is None:
            raise FailedPrecondition(f"blueprint {w.blueprint_id} of workflow {w.id} no longer exists", [
                PreconditionViolation("BLUEPRINT_MISSING", f"blueprints/{w.blueprint_id}",
                                      "create a new workflow")])
        violations: list[FieldViolation] = []
        planned = await self._planned_steps(changed, *got, violations,
                                            step_ids={s.template_id: s.id for s in steps})
        if violations:
            raise InvalidArgument("invalid workflow update", violations)
        by_template = {s.template_id: s for s in planned}
        moved, untouchable = [], []
        for st in steps:
            new = by_template.get(st.template_id)
            if new is None:
                continue
            inputs = ("overrides", "source_code_version_id", "parent_resource_ids")
            if all(getattr(new, f) == getattr(st, f) for f in inputs):
                continue
            if st.status in (DONE, IN_PROGRESS):
                untouchable.append(st)
                continue
            moved.append(replace(st, overrides=new.overrides, source_code_version_id=new.source_code_version_id,
                                 parent_resource_ids=new.parent_resource_ids,
                                 sensitive_variables=new.sensitive_variables,
                                 resolved_variables=new.resolved_variables, version=st.version + 1))
        if untouchable:
            raise FailedPrecondition("the update would change steps that already ran", [PreconditionViolation(
                "STEP_DONE" if st.status == DONE else "STEP_RUNNING", f"steps/{st.id}",
                f"step {st.template_name} is {st.status}: its resource {st.resource_id or '(none yet)'} keeps its "
                "inputs; change it through the resource (a temporary state) instead") for st in untouchable],
                reason="STEP_ALREADY_RAN")
        for st, new in ((s, m) for s in steps for m in moved if m.id == s.id):
            if not await uow.steps.update(new, st.version):
                raise Aborted(f"workflow {w.id} changed at the same moment; read it again and retry",
                              reason="CONCURRENT_CHANGE")
        updated = replace(changed, update_time=utcnow(), version=w.version + 1)
        await uow.workflows.update(updated, w.version)  # ABORTED when another writer came first
        await self._workflow_event(uow, "workflow_updated", updated, principal.user)
        return updated

    @staticmethod
    def _controls_changed(w: Workflow, mask_: list[str], controls: Controls) -> Workflow:
        """The failure policy, retry policy and expiry an update names, validated."""
        now = utcnow()
        given = Controls(on_failure=controls.on_failure if "on_failure" in mask_ else w.on_failure,
                         retry_policy=controls.retry_policy if "retry_policy" in mask_ else RetryPolicy(),
                         expire_time=controls.expire_time if "expire_time" in mask_ else None)
        if problems := given.problems(now):
            raise InvalidArgument("invalid workflow update", problems)
        return replace(w, on_failure=given.on_failure,
                       retry_policy=given.retry_policy.to_json() if "retry_policy" in mask_ else w.retry_policy,
                       expire_time=given.expire_time if "expire_time" in mask_ else w.expire_time)

    async def _extend(self, uow, principal: Principal, w: Workflow, expire_time) -> Workflow:
        """A new expire_time (or none), also while the workflow runs; not once it expired."""
        if w.expired:
            raise FailedPrecondition(f"workflow {w.id} expired already", [PreconditionViolation(
                "WORKFLOW_EXPIRED", f"workflows/{w.id}", "its teardown started when it expired")])
        if problems := Controls(expire_time=expire_time).problems(utcnow()):
            raise InvalidArgument("invalid workflow update", problems)
        extended = replace(w, expire_time=expire_time, update_time=utcnow(), version=w.version + 1)
        await uow.workflows.update(extended, w.version)
        await self._workflow_event(uow, "workflow_updated", extended, principal.user)
        return extended

    # --- reading and deleting ----------------------------------------------------------------

    async def list(self, uow, page_size: int, page_token: str, blueprint_id: str = "", status: str = "",
                   order_by: str = ""):
        desc = newest_first(order_by)
        return await paginate(lambda a, n: uow.workflows.list(a, n, blueprint_id, status, desc), page_size,
                              page_token, {"list": "workflows", "blueprint_id": blueprint_id, "status": status,
                                           "desc": desc}, by_creation)

    async def delete(self, uow, principal: Principal, id_: str) -> None:
        w = await self.get(uow, id_)
        await uow.workflows.delete(w.id)
        await self._workflow_event(uow, "workflow_deleted", w, principal.user)
