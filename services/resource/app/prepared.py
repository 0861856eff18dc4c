"""Prepared resources: a workflow step's resource created ahead, while the
step it depends on still runs, so that its job starts the moment that step's
job succeeds, on the executor worker it frees, with no hop in between (the
dispatch of a chain of steps).

The workflow service prepares (CreateResource with after_job_id); the
resource is checked as any create is (but for the variables the upstream's
outputs fill in later, whose types the executor checks), stored hidden and
its job submitted to wait for the upstream job. Nobody sees it, and no event
names it, until its job starts (it may create infrastructure from then on)
or the workflow adopts it (the step starts: CreateResource for the same
workflow step, with the resolved inputs), whichever comes first. When the
upstream job does not succeed, the waiting job is cancelled before it ever
ran, and the hidden resource is dropped (its storage path released)."""
from __future__ import annotations

from dataclasses import replace

from services.common.auth import Principal
from services.common.errors import FailedPrecondition, FieldViolation, InvalidArgument, PermissionDenied, \
    PreconditionViolation
from services.common.uow import utcnow
from services.resource.domain.model import OP_PROVISION, READY, Resource, inherited
from services.resource.app.base import LifecycleBase


def _not_preparable(why: str) -> FailedPrecondition:
    return FailedPrecondition(f"the step's resource cannot be prepared ahead: {why}", [PreconditionViolation(
        "NOT_PREPARABLE", "resources", f"{why}; create it once the upstream step is done")],
        reason="NOT_PREPARABLE")


class PreparedResources(LifecycleBase):
    async def prepare(self, uow, principal: Principal, r: Resource, provision: bool, reviewed, after_job_id: str,
                      wiring: list[tuple[str, str]]) -> Resource:
        if principal.via != "workflow":
            raise PermissionDenied("only the workflow service prepares a step's resource ahead")
        problems = []
        if not after_job_id:
            problems.append(FieldViolation("after_job_id", "is required with wired_variables"))
        if not (r.workflow_id and r.step_id and provision) or reviewed is not None:
            problems.append(FieldViolation("after_job_id", "only for a workflow step's resource provisioned at "
                                                           "create, without a reviewed plan"))
        for i, (variable, output) in enumerate(wiring):
            if not variable.strip() or not output.strip():
                problems.append(FieldViolation(f"wired_variables[{i}]", "needs a variable and an output"))
        if problems:
            raise InvalidArgument("invalid preparation", problems)
        if (existing := await uow.resources.prepared_for(r.workflow_id, r.step_id)) is not None:
            if existing.prepared_after_job_id == after_job_id and existing.hidden:
                return existing  # a retry of this preparation
            raise _not_preparable("the step already has a resource prepared")
        if await self.approval_flow_on(uow):
            raise _not_preparable("the approval flow is on (an owner approves the provisioning first)")
        wired = frozenset(variable for variable, _ in wiring)
        template, version, variables, sensitive, tags, storage_path = await self._checked(
            uow, principal, r, provision, reviewed, wired, after_job_id)
        if template.abstract:
            raise _not_preparable("the template is abstract")
        problems = []
        for i, (variable, _) in enumerate(wiring):
            declared = version.variable(variable)
            if declared is None:
                problems.append(FieldViolation(f"wired_variables[{i}].variable",
                                               "is not a variable of the source code version"))
            elif declared.unique:  # its uniqueness is checked against the value, which is not known yet
                raise _not_preparable(f"variable {variable} must be unique")
        if problems:
            raise InvalidArgument("invalid preparation", problems)
        created = self._new(principal, r, template, version, variables, sensitive, tags, storage_path,
                            approval_flow=False)
        stored = replace(self._queued(created, OP_PROVISION), prepared_after_job_id=after_job_id,
                         prepared_wiring=list(wiring))
        await uow.resources.add(stored)  # no audit entry, no event: hidden until shown (_show)
        self._submit_after_commit(uow, stored, principal.user)
        return stored

    async def adopt(self, uow, principal: Principal, prepared: Resource, r: Resource, request_id: str) -> Resource:
        """The step starts: its prepared resource takes the step's inputs as
        resolved now (wired values in clear, sensitive ones sealed), checked
        as a create's are, and is shown (if its job has not started yet)."""
        version = await self._version(prepared.source_code_version_id)
        variables = dict(r.variables)
        _, configs = inherited(list((await uow.resources.get_many(prepared.parent_ids)).values()))
        self._prefill(version, variables, configs)
        violations: list[FieldViolation] = []
        sensitive = await self._check_variables(uow, prepared.template_id, prepared.id, version, variables,
                                                violations, "resource.variables")
        if violations:
            # (its job runs already, or waits: it ends as terraform decides)
            raise InvalidArgument("invalid resource", violations)
        adopted = replace(prepared, variables=variables, prepared_after_job_id="", prepared_wiring=[],
                          sensitive_variables=sorted({*sensitive, *prepared.sensitive_variables,
                                                      *(n for n in r.sensitive_variables if n in variables)}))
        await uow.remember_request("CreateResource", request_id, prepared.id)
        if prepared.hidden:
            return await self._show(uow, prepared, adopted, principal.user)
        return await self._save(uow, prepared, adopted, principal.user, "adopted", events=())

    async def on_prepared_job_event(self, uow, r: Resource, status: str, attempt: int) -> Resource | None:
        """A job event of a hidden resource: None when that is all (the job
        was queued; or it ended without ever running, and the resource is
        dropped); else the resource as shown now, for the event to apply."""
        if status == "queued":
            return None
        if status in ("succeeded", "failed", "cancelled", "timed_out") and not attempt:
            await self.drop_prepared(uow, r)
            return None
        return await self._show(uow, r, r, r.creator)

    async def drop_prepared(self, uow, r: Resource) -> None:
        """A hidden resource whose job never ran (its upstream job did not
        succeed, or the submission failed) goes, and so does its claim on
        its storage path; the step creates (or prepares) it anew."""
        await uow.resources.delete(r.id)
        uow.after_commit(lambda: self._release(r))

    async def _show(self, uow, hidden: Resource, shown: Resource, actor: str) -> Resource:
        """The first anyone hears of a prepared resource: recorded as created
        and provisioned, as a create that provisions at once is, and created
        now (lists, ordered by creation, show it from now on, after the
        upstream step's resource)."""
        now = utcnow()
        shown = replace(shown, create_time=now, update_time=now, version=hidden.version + 1)
        await uow.resources.update(shown, hidden.version)
        created = replace(shown, status=READY, pending_operation="", job_request_id="", last_job_id="",
                          last_job_action="")
        await self._audit(uow, actor, "create", None, created)
        await self._emit(uow, "resource_created", created, actor)
        await self._audit(uow, actor, "provision", created, shown)
        await self._emit(uow, "resource_status_changed", shown, actor, created)
        return shown
