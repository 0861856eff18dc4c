"""SQLAlchemy repositories of the workflow context; version-guarded updates."""
from __future__ import annotations

import datetime as dt
from collections.abc import Callable

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from services.common.db import guarded_update, guarded_update_params
from services.common.errors import Aborted
from services.common.paging import after_key
from services.common.vault import Vault
from services.workflow.adapters.tables import steps, workflows
from services.workflow.domain.model import Step, WiringRule, Workflow

_STEP_DATA = ("template_name", "depends_on", "source_code_version_id", "defaults", "overrides",
              "resolved_variables", "sensitive_variables", "parent_template_ids", "parent_resource_ids", "outputs",
              "sensitive_outputs", "teardown_status", "teardown_error_message", "teardown_job_id",
              "teardown_start_time", "plan", "attempts", "attempt_job_ids", "retry_time",
              "retry_default")
_SPEC = ("variable_overrides", "version_overrides", "parent_overrides", "integration_ids", "secret_ids",
         "storage_id", "max_parallel_steps", "teardown_error_message", "torn_down_by", "teardown_start_time",
         "teardown_completion_time", "plan_status", "plan_error_message", "plan_start_time", "plan_completion_time",
         "plan_id", "executed_plan_id", "plan_approval_request_id", "plan_approval_status", "on_failure",
         "retry_policy", "expire_time", "expired", "cancelled_by")


def _to_json(name: str, value):
    """Timestamps kept in the JSON columns are ISO 8601 strings."""
    if name.endswith("_time"):
        return value.isoformat() if value is not None else None
    return value


def _from_json(values: dict) -> dict:
    return {k: (_aware(dt.datetime.fromisoformat(v)) if k.endswith("_time") and v else v)
            for k, v in values.items()}


def _aware(moment):
    if moment is not None and moment.tzinfo is None:
        return moment.replace(tzinfo=dt.timezone.utc)
    return moment


# Built once: building a statement costs more than running it on SQLite.
_WORKFLOW = sa.select(workflows).where(workflows.c.id == sa.bindparam("id"))
_UPDATE_WORKFLOW = guarded_update(workflows)
_STEP = sa.select(steps).where(steps.c.id == sa.bindparam("id"))
_STEPS_OF = sa.select(steps).where(steps.c.workflow_id == sa.bindparam("workflow_id")).order_by(steps.c.position,
                                                                                               steps.c.id)
_UPDATE_STEP = guarded_update(steps)
_STEPS = sa.select(steps).where(steps.c.id.in_(sa.bindparam("ids", expanding=True)))
_NOT_DONE_AND_FAILED = sa.select(
    sa.func.count().filter(steps.c.status != "done"),
    sa.func.count().filter(steps.c.status == "error")).where(steps.c.workflow_id == sa.bindparam("workflow_id"))
# Pending steps that list a given step among their dependencies (JSON list in
# `data`): the SQL differs between SQLite and PostgreSQL.
_PENDING_DEPENDENTS = {
    "sqlite": sa.select(steps).where(
        steps.c.workflow_id == sa.bindparam("workflow_id"), steps.c.status == "pending",
        sa.text("EXISTS (SELECT 1 FROM json_each(steps.data, '$.depends_on') WHERE json_each.value = :step_id)")),
    "postgresql": sa.select(steps).where(
        steps.c.workflow_id == sa.bindparam("workflow_id"), steps.c.status == "pending",
        sa.text("EXISTS (SELECT 1 FROM json_array_elements_text(steps.data -> 'depends_on') AS d(id) "
                "WHERE d.id = :step_id)")),
}
_INSERT_WORKFLOW, _INSERT_STEP = sa.insert(workflows), sa.insert(steps)


class WorkflowRepository:
    """`touch` marks a written workflow's id on the unit of work (its watchers wake at commit).
    Variable overrides are sealed (encrypted at rest): some are sensitive."""

    def __init__(self, session: AsyncSession, touch: Callable[[str], None], vault: Vault):
        self.s = session
        self.touch = touch
        self.vault = vault

    def _row(self, w: Workflow) -> dict:
        spec = {k: _to_json(k, getattr(w, k)) for k in _SPEC}
        spec["variable_overrides"] = self.vault.seal_into({}, w.variable_overrides)
        spec["wiring"] = [vars(r) for r in w.wiring]
        return dict(id=w.id, blueprint_id=w.blueprint_id, blueprint_revision=w.blueprint_revision, status=w.status,
                    error_message=w.error_message, spec=spec, creator=w.creator, executor=w.executor,
                    create_time=w.create_time, start_time=w.start_time, completion_time=w.completion_time,
                    update_time=w.update_time, version=w.version, teardown_status=w.teardown_status)

    def _workflow(self, r) -> Workflow:
        spec = _from_json(r.spec)
        spec["variable_overrides"] = self.vault.open_from(spec["variable_overrides"])
        wiring = [WiringRule(**x) for x in spec.pop("wiring")]
        return Workflow(id=r.id, blueprint_id=r.blueprint_id, blueprint_revision=r.blueprint_revision,
                        status=r.status, error_message=r.error_message, wiring=wiring, creator=r.creator,
                        executor=r.executor, create_time=_aware(r.create_time), start_time=_aware(r.start_time),
                        completion_time=_aware(r.completion_time), update_time=_aware(r.update_time),
                        version=r.version, teardown_status=r.teardown_status, **spec)

    async def add(self, w: Workflow) -> None:
        await self.s.execute(_INSERT_WORKFLOW, self._row(w))
        self.touch(w.id)

    async def get(self, id_: str) -> Workflow | None:
        row = (await self.s.execute(_WORKFLOW, {"id": id_})).first()
        return self._workflow(row) if row else None

    async def list(self, after: list | None, limit: int, blueprint_id: str = "", status: str = "",
                   descending: bool = False) -> list[Workflow]:
        q = sa.select(workflows)
        if blueprint_id:
            q = q.where(workflows.c.blueprint_id == blueprint_id)
        if status:
            q = q.where(workflows.c.status == status)
        q = after_key(q, (workflows.c.create_time, workflows.c.id), after, descending).limit(limit)
        return [self._workflow(r) for r in await self.s.execute(q)]

    async def in_progress(self) -> list[Workflow]:
        """Workflows executing or being torn down."""
        return [self._workflow(r) for r in await self.s.execute(sa.select(workflows).where(
            sa.or_(workflows.c.status == "in_progress", workflows.c.teardown_status == "in_progress")))]

    async def expired(self, now: dt.datetime) -> list[Workflow]:
        """Workflows whose expire_time (ISO 8601 UTC in the spec JSON, which
        sorts as text) has passed and whose expiry was not handled yet."""
        expire = workflows.c.spec["expire_time"].as_string()
        found = [self._workflow(r) for r in await self.s.execute(sa.select(workflows).where(
            expire.is_not(None), expire <= _to_json("expire_time", now),
            workflows.c.teardown_status != "in_progress"))]
        return [w for w in found if not w.expired]

    async def planning(self) -> list[Workflow]:
        """Workflows whose PlanWorkflow is under way (its status is in the spec JSON)."""
        return [self._workflow(r) for r in await self.s.execute(sa.select(workflows).where(
            workflows.c.status.in_(("pending", "error")),
            workflows.c.spec["plan_status"].as_string() == "in_progress"))]

    async def update(self, w: Workflow, read_version: int) -> None:
        result = await self.s.execute(_UPDATE_WORKFLOW, guarded_update_params(self._row(w), read_version))
        if result.rowcount != 1:
            raise Aborted(f"workflow {w.id} was changed at the same moment; read it again and retry",
                          reason="CONCURRENT_CHANGE")
        self.touch(w.id)

    async def delete(self, id_: str) -> None:
        await self.s.execute(sa.delete(steps).where(steps.c.workflow_id == id_))
        await self.s.execute(sa.delete(workflows).where(workflows.c.id == id_))
        self.touch(id_)


class StepRepository:
    """A step's overrides and blueprint defaults are sealed (encrypted at rest);
    its resolved variables and outputs are stored masked already."""

    def __init__(self, session: AsyncSession, touch: Callable[[str], None], vault: Vault):
        self.s = session
        self.touch = touch
        self.vault = vault

    def _row(self, st: Step) -> dict:
        data = {k: _to_json(k, getattr(st, k)) for k in _STEP_DATA}
        data["overrides"] = self.vault.seal_into({}, st.overrides)
        data["defaults"] = self.vault.seal_into({}, st.defaults)
        return dict(id=st.id, workflow_id=st.workflow_id, template_id=st.template_id, position=st.position,
                    status=st.status, error_message=st.error_message, waiting_reason=st.waiting_reason,
                    resource_id=st.resource_id, job_id=st.job_id, data=data,
                    start_time=st.start_time, completion_time=st.completion_time, version=st.version)

    def _step(self, r) -> Step:
        data = _from_json(r.data)
        data["overrides"] = self.vault.open_from(data["overrides"])
        data["defaults"] = self.vault.open_from(data["defaults"])
        return Step(id=r.id, workflow_id=r.workflow_id, template_id=r.template_id, position=r.position,
                    status=r.status, error_message=r.error_message, waiting_reason=r.waiting_reason,
                    resource_id=r.resource_id, job_id=r.job_id, start_time=_aware(r.start_time),
                    completion_time=_aware(r.completion_time), version=r.version, **data)

    async def add(self, st: Step) -> None:
        await self.s.execute(_INSERT_STEP, self._row(st))
        self.touch(st.workflow_id)

    async def get(self, id_: str) -> Step | None:
        row = (await self.s.execute(_STEP, {"id": id_})).first()
        return self._step(row) if row else None

    async def of(self, workflow_id: str) -> list[Step]:
        return [self._step(r) for r in await self.s.execute(_STEPS_OF, {"workflow_id": workflow_id})]

    async def get_many(self, ids: list[str]) -> list[Step]:
        if not ids:
            return []
        return [self._step(r) for r in await self.s.execute(_STEPS, {"ids": list(ids)})]

    async def not_done_and_failed(self, workflow_id: str) -> tuple[int, int]:
        """How many of the workflow's steps are not done, and how many failed."""
        row = (await self.s.execute(_NOT_DONE_AND_FAILED, {"workflow_id": workflow_id})).one()
        return int(row[0] or 0), int(row[1] or 0)

    async def pending_dependents(self, workflow_id: str, step_id: str) -> list[Step]:
        query = _PENDING_DEPENDENTS[self.s.bind.dialect.name]
        return [self._step(r) for r in await self.s.execute(query, {"workflow_id": workflow_id,
                                                                   "step_id": step_id})]

    async def update(self, st: Step, read_version: int) -> bool:
        """False when someone else changed the step first (the caller lost the race)."""
        result = await self.s.execute(_UPDATE_STEP, guarded_update_params(self._row(st), read_version))
        if result.rowcount != 1:
            return False
        self.touch(st.workflow_id)
        return True
