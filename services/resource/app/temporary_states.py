"""Temporary states: reviewable pending updates of a provisioned resource."""
from __future__ import annotations

import uuid
from dataclasses import replace

from infrakitchen.events.v1 import events_pb2
from services.common.auth import Principal
from services.common.errors import (Aborted, AlreadyExists, FailedPrecondition, FieldViolation, InvalidArgument, NotFound,
                                    PreconditionViolation)
from services.common.events import Correlation, new_event
from services.common.paging import by_creation, paginate
from services.common.uow import utcnow
from services.resource.domain.model import (dry_run_started, APPROVAL_PENDING, DONE, OP_UPDATE, PROVISIONED, TS_APPROVAL_PENDING,
                                            TS_MERGED, TS_PENDING, TS_REJECTED, Resource, TemporaryState, mask)
from services.resource.app.base import SOURCE, LifecycleBase, _busy, _wrong_state


class TemporaryStates(LifecycleBase):
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
        await self._name_free_in(uow, r, version.id)
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

    async def _name_free_in(self, uow, r: Resource, version_id: str) -> None:
        """Names are unique per template and source code version: moving to
        another version must not take a name another resource has there
        (checked here, not left to the unique index to notice at commit)."""
        if version_id != r.source_code_version_id and await uow.resources.name_taken(
                r.template_id, version_id, r.name, exclude_id=r.id):
            raise AlreadyExists("resource", r.name, f"a resource named {r.name!r} already exists for this template "
                                                    "at that source code version")

    async def get_temporary_state(self, uow, id_: str) -> TemporaryState:
        t = await uow.temporary_states.get(id_) if id_ else None
        if t is None:
            raise NotFound("temporary state", id_)
        return t

    async def list_temporary_states(self, uow, resource_id: str, page_size: int, page_token: str):
        return await paginate(lambda a, n: uow.temporary_states.list(a, n, resource_id), page_size, page_token,
                              {"list": "temporary_states", "resource_id": resource_id}, by_creation)

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
        now = utcnow()
        updated = replace(t, dry_run_job_id=job_id, dry_run=dry_run_started(job_id, now), plan_add=0,
                          plan_change=0, plan_destroy=0, update_time=now, version=t.version + 1)
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
        if t.source_code_version_id:  # another resource may have taken the name there since
            await self._name_free_in(uow, r, t.source_code_version_id)
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

    async def _merge_and_apply(self, uow, actor: str, r: Resource, t: TemporaryState, plan_job_id: str,
                               approved: bool = False) -> Resource:
        merged = replace(self._proposed(r, t), temporary_state_id=t.id, plan_job_id=plan_job_id)
        if t.status == TS_APPROVAL_PENDING:
            await uow.temporary_states.update(replace(t, status=TS_PENDING, version=t.version + 1), t.version)
        r = await self._save(uow, r, merged, actor, "merged", events=(),
                             extra={"temporary_state_id": t.id})
        return await self._start(uow, actor, r, OP_UPDATE, "update", approved=approved)

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

