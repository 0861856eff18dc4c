"""What every family of resource use cases shares: reading, events, the audit
trail and the guarded save. The use cases themselves live beside this file,
one module per family (create, operations, metadata, temporary states,
approvals, reconciliation), and `lifecycle.Lifecycle` puts them together.

IaC runs as executor jobs. A use case that starts one stores the resource as
`queued` with a fresh job request id and registers the submission to run after
the commit (so a job never starts for a state that was not stored); the
submission is idempotent by that request id, so the reconciler can repeat it
after a crash. Completion events (or the reconciler, or a child's create that
finds its parent's job finished) apply the job's outcome exactly once: only
while the resource still waits for that very job."""
from __future__ import annotations

import logging
import uuid
from dataclasses import replace

from infrakitchen.approval.v1 import approval_pb2
from infrakitchen.events.v1 import events_pb2
from infrakitchen.executor.v1 import executor_pb2
from services.common.consumer import NotYet
from services.common.errors import Aborted, FailedPrecondition, NotFound, PreconditionViolation
from services.common.events import Correlation, new_event
from services.common.paging import by_creation, newest_first, paginate
from services.common.uow import utcnow
from services.common.values import to_value
from services.resource.adapters.remote import JobInfo, Remote
from services.resource.domain.model import (APPROVAL_PENDING, DONE, ERROR, OP_DESTROY, OP_PROVISION, OP_UPDATE, PROVISION,
                                            PROVISIONED, AuditEntry, Resource)

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


class JobNotRecordedYet(NotYet):
    """A job event arrived before the submitter stored the job id (the
    executor publishes a direct start's events as SubmitJob commits); retried."""


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



class LifecycleBase:
    def __init__(self, remote: Remote, uow_factory):
        self.remote = remote
        self.uow_factory = uow_factory

    # --- reading -------------------------------------------------------------

    async def get(self, uow, id_: str) -> Resource:
        r = await uow.resources.get(id_) if id_ else None
        if r is None:
            raise NotFound("resource", id_)
        return r

    async def list(self, uow, page_size, page_token, order_by: str = "", **filters):
        desc = newest_first(order_by)
        return await paginate(lambda a, n: uow.resources.list(a, n, descending=desc, **filters), page_size,
                              page_token, {"list": "resources", "desc": desc, **filters}, by_creation)

    async def tree(self, uow, id_: str):
        root = await self.get(uow, id_)

        async def down(r: Resource, seen: set[str]):
            kids = [] if r.id in seen else [await down(c, seen | {r.id}) for c in await uow.resources.children(r.id)]
            return r, kids
        parents = list((await uow.resources.get_many(root.parent_ids)).values())
        return parents, await down(root, set())

    @staticmethod
    def _destroy_withdrawn(r: Resource) -> Resource:
        """A destroy that will not run (cancelled, or its approval rejected):
        the resource is back where the destroy found it, provisioned, or a
        provisioning that failed when it never was."""
        if r.ever_provisioned:
            return replace(r, state=PROVISIONED, status=DONE, pending_operation="", operation_approved=False)
        return replace(r, state=PROVISION, status=ERROR, pending_operation="", operation_approved=False)

    async def approval_flow_on(self, uow) -> bool:
        return bool(await uow.settings.get(FLAG_KEY, False))

    # --- events and audit ------------------------------------------------------

    @staticmethod
    def _awaiting_approval(r: Resource) -> Resource:
        """A resource that starts waiting for approval names the request it
        waits for before the request exists: the approval service opens the
        request with this id (from the event's correlation), so a decision is
        matched to exactly the request it decides, never a late one of an
        earlier, withdrawn request."""
        return replace(r, approval_request_id=str(uuid.uuid4()))

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
            temporary_state_id=r.temporary_state_id,
            approval_request_id=r.approval_request_id if r.status == APPROVAL_PENDING else "")))

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
        if after.status == APPROVAL_PENDING and before.status != APPROVAL_PENDING:
            after = self._awaiting_approval(after)
        after = replace(after, update_time=utcnow(), version=before.version + 1)
        await uow.resources.update(after, before.version)
        await self._audit(uow, actor, action, before, after, extra)
        for field in events:
            await self._emit(uow, field, after, actor, before, plan)
        return after

