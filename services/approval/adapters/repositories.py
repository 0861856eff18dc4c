"""SQLAlchemy repositories of the approval context."""
from __future__ import annotations

import datetime as dt
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from services.approval.adapters.tables import approval_flow, approval_requests, resource_owners
from services.approval.domain.model import ApprovalFlow, ApprovalRequest, Decision
from services.common.errors import Aborted
from services.common.paging import after_key, by_creation, filtered


def _aware(moment):
    if moment is not None and moment.tzinfo is None:
        return moment.replace(tzinfo=dt.timezone.utc)
    return moment


class ApprovalRequestRepository:
    def __init__(self, session: AsyncSession):
        self.s = session

    @staticmethod
    def _row(r: ApprovalRequest) -> dict[str, Any]:
        return dict(id=r.id, resource_id=r.resource_id, resource_name=r.resource_name, operation=r.operation,
                    requester=r.requester, revision=r.revision, temporary_state_id=r.temporary_state_id,
                    plan_job_id=r.plan_job_id, plan_add=r.plan_add, plan_change=r.plan_change,
                    plan_destroy=r.plan_destroy, workflow_id=r.workflow_id, status=r.status,
                    decisions=[dict(user=d.user, outcome=d.outcome, comment=d.comment, time=d.time.isoformat())
                               for d in r.decisions],
                    owners=list(r.owners), create_time=r.create_time, update_time=r.update_time, version=r.version,
                    workflow_plan_id=r.workflow_plan_id, step_id=r.step_id, planned_steps=list(r.planned_steps))

    @staticmethod
    def _request(row) -> ApprovalRequest:
        m = dict(row._mapping)
        m["decisions"] = [Decision(d["user"], d["outcome"], d["comment"], dt.datetime.fromisoformat(d["time"]))
                          for d in m["decisions"]]
        m["owners"] = list(m["owners"])
        m["planned_steps"] = list(m["planned_steps"] or [])
        m["create_time"], m["update_time"] = _aware(m["create_time"]), _aware(m["update_time"])
        return ApprovalRequest(**m)

    async def add(self, r: ApprovalRequest) -> None:
        await self.s.execute(sa.insert(approval_requests).values(**self._row(r)))

    async def get(self, id_: str) -> ApprovalRequest | None:
        row = (await self.s.execute(sa.select(approval_requests).where(approval_requests.c.id == id_))).first()
        return self._request(row) if row else None

    async def update(self, r: ApprovalRequest, read_version: int) -> None:
        values = self._row(r)
        values.pop("id")
        result = await self.s.execute(sa.update(approval_requests).where(
            approval_requests.c.id == r.id, approval_requests.c.version == read_version).values(**values))
        if result.rowcount != 1:
            raise Aborted(f"approval request {r.id} was decided by someone else just now; read it again",
                          reason="CONCURRENT_DECISION")

    async def pending_for(self, resource_id: str = "", temporary_state_id: str = "",
                          workflow_id: str = "") -> list[ApprovalRequest]:
        query = sa.select(approval_requests).where(approval_requests.c.status == "pending")
        if workflow_id:  # a workflow's plan requests
            query = query.where(approval_requests.c.workflow_id == workflow_id,
                                approval_requests.c.operation == "workflow_plan")
        if resource_id:
            query = query.where(approval_requests.c.resource_id == resource_id)
        if temporary_state_id:
            query = query.where(approval_requests.c.temporary_state_id == temporary_state_id)
        return [self._request(r) for r in await self.s.execute(query)]

    async def list(self, after: list | None, limit: int, resource_id: str = "", status: str = "",
                   decider: tuple[str, bool] | None = None) -> list[ApprovalRequest]:
        async def page(after_, n):
            query = sa.select(approval_requests)
            if resource_id:
                query = query.where(approval_requests.c.resource_id == resource_id)
            if status:
                query = query.where(approval_requests.c.status == status)
            query = after_key(query, (approval_requests.c.create_time, approval_requests.c.id), after_).limit(n)
            return [self._request(r) for r in await self.s.execute(query)]
        if decider is None:
            return await page(after, limit)
        # "Awaiting my decision": owners are a JSON list, matched here to stay
        # portable across SQLite and PostgreSQL; read in keyset batches of pending rows.
        user, is_admin = decider
        return await filtered(page, lambda r: is_admin or user in r.owners, by_creation, after, limit)


class ApprovalFlowRepository:
    def __init__(self, session: AsyncSession):
        self.s = session

    async def get(self) -> ApprovalFlow:
        row = (await self.s.execute(sa.select(approval_flow).where(approval_flow.c.id == 1))).first()
        if row is None:
            return ApprovalFlow()
        return ApprovalFlow(row.enabled, row.updated_by, _aware(row.update_time))

    async def set(self, flow: ApprovalFlow) -> None:
        values = dict(enabled=flow.enabled, updated_by=flow.updated_by, update_time=flow.update_time)
        if (await self.s.execute(sa.update(approval_flow).where(approval_flow.c.id == 1).values(**values))).rowcount:
            return
        await self.s.execute(sa.insert(approval_flow).values(id=1, **values))


class ResourceOwnersRepository:
    def __init__(self, session: AsyncSession):
        self.s = session

    async def get(self, resource_id: str) -> list[str] | None:
        owners = await self.s.scalar(sa.select(resource_owners.c.owners).where(
            resource_owners.c.resource_id == resource_id))
        return list(owners) if owners is not None else None

    async def set(self, resource_id: str, owners: list[str], now: dt.datetime) -> None:
        result = await self.s.execute(sa.update(resource_owners).where(
            resource_owners.c.resource_id == resource_id).values(owners=owners, update_time=now))
        if not result.rowcount:
            await self.s.execute(sa.insert(resource_owners).values(resource_id=resource_id, owners=owners,
                                                                   update_time=now))

    async def forget(self, resource_id: str) -> None:
        await self.s.execute(sa.delete(resource_owners).where(resource_owners.c.resource_id == resource_id))
