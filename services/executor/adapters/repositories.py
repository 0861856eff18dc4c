"""SQLAlchemy repositories of the executor context. They seal and open secret
material with the Vault, so nothing above them sees ciphertext and nothing
below them sees clear text."""
from __future__ import annotations

import datetime as dt
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from services.common.errors import Aborted
from services.common.paging import after_key
from services.executor.adapters.tables import (integrations, job_logs, jobs, oidc_keys, provider_locks, secrets,
                                              state_path_claims, storages)
from services.common.vault import Vault
from services.executor.domain.model import (NOT_ENDED, Correlation, Integration, Job, JobLease, Output, PlanSummary,
                                            Secret, Source, StatePathClaim, Storage)


async def _exactly_one(session: AsyncSession, statement, kind: str, id_: str) -> None:
    if (await session.execute(statement)).rowcount != 1:
        raise Aborted(f"{kind} {id_} was changed by someone else; read it again and retry", reason="STALE_ETAG")


def _summary_to_json(p: PlanSummary | None):
    if p is None:
        return None
    return {"add": p.add, "change": p.change, "destroy": p.destroy,
            "resource_changes": [[a, list(actions)] for a, actions in p.resource_changes],
            "state_serial": p.state_serial, "state_lineage": p.state_lineage}


def _summary_from_json(d) -> PlanSummary | None:
    if d is None:
        return None
    return PlanSummary(d["add"], d["change"], d["destroy"],
                       tuple((a, tuple(actions)) for a, actions in d["resource_changes"]),
                       int(d.get("state_serial", 0)), str(d.get("state_lineage", "")))


# Built once (the statements on a job's way from submission to its worker):
# building a statement costs more than running it on SQLite.
_JOB = sa.select(jobs).where(jobs.c.id == sa.bindparam("id"))
_INSERT_JOB = sa.insert(jobs)
_SAVE_JOB = sa.update(jobs).where(jobs.c.id == sa.bindparam("w_id")).values(
    {c.name: sa.bindparam(c.name) for c in jobs.columns if c.name not in ("id", "plan_file")})
_CLAIM_JOB = sa.update(jobs).where(
    jobs.c.id == sa.bindparam("w_id"),
    sa.or_(jobs.c.status == "queued", sa.and_(jobs.c.status == "running", jobs.c.lease_until < sa.bindparam("now"))),
    jobs.c.cancel_requested == sa.false(),
).values(status="running", worker=sa.bindparam("worker"), lease_until=sa.bindparam("lease_until"),
         attempt=jobs.c.attempt + 1, queue_reason="")
_INTEGRATION = sa.select(integrations).where(integrations.c.id == sa.bindparam("id"))
_STORAGE = sa.select(storages).where(storages.c.id == sa.bindparam("id"))
_CLAIM = sa.select(state_path_claims).where(state_path_claims.c.storage_id == sa.bindparam("storage_id"),
                                            state_path_claims.c.state_path == sa.bindparam("state_path"))
_INSERT_CLAIM = sa.insert(state_path_claims)
_MARK_STARTED = sa.update(jobs).where(jobs.c.id == sa.bindparam("w_id"), jobs.c.start_time.is_(None)).values(
    start_time=sa.bindparam("start_time"))
_OLDEST_WAITING = sa.select(jobs.c.create_time).where(
    jobs.c.status == "queued", jobs.c.queue_reason == "").order_by(jobs.c.create_time).limit(1)
_INSERT_LOG_LINES = sa.insert(job_logs)
_LAST_LOG_NUMBER = sa.select(sa.func.coalesce(sa.func.max(job_logs.c.number), 0)).where(
    job_logs.c.job_id == sa.bindparam("job_id"))


@functools.cache
def _named_query(kind: str, postgres: bool) -> sa.Select:
    """The ids (and an integration's cap) of what a job names, held FOR KEY
    SHARE on PostgreSQL (see JobRepository.hold_named)."""
    table = {"integration": integrations, "secret": secrets, "storage": storages}[kind]
    columns = [table.c.id]
    if kind == "integration":
        columns += [table.c.name, table.c.max_concurrent_jobs]
    query = sa.select(*columns).where(table.c.id.in_(sa.bindparam("ids", expanding=True)))
    return query.with_for_update(read=True, key_share=True) if postgres else query


@dataclass(frozen=True)
class Named:
    """What hold_named found: `(kind, id) in named` for each that exists, and
    `caps` (integration id -> (name, max_concurrent_jobs)) as read with it."""
    found: set[tuple[str, str]] = field(default_factory=set)
    caps: dict[str, tuple[str, int]] = field(default_factory=dict)

    def __contains__(self, item: tuple[str, str]) -> bool:
        return item in self.found


class JobRepository:
    """`touch` marks a job whose status may have changed (its log streams wake at commit)."""

    def __init__(self, session: AsyncSession, vault: Vault, touch: Callable[[str], None]):
        self.s = session
        self.vault = vault
        self.touch = touch

    def _row(self, j: Job) -> dict[str, Any]:
        sensitive = {k: v for k, v in j.variables.items() if k in j.sensitive_variables}
        plain = {k: v for k, v in j.variables.items() if k not in j.sensitive_variables}
        secret_outputs = {o.name: o.value for o in j.outputs if o.sensitive}
        c = j.correlation
        return dict(
            id=j.id, action=j.action, status=j.status,
            source={"repository_url": j.source.repository_url, "ref": j.source.ref, "path": j.source.path},
            commit=j.commit, variables=plain, sensitive_values=self.vault.seal_json(sensitive) if sensitive else None,
            sensitive_variables=list(j.sensitive_variables), integration_ids=list(j.integration_ids),
            secret_ids=list(j.secret_ids), storage_id=j.storage_id, state_path=j.state_path,
            resource_id=c.resource_id, resource_revision=c.resource_revision, workflow_id=c.workflow_id,
            step_id=c.step_id, temporary_state_id=c.temporary_state_id, template_id=c.template_id,
            plan_job_id=j.plan_job_id,
            timeout_seconds=j.timeout_seconds,
            outputs=[{"name": o.name, "value": None if o.sensitive else o.value, "sensitive": o.sensitive}
                     for o in j.outputs],
            sensitive_outputs=self.vault.seal_json(secret_outputs) if secret_outputs else None,
            plan_summary=_summary_to_json(j.plan_summary), exit_code=j.exit_code, error_message=j.error_message,
            attempt=j.attempt, worker=j.worker, lease_until=j.lease_until, cancel_requested=j.cancel_requested,
            creator=j.creator, create_time=j.create_time, start_time=j.start_time, end_time=j.end_time,
            queue_reason=j.queue_reason, via=j.via,
        )

    def _job(self, r) -> Job:
        variables = dict(r.variables)
        variables.update(self.vault.open_json(r.sensitive_values, {}))
        secret_outputs = self.vault.open_json(r.sensitive_outputs, {})
        return Job(
            id=r.id, action=r.action, status=r.status, source=Source(**r.source), commit=r.commit,
            variables=variables, sensitive_variables=list(r.sensitive_variables),
            integration_ids=list(r.integration_ids), secret_ids=list(r.secret_ids), storage_id=r.storage_id,
            state_path=r.state_path,
            correlation=Correlation(r.resource_id, r.resource_revision, r.workflow_id, r.step_id,
                                    r.temporary_state_id, r.template_id),
            plan_job_id=r.plan_job_id, timeout_seconds=r.timeout_seconds,
            outputs=[Output(o["name"], secret_outputs.get(o["name"]) if o["sensitive"] else o["value"],
                            o["sensitive"]) for o in r.outputs],
            plan_summary=_summary_from_json(r.plan_summary), exit_code=r.exit_code, error_message=r.error_message,
            attempt=r.attempt, worker=r.worker, lease_until=_aware(r.lease_until),
            cancel_requested=r.cancel_requested, creator=r.creator, create_time=_aware(r.create_time),
            start_time=_aware(r.start_time), end_time=_aware(r.end_time), queue_reason=r.queue_reason,
            via=r.via,
        )

    async def add(self, j: Job) -> None:
        await self.s.execute(_INSERT_JOB, {**self._row(j), "plan_file": None})

    async def get(self, id_: str, *, for_update: bool = False) -> Job | None:
        query = _JOB.with_for_update() if for_update else _JOB
        row = (await self.s.execute(query, {"id": id_})).first()
        return self._job(row) if row else None

    async def save(self, j: Job) -> None:
        values = self._row(j)
        values["w_id"] = values.pop("id")
        await self.s.execute(_SAVE_JOB, values)
        self.touch(j.id)

    async def claim(self, id_: str, worker: str, now: dt.datetime, lease_until: dt.datetime) -> bool:
        """Atomically makes `worker` the job's runner: only a queued job, or a
        running one whose runner's lease expired (it died), can be claimed.
        Two workers racing for one job: exactly one update matches."""
        result = await self.s.execute(_CLAIM_JOB, dict(w_id=id_, now=now, worker=worker, lease_until=lease_until))
        return result.rowcount == 1

    async def mark_started(self, id_: str, moment: dt.datetime) -> None:
        """The moment a worker began running the job, kept from its first attempt."""
        await self.s.execute(_MARK_STARTED, {"w_id": id_, "start_time": moment})

    async def count_by_status(self, statuses: tuple[str, ...]) -> dict[str, int]:
        rows = await self.s.execute(sa.select(jobs.c.status, sa.func.count()).where(
            jobs.c.status.in_(statuses)).group_by(jobs.c.status))
        return {status: 0 for status in statuses} | {r[0]: r[1] for r in rows}

    async def running_integrations(self, except_job: str) -> list[list[str]]:
        """The integration ids of each running job but `except_job` (running jobs are few)."""
        rows = await self.s.execute(sa.select(jobs.c.integration_ids).where(jobs.c.status == "running",
                                                                             jobs.c.id != except_job))
        return [list(r.integration_ids) for r in rows]

    async def set_queue_reason(self, id_: str, reason: str) -> None:
        await self.s.execute(sa.update(jobs).where(jobs.c.id == id_, jobs.c.status == "queued").values(
            queue_reason=reason))
        self.touch(id_)

    async def oldest_waiting(self) -> dt.datetime | None:
        """When the longest-waiting queued job (one no integration cap holds
        back) was submitted; None when none waits."""
        row = (await self.s.execute(_OLDEST_WAITING)).first()
        return _aware(row.create_time) if row else None

    async def oldest_waiting_next_step(self, started_before: str) -> str | None:
        """The longest-waiting queued job (no cap holding it back) of a
        workflow that already has a succeeded job (a next step that missed
        the hold of its workflow's worker, or one of several waiting at once,
        e.g. a plan's parallel plan jobs) of workflow `started_before` itself
        or of one whose first job came before that workflow's first job."""
        done, theirs, mine = jobs.alias("done"), jobs.alias("theirs"), jobs.alias("mine")
        their_start = sa.select(sa.func.min(theirs.c.create_time)).where(
            theirs.c.workflow_id == jobs.c.workflow_id).scalar_subquery()
        my_start = sa.select(sa.func.min(mine.c.create_time)).where(
            mine.c.workflow_id == started_before).scalar_subquery()
        row = (await self.s.execute(sa.select(jobs.c.id).where(
            jobs.c.status == "queued", jobs.c.queue_reason == "", jobs.c.workflow_id != "",
            sa.exists().where(done.c.workflow_id == jobs.c.workflow_id, done.c.status == "succeeded"),
            their_start <= my_start)
            .order_by(jobs.c.create_time).limit(1))).first()
        return row.id if row else None

    async def lease_expired_before(self, moment: dt.datetime) -> list[tuple[str, int]]:
        """(id, attempt) of running jobs whose runner's lease ended before `moment`."""
        rows = await self.s.execute(sa.select(jobs.c.id, jobs.c.attempt).where(
            jobs.c.status == "running", jobs.c.lease_until < moment))
        return [(r.id, r.attempt) for r in rows]

    async def leases(self, ids: list[str]) -> dict[str, JobLease]:
        """Who runs each of these jobs (those that exist), read in batches."""
        found: dict[str, JobLease] = {}
        for start in range(0, len(ids), 500):
            rows = await self.s.execute(sa.select(jobs.c.id, jobs.c.status, jobs.c.attempt, jobs.c.worker,
                                                  jobs.c.lease_until).where(jobs.c.id.in_(ids[start:start + 500])))
            found.update({r.id: JobLease(r.status, r.attempt, r.worker, _aware(r.lease_until)) for r in rows})
        return found

    async def renew_lease(self, id_: str, worker: str, lease_until: dt.datetime, attempt: int) -> bool:
        """False when the job is no longer this run's: it lost the lease and was
        claimed again (another attempt: the same process's other worker task
        has the same worker id, so the attempt tells the runs apart)."""
        result = await self.s.execute(sa.update(jobs).where(
            jobs.c.id == id_, jobs.c.worker == worker, jobs.c.attempt == attempt,
            jobs.c.status == "running").values(lease_until=lease_until))
        return result.rowcount == 1

    async def cancel_if_queued(self, id_: str, reason: str, now: dt.datetime) -> bool:
        result = await self.s.execute(sa.update(jobs).where(jobs.c.id == id_, jobs.c.status == "queued").values(
            status="cancelled", cancel_requested=True, end_time=now, error_message=reason))
        if result.rowcount != 1:
            return False
        self.touch(id_)
        return True

    async def request_cancel_if_running(self, id_: str) -> bool:
        result = await self.s.execute(sa.update(jobs).where(jobs.c.id == id_, jobs.c.status == "running").values(
            cancel_requested=True))
        return result.rowcount == 1

    async def release(self, id_: str, worker: str) -> None:
        """Hands a running job back (shutdown): the next worker may claim it at once."""
        await self.s.execute(sa.update(jobs).where(jobs.c.id == id_, jobs.c.worker == worker).values(
            lease_until=dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)))

    async def cancel_requested(self, id_: str) -> bool:
        return bool(await self.s.scalar(sa.select(jobs.c.cancel_requested).where(jobs.c.id == id_)))

    async def set_plan_file(self, id_: str, data: bytes) -> None:
        await self.s.execute(sa.update(jobs).where(jobs.c.id == id_).values(plan_file=self.vault.seal(data)))

    async def plan_file(self, id_: str) -> bytes | None:
        sealed = await self.s.scalar(sa.select(jobs.c.plan_file).where(jobs.c.id == id_))
        return self.vault.open(sealed) if sealed else None

    async def state_changed_since(self, storage_id: str, state_path: str, since: dt.datetime) -> list[str]:
        """Ids of apply/destroy jobs on this state that succeeded after `since`."""
        rows = await self.s.execute(sa.select(jobs.c.id, jobs.c.end_time).where(
            jobs.c.storage_id == storage_id, jobs.c.state_path == state_path,
            jobs.c.action.in_(["apply", "destroy"]), jobs.c.status == "succeeded"))
        return [r.id for r in rows if r.end_time is not None and _aware(r.end_time) > since]

    async def list(self, after: list | None, limit: int, resource_id: str = "", workflow_id: str = "",
                   status: str = "", descending: bool = False) -> list[Job]:
        query = sa.select(jobs)
        if resource_id:
            query = query.where(jobs.c.resource_id == resource_id)
        if workflow_id:
            query = query.where(jobs.c.workflow_id == workflow_id)
        if status:
            query = query.where(jobs.c.status == status)
        query = after_key(query, (jobs.c.create_time, jobs.c.id), after, descending).limit(limit)
        return [self._job(r) for r in await self.s.execute(query)]

    async def hold_named(self, integration_ids: list[str], secret_ids: list[str], storage_id: str) -> Named:
        """What of the integrations, secrets and storage a job names exists
        (and the integrations' caps, read in the same statement); on
        PostgreSQL their rows are held FOR KEY SHARE until commit, so a
        concurrent delete waits for this transaction."""
        named = Named()
        postgres = self.s.bind.dialect.name == "postgresql"
        for kind, ids in (("integration", integration_ids), ("secret", secret_ids),
                          ("storage", [storage_id] if storage_id else [])):
            if not ids:
                continue
            for r in await self.s.execute(_named_query(kind, postgres), {"ids": sorted(set(ids))}):
                named.found.add((kind, r.id))
                if kind == "integration":
                    named.caps[r.id] = (r.name, r.max_concurrent_jobs)
        return named

    async def uses(self, column: str, id_: str, limit: int = 20) -> list[str]:
        """Ids of up to `limit` jobs that have not ended (NOT_ENDED: queued
        or running) and reference an integration, secret or storage, oldest
        first. The statuses come from the model, not a list of their own
        here: a job waiting in a status such a list missed once let its
        credentials be deleted under it."""
        rows = await self.s.execute(sa.select(jobs.c.id, jobs.c[column]).where(
            jobs.c.status.in_(NOT_ENDED)).order_by(jobs.c.create_time, jobs.c.id))
        return [r.id for r in rows if (id_ in r[1] if isinstance(r[1], list) else r[1] == id_)][:limit]


class JobLogRepository:
    """`touch` marks the job whose lines were written (its log streams wake at commit)."""

    def __init__(self, session: AsyncSession, touch: Callable[[str], None]):
        self.s = session
        self.touch = touch

    async def append(self, job_id: str, first_number: int, lines: list[tuple[dt.datetime, str, str]]) -> None:
        if lines:
            await self.s.execute(_INSERT_LOG_LINES, [
                dict(job_id=job_id, number=first_number + i, time=t, stream=stream, text=text)
                for i, (t, stream, text) in enumerate(lines)])
            self.touch(job_id)

    async def last_number(self, job_id: str) -> int:
        return int(await self.s.scalar(_LAST_LOG_NUMBER, {"job_id": job_id}))

    async def after(self, job_id: str, after: int, limit: int = 500) -> list:
        return list(await self.s.execute(sa.select(job_logs).where(
            job_logs.c.job_id == job_id, job_logs.c.number > after).order_by(job_logs.c.number).limit(limit)))


class ProviderLockRepository:
    """The lock file recorded on a resource's first run of a module that ships none."""

    def __init__(self, session: AsyncSession):
        self.s = session

    async def get(self, resource_id: str, source: str) -> str:
        """The recorded lock file, if it was recorded for this very source ("" otherwise)."""
        row = (await self.s.execute(sa.select(provider_locks.c.source, provider_locks.c.lock_file).where(
            provider_locks.c.resource_id == resource_id))).first()
        return row.lock_file if row is not None and row.source == source else ""

    async def record(self, resource_id: str, source: str, lock_file: str, now: dt.datetime) -> None:
        """Records (or replaces) the resource's lock file; two jobs' ends at
        once leave the later one (one statement: no key conflict)."""
        if self.s.bind.dialect.name == "postgresql":
            from sqlalchemy.dialects.postgresql import insert
        else:
            from sqlalchemy.dialects.sqlite import insert
        statement = insert(provider_locks).values(resource_id=resource_id, source=source, lock_file=lock_file,
                                                  update_time=now)
        await self.s.execute(statement.on_conflict_do_update(
            index_elements=[provider_locks.c.resource_id],
            set_={"source": source, "lock_file": lock_file, "update_time": now}))


class OidcKeyRepository:
    """The keys jobs' OIDC tokens are signed with, newest first; private keys sealed by the vault."""

    def __init__(self, session: AsyncSession, vault: Vault):
        self.s = session
        self.vault = vault

    async def all(self) -> list[tuple[str, bytes, dt.datetime]]:
        rows = await self.s.execute(sa.select(oidc_keys).order_by(oidc_keys.c.create_time.desc(), oidc_keys.c.kid))
        return [(r.kid, self.vault.open(r.private_key), _aware(r.create_time)) for r in rows]

    async def add(self, kid: str, private_pem: bytes, now: dt.datetime) -> None:
        await self.s.execute(sa.insert(oidc_keys).values(kid=kid, private_key=self.vault.seal(private_pem),
                                                         create_time=now))

    async def delete(self, kid: str) -> None:
        await self.s.execute(sa.delete(oidc_keys).where(oidc_keys.c.kid == kid))


class IntegrationRepository:
    def __init__(self, session: AsyncSession, vault: Vault):
        self.s = session
        self.vault = vault

    def _row(self, i: Integration) -> dict[str, Any]:
        return dict(id=i.id, name=i.name, description=i.description, provider=i.provider,
                    credentials=self.vault.seal_json(i.credentials), creator=i.creator,
                    create_time=i.create_time, update_time=i.update_time, version=i.version,
                    max_concurrent_jobs=i.max_concurrent_jobs, oidc=dict(i.oidc) or None)

    def _integration(self, r) -> Integration:
        return Integration(id=r.id, name=r.name, description=r.description, provider=r.provider,
                           credentials=self.vault.open_json(r.credentials, {}), creator=r.creator,
                           create_time=_aware(r.create_time), update_time=_aware(r.update_time), version=r.version,
                           max_concurrent_jobs=r.max_concurrent_jobs, oidc=dict(r.oidc or {}))

    async def caps(self, ids: list[str], lock: bool = False) -> dict[str, tuple[str, int]]:
        """id -> (name, cap) of these integrations. `lock` (PostgreSQL)
        serializes the executors that check the same integration's cap."""
        query = sa.select(integrations.c.id, integrations.c.name, integrations.c.max_concurrent_jobs).where(
            integrations.c.id.in_(ids))
        if lock and self.s.bind.dialect.name == "postgresql":
            # FOR NO KEY UPDATE: serializes cap checks without conflicting with
            # the FOR KEY SHARE that SubmitJob holds on what a job names.
            query = query.with_for_update(key_share=True)
        return {r.id: (r.name, r.max_concurrent_jobs) for r in await self.s.execute(query)}

    async def add(self, i: Integration) -> None:
        await self.s.execute(sa.insert(integrations).values(**self._row(i)))

    async def get(self, id_: str) -> Integration | None:
        row = (await self.s.execute(_INTEGRATION, {"id": id_})).first()
        return self._integration(row) if row else None

    async def name_taken(self, name: str) -> bool:
        return bool(await self.s.scalar(sa.select(sa.func.count()).where(integrations.c.name == name)))

    async def list(self, after: list | None, limit: int) -> list[Integration]:
        rows = await self.s.execute(after_key(sa.select(integrations), (integrations.c.create_time, integrations.c.id), after)
                                    .limit(limit))
        return [self._integration(r) for r in rows]

    async def update(self, i: Integration, read_version: int) -> None:
        values = self._row(i)
        values.pop("id")
        await _exactly_one(self.s, sa.update(integrations).where(
            integrations.c.id == i.id, integrations.c.version == read_version).values(**values), "integration", i.id)

    async def delete(self, id_: str) -> None:
        await self.s.execute(sa.delete(integrations).where(integrations.c.id == id_))


class SecretRepository:
    def __init__(self, session: AsyncSession, vault: Vault):
        self.s = session
        self.vault = vault

    def _row(self, x: Secret) -> dict[str, Any]:
        return dict(id=x.id, name=x.name, description=x.description, exposure=x.exposure,
                    secret_values=self.vault.seal_json(x.values), creator=x.creator,
                    create_time=x.create_time, update_time=x.update_time, version=x.version)

    def _secret(self, r) -> Secret:
        return Secret(id=r.id, name=r.name, description=r.description, exposure=r.exposure,
                      values=self.vault.open_json(r.secret_values, {}), creator=r.creator,
                      create_time=_aware(r.create_time), update_time=_aware(r.update_time), version=r.version)

    async def add(self, x: Secret) -> None:
        await self.s.execute(sa.insert(secrets).values(**self._row(x)))

    async def get(self, id_: str) -> Secret | None:
        row = (await self.s.execute(sa.select(secrets).where(secrets.c.id == id_))).first()
        return self._secret(row) if row else None

    async def name_taken(self, name: str) -> bool:
        return bool(await self.s.scalar(sa.select(sa.func.count()).where(secrets.c.name == name)))

    async def list(self, after: list | None, limit: int) -> list[Secret]:
        rows = await self.s.execute(after_key(sa.select(secrets), (secrets.c.create_time, secrets.c.id), after)
                                    .limit(limit))
        return [self._secret(r) for r in rows]

    async def update(self, x: Secret, read_version: int) -> None:
        values = self._row(x)
        values.pop("id")
        await _exactly_one(self.s, sa.update(secrets).where(
            secrets.c.id == x.id, secrets.c.version == read_version).values(**values), "secret", x.id)

    async def delete(self, id_: str) -> None:
        await self.s.execute(sa.delete(secrets).where(secrets.c.id == id_))


class StorageRepository:
    def __init__(self, session: AsyncSession, vault: Vault):
        self.s = session
        self.vault = vault

    def _storage(self, r) -> Storage:
        return Storage(id=r.id, name=r.name, kind=r.kind, local_directory=r.local_directory,
                       pg_connection_string=self.vault.open(r.pg_connection).decode() if r.pg_connection else "",
                       pg_schema=r.pg_schema, creator=r.creator, create_time=_aware(r.create_time),
                       version=r.version)

    async def add(self, x: Storage) -> None:
        await self.s.execute(sa.insert(storages).values(
            id=x.id, name=x.name, kind=x.kind, local_directory=x.local_directory,
            pg_connection=self.vault.seal(x.pg_connection_string.encode()) if x.pg_connection_string else None,
            pg_schema=x.pg_schema, creator=x.creator, create_time=x.create_time, version=x.version))

    async def get(self, id_: str) -> Storage | None:
        row = (await self.s.execute(_STORAGE, {"id": id_})).first()
        return self._storage(row) if row else None

    async def name_taken(self, name: str) -> bool:
        return bool(await self.s.scalar(sa.select(sa.func.count()).where(storages.c.name == name)))

    async def list(self, after: list | None, limit: int) -> list[Storage]:
        rows = await self.s.execute(after_key(sa.select(storages), (storages.c.create_time, storages.c.id), after)
                                    .limit(limit))
        return [self._storage(r) for r in rows]

    async def delete(self, id_: str) -> None:
        await self.s.execute(sa.delete(storages).where(storages.c.id == id_))

    async def claim(self, storage_id: str, state_path: str) -> StatePathClaim | None:
        row = (await self.s.execute(_CLAIM, dict(storage_id=storage_id, state_path=state_path))).first()
        return StatePathClaim(row.storage_id, row.state_path, row.resource_id, _aware(row.create_time)) if row else None

    async def add_claim(self, c: StatePathClaim) -> None:
        await self.s.execute(_INSERT_CLAIM, dict(
            storage_id=c.storage_id, state_path=c.state_path, resource_id=c.resource_id, create_time=c.create_time))

    async def remove_claim(self, storage_id: str, state_path: str) -> None:
        await self.s.execute(sa.delete(state_path_claims).where(
            state_path_claims.c.storage_id == storage_id, state_path_claims.c.state_path == state_path))

    async def claims_of(self, storage_id: str, limit: int = 20) -> list[str]:
        rows = await self.s.execute(sa.select(state_path_claims.c.state_path).where(
            state_path_claims.c.storage_id == storage_id).limit(limit))
        return [r.state_path for r in rows]


def _aware(moment: dt.datetime | None) -> dt.datetime | None:
    """SQLite gives naive datetimes back; everything here is UTC."""
    if moment is not None and moment.tzinfo is None:
        return moment.replace(tzinfo=dt.timezone.utc)
    return moment
