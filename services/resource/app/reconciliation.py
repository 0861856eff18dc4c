"""Reconciliation: resources whose operation has not moved for a while."""
from __future__ import annotations

from dataclasses import replace

from services.common.uow import utcnow
from services.resource.domain.model import IN_PROGRESS, QUEUED, UNKNOWN
from services.resource.app.base import LifecycleBase


class Reconciliation(LifecycleBase):
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
