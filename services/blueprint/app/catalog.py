"""Use cases of the blueprint service, one function per command. Each runs in
the unit of work it is given; the caller commits."""
from __future__ import annotations

import re
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import replace

import networkx as nx

from infrakitchen.events.v1 import events_pb2
from services.blueprint.domain import planning
from services.blueprint.domain.model import (Blueprint, ModuleSource, SourceCodeVersion, Template,
                                             VariableConfig)
from services.common.auth import Principal
from services.common.errors import (Aborted, AlreadyExists, FailedPrecondition, FieldViolation, InvalidArgument, NotFound,
                                    PreconditionViolation)
from services.common.events import Correlation, new_event
from services.common.paging import by_creation, paginate
from services.common.retry import RetryPolicy, retry_problems
from services.common.uow import utcnow

SOURCE = "blueprint"
_KEY_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,127}$")

ModuleReader = Callable[[ModuleSource], Awaitable["object"]]


def _check_etag(kind: str, id_: str, given: str, current: str) -> None:
    # Etags are '"<n>"' in every service; the 'v<n>' / 'r<n>' this service gave before still count.
    if len(given) > 1 and given[0] in "vr" and given[1:].isdigit():
        given = f'"{given[1:]}"'
    if given and given != current:
        raise Aborted(f"{kind} {id_} has etag {current}, not {given}; read it again and retry", reason="STALE_ETAG")


def _new_id() -> str:
    return str(uuid.uuid4())


# --- templates -------------------------------------------------------------

async def _template_event(uow, field: str, t: Template, actor: str) -> None:
    from services.blueprint.api.convert import template_to_pb  # api owns proto conversion
    await uow.emit(new_event(SOURCE, field, events_pb2.TemplateChanged(
        template_id=t.id, key=t.key, name=t.name, enabled=t.enabled, template=template_to_pb(t)), actor=actor))


async def _check_parents(uow, template_id: str, parent_ids: list[str], field: str) -> None:
    violations = []
    found = await uow.templates.get_many(parent_ids)
    for i, pid in enumerate(parent_ids):
        if pid == template_id:
            violations.append(FieldViolation(f"{field}[{i}]", "a template cannot be its own parent"))
        elif pid not in found:
            violations.append(FieldViolation(f"{field}[{i}]", f"unknown template {pid!r}"))
    if len(set(parent_ids)) != len(parent_ids):
        violations.append(FieldViolation(field, "lists a parent template twice"))
    if violations:
        raise InvalidArgument("invalid parent templates", violations)


async def create_template(uow, principal: Principal, t: Template, request_id: str = "") -> Template:
    if (existing := await uow.find_request("CreateTemplate", request_id)) is not None:
        return await get_template(uow, existing)
    violations = []
    if not _KEY_RE.match(t.key):
        violations.append(FieldViolation("template.key", "must be 1-128 of a-z, 0-9, '_' and '-', "
                                                         "starting with a letter or digit"))
    if not t.name.strip():
        violations.append(FieldViolation("template.name", "must not be empty"))
    violations += retry_problems(RetryPolicy.from_json(t.retry_policy), "template.retry_policy")
    if violations:
        raise InvalidArgument("invalid template", violations)
    t = replace(t, id=_new_id(), creator=principal.user, create_time=utcnow(), update_time=utcnow(), version=1)
    await _check_parents(uow, t.id, t.parent_template_ids, "template.parent_template_ids")
    if await uow.templates.key_taken(t.key):
        raise AlreadyExists("template", t.key, f"a template with key {t.key!r} already exists")
    await uow.templates.add(t)
    await uow.remember_request("CreateTemplate", request_id, t.id)
    await _template_event(uow, "template_created", t, principal.user)
    return t


async def get_template(uow, id_: str) -> Template:
    t = await uow.templates.get(id_) if id_ else None
    if t is None:
        raise NotFound("template", id_)
    return t


MAX_BATCH = 1000


async def batch_get(repo, kind: str, ids: list[str]) -> list:
    """AIP-231: every one of `ids`, in order, or NOT_FOUND naming the first missing."""
    if len(ids) > MAX_BATCH:
        raise InvalidArgument.of("ids", f"at most {MAX_BATCH} ids")
    found = await repo.get_many(list(dict.fromkeys(ids)))
    if missing := next((i for i in ids if i not in found), None):
        raise NotFound(kind, missing)
    return [found[i] for i in ids]


async def list_templates(uow, page_size: int, page_token: str, label: str = "",
                         enabled: bool | None = None) -> tuple[list[Template], str]:
    return await paginate(lambda after, limit: uow.templates.list(after, limit, label, enabled),
                          page_size, page_token, {"list": "templates", "label": label, "enabled": enabled},
                          by_creation)


TEMPLATE_FIELDS = ("name", "description", "labels", "enabled", "abstract", "parent_template_ids", "retry_policy")


async def update_template(uow, principal: Principal, changes: Template, mask: list[str], etag: str) -> Template:
    current = await get_template(uow, changes.id)
    _check_etag("template", current.id, etag, current.etag)
    if "key" in mask or (changes.key and changes.key != current.key):
        raise InvalidArgument.of("template.key", "is immutable")
    unknown = [f for f in mask if f not in TEMPLATE_FIELDS]
    if unknown:
        raise InvalidArgument.of("update_mask", f"unknown or immutable fields: {', '.join(unknown)}")
    updated = replace(current, **{f: getattr(changes, f) for f in mask},
                      update_time=utcnow(), version=current.version + 1)
    if not updated.name.strip():
        raise InvalidArgument.of("template.name", "must not be empty")
    if problems := retry_problems(RetryPolicy.from_json(updated.retry_policy), "template.retry_policy"):
        raise InvalidArgument("invalid template", problems)
    if "parent_template_ids" in mask:
        await _check_parents(uow, current.id, updated.parent_template_ids, "template.parent_template_ids")
        graph = nx.DiGraph()
        for t in await uow.templates.list(None, 10**6):
            for p in (updated.parent_template_ids if t.id == current.id else t.parent_template_ids):
                graph.add_edge(p, t.id)
        if not nx.is_directed_acyclic_graph(graph):
            raise InvalidArgument.of("template.parent_template_ids", "would make the template hierarchy cyclic")
    await uow.templates.update(updated, current.version)
    await _template_event(uow, "template_updated", updated, principal.user)
    return updated


async def delete_template(uow, principal: Principal, id_: str, etag: str) -> None:
    current = await get_template(uow, id_)
    _check_etag("template", id_, etag, current.etag)
    users = await uow.blueprints.using(template_id=id_)
    children = await uow.templates.children_of(id_)
    if users or children:
        raise FailedPrecondition(
            f"template {current.name} is still used by "
            + ", ".join([f"blueprint {name}" for _, name in users] + [f"template {c.name}" for c in children]),
            [PreconditionViolation("BLUEPRINT_USES_TEMPLATE", f"blueprints/{bid}", f"blueprint {name} uses it")
             for bid, name in users]
            + [PreconditionViolation("CHILD_TEMPLATE", f"templates/{c.id}", f"template {c.name} has it as parent")
               for c in children],
            reason="TEMPLATE_IN_USE")
    await uow.templates.delete(id_, current.version)
    await _template_event(uow, "template_deleted", current, principal.user)


# --- source code versions ----------------------------------------------------

def _check_configs(configs: list[VariableConfig], declared: set[str]) -> None:
    violations = [FieldViolation(f"variable_configs[{i}].name", f"the module has no variable {c.name!r}")
                  for i, c in enumerate(configs) if c.name not in declared]
    if violations:
        raise InvalidArgument("variable configuration names unknown variables", violations)


async def _version_event(uow, field: str, v: SourceCodeVersion, actor: str) -> None:
    from services.blueprint.api.convert import version_to_pb  # api owns proto conversion
    await uow.emit(new_event(SOURCE, field, events_pb2.SourceCodeVersionChanged(
        source_code_version_id=v.id, template_id=v.template_id, repository_url=v.source.repository_url,
        ref=v.source.ref, commit=v.commit, source_code_version=version_to_pb(v)), actor=actor))


async def create_source_code_version(uow, principal: Principal, read_module: ModuleReader, template_id: str,
                                     source: ModuleSource, description: str = "", is_default: bool = False,
                                     configs: list[VariableConfig] | None = None,
                                     request_id: str = "") -> SourceCodeVersion:
    if (existing := await uow.find_request("CreateSourceCodeVersion", request_id)) is not None:
        return await get_source_code_version(uow, existing)
    template = await get_template(uow, template_id)
    if template.abstract:
        raise FailedPrecondition(f"template {template.name} is abstract: it has no IaC code",
                                 [PreconditionViolation("TEMPLATE_ABSTRACT", f"templates/{template.id}",
                                                        "abstract templates have no source code versions")],
                                 reason="TEMPLATE_ABSTRACT")
    module = await read_module(source)
    configs = list(configs or [])
    _check_configs(configs, {v.name for v in module.variables})
    now = utcnow()
    first = await uow.versions.count_for(template_id) == 0
    version = SourceCodeVersion(
        id=_new_id(), template_id=template_id, source=source, commit=module.commit,
        declared_variables=module.variables, outputs=module.outputs, variable_configs=configs,
        description=description, is_default=is_default or first, creator=principal.user,
        create_time=now, update_time=now)
    await uow.versions.add(version)
    if version.is_default:
        await uow.versions.clear_default(template_id, except_id=version.id)
    await uow.remember_request("CreateSourceCodeVersion", request_id, version.id)
    await _version_event(uow, "source_code_version_created", version, principal.user)
    return version


async def get_source_code_version(uow, id_: str) -> SourceCodeVersion:
    v = await uow.versions.get(id_) if id_ else None
    if v is None:
        raise NotFound("source code version", id_)
    return v


async def list_source_code_versions(uow, page_size: int, page_token: str,
                                    template_id: str = "") -> tuple[list[SourceCodeVersion], str]:
    return await paginate(lambda after, limit: uow.versions.list(after, limit, template_id),
                          page_size, page_token, {"list": "source_code_versions", "template_id": template_id},
                          by_creation)


async def update_source_code_version(uow, principal: Principal, id_: str, etag: str, description: str | None,
                                     is_default: bool | None, configs: list[VariableConfig]) -> SourceCodeVersion:
    current = await get_source_code_version(uow, id_)
    _check_etag("source code version", id_, etag, current.etag)
    _check_configs(configs, {v.name for v in current.declared_variables})
    merged = {c.name: c for c in current.variable_configs}
    merged.update({c.name: c for c in configs})
    updated = replace(current, variable_configs=list(merged.values()), update_time=utcnow(),
                      version=current.version + 1,
                      description=current.description if description is None else description,
                      is_default=current.is_default if is_default is None else is_default)
    await uow.versions.update(updated, current.version)
    if updated.is_default and not current.is_default:
        await uow.versions.clear_default(updated.template_id, except_id=updated.id)
    await _version_event(uow, "source_code_version_updated", updated, principal.user)
    return updated


async def delete_source_code_version(uow, principal: Principal, id_: str, etag: str) -> None:
    current = await get_source_code_version(uow, id_)
    _check_etag("source code version", id_, etag, current.etag)
    users = await uow.blueprints.using(source_code_version_id=id_)
    if users:
        raise FailedPrecondition(
            "source code version is used by " + ", ".join(f"blueprint {name}" for _, name in users),
            [PreconditionViolation("BLUEPRINT_USES_VERSION", f"blueprints/{bid}", f"blueprint {name} uses it")
             for bid, name in users], reason="VERSION_IN_USE")
    await uow.versions.delete(id_, current.version)
    await _version_event(uow, "source_code_version_deleted", current, principal.user)


# --- blueprints --------------------------------------------------------------

async def _resolve(uow, blueprint: Blueprint) -> tuple[dict[str, Template], dict[str, SourceCodeVersion]]:
    """The templates of a blueprint and the version each uses (its default when none is named).
    Fills in the chosen version ids."""
    templates = await uow.templates.get_many(blueprint.template_ids())
    # Two queries for all the versions, not one per template (500 templates: 500 queries).
    named = await uow.versions.get_many([e.source_code_version_id for e in blueprint.templates
                                         if e.template_id in templates and e.source_code_version_id])
    defaults = await uow.versions.defaults_for([e.template_id for e in blueprint.templates
                                                if e.template_id in templates and not e.source_code_version_id])
    versions: dict[str, SourceCodeVersion] = {}
    for entry in blueprint.templates:
        if entry.template_id not in templates:
            continue
        if entry.source_code_version_id:
            v = named.get(entry.source_code_version_id)
            if v is not None and v.template_id == entry.template_id:
                versions[entry.template_id] = v
        elif (v := defaults.get(entry.template_id)) is not None:
            entry.source_code_version_id = v.id
            versions[entry.template_id] = v
    return templates, versions


async def _blueprint_event(uow, field: str, b: Blueprint, actor: str) -> None:
    await uow.emit(new_event(SOURCE, field, events_pb2.BlueprintChanged(
        blueprint_id=b.id, name=b.name, revision=b.revision), actor=actor,
        correlation=Correlation(blueprint_id=b.id)))


async def create_blueprint(uow, principal: Principal, b: Blueprint, request_id: str = "") -> Blueprint:
    if (existing := await uow.find_request("CreateBlueprint", request_id)) is not None:
        return await get_blueprint(uow, existing)
    b = replace(b, id=_new_id(), revision=1, creator=principal.user, create_time=utcnow(), update_time=utcnow())
    templates, versions = await _resolve(uow, b)
    planning.validate(b, templates, versions)
    if await uow.blueprints.name_taken(b.name):
        raise AlreadyExists("blueprint", b.name, f"a blueprint named {b.name!r} already exists")
    await uow.blueprints.add(b)
    await uow.remember_request("CreateBlueprint", request_id, b.id)
    await _blueprint_event(uow, "blueprint_created", b, principal.user)
    return b


async def get_blueprint(uow, id_: str, revision: int = 0) -> Blueprint:
    if revision < 0:
        raise InvalidArgument.of("revision", "must not be negative")
    b = await uow.blueprints.get(id_, revision) if id_ else None
    if b is None:
        raise NotFound("blueprint", f"{id_}@{revision}" if revision else id_)
    return b


async def list_blueprints(uow, page_size: int, page_token: str, label: str = "") -> tuple[list[Blueprint], str]:
    return await paginate(lambda after, limit: uow.blueprints.list(after, limit, label), page_size, page_token,
                          {"list": "blueprints", "label": label}, by_creation)


BLUEPRINT_FIELDS = ("name", "description", "labels", "templates", "wiring_rules")


async def update_blueprint(uow, principal: Principal, changes: Blueprint, mask: list[str], etag: str) -> Blueprint:
    current = await get_blueprint(uow, changes.id)
    _check_etag("blueprint", current.id, etag, current.etag)
    unknown = [f for f in mask if f not in BLUEPRINT_FIELDS]
    if unknown:
        raise InvalidArgument.of("update_mask", f"unknown or immutable fields: {', '.join(unknown)}")
    updated = replace(current, **{f: getattr(changes, f) for f in mask},
                      revision=current.revision + 1, update_time=utcnow())
    templates, versions = await _resolve(uow, updated)
    planning.validate(updated, templates, versions)
    if "name" in mask and await uow.blueprints.name_taken(updated.name, except_id=updated.id):
        raise AlreadyExists("blueprint", updated.name, f"a blueprint named {updated.name!r} already exists")
    await uow.blueprints.update(updated, current.revision)
    await _blueprint_event(uow, "blueprint_updated", updated, principal.user)
    return updated


async def delete_blueprint(uow, principal: Principal, id_: str, etag: str) -> None:
    current = await get_blueprint(uow, id_)
    _check_etag("blueprint", id_, etag, current.etag)
    await uow.blueprints.delete(id_, current.revision)
    await _blueprint_event(uow, "blueprint_deleted", current, principal.user)


async def preview_blueprint(uow, id_: str, revision: int = 0) -> tuple[Blueprint, planning.Plan]:
    b = await get_blueprint(uow, id_, revision)
    templates, versions = await _resolve(uow, b)
    missing = [t for t in b.template_ids() if t not in templates or t not in versions]
    if missing:
        raise FailedPrecondition(
            "the blueprint refers to templates or versions that no longer exist: " + ", ".join(missing),
            [PreconditionViolation("TEMPLATE_MISSING", f"templates/{t}", "deleted since") for t in missing],
            reason="BLUEPRINT_STALE")
    return b, planning.plan(b, templates, versions)
