"""Approval decisions (from the approval service's events) applied to the resource that waits for them."""
from __future__ import annotations

from dataclasses import replace

from services.common.uow import utcnow
from services.resource.domain.model import (APPROVAL_PENDING, DONE, OP_DESTROY, OP_PROVISION, OP_UPDATE,
                                            READY, REJECTED, TS_PENDING, TS_REJECTED)
from services.resource.app.base import LifecycleBase


class Approvals(LifecycleBase):
    # --- approval decisions --------------------------------------------------------------------

    async def on_approval(self, uow, decision: str, operation: str, resource_id: str, temporary_state_id: str,
                          request_id: str, actor: str) -> None:
        r = await uow.resources.get(resource_id)
        if r is None or r.status != APPROVAL_PENDING or r.pending_operation != operation:
            return  # nothing waits for this decision any more
        if operation == OP_UPDATE and r.temporary_state_id != temporary_state_id:
            return
        if r.approval_request_id and request_id and r.approval_request_id != request_id:
            return  # the decision of another request (e.g. a withdrawn one's late cancellation)
        r = replace(r, approval_request_id=request_id or r.approval_request_id)
        if decision == "approved":
            if operation == OP_UPDATE:
                ready = await self._save(uow, r, replace(r, status=READY), actor, f"{operation}_approved")
                t = await uow.temporary_states.get(temporary_state_id)
                await self._merge_and_apply(uow, actor, ready, t, r.plan_job_id, approved=True)
            else:
                # One change, approval_pending -> queued (audit "<operation>_approved"):
                # its event says the wait for approval is over.
                await self._start(uow, actor, r, operation, f"{operation}_approved", approved=True)
            return
        rejected = decision == "rejected"
        if operation == OP_PROVISION:
            after = replace(r, status=REJECTED if rejected else READY, pending_operation="")
        elif operation == OP_DESTROY:
            after = self._destroy_withdrawn(r)
        else:
            t = await uow.temporary_states.get(temporary_state_id)
            if t is not None:
                await uow.temporary_states.update(replace(t, status=TS_REJECTED if rejected else TS_PENDING,
                                                          approval_request_id=request_id, update_time=utcnow(),
                                                          version=t.version + 1), t.version)
            after = replace(r, status=DONE, pending_operation="", temporary_state_id="", plan_job_id="")
        await self._save(uow, r, after, actor, f"{operation}_{decision}")

