"""Use cases of integrations (cloud credentials), secrets and storages (state
backends). Credential and secret values go in and never come out: responses
carry only their key names."""
from __future__ import annotations

import re
import uuid
from dataclasses import replace
from pathlib import Path

from services.common.auth import Principal
from services.common.errors import (Aborted, AlreadyExists, FailedPrecondition, FieldViolation, InvalidArgument,
                                    NotFound, PreconditionViolation)
from services.common.paging import by_creation, paginate
from services.common.uow import utcnow
from services.executor.app.jobs import claim_state_path
from services.executor.adapters.oidc import check_federation
from services.executor.domain.model import (AWS, AZURE, ENV, GCP, GENERIC, LOCAL, OIDC, PG, TF_VAR, Integration, Secret,
                                            StatePathClaim, Storage, integration_env, protected_env_name,
                                            valid_env_name, valid_state_path)

_SCHEMA_RE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")

MAX_CONCURRENT_JOBS = 1000


def _check_etag(kind: str, id_: str, given: str, current: str) -> None:
    if given and given != current:
        raise Aborted(f"{kind} {id_} has etag {current}, not {given}; read it again and retry", reason="STALE_ETAG")


def _check_name(name: str, field: str, violations: list) -> None:
    if not name.strip():
        violations.append(FieldViolation(field, "must not be empty"))


def _check_keys(values: dict[str, str], field: str, violations: list, env_names: bool,
                exported: dict[str, str] | None = None) -> None:
    """`exported`: key -> the environment variable it becomes in a job (when it becomes one)."""
    for key, value in values.items():
        if env_names and not valid_env_name(key):
            violations.append(FieldViolation(f"{field}[{key!r}]", "must be a valid environment variable name"))
        elif exported is not None and (why := protected_env_name(exported.get(key, key))):
            violations.append(FieldViolation(f"{field}[{key!r}]", why))
        if not value:
            violations.append(FieldViolation(f"{field}[{key!r}]", "must not be empty"))


def _exported_integration(provider: str, credentials: dict[str, str]) -> dict[str, str]:
    return {key: next(iter(integration_env(provider, {key: "x"}))) for key in credentials} \
        if provider in (AWS, AZURE, GCP, GENERIC) else {}


def _exported_secret(exposure: str, values: dict[str, str]) -> dict[str, str] | None:
    return {key: key for key in values} if exposure == ENV else None


# --- integrations ----------------------------------------------------------

async def create_integration(uow, principal: Principal, i: Integration, request_id: str = "") -> Integration:
    if (existing := await uow.find_request("CreateIntegration", request_id)) is not None:
        return await get_integration(uow, existing)
    violations: list[FieldViolation] = []
    _check_name(i.name, "integration.name", violations)
    if i.provider not in (AWS, AZURE, GCP, GENERIC, OIDC):
        violations.append(FieldViolation("integration.provider", "must be AWS, AZURE, GCP, GENERIC or OIDC"))
    if i.provider == OIDC:
        violations += [FieldViolation(f, why) for f, why in check_federation(i.oidc)]
    elif i.oidc:
        violations.append(FieldViolation("integration.oidc", "only for an OIDC integration"))
    if not i.credentials and i.provider != OIDC:  # federation needs no stored key
        violations.append(FieldViolation("credentials", "must hold at least one key"))
    _check_cap(i.max_concurrent_jobs, violations)
    _check_keys(i.credentials, "credentials", violations, env_names=True,
                exported=_exported_integration(i.provider, i.credentials))
    if violations:
        raise InvalidArgument("invalid integration", violations)
    if await uow.integrations.name_taken(i.name):
        raise AlreadyExists("integration", i.name, f"an integration named {i.name!r} already exists")
    i = replace(i, id=str(uuid.uuid4()), creator=principal.user, create_time=utcnow(), update_time=utcnow(),
                version=1)
    await uow.integrations.add(i)
    await uow.remember_request("CreateIntegration", request_id, i.id)
    return i


async def get_integration(uow, id_: str) -> Integration:
    i = await uow.integrations.get(id_) if id_ else None
    if i is None:
        raise NotFound("integration", id_)
    return i


async def list_integrations(uow, page_size: int, page_token: str):
    return await paginate(uow.integrations.list, page_size, page_token, {"list": "integrations"}, by_creation)


def _check_cap(cap: int, violations: list[FieldViolation]) -> None:
    if not 0 <= cap <= MAX_CONCURRENT_JOBS:
        violations.append(FieldViolation("integration.max_concurrent_jobs",
                                         f"must be between 0 (no cap) and {MAX_CONCURRENT_JOBS}"))


async def update_integration(uow, principal: Principal, id_: str, etag: str, name: str | None,
                             description: str | None, credentials: dict[str, str],
                             max_concurrent_jobs: int | None = None) -> Integration:
    current = await get_integration(uow, id_)
    _check_etag("integration", id_, etag, current.etag)
    violations: list[FieldViolation] = []
    if max_concurrent_jobs is not None:
        _check_cap(max_concurrent_jobs, violations)
    if name is not None:
        _check_name(name, "integration.name", violations)
    _check_keys(credentials, "credentials", violations, env_names=True,
                exported=_exported_integration(current.provider, credentials))
    if violations:
        raise InvalidArgument("invalid integration", violations)
    if name and name != current.name and await uow.integrations.name_taken(name):
        raise AlreadyExists("integration", name, f"an integration named {name!r} already exists")
    updated = replace(current, name=name or current.name,
                      description=current.description if description is None else description,
                      credentials=dict(credentials) or current.credentials, update_time=utcnow(),
                      max_concurrent_jobs=current.max_concurrent_jobs if max_concurrent_jobs is None
                      else max_concurrent_jobs, version=current.version + 1)
    await uow.integrations.update(updated, current.version)
    return updated


async def delete_integration(uow, principal: Principal, id_: str, etag: str, resource_users=None) -> None:
    current = await get_integration(uow, id_)
    _check_etag("integration", id_, etag, current.etag)
    await _refuse_if_resources_use(resource_users, "integration_id", "integration", id_)
    await uow.integrations.delete(id_)
    await _refuse_if_used(uow, "integration_ids", "integration", id_)  # after the delete: see there


async def _refuse_if_resources_use(resource_users, field: str, kind: str, id_: str) -> None:
    """Resources that name it would fail their next job: refused like a
    storage that still holds state, naming them."""
    users = await resource_users.of(field, id_) if resource_users is not None else []
    if users:
        raise FailedPrecondition(f"{kind} {id_} is used by resources", [
            PreconditionViolation("IN_USE", f"resources/{rid}", f"resource {name} uses it; change or delete it first")
            for rid, name in users], reason="IN_USE_BY_RESOURCES")


async def _refuse_if_used(uow, column: str, kind: str, id_: str) -> None:
    """Every job that has not ended holds what it names: a queued one would
    start without it, a running one may still need it (a destroy's
    credentials). Names up to 20 of them, the oldest first. Called after the
    row's delete, in its transaction (a refusal rolls the delete back), so a
    job submitted at the same moment is seen: on SQLite the delete holds the
    write lock; on PostgreSQL SubmitJob reads what the job names FOR KEY
    SHARE, so the delete waits for that submission to commit and this read,
    a statement after it, sees its job."""
    users = await uow.jobs.uses(column, id_)
    if users:
        raise FailedPrecondition(f"{kind} {id_} is used by jobs that have not ended", [
            PreconditionViolation("IN_USE", f"jobs/{j}", f"job {j} is queued or running with it") for j in users],
            reason="IN_USE_BY_JOBS")


# --- secrets ---------------------------------------------------------------

_EXPOSURES = (TF_VAR, ENV)


async def create_secret(uow, principal: Principal, x: Secret, request_id: str = "") -> Secret:
    if (existing := await uow.find_request("CreateSecret", request_id)) is not None:
        return await get_secret(uow, existing)
    violations: list[FieldViolation] = []
    _check_name(x.name, "secret.name", violations)
    if x.exposure not in _EXPOSURES:
        violations.append(FieldViolation("secret.exposure", "must be TF_VAR or ENV"))
    if not x.values:
        violations.append(FieldViolation("values", "must hold at least one key"))
    _check_keys(x.values, "values", violations, env_names=True, exported=_exported_secret(x.exposure, x.values))
    if violations:
        raise InvalidArgument("invalid secret", violations)
    if await uow.secrets.name_taken(x.name):
        raise AlreadyExists("secret", x.name, f"a secret named {x.name!r} already exists")
    x = replace(x, id=str(uuid.uuid4()), creator=principal.user, create_time=utcnow(), update_time=utcnow(),
                version=1)
    await uow.secrets.add(x)
    await uow.remember_request("CreateSecret", request_id, x.id)
    return x


async def get_secret(uow, id_: str) -> Secret:
    x = await uow.secrets.get(id_) if id_ else None
    if x is None:
        raise NotFound("secret", id_)
    return x


async def list_secrets(uow, page_size: int, page_token: str):
    return await paginate(uow.secrets.list, page_size, page_token, {"list": "secrets"}, by_creation)


async def update_secret(uow, principal: Principal, id_: str, etag: str, description: str | None,
                        values: dict[str, str]) -> Secret:
    current = await get_secret(uow, id_)
    _check_etag("secret", id_, etag, current.etag)
    violations: list[FieldViolation] = []
    _check_keys(values, "values", violations, env_names=True, exported=_exported_secret(current.exposure, values))
    if violations:
        raise InvalidArgument("invalid secret", violations)
    updated = replace(current, description=current.description if description is None else description,
                      values=dict(values) or current.values, update_time=utcnow(), version=current.version + 1)
    await uow.secrets.update(updated, current.version)
    return updated


async def delete_secret(uow, principal: Principal, id_: str, etag: str, resource_users=None) -> None:
    current = await get_secret(uow, id_)
    _check_etag("secret", id_, etag, current.etag)
    await _refuse_if_resources_use(resource_users, "secret_id", "secret", id_)
    await uow.secrets.delete(id_)
    await _refuse_if_used(uow, "secret_ids", "secret", id_)  # after the delete: see there


# --- storages --------------------------------------------------------------

async def create_storage(uow, principal: Principal, x: Storage, request_id: str = "") -> Storage:
    if (existing := await uow.find_request("CreateStorage", request_id)) is not None:
        return await get_storage(uow, existing)
    violations: list[FieldViolation] = []
    _check_name(x.name, "storage.name", violations)
    if x.kind == LOCAL:
        if not Path(x.local_directory).is_absolute():
            violations.append(FieldViolation("storage.local_directory", "must be an absolute directory path"))
    elif x.kind == PG:
        if not x.pg_connection_string.startswith(("postgres://", "postgresql://")):
            violations.append(FieldViolation("storage.pg_connection_string",
                                             "must be a postgres:// or postgresql:// connection string"))
        if not _SCHEMA_RE.match(x.pg_schema):
            violations.append(FieldViolation("storage.pg_schema", "must be a lower-case SQL identifier "
                                                                  "(a-z, 0-9, _; at most 63)"))
    else:
        violations.append(FieldViolation("storage.kind", "must be LOCAL or PG"))
    if violations:
        raise InvalidArgument("invalid storage", violations)
    if await uow.storages.name_taken(x.name):
        raise AlreadyExists("storage", x.name, f"a storage named {x.name!r} already exists")
    x = replace(x, id=str(uuid.uuid4()), creator=principal.user, create_time=utcnow(), version=1)
    await uow.storages.add(x)
    await uow.remember_request("CreateStorage", request_id, x.id)
    return x


async def get_storage(uow, id_: str) -> Storage:
    x = await uow.storages.get(id_) if id_ else None
    if x is None:
        raise NotFound("storage", id_)
    return x


async def list_storages(uow, page_size: int, page_token: str):
    return await paginate(uow.storages.list, page_size, page_token, {"list": "storages"}, by_creation)


async def delete_storage(uow, principal: Principal, id_: str, etag: str) -> None:
    current = await get_storage(uow, id_)
    _check_etag("storage", id_, etag, current.etag)
    claimed = await uow.storages.claims_of(id_)
    if claimed:
        raise FailedPrecondition(f"storage {id_} still holds the state of resources", [
            PreconditionViolation("STATE_PATH_CLAIMED", f"storages/{id_}/paths/{p}", f"state path {p} is claimed")
            for p in claimed])
    await uow.storages.delete(id_)
    await _refuse_if_used(uow, "storage_id", "storage", id_)  # after the delete: see there


async def claim(uow, storage_id: str, state_path: str, resource_id: str) -> StatePathClaim:
    _check_claim(storage_id, state_path, resource_id)
    if storage_id:  # empty: the executor's default local storage
        await get_storage(uow, storage_id)
    return await claim_state_path(uow, storage_id, state_path, resource_id)


async def release(uow, storage_id: str, state_path: str, resource_id: str) -> None:
    _check_claim(storage_id, state_path, resource_id)
    existing = await uow.storages.claim(storage_id, state_path)
    if existing is None:
        return
    if existing.resource_id != resource_id:
        raise FailedPrecondition("the state path belongs to another resource", [PreconditionViolation(
            "CLAIMED_BY_OTHER", f"storages/{storage_id}/paths/{state_path}", "claimed by another resource")])
    await uow.storages.remove_claim(storage_id, state_path)


def _check_claim(storage_id: str, state_path: str, resource_id: str) -> None:
    violations = []
    if not valid_state_path(state_path):
        violations.append(FieldViolation("state_path", "must be a relative path without '..'"))
    if not resource_id:
        violations.append(FieldViolation("resource_id", "must not be empty"))
    if violations:
        raise InvalidArgument("invalid state path claim", violations)
