"""Metadata updates (and the inputs of a resource never provisioned) and owners."""
from __future__ import annotations

from dataclasses import replace

from services.common.auth import Principal, Role
from services.common.errors import (FailedPrecondition, FieldViolation, InvalidArgument, PermissionDenied,
                                    PreconditionViolation)
from services.common.errors import AlreadyExists
from services.resource.domain.model import ERROR, MASK, PROVISION, READY, REJECTED, Resource, inherited
from services.resource.app.base import LifecycleBase, _busy, _check_etag


class Metadata(LifecycleBase):
    # (uses CreateCases' _check_parents, _check_variables and _prefill)
    # --- metadata updates and owners --------------------------------------------------------

    IMMUTABLE = ("name", "template_id", "storage_id", "storage_path", "parent_ids")
    METADATA = ("description", "labels", "dependency_tags", "dependency_configs")
    ABSTRACT_ONLY = ("variables",)
    # What a resource that never reached its infrastructure may still change
    # directly (the fix of a failed first provisioning, e.g. a workflow's
    # re-execution after UpdateWorkflow): nothing exists yet that a temporary
    # state would have to review, so the create's validation applies.
    INPUTS = ("variables", "source_code_version_id", "integration_ids", "secret_ids", "parent_ids")
    MAX_OWNERS = 100

    @staticmethod
    def _inputs_editable(r: Resource) -> bool:
        return not r.abstract and not r.ever_provisioned and r.state == PROVISION and r.status in (
            READY, ERROR, REJECTED)

    async def update(self, uow, principal: Principal, changes: Resource, mask_: list[str], etag: str) -> Resource:
        r = await self.get(uow, changes.id)
        _check_etag(r, etag)
        inputs = [f for f in mask_ if f in self.INPUTS and not r.abstract]
        violations = []
        for f in mask_:
            if f in inputs:
                if not self._inputs_editable(r):
                    violations.append(FieldViolation(
                        f"resource.{f}", "is immutable" if f == "parent_ids" else
                        "changes through a temporary state (update) once the resource was provisioned; before, "
                        "only while it is provision/ready, error or rejected"))
            elif f in self.IMMUTABLE:
                violations.append(FieldViolation(f"resource.{f}", "is immutable"))
            elif f in self.ABSTRACT_ONLY and not r.abstract:
                violations.append(FieldViolation(f"resource.{f}", "changes through a temporary state (update)"))
            elif f not in self.METADATA + self.ABSTRACT_ONLY:
                violations.append(FieldViolation(f"resource.{f}", "cannot be updated here; use a temporary state"))
        if violations:
            raise InvalidArgument("invalid resource update", violations)
        if r.busy:
            raise _busy(r, "update")
        if inputs:
            return await self._update_inputs(uow, principal, r, changes, inputs, [f for f in mask_ if f not in inputs])
        after = replace(r, **{f: getattr(changes, f) for f in mask_})
        return await self._save(uow, r, after, principal.user, "metadata_updated", events=("resource_updated",))

    async def _update_inputs(self, uow, principal: Principal, r: Resource, changes: Resource, inputs: list[str],
                             metadata: list[str]) -> Resource:
        """New variables, version, integrations, secrets or parents of a
        resource never provisioned, validated as a create validates them:
        the next provisioning uses them. Revision + 1 and an audit entry."""
        after = replace(r, **{f: getattr(changes, f) for f in [*inputs, *metadata]})
        if "source_code_version_id" in inputs and not after.source_code_version_id:
            after = replace(after, source_code_version_id=r.source_code_version_id)
        if "variables" in inputs:
            # A masked value sent back as it was read keeps the stored one.
            after = replace(after, variables={k: (r.variables.get(k) if v == MASK and k in r.sensitive_variables
                                                  else v) for k, v in after.variables.items()})
        violations: list[FieldViolation] = []
        version = await self.remote.version(after.source_code_version_id)
        if version is None or version.template_id != r.template_id:
            raise InvalidArgument.of("resource.source_code_version_id",
                                     "unknown source code version of the resource's template")
        if after.source_code_version_id != r.source_code_version_id and await uow.resources.name_taken(
                r.template_id, after.source_code_version_id, r.name, exclude_id=r.id):
            raise AlreadyExists("resource", r.name, f"a resource named {r.name!r} already exists for this template "
                                                    "and source code version")
        if "parent_ids" in inputs:
            template = await self.remote.template(r.template_id)
            await self._check_parents(uow, principal, after.parent_ids, template, violations)
        variables = dict(after.variables)
        _, configs = inherited(list((await uow.resources.get_many(after.parent_ids)).values()))
        self._prefill(version, variables, configs)  # as at create
        sensitive = await self._check_variables(uow, r.template_id, r.id, version, variables, violations,
                                                "resource.variables")
        if "integration_ids" in inputs and not after.integration_ids:
            violations.append(FieldViolation("resource.integration_ids",
                                             "a resource with infrastructure needs a cloud integration"))
        for i, iid in enumerate(after.integration_ids if "integration_ids" in inputs else []):
            if not await self.remote.integration_exists(iid):
                violations.append(FieldViolation(f"resource.integration_ids[{i}]", f"unknown integration {iid!r}"))
        if violations:
            raise InvalidArgument("invalid resource update", violations)
        # What was marked sensitive at create (wired from a sensitive output) stays so.
        after = replace(after, variables=variables, sensitive_variables=sorted(
            {*sensitive, *(n for n in r.sensitive_variables if n in variables)}))
        if all(getattr(after, f) == getattr(r, f) for f in (*self.INPUTS, *metadata)):
            return r  # nothing changes: no revision, no audit entry
        return await self._save(uow, r, replace(after, revision=r.revision + 1), principal.user, "inputs_updated",
                                events=("resource_updated",))

    async def add_owner(self, uow, principal: Principal, id_: str, user: str) -> Resource:
        r = await self._owner_change(uow, principal, id_, user)
        if user in r.owners:
            return r
        if len(r.owners) >= self.MAX_OWNERS:
            raise FailedPrecondition(f"a resource has at most {self.MAX_OWNERS} owners", [PreconditionViolation(
                "TOO_MANY_OWNERS", f"resources/{r.id}", "remove an owner first")])
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

