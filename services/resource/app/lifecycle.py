"""Use cases of the resource lifecycle (resource-workflows.md), one method per
command. Each runs in the unit of work it is given; the caller commits.

IaC runs as executor jobs. A use case that starts one stores the resource as
`queued` with a fresh job request id and registers the submission to run after
the commit (so a job never starts for a state that was not stored); the
submission is idempotent by that request id, so the reconciler can repeat it
after a crash. Completion events (or the reconciler, or a child's create that
finds its parent's job finished) apply the job's outcome exactly once: only
while the resource still waits for that very job."""
from __future__ import annotations

import asyncio
import json
import logging
import uuid
from dataclasses import replace
from typing import Any

from infrakitchen.approval.v1 import approval_pb2
from infrakitchen.events.v1 import events_pb2
from infrakitchen.executor.v1 import executor_pb2
from services.common.auth import Principal, Role
from services.common.errors import (Aborted, AlreadyExists, DomainError, FailedPrecondition, FieldViolation,
                                    Unavailable,
                                    InvalidArgument, NotFound, PermissionDenied, PreconditionViolation)
from services.common.events import Correlation, new_event
from services.common.paging import paginate
from services.common.uow import utcnow
from services.common.values import to_struct, to_value
from services.resource.adapters.remote import JobInfo, JobSubmission, Remote, VersionInfo
from services.resource.domain.model import (APPROVAL_PENDING, BUSY, DESTROY, PENDING, DESTROYED, DONE, ERROR, IN_PROGRESS,
                                            OP_DESTROY, OP_PROVISION, OP_UPDATE, PROVISION, PROVISIONED, QUEUED,
                                            READY, REJECTED, TS_APPROVAL_PENDING, TS_MERGED, TS_PENDING, TS_REJECTED,
                                            UNKNOWN, AuditEntry, Resource, Revision, TemporaryState, can_move,
                                            default_storage_path, inherited, mask, type_problem,
                                            valid_storage_path)

log = logging.getLogger(__name__)

SOURCE = "resource"
FLAG_KEY = "approval_flow"

_STATE_PB = {"provision": 1, "provisioned": 2, "destroy": 3, "destroyed": 4}
_STATUS_PB = {"ready": 1, "queued": 2, "in_progress": 3, "done": 4, "error": 5, "approval_pending": 6,
              "pending": 7, "rejected": 8, "unknown": 9}
_OPERATION_PB = {OP_PROVISION: approval_pb2.APPROVAL_OPERATION_PROVISION,
                 OP_UPDATE: approval_pb2.APPROVAL_OPERATION_UPDATE,
                 OP_DESTROY: approval_pb2.APPROVAL_OPERATION_DESTROY}
_OPERATION = {v: k for k, v in _OPERATION_PB.items()}


class JobNotRecordedYet(Exception):
    """A job event arrived before the submitter stored the job id; retried."""


async def _nothing() -> None:
    return None


def _busy(r: Resource, action: str) -> FailedPrecondition:
    return FailedPrecondition(f"cannot {action} resource {r.name}: an operation is under way ({r.state}/{r.status})",
                              [PreconditionViolation("OPERATION_IN_PROGRESS", f"resources/{r.id}",
                                                     f"status is {r.status}; wait for it to finish")])


def _wrong_state(r: Resource, action: str, allowed: str) -> FailedPrecondition:
    return FailedPrecondition(f"cannot {action} resource {r.name} in {r.state}/{r.status}", [PreconditionViolation(
        "INVALID_STATE", f"resources/{r.id}", f"{action} needs {allowed}; the resource is {r.state}/{r.status}")])


def _check_etag(r: Resource, etag: str) -> None:
    if etag and etag != r.etag:
        raise Aborted(f"resource {r.id} has etag {r.etag}, not {etag}; read it again and retry", reason="STALE_ETAG")


class Lifecycle:
    def __init__(self, remote: Remote, uow_factory):
        self.remote = remote
        self.uow_factory = uow_factory

    # --- reading -------------------------------------------------------------

    async def get(self, uow, id_: str) -> Resource:
        r = await uow.resources.get(id_) if id_ else None
        if r is None:
            raise NotFound("resource", id_)
        return r

    async def list(self, uow, page_size, page_token, **filters):
        return await paginate(lambda o, n: uow.resources.list(o, n, **filters), page_size, page_token)

    async def tree(self, uow, id_: str):
        root = await self.get(uow, id_)

        async def down(r: Resource, seen: set[str]):
            kids = [] if r.id in seen else [await down(c, seen | {r.id}) for c in await uow.resources.children(r.id)]
            return r, kids
        parents = list((await uow.resources.get_many(root.parent_ids)).values())
        return parents, await down(root, set())

    async def approval_flow_on(self, uow) -> bool:
        return bool(await uow.settings.get(FLAG_KEY, False))

    # --- events and audit ------------------------------------------------------

    async def _emit(self, uow, field: str, r: Resource, actor: str, before: Resource | None = None,
                    plan: JobInfo | None = None) -> None:
        body = events_pb2.ResourceChanged(
            resource_id=r.id, name=r.name, template_id=r.template_id, state=_STATE_PB[r.state],
            status=_STATUS_PB[r.status], revision=r.revision, error_message=r.error_message, job_id=r.last_job_id,
            owners=r.owners, temporary_state_id=r.temporary_state_id, workflow_id=r.workflow_id,
            plan_job_id=r.plan_job_id)
        if before is not None:
            body.previous_state, body.previous_status = _STATE_PB[before.state], _STATUS_PB[before.status]
        for o in r.masked_outputs():
            body.outputs.add(name=o.name, value=to_value(o.value), sensitive=o.sensitive)
        if r.status == APPROVAL_PENDING:
            body.awaiting_approval = _OPERATION_PB[r.pending_operation]
            if plan is not None:
                body.plan_summary.CopyFrom(executor_pb2.PlanSummary(add=plan.plan_add, change=plan.plan_change,
                                                                    destroy=plan.plan_destroy))
        await uow.emit(new_event(SOURCE, field, body, actor=actor, correlation=Correlation(
            resource_id=r.id, workflow_id=r.workflow_id, step_id=r.step_id, job_id=r.last_job_id,
            temporary_state_id=r.temporary_state_id)))

    async def _audit(self, uow, actor: str, action: str, before: Resource | None, after: Resource | None,
                     extra: dict | None = None) -> None:
        subject = after or before
        await uow.audit.add(AuditEntry(
            id=str(uuid.uuid4()), resource_id=subject.id, resource_name=subject.name, actor=actor, action=action,
            revision=subject.revision, before=before.snapshot() if before else {},
            after={**(after.snapshot() if after else {}), **(extra or {})}, time=utcnow()))

    async def _save(self, uow, before: Resource, after: Resource, actor: str, action: str,
                    events: tuple[str, ...] = ("resource_status_changed",), plan: JobInfo | None = None,
                    extra: dict | None = None) -> Resource:
        after = replace(after, update_time=utcnow(), version=before.version + 1)
        await uow.resources.update(after, before.version)
        await self._audit(uow, actor, action, before, after, extra)
        for field in events:
            await self._emit(uow, field, after, actor, before, plan)
        return after

    # --- create ----------------------------------------------------------------

    async def create(self, uow, principal: Principal, r: Resource, request_id: str = "",
                     provision: bool = False) -> Resource:
        if (existing := await uow.find_request("CreateResource", request_id)) is not None:
            return await self.get(uow, existing)
        violations: list[FieldViolation] = []
        if not r.name.strip():
            violations.append(FieldViolation("resource.name", "must not be empty"))
        # Both from the blueprint service, at once: they are on the way of every workflow step.
        template, given_version = await asyncio.gather(
            self.remote.template(r.template_id) if r.template_id else _nothing(),
            self.remote.version(r.source_code_version_id) if r.source_code_version_id else _nothing())
        if template is None:
            violations.append(FieldViolation("resource.template_id", f"unknown template {r.template_id!r}"))
            raise InvalidArgument("invalid resource", violations)
        if not template.enabled:
            raise FailedPrecondition(f"template {template.key} is disabled", [PreconditionViolation(
                "TEMPLATE_DISABLED", f"templates/{template.id}", "enable the template to create resources of it")],
                reason="TEMPLATE_DISABLED")
        version: VersionInfo | None = None
        if not template.abstract:
            version = given_version if r.source_code_version_id else await self.remote.default_version(template.id)
            if version is None or version.template_id != template.id:
                violations.append(FieldViolation("resource.source_code_version_id",
                                                 "unknown source code version of this template"
                                                 if r.source_code_version_id else "the template has no version"))
        version_id = version.id if version else ""
        if r.name.strip() and await uow.resources.name_taken(template.id, version_id, r.name):
            raise AlreadyExists("resource", r.name, f"a resource named {r.name!r} already exists for this template "
                                                    "and source code version")
        parents = await self._check_parents(uow, principal, r.parent_ids, template, violations)
        tags, configs = inherited(parents)
        variables = dict(r.variables)
        for config in configs:  # inherited configs pre-fill variables of the same name
            if config.name not in variables and (version is None or version.variable(config.name)):
                variables[config.name] = config.value
        sensitive: list[str] = []
        if version is not None:
            sensitive = await self._check_variables(uow, template.id, "", version, variables, violations,
                                                    "resource.variables")
        if not template.abstract:
            if not r.integration_ids:
                violations.append(FieldViolation("resource.integration_ids",
                                                 "a resource with infrastructure needs a cloud integration"))
            for i, iid in enumerate(r.integration_ids):
                if not await self.remote.integration_exists(iid):
                    violations.append(FieldViolation(f"resource.integration_ids[{i}]", f"unknown integration {iid!r}"))
        storage_path = r.storage_path or ("" if template.abstract else default_storage_path(template.key, r.name))
        if not template.abstract:
            # (without a name there is no default path to judge; the name's violation says why)
            if (r.storage_path or r.name.strip()) and not valid_storage_path(storage_path):
                violations.append(FieldViolation("resource.storage_path", "must be a relative path of letters, "
                                                 "digits, '.', '_', '-' and '/', without '..'"))
            if r.storage_id and not await self.remote.storage_exists(r.storage_id):
                violations.append(FieldViolation("resource.storage_id", f"unknown storage {r.storage_id!r}"))
        if violations:
            raise InvalidArgument("invalid resource", violations)
        if storage_path and await uow.resources.storage_path_taken(r.storage_id, storage_path):
            raise AlreadyExists("storage path", storage_path,
                                f"storage path {storage_path!r} is used by another resource")

        now = utcnow()
        flag = await self.approval_flow_on(uow)
        own_tags = {(t.name, t.value) for t in r.dependency_tags}
        created = replace(
            r, id=str(uuid.uuid4()), source_code_version_id=version_id, abstract=template.abstract,
            variables=variables, sensitive_variables=sensitive, storage_path=storage_path,
            dependency_tags=list(r.dependency_tags) + [t for t in tags if (t.name, t.value) not in own_tags],
            dependency_configs=list(r.dependency_configs), revision=1, owners=[principal.user],
            creator=principal.user, create_time=now, update_time=now, version=1, outputs=[],
            state=PROVISIONED if template.abstract else PROVISION,
            status=DONE if template.abstract else (APPROVAL_PENDING if flag else READY),
            pending_operation=OP_PROVISION if flag and not template.abstract else "")
        # Created and provisioned in one call (parents were checked provisioned
        # above): stored queued at once, recorded as a create and a provision.
        start = provision and created.status == READY
        stored = self._queued(created, OP_PROVISION) if start else created
        await uow.resources.add(stored)
        await uow.remember_request("CreateResource", request_id, created.id)
        await self._audit(uow, principal.user, "create", None, created)
        await self._emit(uow, "resource_created", created, principal.user)
        if created.status == APPROVAL_PENDING:
            await self._emit(uow, "resource_status_changed", created, principal.user)
        elif start:
            await self._audit(uow, principal.user, "provision", created, stored)
            await self._emit(uow, "resource_status_changed", stored, principal.user, created)
            self._submit_after_commit(uow, stored, principal.user)
        return stored

    async def _check_parents(self, uow, principal: Principal, parent_ids: list[str], template,
                             violations: list[FieldViolation]) -> list[Resource]:
        found = await uow.resources.get_many(parent_ids)
        parents = []
        for i, pid in enumerate(parent_ids):
            parent = found.get(pid)
            field = f"resource.parent_ids[{i}]"
            if parent is None:
                violations.append(FieldViolation(field, f"unknown resource {pid!r}"))
                continue
            if parent.template_id not in template.parent_template_ids:
                violations.append(FieldViolation(field, f"{parent.name} is of a template that is not a parent "
                                                        f"template of {template.key}"))
            parent = await self.settle(uow, parent, principal.user)
            if parent.state != PROVISIONED:
                violations.append(FieldViolation(field, f"{parent.name} is {parent.state}/{parent.status}, "
                                                        "not provisioned"))
            parents.append(parent)
        if len(set(parent_ids)) != len(parent_ids):
            violations.append(FieldViolation("resource.parent_ids", "lists a parent twice"))
        return parents

    async def settle(self, uow, r: Resource, actor: str) -> Resource:
        """A resource whose job may have finished before its completion event
        was applied here (the race of a child created right after its parent's
        completion event): ask the executor and apply the outcome now."""
        if r.status not in (QUEUED, IN_PROGRESS) or not r.last_job_id:
            return r
        job = await self.remote.job(r.last_job_id)
        if job is None or job.status in ("queued", "running"):
            return r
        try:
            return await self.apply_job_outcome(uow, r, job, actor) or r
        except Aborted as exc:
            if exc.reason != "CONCURRENT_CHANGE":
                raise
            # The completion event was applied meanwhile (its consumer won the
            # guarded write, before this transaction wrote anything): read its result.
            return await uow.resources.get(r.id) or r

    async def _check_variables(self, uow, template_id: str, resource_id: str, version: VersionInfo,
                               variables: dict[str, Any], violations: list[FieldViolation], field: str) -> list[str]:
        for name, value in variables.items():
            declared = version.variable(name)
            if declared is None:
                violations.append(FieldViolation(f"{field}.{name}", "is not a variable of the source code version"))
                continue
            if problem := type_problem(declared.type, value):
                violations.append(FieldViolation(f"{field}.{name}", problem))
        for declared in version.variables:
            if declared.required and not declared.has_default and variables.get(declared.name) is None:
                violations.append(FieldViolation(f"{field}.{declared.name}", "is required"))
        unique = [v.name for v in version.variables if v.unique and variables.get(v.name) is not None]
        if unique:
            for other in await uow.resources.of_template(template_id):
                if other.id == resource_id:
                    continue
                for name in unique:
                    if name in other.variables and other.variables[name] == variables[name]:
                        violations.append(FieldViolation(f"{field}.{name}",
                                                         f"must be unique; resource {other.name} has this value"))
        return [v.name for v in version.variables if v.sensitive]

    # --- provision, dry run, recreate ---------------------------------------------

    async def provision(self, uow, principal: Principal, id_: str, etag: str = "") -> Resource:
        r = await self.get(uow, id_)
        _check_etag(r, etag)
        self._needs_iac(r, "provision")
        if r.busy:
            raise _busy(r, "provision")
        if r.state != PROVISION or r.status not in (READY, ERROR, UNKNOWN, PENDING):
            raise _wrong_state(r, "provision", "state provision with status ready or error")
        if await self._parents_on_their_way(uow, r, principal.user):
            # Waits for its prerequisite: starts when the last parent is provisioned.
            return await self._save(uow, r, replace(r, status=PENDING, error_message=""), principal.user,
                                    "provision_pending")
        await self._parents_provisioned(uow, r, principal.user)
        return await self._start_or_ask(uow, principal, r, OP_PROVISION, "provision")

    async def recreate(self, uow, principal: Principal, id_: str, etag: str = "") -> Resource:
        r = await self.get(uow, id_)
        _check_etag(r, etag)
        self._needs_iac(r, "recreate")
        if not ((r.state == DESTROYED and r.status == DONE) or (r.state == PROVISION and r.status == REJECTED)):
            raise _wrong_state(r, "recreate", "destroyed/done or provision/rejected")
        waiting = await self._parents_on_their_way(uow, r, principal.user)
        if not waiting:
            await self._parents_provisioned(uow, r, principal.user)
        ready = await self._save(uow, r, replace(r, state=PROVISION, status=PENDING if waiting else READY,
                                                 error_message=""), principal.user, "recreate")
        if waiting:  # starts when the last parent is provisioned
            return ready
        return await self._start_or_ask(uow, principal, ready, OP_PROVISION, "recreate")

    async def dry_run(self, uow, principal: Principal, id_: str) -> Resource:
        r = await self.get(uow, id_)
        self._needs_iac(r, "dry-run")
        if r.busy:
            raise _busy(r, "dry-run")
        if r.state not in (PROVISION, PROVISIONED):
            raise _wrong_state(r, "dry-run", "state provision or provisioned")
        version = await self._version(r.source_code_version_id)
        job_id = await self.remote.submit_job(self._submission(r, version, "plan", f"dryrun-{uuid.uuid4()}"),
                                              principal.user)
        after = await self._save(uow, r, replace(r, plan_job_id=job_id), principal.user, "dry_run", events=(),
                                 extra={"job_id": job_id})
        return after

    def _needs_iac(self, r: Resource, action: str) -> None:
        if r.abstract:
            raise FailedPrecondition(f"resource {r.name} is abstract: it has no infrastructure to {action}",
                                     [PreconditionViolation("ABSTRACT_RESOURCE", f"resources/{r.id}",
                                                            "abstract resources are records only")])

    async def _parents_on_their_way(self, uow, r: Resource, actor: str) -> bool:
        """True when some parent is not provisioned yet but is being provisioned
        (and every other parent is provisioned or on its way too)."""
        waiting = False
        for parent in (await uow.resources.get_many(r.parent_ids)).values():
            parent = await self.settle(uow, parent, actor)
            if parent.state == PROVISIONED:
                continue
            if parent.state == PROVISION and parent.status in (QUEUED, IN_PROGRESS, APPROVAL_PENDING, PENDING):
                waiting = True
                continue
            return False
        return waiting

    async def _start_waiting_children(self, uow, parent: Resource, actor: str) -> None:
        """A parent finished provisioning (or failed): children waiting for it
        start (or fail too)."""
        for child in await uow.resources.children(parent.id):
            if child.status != PENDING or child.state != PROVISION:
                continue
            if parent.state != PROVISIONED:
                await self._save(uow, child, replace(child, status=ERROR,
                                                     error_message=f"parent {parent.name} failed to provision"),
                                 actor, "provision_failed")
                continue
            parents = await uow.resources.get_many(child.parent_ids)
            parents[parent.id] = parent
            if all(p.state == PROVISIONED for p in parents.values()):
                await self._start_or_ask(uow, Principal(actor, Role.WRITE), child, OP_PROVISION, "provision")

    async def _parents_provisioned(self, uow, r: Resource, actor: str) -> None:
        problems = []
        for parent in (await uow.resources.get_many(r.parent_ids)).values():
            parent = await self.settle(uow, parent, actor)
            if parent.state != PROVISIONED:
                problems.append(PreconditionViolation("PARENT_NOT_PROVISIONED", f"resources/{parent.id}",
                                                      f"{parent.name} is {parent.state}/{parent.status}"))
        if problems:
            raise FailedPrecondition(f"the parents of {r.name} must be provisioned first", problems)

    async def _start_or_ask(self, uow, principal: Principal, r: Resource, operation: str, action: str,
                            plan: JobInfo | None = None) -> Resource:
        """With the approval flow on, the operation waits for an owner's
        decision; otherwise its job starts (after commit)."""
        if await self.approval_flow_on(uow):
            return await self._save(uow, r, replace(r, status=APPROVAL_PENDING, pending_operation=operation,
                                                    error_message=""),
                                    principal.user, f"{action}_requested", plan=plan)
        return await self._start(uow, principal.user, r, operation, action)

    async def _start(self, uow, actor: str, r: Resource, operation: str, action: str) -> Resource:
        queued = await self._save(uow, r, self._queued(r, operation), actor, action)
        self._submit_after_commit(uow, queued, actor)
        return queued

    @staticmethod
    def _queued(r: Resource, operation: str) -> Resource:
        """The resource waiting for the job of `operation` (submitted after commit)."""
        return replace(r, state=DESTROY if operation == OP_DESTROY else r.state, status=QUEUED,
                       pending_operation=operation, job_request_id=str(uuid.uuid4()), last_job_id="",
                       error_message="")

    def _submit_after_commit(self, uow, queued: Resource, actor: str) -> None:
        uow.after_commit(lambda: self.submit(queued.id, queued.job_request_id, actor, queued))

    def _submission(self, r: Resource, version: VersionInfo | None, action: str, request_id: str,
                    variables: dict | None = None, temporary_state_id: str = "") -> JobSubmission:
        return JobSubmission(
            action=action, version=version, variables=dict(r.variables if variables is None else variables),
            sensitive_variables=[n for n in r.sensitive_variables if n in (variables or r.variables)],
            integration_ids=r.integration_ids, secret_ids=r.secret_ids, storage_id=r.storage_id,
            state_path=r.storage_path, resource_id=r.id, revision=r.revision, workflow_id=r.workflow_id,
            step_id=r.step_id, temporary_state_id=temporary_state_id or r.temporary_state_id, request_id=request_id)

    async def submit(self, resource_id: str, request_id: str, actor: str, queued: Resource | None = None) -> None:
        """Submits the job of a queued resource (idempotent by request id) and
        records its id. On failure the resource shows the error instead of
        staying queued. `queued` is the resource as just committed, if the
        caller has it."""
        r = queued
        if r is None:
            async with self.uow_factory() as uow:
                r = await uow.resources.get(resource_id)
        if r is None or r.job_request_id != request_id or r.last_job_id:
            return
        try:
            # An approved update applies exactly the reviewed plan; everything
            # else runs the source code version as it is now.
            reviewed = r.plan_job_id if r.pending_operation == OP_UPDATE else ""
            version = None if reviewed else await self._version(r.source_code_version_id)
            action = "destroy" if r.pending_operation == OP_DESTROY else "apply"
            submission = self._submission(r, version, action, request_id)
            submission.plan_job_id = reviewed
            job_id = await self.remote.submit_job(submission, actor)
            error = ""
        except Unavailable as exc:
            # The executor is down or restarting: the resource stays queued and
            # the reconciler submits again (the request id makes it one job).
            log.warning("submitting the job of resource %s: %s; the reconciler retries", resource_id, exc.message)
            return
        except DomainError as exc:
            job_id, error = "", f"could not start the job: {exc.message}"
        except Exception as exc:  # noqa: BLE001 - the resource must not stay queued silently
            log.exception("submitting the job of resource %s failed", resource_id)
            job_id, error = "", f"could not start the job: {type(exc).__name__}"
        for _ in range(5):  # a job event may be changing the resource at the same moment
            async with self.uow_factory() as uow:
                current = await uow.resources.get(resource_id)
                if current is None or current.job_request_id != request_id or current.last_job_id:
                    return
                if job_id:
                    after = replace(current, last_job_id=job_id,
                                    last_job_action="destroy" if current.pending_operation == OP_DESTROY else "apply")
                    await self._save(uow, current, after, actor, "job_submitted", events=(), extra={"job_id": job_id})
                else:
                    after = replace(current, status=ERROR, error_message=error, job_request_id="",
                                    pending_operation="")
                    await self._save(uow, current, after, actor, "job_failed_to_start", events=("resource_failed",))
                try:
                    await uow.commit()
                    return
                except Aborted:
                    continue

    async def _version(self, id_: str) -> VersionInfo:
        version = await self.remote.version(id_)
        if version is None:
            raise FailedPrecondition(f"source code version {id_} no longer exists", [PreconditionViolation(
                "VERSION_MISSING", f"source_code_versions/{id_}", "pick another source code version")])
        return version

    # --- job outcomes ----------------------------------------------------------------

    async def on_job_event(self, uow, job: JobInfo, resource_id: str, temporary_state_id: str, actor: str) -> None:
        if job.action == "plan":
            if temporary_state_id:
                t = await uow.temporary_states.get(temporary_state_id)
                if t is not None and t.dry_run_job_id == job.id and job.status == "succeeded":
                    await uow.temporary_states.update(replace(
                        t, plan_add=job.plan_add, plan_change=job.plan_change, plan_destroy=job.plan_destroy,
                        update_time=utcnow(), version=t.version + 1), t.version)
            return
        r = await uow.resources.get(resource_id)
        if r is None:
            return
        if not r.last_job_id and r.job_request_id and r.status in (QUEUED, IN_PROGRESS):
            raise JobNotRecordedYet(f"resource {r.id} has not recorded its job yet")
        if r.last_job_id != job.id:
            return  # an older job's event
        if job.status == "running":
            if r.status == QUEUED:
                await self._save(uow, r, replace(r, status=IN_PROGRESS), actor, "job_started")
            return
        if job.status in ("succeeded", "failed", "cancelled", "timed_out"):
            await self.apply_job_outcome(uow, r, job, actor)

    async def apply_job_outcome(self, uow, r: Resource, job: JobInfo, actor: str) -> Resource | None:
        """Applies a finished job to the resource exactly once."""
        if r.last_job_id != job.id or r.status not in (QUEUED, IN_PROGRESS):
            return None
        operation = r.pending_operation
        base = replace(r, pending_operation="", job_request_id="", plan_job_id="")
        if job.status != "succeeded":
            message = job.error_message or f"the {job.action} job ended {job.status}"
            failed = await self._save(uow, r, replace(base, status=ERROR, error_message=message), actor,
                                      f"{operation}_failed", events=("resource_status_changed", "resource_failed"))
            if operation == OP_PROVISION:
                await self._start_waiting_children(uow, failed, actor)
            return failed
        if operation == OP_DESTROY:
            return await self._save(uow, r, replace(base, state=DESTROYED, status=DONE, outputs=[],
                                                    error_message=""),
                                    actor, "destroyed", events=("resource_status_changed", "resource_destroyed"))
        revision = r.revision + 1 if (operation == OP_UPDATE or r.ever_provisioned) else r.revision
        after = replace(base, state=PROVISIONED, status=DONE, outputs=list(job.outputs), revision=revision,
                        ever_provisioned=True, error_message="", temporary_state_id="")
        # The guarded write of the resource comes first: a concurrent applier
        # loses there, before it has written anything else (see settle).
        event = "resource_updated" if operation == OP_UPDATE else "resource_provisioned"
        done = await self._save(uow, r, after, actor, "updated" if operation == OP_UPDATE else "provisioned",
                                events=("resource_status_changed", event))
        if operation == OP_UPDATE and r.temporary_state_id:
            t = await uow.temporary_states.get(r.temporary_state_id)
            if t is not None:
                await uow.temporary_states.update(replace(t, status=TS_MERGED, update_time=utcnow(),
                                                          version=t.version + 1), t.version)
        await uow.revisions.add(Revision(r.id, revision, after.source_code_version_id, after.masked_variables(),
                                         after.masked_outputs(), job.id, actor, utcnow()))
        if operation == OP_PROVISION:
            await self._start_waiting_children(uow, done, actor)
        return done

    # --- destroy, delete ----------------------------------------------------------------

    async def destroy(self, uow, principal: Principal, id_: str, etag: str = "") -> Resource:
        r = await self.get(uow, id_)
        _check_etag(r, etag)
        self._needs_iac(r, "destroy")
        if r.busy:
            raise _busy(r, "destroy")
        if not (r.state == PROVISIONED or (r.state == DESTROY and r.status in (READY, ERROR, UNKNOWN))):
            raise _wrong_state(r, "destroy", "state provisioned")
        await self._guard_dependents(uow, r, principal.user)
        if r.state == PROVISIONED:
            r = await self._save(uow, r, replace(r, state=DESTROY, status=READY, error_message=""), principal.user,
                                 "destroy_requested")
        return await self._start_or_ask(uow, principal, r, OP_DESTROY, "destroy")

    async def _guard_dependents(self, uow, r: Resource, actor: str) -> None:
        """The product document's "Dependencies exist" error: every child not
        destroyed is listed (id, name, state). A child whose destroy job may
        have just finished is settled with the executor first, so a parent
        destroyed right after its last child's completion event (a workflow
        teardown does exactly that) is not refused (DESIGN §3)."""
        blocking = []
        for child in await uow.resources.children(r.id):
            if child.state != DESTROYED:
                child = await self.settle(uow, child, actor)
            if child.state != DESTROYED:
                blocking.append(child)
        if blocking:
            dependencies = [{"resource_id": c.id, "resource_name": c.name, "state": c.state} for c in blocking]
            raise FailedPrecondition(
                "Cannot destroy resource: Dependencies exist",
                [PreconditionViolation("DEPENDENCY_EXISTS", f"resources/{c.id}", f"{c.name} is {c.state}")
                 for c in blocking],
                reason="DEPENDENCIES_EXIST", metadata={"dependencies": json.dumps(dependencies)})

    async def cancel_destroy(self, uow, principal: Principal, id_: str) -> Resource:
        r = await self.get(uow, id_)
        if r.state != DESTROY or r.status not in (READY, ERROR, APPROVAL_PENDING, REJECTED, UNKNOWN):
            raise _wrong_state(r, "cancel the destroy of", "state destroy, not running")
        return await self._save(uow, r, replace(r, state=PROVISIONED, status=DONE, pending_operation="",
                                                error_message=""), principal.user, "destroy_cancelled")

    async def delete(self, uow, principal: Principal, id_: str, etag: str = "") -> None:
        r = await self.get(uow, id_)
        _check_etag(r, etag)
        if not r.abstract and not (r.state == DESTROYED and r.status == DONE):
            raise _wrong_state(r, "delete", "destroyed/done")
        problems = [PreconditionViolation("CHILD_EXISTS", f"resources/{c.id}", f"{c.name} still has it as parent")
                    for c in await uow.resources.children(r.id)]
        problems += [PreconditionViolation("TEMPORARY_STATE_OPEN", f"temporary_states/{t.id}",
                                           f"temporary state {t.id} is {t.status}; submit or discard it")
                     for t in await uow.temporary_states.open_for(r.id)]
        if problems:
            raise FailedPrecondition(f"cannot delete resource {r.name} yet", problems)
        await uow.resources.delete(r.id)
        await self._audit(uow, principal.user, "delete", r, None)
        await self._emit(uow, "resource_deleted", r, principal.user)
        if not r.abstract:
            uow.after_commit(lambda: self._release(r))

    async def _release(self, r: Resource) -> None:
        try:
            await self.remote.release_state_path(r.storage_id, r.storage_path, r.id)
        except Exception as exc:  # noqa: BLE001 - a leftover claim only blocks reuse of the path
            log.warning("could not release storage path %s of deleted resource %s: %s", r.storage_path, r.id, exc)

    # --- metadata updates and owners --------------------------------------------------------

    IMMUTABLE = ("name", "template_id", "storage_id", "storage_path", "parent_ids")
    METADATA = ("description", "labels", "dependency_tags", "dependency_configs")
    ABSTRACT_ONLY = ("variables",)

    async def update(self, uow, principal: Principal, changes: Resource, mask_: list[str], etag: str) -> Resource:
        r = await self.get(uow, changes.id)
        _check_etag(r, etag)
        violations = [FieldViolation(f"resource.{f}", "is immutable") for f in mask_ if f in self.IMMUTABLE]
        for f in mask_:
            if f in self.IMMUTABLE:
                continue
            if f in self.ABSTRACT_ONLY and not r.abstract:
                violations.append(FieldViolation(f"resource.{f}", "changes through a temporary state (update)"))
            elif f not in self.METADATA + self.ABSTRACT_ONLY:
                violations.append(FieldViolation(f"resource.{f}", "cannot be updated here; use a temporary state"))
        if violations:
            raise InvalidArgument("invalid resource update", violations)
        if r.busy:
            raise _busy(r, "update")
        after = replace(r, **{f: getattr(changes, f) for f in mask_})
        return await self._save(uow, r, after, principal.user, "metadata_updated", events=("resource_updated",))

    async def add_owner(self, uow, principal: Principal, id_: str, user: str) -> Resource:
        r = await self._owner_change(uow, principal, id_, user)
        if user in r.owners:
            return r
        return await self._save(uow, r, replace(r, owners=[*r.owners, user]), principal.user, "owner_added",
                                events=("resource_updated",))

    async def remove_owner(self, uow, principal: Principal, id_: str, user: str) -> Resource:
        r = await self._owner_change(uow, principal, id_, user)
        if user not in r.owners:
            return r
        if r.owners == [user]:
            raise FailedPrecondition("a resource keeps at least one owner", [PreconditionViolation(
                "LAST_OWNER", f"resources/{r.id}", "add another owner first")])
        return await self._save(uow, r, replace(r, owners=[o for o in r.owners if o != user]), principal.user,
                                "owner_removed", events=("resource_updated",))

    async def _owner_change(self, uow, principal: Principal, id_: str, user: str) -> Resource:
        if not user.strip():
            raise InvalidArgument.of("user", "must not be empty")
        r = await self.get(uow, id_)
        if principal.role < Role.ADMIN and principal.user not in r.owners:
            raise PermissionDenied("only an owner of the resource or an admin may change its owners")
        return r

    # --- temporary states (updates) -------------------------------------------------------------

    async def create_temporary_state(self, uow, principal: Principal, t: TemporaryState,
                                     request_id: str = "") -> TemporaryState:
        if (existing := await uow.find_request("CreateTemporaryState", request_id)) is not None:
            return await self.get_temporary_state(uow, existing)
        r = await self.get(uow, t.resource_id)
        self._needs_iac(r, "update")
        if r.state != PROVISIONED or r.busy:
            raise _wrong_state(r, "update", "provisioned and not busy")
        if await uow.temporary_states.open_for(r.id):
            raise FailedPrecondition(f"resource {r.name} already has an open temporary state", [PreconditionViolation(
                "TEMPORARY_STATE_OPEN", f"resources/{r.id}", "submit or discard it first")])
        await self._check_changes(uow, r, t)
        now = utcnow()
        t = replace(t, id=str(uuid.uuid4()), status=TS_PENDING, base_revision=r.revision, creator=principal.user,
                    create_time=now, update_time=now, version=1, dry_run_job_id="", approval_request_id="")
        await uow.temporary_states.add(t)
        await uow.remember_request("CreateTemporaryState", request_id, t.id)
        await self._audit(uow, principal.user, "temporary_state_created", r, r,
                          {"temporary_state_id": t.id, "proposed": mask(t.variables, r.sensitive_variables)})
        await self._emit_temporary(uow, "temporary_state_created", t, principal.user)
        return t

    async def _check_changes(self, uow, r: Resource, t: TemporaryState) -> None:
        violations: list[FieldViolation] = []
        version_id = t.source_code_version_id or r.source_code_version_id
        version = await self.remote.version(version_id)
        if version is None or version.template_id != r.template_id:
            raise InvalidArgument.of("temporary_state.source_code_version_id",
                                     "unknown source code version of the resource's template")
        current = await self.remote.version(r.source_code_version_id)
        for name, value in t.variables.items():
            declared = (current.variable(name) if current else None) or version.variable(name)
            if declared is not None and declared.frozen and r.ever_provisioned and r.variables.get(name) != value:
                violations.append(FieldViolation(f"temporary_state.variables.{name}",
                                                 "is frozen: it cannot change after the first provisioning"))
        proposed = {**r.variables, **t.variables}
        proposed = {k: v for k, v in proposed.items() if version.variable(k) is not None}
        await self._check_variables(uow, r.template_id, r.id, version, proposed, violations,
                                    "temporary_state.variables")
        for i, iid in enumerate(t.integration_ids or []):
            if not await self.remote.integration_exists(iid):
                violations.append(FieldViolation(f"temporary_state.integration_ids[{i}]", f"unknown integration {iid!r}"))
        if violations:
            raise InvalidArgument("invalid temporary state", violations)

    async def get_temporary_state(self, uow, id_: str) -> TemporaryState:
        t = await uow.temporary_states.get(id_) if id_ else None
        if t is None:
            raise NotFound("temporary state", id_)
        return t

    async def list_temporary_states(self, uow, resource_id: str, page_size: int, page_token: str):
        return await paginate(lambda o, n: uow.temporary_states.list(o, n, resource_id), page_size, page_token)

    async def update_temporary_state(self, uow, principal: Principal, changes: TemporaryState, mask_: list[str],
                                     etag: str) -> TemporaryState:
        t = await self.get_temporary_state(uow, changes.id)
        if etag and etag != t.etag:
            raise Aborted(f"temporary state {t.id} has etag {t.etag}, not {etag}", reason="STALE_ETAG")
        if t.status != TS_PENDING:
            raise FailedPrecondition(f"temporary state {t.id} is {t.status}", [PreconditionViolation(
                "TEMPORARY_STATE_CLOSED", f"temporary_states/{t.id}", "only a pending temporary state changes")])
        allowed = ("description", "source_code_version_id", "variables", "integration_ids", "secret_ids", "labels",
                   "workspace")
        bad = [f for f in mask_ if f not in allowed]
        if bad:
            raise InvalidArgument("invalid temporary state update",
                                  [FieldViolation(f"temporary_state.{f}", "cannot change") for f in bad])
        updated = replace(t, **{f: getattr(changes, f) for f in mask_}, dry_run_job_id="", plan_add=0,
                          plan_change=0, plan_destroy=0, update_time=utcnow(), version=t.version + 1)
        r = await self.get(uow, t.resource_id)
        await self._check_changes(uow, r, updated)
        await uow.temporary_states.update(updated, t.version)
        return updated

    def _proposed(self, r: Resource, t: TemporaryState) -> Resource:
        return replace(
            r, variables={**r.variables, **t.variables},
            source_code_version_id=t.source_code_version_id or r.source_code_version_id,
            description=r.description if t.description is None else t.description,
            integration_ids=r.integration_ids if t.integration_ids is None else list(t.integration_ids),
            secret_ids=r.secret_ids if t.secret_ids is None else list(t.secret_ids),
            labels=r.labels if t.labels is None else list(t.labels),
            workspace=r.workspace if t.workspace is None else t.workspace)

    async def dry_run_temporary_state(self, uow, principal: Principal, id_: str) -> TemporaryState:
        t = await self.get_temporary_state(uow, id_)
        if t.status != TS_PENDING:
            raise FailedPrecondition(f"temporary state {t.id} is {t.status}", [PreconditionViolation(
                "TEMPORARY_STATE_CLOSED", f"temporary_states/{t.id}", "only a pending temporary state runs")])
        r = await self.get(uow, t.resource_id)
        proposed = self._proposed(r, t)
        version = await self._version(proposed.source_code_version_id)
        job_id = await self.remote.submit_job(
            self._submission(proposed, version, "plan", f"tsdry-{t.id}-{t.version}", proposed.variables, t.id),
            principal.user)
        updated = replace(t, dry_run_job_id=job_id, update_time=utcnow(), version=t.version + 1)
        await uow.temporary_states.update(updated, t.version)
        return updated

    async def submit_temporary_state(self, uow, principal: Principal, id_: str, etag: str = "") -> TemporaryState:
        t = await self.get_temporary_state(uow, id_)
        if etag and etag != t.etag:
            raise Aborted(f"temporary state {t.id} has etag {t.etag}, not {etag}", reason="STALE_ETAG")
        if t.status != TS_PENDING:
            raise FailedPrecondition(f"temporary state {t.id} is {t.status}", [PreconditionViolation(
                "TEMPORARY_STATE_CLOSED", f"temporary_states/{t.id}", "only a pending temporary state is submitted")])
        r = await self.get(uow, t.resource_id)
        if r.busy or r.state != PROVISIONED:
            raise _busy(r, "update") if r.busy else _wrong_state(r, "update", "provisioned")
        if r.revision != t.base_revision:
            raise FailedPrecondition("the resource changed since this temporary state was made", [
                PreconditionViolation("STALE_TEMPORARY_STATE", f"temporary_states/{t.id}",
                                      f"made at revision {t.base_revision}; the resource is at {r.revision}")])
        plan = await self.remote.job(t.dry_run_job_id) if t.dry_run_job_id else None
        reviewed = t.dry_run_job_id if plan is not None and plan.status == "succeeded" else ""
        if await self.approval_flow_on(uow):
            waiting = replace(t, status=TS_APPROVAL_PENDING, update_time=utcnow(), version=t.version + 1)
            await uow.temporary_states.update(waiting, t.version)
            await self._save(uow, r, replace(r, status=APPROVAL_PENDING, pending_operation=OP_UPDATE,
                                             temporary_state_id=t.id, plan_job_id=reviewed, error_message=""),
                             principal.user, "update_requested", plan=plan)
            await self._emit_temporary(uow, "temporary_state_submitted", waiting, principal.user)
            return waiting
        await self._emit_temporary(uow, "temporary_state_submitted", t, principal.user)
        await self._merge_and_apply(uow, principal.user, r, t, reviewed)
        return await self.get_temporary_state(uow, t.id)

    async def _merge_and_apply(self, uow, actor: str, r: Resource, t: TemporaryState, plan_job_id: str) -> Resource:
        merged = replace(self._proposed(r, t), temporary_state_id=t.id, plan_job_id=plan_job_id)
        if t.status == TS_APPROVAL_PENDING:
            await uow.temporary_states.update(replace(t, status=TS_PENDING, version=t.version + 1), t.version)
        r = await self._save(uow, r, merged, actor, "merged", events=(),
                             extra={"temporary_state_id": t.id})
        return await self._start(uow, actor, r, OP_UPDATE, "update")

    async def discard_temporary_state(self, uow, principal: Principal, id_: str) -> None:
        t = await self.get_temporary_state(uow, id_)
        if not t.open:
            raise FailedPrecondition(f"temporary state {t.id} is {t.status}", [PreconditionViolation(
                "TEMPORARY_STATE_CLOSED", f"temporary_states/{t.id}", "only an open temporary state is discarded")])
        r = await self.get(uow, t.resource_id)
        await uow.temporary_states.delete(t.id)
        if r.status == APPROVAL_PENDING and r.temporary_state_id == t.id:
            r = await self._save(uow, r, replace(r, status=DONE, pending_operation="", temporary_state_id="",
                                                 plan_job_id=""), principal.user, "update_withdrawn")
        await self._audit(uow, principal.user, "temporary_state_discarded", r, r, {"temporary_state_id": t.id})
        await self._emit_temporary(uow, "temporary_state_discarded", t, principal.user)

    async def _emit_temporary(self, uow, field: str, t: TemporaryState, actor: str) -> None:
        status = {TS_PENDING: 1, TS_APPROVAL_PENDING: 2, TS_MERGED: 3, TS_REJECTED: 4}[t.status]
        await uow.emit(new_event(SOURCE, field, events_pb2.TemporaryStateChanged(
            temporary_state_id=t.id, resource_id=t.resource_id, status=status), actor=actor,
            correlation=Correlation(resource_id=t.resource_id, temporary_state_id=t.id)))

    # --- approval decisions --------------------------------------------------------------------

    async def on_approval(self, uow, decision: str, operation: str, resource_id: str, temporary_state_id: str,
                          request_id: str, actor: str) -> None:
        r = await uow.resources.get(resource_id)
        if r is None or r.status != APPROVAL_PENDING or r.pending_operation != operation:
            return  # nothing waits for this decision any more
        if operation == OP_UPDATE and r.temporary_state_id != temporary_state_id:
            return
        r = replace(r, approval_request_id=request_id)
        if decision == "approved":
            ready = await self._save(uow, r, replace(r, status=READY), actor, f"{operation}_approved")
            if operation == OP_UPDATE:
                t = await uow.temporary_states.get(temporary_state_id)
                await self._merge_and_apply(uow, actor, ready, t, r.plan_job_id)
            else:
                await self._start(uow, actor, ready, operation, operation)
            return
        rejected = decision == "rejected"
        if operation == OP_PROVISION:
            after = replace(r, status=REJECTED if rejected else READY, pending_operation="")
        elif operation == OP_DESTROY:
            after = replace(r, state=PROVISIONED, status=DONE, pending_operation="")
        else:
            t = await uow.temporary_states.get(temporary_state_id)
            if t is not None:
                await uow.temporary_states.update(replace(t, status=TS_REJECTED if rejected else TS_PENDING,
                                                          approval_request_id=request_id, update_time=utcnow(),
                                                          version=t.version + 1), t.version)
            after = replace(r, status=DONE, pending_operation="", temporary_state_id="", plan_job_id="")
        await self._save(uow, r, after, actor, f"{operation}_{decision}")

    # --- reconciliation --------------------------------------------------------------------------

    async def reconcile(self, older_than_seconds: float) -> int:
        """Resources whose operation has not moved for a while: finish what the
        executor finished, resubmit a job that was never recorded, and mark a
        job the executor does not know as lost. Returns how many changed."""
        import datetime as dt
        changed = 0
        async with self.uow_factory() as uow:
            stale = await uow.resources.busy_since(utcnow() - dt.timedelta(seconds=older_than_seconds))
        for r in stale:
            if not r.last_job_id:
                if r.job_request_id:
                    await self.submit(r.id, r.job_request_id, "system:reconciler")
                    changed += 1
                continue
            job = await self.remote.job(r.last_job_id)
            async with self.uow_factory() as uow:
                current = await uow.resources.get(r.id)
                if current is None or current.last_job_id != r.last_job_id:
                    continue
                if job is None:
                    await self._save(uow, current, replace(current, status=UNKNOWN, pending_operation="",
                                                           error_message="the executor has no record of the job"),
                                     "system:reconciler", "job_lost")
                elif job.status in ("succeeded", "failed", "cancelled", "timed_out"):
                    await self.apply_job_outcome(uow, current, job, "system:reconciler")
                elif job.status == "running" and current.status == QUEUED:
                    await self._save(uow, current, replace(current, status=IN_PROGRESS), "system:reconciler",
                                     "job_started")
                else:
                    continue
                await uow.commit()
                changed += 1
        return changed


OPERATION_OF_APPROVAL = _OPERATION
