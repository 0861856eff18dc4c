"""Create: validation of a new resource (name, template, version, variables, parents, storage path) and the settle of a parent whose job just finished (DESIGN §3)."""
from __future__ import annotations

import asyncio
import uuid
from dataclasses import replace
from typing import Any

from services.common.auth import Principal
from services.common.errors import (Aborted, AlreadyExists, FailedPrecondition, FieldViolation, InvalidArgument,
                                    PreconditionViolation)
from services.common.uow import utcnow
from services.resource.adapters.remote import VersionInfo
from services.resource.domain.model import (APPROVAL_PENDING, DONE, IN_PROGRESS, OP_PROVISION, PROVISION, PROVISIONED,
                                            QUEUED, READY, Resource, default_storage_path, inherited, type_problem,
                                            valid_storage_path)
from services.resource.app.base import LifecycleBase, _nothing


class CreateCases(LifecycleBase):
    # --- create ----------------------------------------------------------------

    async def create(self, uow, principal: Principal, r: Resource, request_id: str = "",
                     provision: bool = False, reviewed=None) -> Resource:
        """`reviewed` (a ReviewedPlan): the workflow step's plan, applied
        exactly; its approved workflow plan stands in for the provision approval."""
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
        self._prefill(version, variables, configs)
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
        if reviewed is not None and (not provision or template.abstract):
            violations.append(FieldViolation("reviewed_plan", "applies only to a resource provisioned at create"))
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
            variables=variables, storage_path=storage_path,
            # The version's sensitive variables, and those the caller marks (wired from sensitive outputs).
            sensitive_variables=sorted({*sensitive, *(n for n in r.sensitive_variables if n in variables)}),
            dependency_tags=list(r.dependency_tags) + [t for t in tags if (t.name, t.value) not in own_tags],
            dependency_configs=list(r.dependency_configs), revision=1, owners=[principal.user],
            creator=principal.user, create_time=now, update_time=now, version=1, outputs=[],
            state=PROVISIONED if template.abstract else PROVISION,
            status=DONE if template.abstract else (APPROVAL_PENDING if flag else READY),
            pending_operation=OP_PROVISION if flag and not template.abstract else "")
        # Created and provisioned in one call (parents were checked provisioned
        # above): stored queued at once, recorded as a create and a provision.
        if reviewed is not None:
            # Raises unless the flow is off or an approved workflow plan covers
            # it; then that approval is this provisioning's.
            approved = await self.check_reviewed_plan(uow, principal, created, reviewed)
            created = replace(created, plan_job_id=reviewed.plan_job_id, status=READY, pending_operation="",
                              operation_approved=approved)
        if created.status == APPROVAL_PENDING:
            created = self._awaiting_approval(created)
        start = provision and created.status == READY
        stored = self._queued(created, OP_PROVISION, created.operation_approved) if start else created
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

    def _prefill(self, version: VersionInfo | None, variables: dict[str, Any], configs) -> None:
        """What a resource takes without being told: configs inherited from its
        parents (variables of the same name), then the platform team's defaults."""
        for config in configs:
            if config.name not in variables and (version is None or version.variable(config.name)):
                variables[config.name] = config.value
        self._platform_defaults(version, variables)

    @staticmethod
    def _platform_defaults(version: VersionInfo | None, variables: dict[str, Any]) -> None:
        """A default the platform team set on the version (variable_configs)
        is the resource's value when nobody gave one; the module's own default
        needs no copy (terraform applies it). Sensitive defaults reach this
        service masked, so they are left to the executor's copy of the module."""
        for declared in version.variables if version is not None else ():
            if declared.platform_default and not declared.sensitive and declared.name not in variables:
                variables[declared.name] = declared.default

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

