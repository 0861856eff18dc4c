"""SQLAlchemy repositories of the resource context. Resource updates are
optimistic: they apply only to the version the caller read (ABORTED
otherwise), so two concurrent operations never both start."""
from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from services.common.db import guarded_update, guarded_update_params
from services.common.errors import AlreadyExists, Aborted
from services.common.paging import after_key
from services.common.vault import Vault
from services.resource.adapters.tables import (audit_entries, resource_labels, resource_links, resource_revisions,
                                               resources, settings, temporary_states)
from services.resource.domain.model import (AuditEntry, DependencyConfig, DependencyTag, Output, Resource, Revision,
                                            TemporaryState)


def _aware(moment):
    if moment is not None and moment.tzinfo is None:
        return moment.replace(tzinfo=dt.timezone.utc)
    return moment


def _outputs_json(outputs: list[Output]) -> list[dict]:
    return [{"name": o.name, "value": o.value, "sensitive": o.sensitive} for o in outputs]


def _outputs(data) -> list[Output]:
    return [Output(o["name"], o["value"], o["sensitive"]) for o in data]


# Built once: building a statement costs more than running it on SQLite.
_RESOURCE = sa.select(resources).where(resources.c.id == sa.bindparam("id"))
_RESOURCES = sa.select(resources).where(resources.c.id.in_(sa.bindparam("ids", expanding=True)))
_NAME_TAKEN = sa.select(sa.func.count()).where(
    resources.c.template_id == sa.bindparam("template_id"),
    resources.c.source_code_version_id == sa.bindparam("version_id"), resources.c.name == sa.bindparam("name"),
    resources.c.id != sa.bindparam("exclude_id"))
_PATH_TAKEN = sa.select(sa.func.count()).where(resources.c.storage_id == sa.bindparam("storage_id"),
                                               resources.c.storage_path == sa.bindparam("storage_path"))
_CHILDREN = sa.select(resources).join(resource_links, resource_links.c.child_id == resources.c.id).where(
    resource_links.c.parent_id == sa.bindparam("id")).order_by(resources.c.create_time)
_UPDATE_RESOURCE = guarded_update(resources)
_INSERT = {t.name: sa.insert(t) for t in (resources, resource_links, resource_revisions, audit_entries,
                                          resource_labels)}
_SETTING = sa.select(settings.c.value).where(settings.c.key == sa.bindparam("key"))


class ResourceRepository:
    """`touch` marks a written resource's id on the unit of work (its watchers wake at commit)."""

    def __init__(self, session: AsyncSession, touch: Callable[[str], None], vault: Vault):
        self.s = session
        self.touch = touch
        self.vault = vault
        self._labels_read: dict[str, tuple[str, ...]] = {}  # as read in this unit of work

    async def _write_labels(self, r: Resource) -> None:
        """The labels index (resource_labels), rewritten only when they changed."""
        if tuple(r.labels) == self._labels_read.get(r.id, ()):
            return
        await self.s.execute(sa.delete(resource_labels).where(resource_labels.c.resource_id == r.id))
        if r.labels:
            await self.s.execute(_INSERT["resource_labels"], [dict(label=label, resource_id=r.id,
                                                                   create_time=r.create_time)
                                                              for label in dict.fromkeys(r.labels)])
        self._labels_read[r.id] = tuple(r.labels)

    def _row(self, r: Resource) -> dict[str, Any]:
        # Sensitive values are sealed (encrypted at rest); the others stay readable in the database.
        secret = {k: v for k, v in r.variables.items() if k in r.sensitive_variables}
        plain = {k: v for k, v in r.variables.items() if k not in r.sensitive_variables}
        return dict(
            id=r.id, name=r.name, template_id=r.template_id, source_code_version_id=r.source_code_version_id,
            description=r.description, state=r.state, status=r.status, abstract=r.abstract,
            variables=self.vault.seal_into(plain, secret), sensitive_variables=list(r.sensitive_variables),
            outputs=_outputs_json(r.outputs), parent_ids=list(r.parent_ids),
            dependency_tags=[vars(t) for t in r.dependency_tags],
            dependency_configs=[vars(c) for c in r.dependency_configs],
            integration_ids=list(r.integration_ids), secret_ids=list(r.secret_ids), storage_id=r.storage_id,
            storage_path=r.storage_path, workspace=r.workspace, labels=list(r.labels), revision=r.revision,
            owners=list(r.owners), creator=r.creator, error_message=r.error_message, last_job_id=r.last_job_id,
            last_job_action=r.last_job_action, job_request_id=r.job_request_id,
            pending_operation=r.pending_operation, operation_approved=r.operation_approved,
            temporary_state_id=r.temporary_state_id,
            plan_job_id=r.plan_job_id, approval_request_id=r.approval_request_id, workflow_id=r.workflow_id,
            step_id=r.step_id, ever_provisioned=r.ever_provisioned, last_dry_run=dict(r.last_dry_run),
            create_time=r.create_time,
            update_time=r.update_time, version=r.version)

    def _resource(self, row) -> Resource:
        m = dict(row._mapping)
        m["outputs"] = _outputs(m["outputs"])
        m["dependency_tags"] = [DependencyTag(**t) for t in m["dependency_tags"]]
        m["dependency_configs"] = [DependencyConfig(**c) for c in m["dependency_configs"]]
        for key in ("parent_ids", "integration_ids", "secret_ids", "labels", "owners", "sensitive_variables"):
            m[key] = list(m[key])
        m["variables"] = self.vault.open_from(m["variables"])
        m["last_dry_run"] = dict(m["last_dry_run"] or {})
        m["create_time"], m["update_time"] = _aware(m["create_time"]), _aware(m["update_time"])
        self._labels_read[m["id"]] = tuple(m["labels"])
        return Resource(**m)

    async def add(self, r: Resource) -> None:
        try:
            await self.s.execute(_INSERT["resources"], self._row(r))
        except IntegrityError:
            # A create that raced another with the same name or storage path.
            raise AlreadyExists("resource", r.name, f"a resource named {r.name!r} or with storage path "
                                                    f"{r.storage_path!r} was created at the same moment") from None
        if r.parent_ids:
            await self.s.execute(_INSERT["resource_links"], [dict(parent_id=p, child_id=r.id) for p in r.parent_ids])
        await self._write_labels(r)
        self.touch(r.id)

    async def get(self, id_: str) -> Resource | None:
        row = (await self.s.execute(_RESOURCE, {"id": id_})).first()
        return self._resource(row) if row else None

    async def get_many(self, ids: list[str]) -> dict[str, Resource]:
        if not ids:
            return {}
        return {r.id: self._resource(r) for r in await self.s.execute(_RESOURCES, {"ids": list(ids)})}

    async def name_taken(self, template_id: str, version_id: str, name: str, exclude_id: str = "") -> bool:
        """Another resource (not `exclude_id`) has this name for the template and version."""
        return bool(await self.s.scalar(_NAME_TAKEN, dict(template_id=template_id, version_id=version_id,
                                                          name=name, exclude_id=exclude_id)))

    async def storage_path_taken(self, storage_id: str, storage_path: str) -> bool:
        return bool(await self.s.scalar(_PATH_TAKEN, dict(storage_id=storage_id, storage_path=storage_path)))

    async def of_template(self, template_id: str) -> list[Resource]:
        rows = await self.s.execute(sa.select(resources).where(resources.c.template_id == template_id))
        return [self._resource(r) for r in rows]

    async def children(self, id_: str) -> list[Resource]:
        return [self._resource(r) for r in await self.s.execute(_CHILDREN, {"id": id_})]

    async def busy_since(self, before: dt.datetime) -> list[Resource]:
        """Resources with an operation under way that has not moved since `before`."""
        rows = await self.s.execute(sa.select(resources).where(
            resources.c.status.in_(["queued", "in_progress"]), resources.c.update_time < before))
        return [self._resource(r) for r in rows]

    async def list(self, after: list | None, limit: int, template_id: str = "", state: str = "", status: str = "",
                   label: str = "", parent_id: str = "", workflow_id: str = "", integration_id: str = "",
                   secret_id: str = "", descending: bool = False) -> list[Resource]:
        """Oldest first (newest first when `descending`), after the sort key
        `after` (create_time, id); every filter is in SQL, with an index for
        each (see tables.py)."""
        query = sa.select(resources)
        for column, wanted in ((resources.c.integration_ids, integration_id), (resources.c.secret_ids, secret_id)):
            if wanted:
                # A JSON list of ids, matched as text (portable across SQLite and
                # PostgreSQL); the quotes make it a whole-id match.
                pattern = json.dumps(wanted).replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
                query = query.where(sa.cast(column, sa.Text).like(f"%{pattern}%", escape="\\"))
        if template_id:
            query = query.where(resources.c.template_id == template_id)
        if state:
            query = query.where(resources.c.state == state)
        if status:
            query = query.where(resources.c.status == status)
        if workflow_id:
            query = query.where(resources.c.workflow_id == workflow_id)
        if parent_id:
            query = query.where(resources.c.id.in_(
                sa.select(resource_links.c.child_id).where(resource_links.c.parent_id == parent_id)))
        if label:  # the label's rows give the order: a range scan of (label, create_time, resource_id)
            query = query.join(resource_labels, resource_labels.c.resource_id == resources.c.id).where(
                resource_labels.c.label == label)
            order = (resource_labels.c.create_time, resource_labels.c.resource_id)
        else:
            order = (resources.c.create_time, resources.c.id)
        query = after_key(query, order, after, descending).limit(limit)
        return [self._resource(r) for r in await self.s.execute(query)]

    async def update(self, r: Resource, read_version: int) -> None:
        result = await self.s.execute(_UPDATE_RESOURCE, guarded_update_params(self._row(r), read_version))
        if result.rowcount != 1:
            raise Aborted(f"resource {r.id} was changed by someone else just now; read it again and retry",
                          reason="CONCURRENT_CHANGE")
        await self._write_labels(r)
        self.touch(r.id)

    async def delete(self, id_: str) -> None:
        await self.s.execute(sa.delete(resource_links).where(sa.or_(
            resource_links.c.child_id == id_, resource_links.c.parent_id == id_)))
        await self.s.execute(sa.delete(temporary_states).where(temporary_states.c.resource_id == id_))
        await self.s.execute(sa.delete(resource_revisions).where(resource_revisions.c.resource_id == id_))
        await self.s.execute(sa.delete(resource_labels).where(resource_labels.c.resource_id == id_))
        await self.s.execute(sa.delete(resources).where(resources.c.id == id_))
        self.touch(id_)


class TemporaryStateRepository:
    def __init__(self, session: AsyncSession, vault: Vault):
        self.s = session
        self.vault = vault

    def _row(self, t: TemporaryState) -> dict[str, Any]:
        changes = {k: getattr(t, k) for k in ("description", "source_code_version_id", "integration_ids",
                                              "secret_ids", "labels", "workspace")}
        # Proposed values are sealed whole: which of them are sensitive is the resource's business.
        changes["variables"] = self.vault.seal_into({}, dict(t.variables))
        return dict(id=t.id, resource_id=t.resource_id, status=t.status, changes=changes,
                    base_revision=t.base_revision, dry_run_job_id=t.dry_run_job_id, plan_add=t.plan_add,
                    plan_change=t.plan_change, plan_destroy=t.plan_destroy, dry_run=dict(t.dry_run),
                    approval_request_id=t.approval_request_id, creator=t.creator, create_time=t.create_time,
                    update_time=t.update_time, version=t.version)

    def _state(self, row) -> TemporaryState:
        m = dict(row._mapping)
        m.update(m.pop("changes"))
        m["variables"] = self.vault.open_from(m["variables"])
        m["dry_run"] = dict(m["dry_run"] or {})
        m["create_time"], m["update_time"] = _aware(m["create_time"]), _aware(m["update_time"])
        return TemporaryState(**m)

    async def add(self, t: TemporaryState) -> None:
        await self.s.execute(sa.insert(temporary_states).values(**self._row(t)))

    async def get(self, id_: str) -> TemporaryState | None:
        row = (await self.s.execute(sa.select(temporary_states).where(temporary_states.c.id == id_))).first()
        return self._state(row) if row else None

    async def open_for(self, resource_id: str) -> list[TemporaryState]:
        rows = await self.s.execute(sa.select(temporary_states).where(
            temporary_states.c.resource_id == resource_id,
            temporary_states.c.status.in_(["pending", "approval_pending"])))
        return [self._state(r) for r in rows]

    async def list(self, after: list | None, limit: int, resource_id: str = "") -> list[TemporaryState]:
        query = sa.select(temporary_states)
        if resource_id:
            query = query.where(temporary_states.c.resource_id == resource_id)
        query = after_key(query, (temporary_states.c.create_time, temporary_states.c.id), after).limit(limit)
        return [self._state(r) for r in await self.s.execute(query)]

    async def update(self, t: TemporaryState, read_version: int) -> None:
        values = self._row(t)
        values.pop("id")
        result = await self.s.execute(sa.update(temporary_states).where(
            temporary_states.c.id == t.id, temporary_states.c.version == read_version).values(**values))
        if result.rowcount != 1:
            raise Aborted(f"temporary state {t.id} was changed by someone else just now; read it again",
                          reason="CONCURRENT_CHANGE")

    async def delete(self, id_: str) -> None:
        await self.s.execute(sa.delete(temporary_states).where(temporary_states.c.id == id_))


class RevisionRepository:
    def __init__(self, session: AsyncSession):
        self.s = session

    async def add(self, r: Revision) -> None:
        await self.s.execute(_INSERT["resource_revisions"], dict(
            resource_id=r.resource_id, revision=r.revision, source_code_version_id=r.source_code_version_id,
            variables=r.variables, outputs=_outputs_json(r.outputs), job_id=r.job_id, actor=r.actor,
            create_time=r.create_time))

    async def list(self, resource_id: str, after: list | None, limit: int) -> list[Revision]:
        rows = await self.s.execute(after_key(sa.select(resource_revisions).where(
            resource_revisions.c.resource_id == resource_id), (resource_revisions.c.revision,), after).limit(limit))
        return [Revision(r.resource_id, r.revision, r.source_code_version_id, dict(r.variables),
                         _outputs(r.outputs), r.job_id, r.actor, _aware(r.create_time)) for r in rows]


class AuditRepository:
    def __init__(self, session: AsyncSession):
        self.s = session

    async def add(self, e: AuditEntry) -> None:
        await self.s.execute(_INSERT["audit_entries"], dict(
            id=e.id, resource_id=e.resource_id, resource_name=e.resource_name, actor=e.actor, action=e.action,
            revision=e.revision, before=e.before, after=e.after, time=e.time))

    async def list(self, resource_id: str, after: list | None, limit: int) -> list[AuditEntry]:
        rows = await self.s.execute(after_key(sa.select(audit_entries).where(
            audit_entries.c.resource_id == resource_id), (audit_entries.c.seq,), after).limit(limit))
        return [AuditEntry(r.id, r.resource_id, r.resource_name, r.actor, r.action, r.revision, dict(r.before),
                           dict(r.after), _aware(r.time), seq=r.seq) for r in rows]


class SettingsRepository:
    def __init__(self, session: AsyncSession):
        self.s = session

    async def get(self, key: str, default=None):
        value = await self.s.scalar(_SETTING, {"key": key})
        return default if value is None else value

    async def set(self, key: str, value, now: dt.datetime) -> None:
        if (await self.s.execute(sa.update(settings).where(settings.c.key == key).values(
                value=value, update_time=now))).rowcount:
            return
        await self.s.execute(sa.insert(settings).values(key=key, value=value, update_time=now))
