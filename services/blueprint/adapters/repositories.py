"""SQLAlchemy repositories of the blueprint context. Updates are optimistic:
they apply only if the stored version is the one the caller read (ABORTED otherwise)."""
from __future__ import annotations

from dataclasses import asdict
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from services.blueprint.adapters.tables import (blueprint_revisions, blueprint_uses, blueprints,
                                                source_code_versions, templates)
from services.blueprint.domain.model import (Blueprint, BlueprintTemplate, ModuleSource, Output,
                                             SourceCodeVersion, Template, Variable, VariableConfig, WiringRule)
from services.common.errors import Aborted
from services.common.paging import after_key, by_creation, filtered


async def _exactly_one(session: AsyncSession, statement, kind: str, id_: str) -> None:
    """Runs a version-guarded update or delete; no row changed means someone else changed it first."""
    if (await session.execute(statement)).rowcount != 1:
        raise Aborted(f"{kind} {id_} was changed by someone else; read it again and retry", reason="STALE_ETAG")


class TemplateRepository:
    def __init__(self, session: AsyncSession):
        self.s = session

    @staticmethod
    def _row(t: Template) -> dict[str, Any]:
        return dict(id=t.id, key=t.key, name=t.name, description=t.description, labels=list(t.labels),
                    enabled=t.enabled, abstract=t.abstract, parent_template_ids=list(t.parent_template_ids),
                    creator=t.creator, create_time=t.create_time, update_time=t.update_time, version=t.version,
                    retry_policy=dict(t.retry_policy))

    @staticmethod
    def _template(row) -> Template:
        return Template(**{**dict(row._mapping), "retry_policy": dict(row.retry_policy or {})})

    async def add(self, t: Template) -> None:
        await self.s.execute(sa.insert(templates).values(**self._row(t)))

    async def get(self, id_: str) -> Template | None:
        row = (await self.s.execute(sa.select(templates).where(templates.c.id == id_))).first()
        return self._template(row) if row else None

    async def get_many(self, ids: list[str]) -> dict[str, Template]:
        if not ids:
            return {}
        rows = await self.s.execute(sa.select(templates).where(templates.c.id.in_(ids)))
        return {r.id: self._template(r) for r in rows}

    async def key_taken(self, key: str) -> bool:
        return bool(await self.s.scalar(sa.select(sa.func.count()).where(templates.c.key == key)))

    async def list(self, after: list | None, limit: int, label: str = "",
                   enabled: bool | None = None) -> list[Template]:
        async def page(after_, n):
            query = sa.select(templates)
            if enabled is not None:
                query = query.where(templates.c.enabled == enabled)
            query = after_key(query, (templates.c.create_time, templates.c.id), after_).limit(n)
            return [self._template(r) for r in await self.s.execute(query)]
        if not label:
            return await page(after, limit)
        # Labels are a JSON list, matched in Python (portable); read in keyset batches.
        return await filtered(page, lambda t: label in t.labels, by_creation, after, limit)

    async def children_of(self, template_id: str) -> list[Template]:
        rows = [self._template(r) for r in await self.s.execute(sa.select(templates))]
        return [t for t in rows if template_id in t.parent_template_ids]

    async def update(self, t: Template, read_version: int) -> None:
        values = self._row(t)
        values.pop("id")
        await _exactly_one(self.s, sa.update(templates).where(
            templates.c.id == t.id, templates.c.version == read_version).values(**values), "template", t.id)

    async def delete(self, id_: str, read_version: int | None) -> None:
        query = sa.delete(templates).where(templates.c.id == id_)
        if read_version is not None:
            query = query.where(templates.c.version == read_version)
        await _exactly_one(self.s, query, "template", id_)


class SourceCodeVersionRepository:
    def __init__(self, session: AsyncSession):
        self.s = session

    @staticmethod
    def _row(v: SourceCodeVersion) -> dict[str, Any]:
        return dict(
            id=v.id, template_id=v.template_id, repository_url=v.source.repository_url, ref=v.source.ref,
            path=v.source.path, commit=v.commit, description=v.description,
            declared_variables=[asdict(x) for x in v.declared_variables], outputs=[asdict(x) for x in v.outputs],
            variable_configs=[asdict(x) for x in v.variable_configs], is_default=v.is_default, creator=v.creator,
            create_time=v.create_time, update_time=v.update_time, version=v.version)

    @staticmethod
    def _version(row) -> SourceCodeVersion:
        return SourceCodeVersion(
            id=row.id, template_id=row.template_id,
            source=ModuleSource(row.repository_url, row.ref, row.path), commit=row.commit,
            declared_variables=[Variable(**x) for x in row.declared_variables],
            outputs=[Output(**x) for x in row.outputs],
            variable_configs=[VariableConfig(**x) for x in row.variable_configs],
            description=row.description, is_default=row.is_default, creator=row.creator,
            create_time=row.create_time, update_time=row.update_time, version=row.version)

    async def add(self, v: SourceCodeVersion) -> None:
        await self.s.execute(sa.insert(source_code_versions).values(**self._row(v)))

    async def get(self, id_: str) -> SourceCodeVersion | None:
        row = (await self.s.execute(sa.select(source_code_versions).where(source_code_versions.c.id == id_))).first()
        return self._version(row) if row else None

    async def get_many(self, ids: list[str]) -> dict[str, SourceCodeVersion]:
        if not ids:
            return {}
        rows = await self.s.execute(sa.select(source_code_versions).where(source_code_versions.c.id.in_(ids)))
        return {r.id: self._version(r) for r in rows}

    async def defaults_for(self, template_ids: list[str]) -> dict[str, SourceCodeVersion]:
        """Template id -> its default version, for many templates in one query."""
        if not template_ids:
            return {}
        rows = await self.s.execute(sa.select(source_code_versions).where(
            source_code_versions.c.template_id.in_(template_ids), source_code_versions.c.is_default.is_(True)))
        return {r.template_id: self._version(r) for r in rows}

    async def count_for(self, template_id: str) -> int:
        return await self.s.scalar(sa.select(sa.func.count()).where(
            source_code_versions.c.template_id == template_id))

    async def list(self, after: list | None, limit: int, template_id: str = "") -> list[SourceCodeVersion]:
        query = sa.select(source_code_versions)
        if template_id:
            query = query.where(source_code_versions.c.template_id == template_id)
        query = after_key(query, (source_code_versions.c.create_time, source_code_versions.c.id), after).limit(limit)
        return [self._version(r) for r in await self.s.execute(query)]

    async def clear_default(self, template_id: str, except_id: str) -> None:
        await self.s.execute(sa.update(source_code_versions).where(
            source_code_versions.c.template_id == template_id, source_code_versions.c.id != except_id,
            source_code_versions.c.is_default.is_(True)).values(
            is_default=False, version=source_code_versions.c.version + 1))

    async def update(self, v: SourceCodeVersion, read_version: int) -> None:
        values = self._row(v)
        values.pop("id")
        await _exactly_one(self.s, sa.update(source_code_versions).where(
            source_code_versions.c.id == v.id, source_code_versions.c.version == read_version).values(**values),
            "source code version", v.id)

    async def delete(self, id_: str, read_version: int | None) -> None:
        query = sa.delete(source_code_versions).where(source_code_versions.c.id == id_)
        if read_version is not None:
            query = query.where(source_code_versions.c.version == read_version)
        await _exactly_one(self.s, query, "source code version", id_)


def blueprint_spec(b: Blueprint) -> dict[str, Any]:
    return dict(name=b.name, description=b.description, labels=list(b.labels),
                templates=[asdict(t) for t in b.templates], wiring_rules=[asdict(r) for r in b.wiring_rules])


class BlueprintRepository:
    def __init__(self, session: AsyncSession):
        self.s = session

    async def _save_revision(self, b: Blueprint) -> None:
        await self.s.execute(sa.insert(blueprint_revisions).values(
            blueprint_id=b.id, revision=b.revision, spec=blueprint_spec(b), create_time=b.update_time))
        await self.s.execute(sa.delete(blueprint_uses).where(blueprint_uses.c.blueprint_id == b.id))
        if b.templates:
            await self.s.execute(sa.insert(blueprint_uses), [
                dict(blueprint_id=b.id, template_id=t.template_id, source_code_version_id=t.source_code_version_id)
                for t in b.templates])

    async def add(self, b: Blueprint) -> None:
        await self.s.execute(sa.insert(blueprints).values(
            id=b.id, name=b.name, revision=b.revision, creator=b.creator,
            create_time=b.create_time, update_time=b.update_time))
        await self._save_revision(b)

    async def name_taken(self, name: str, except_id: str = "") -> bool:
        return bool(await self.s.scalar(sa.select(sa.func.count()).where(
            blueprints.c.name == name, blueprints.c.id != except_id)))

    async def get(self, id_: str, revision: int = 0) -> Blueprint | None:
        head = (await self.s.execute(sa.select(blueprints).where(blueprints.c.id == id_))).first()
        if head is None:
            return None
        rev = revision or head.revision
        row = (await self.s.execute(sa.select(blueprint_revisions).where(
            blueprint_revisions.c.blueprint_id == id_, blueprint_revisions.c.revision == rev))).first()
        if row is None:
            return None
        spec = row.spec
        return Blueprint(
            id=id_, name=spec["name"], description=spec["description"], labels=spec["labels"],
            templates=[BlueprintTemplate(**t) for t in spec["templates"]],
            wiring_rules=[WiringRule(**r) for r in spec["wiring_rules"]],
            revision=rev, creator=head.creator, create_time=head.create_time, update_time=row.create_time)

    async def list(self, after: list | None, limit: int, label: str = "") -> list[Blueprint]:
        async def page(after_, n):
            ids = list(await self.s.scalars(after_key(sa.select(blueprints.c.id),
                                                      (blueprints.c.create_time, blueprints.c.id), after_).limit(n)))
            return [b for b in [await self.get(i) for i in ids] if b is not None]
        if not label:
            return await page(after, limit)
        return await filtered(page, lambda b: label in b.labels, by_creation, after, limit)

    async def update(self, b: Blueprint, read_revision: int) -> None:
        await _exactly_one(self.s, sa.update(blueprints).where(
            blueprints.c.id == b.id, blueprints.c.revision == read_revision).values(
            name=b.name, revision=b.revision, update_time=b.update_time), "blueprint", b.id)
        await self._save_revision(b)

    async def delete(self, id_: str, read_revision: int | None) -> None:
        await self.s.execute(sa.delete(blueprint_uses).where(blueprint_uses.c.blueprint_id == id_))
        await self.s.execute(sa.delete(blueprint_revisions).where(blueprint_revisions.c.blueprint_id == id_))
        query = sa.delete(blueprints).where(blueprints.c.id == id_)
        if read_revision is not None:
            query = query.where(blueprints.c.revision == read_revision)
        await _exactly_one(self.s, query, "blueprint", id_)

    async def using(self, *, template_id: str = "", source_code_version_id: str = "") -> list[tuple[str, str]]:
        """(id, name) of blueprints whose latest revision uses the template or version."""
        query = sa.select(blueprints.c.id, blueprints.c.name).join(
            blueprint_uses, blueprint_uses.c.blueprint_id == blueprints.c.id).distinct()
        if template_id:
            query = query.where(blueprint_uses.c.template_id == template_id)
        if source_code_version_id:
            query = query.where(blueprint_uses.c.source_code_version_id == source_code_version_id)
        return [(r.id, r.name) for r in await self.s.execute(query.order_by(blueprints.c.name))]
