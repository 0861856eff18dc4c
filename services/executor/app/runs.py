"""Job runs: what a worker does with a job it claimed, from its start to its
recorded end. The environment (integrations' credentials, secrets) and the
redactor of the job's sensitive values, terraform under supervision
(deadline, cancel requests, the lease renewed with the work-queue message's
heartbeat), the log written in small batches as it runs, and the end
recorded only by the attempt that still holds the job. The worker pool
(worker.py) decides which job a worker runs; this module runs it."""
from __future__ import annotations

import asyncio
import datetime as dt
import logging

from sqlalchemy.exc import IntegrityError

from services.common import logs as service_logs
from services.common import metrics, tracing
from services.common.uow import utcnow
from services.executor.adapters.oidc import OidcUnavailable, audience_of
from services.executor.adapters.terraform import (OidcGrant, RunSpec, TerraformRun, break_stale_lock, job_workdirs,
                                                  remove_workdir)
from services.executor.app.jobs import DISPATCH_SUBJECT, emit_job_event, lease_deadline
from services.executor.domain.model import (CANCELLED, FAILED, OIDC, SUCCEEDED, TIMED_OUT, Integration, Job, Redactor,
                                            integration_env, secret_env, sensitive_values)

log = logging.getLogger(__name__)

MAX_LINE = 16 * 1024
# Seconds between two writes of a running job's new lines: a live view
# (StreamJobLogs) redraws twice a second. The last lines are written with
# the job's end, in the transaction that records it.
FLUSH_INTERVAL = 0.5


class LogWriter:
    """Buffers a job's lines and writes them in small batches (every
    FLUSH_INTERVAL), numbered in order, so followers see them while the job
    runs.

    One writer at a time: the timed writes are one task's, and once it is
    stopped (`stop`) what is left is written either with the job's end
    (`write`, in the transaction that records it) or on its own (`flush`).
    A write cancelled half way could not tell whether its lines were stored,
    and a second writer would race it for the same line numbers."""

    def __init__(self, uow_factory, job_id: str, next_number: int, started: dt.datetime | None = None):
        self.uow_factory = uow_factory
        self.job_id = job_id
        self.next_number = next_number
        # The job's start_time goes with the first lines: stamped when the worker
        # began, stored off the way to terraform's first command.
        self.started = started
        self._buffer: list = []
        self._closing = asyncio.Event()
        self._task = asyncio.create_task(self._loop())

    def add(self, stream: str, text: str) -> None:
        self._buffer.append((utcnow(), stream, text[:MAX_LINE]))

    async def _loop(self) -> None:
        while True:
            try:
                async with asyncio.timeout(FLUSH_INTERVAL):
                    await self._closing.wait()
                return  # stopped: what is left is written by whoever stopped it
            except TimeoutError:
                pass
            try:
                await self.flush()
            except Exception as exc:  # noqa: BLE001 - kept in the buffer, written next time
                log.warning("job %s: writing log lines failed: %s", self.job_id, exc)

    async def write(self, uow, lines: list) -> None:
        """Adds `lines` (numbered from next_number) and the start time, if
        not stored yet, to the transaction `uow`; `stored(lines)` once it committed."""
        await uow.logs.append(self.job_id, self.next_number, lines)
        if self.started is not None:
            await uow.jobs.mark_started(self.job_id, self.started)

    def take(self) -> list:
        """The lines not written yet, for `write` (after `stop`)."""
        lines, self._buffer = self._buffer, []
        return lines

    def stored(self, lines: list) -> None:
        self.started = None
        self.next_number += len(lines)

    async def flush(self) -> None:
        if not self._buffer:
            return
        lines = self.take()
        try:
            async with self.uow_factory() as uow:
                await self.write(uow, lines)
                await uow.commit()
        except BaseException:
            self._buffer = lines + self._buffer
            raise
        self.stored(lines)

    async def stop(self) -> None:
        """Ends the timed writes (waiting for one under way); what is left stays buffered."""
        self._closing.set()
        await self._task

    async def close(self) -> None:
        """Writes what is left; raises if the last write failed."""
        await self.stop()
        await self.flush()


class JobRuns:
    """Runs claimed jobs; the worker pool (JobWorkers) is one. Needs `runtime`,
    `config` (ExecutorConfig), `terraform` (TerraformConfig) and `_runs`
    (job id -> its TerraformRun, for interrupts)."""

    async def _execute(self, job: Job, msg, previous_worker: str) -> str:
        """Runs a job this worker has claimed; `msg` is its work-queue message
        (None for a job started directly), heartbeated and acked here. Returns
        the status this run ended the job with ("" when it did not end it)."""
        c = job.correlation
        with tracing.span(f"job {job.action}", job_id=job.id, attempt=job.attempt, worker=self.config.worker_id,
                          workflow_id=c.workflow_id, step_id=c.step_id, resource_id=c.resource_id), \
                service_logs.bound(job_id=job.id, workflow_id=c.workflow_id, step_id=c.step_id,
                                   resource_id=c.resource_id):
            return await self._run_job(job, msg, previous_worker)

    async def _run_job(self, job: Job, msg, previous_worker: str) -> str:
        cfg = self.config
        started = utcnow()
        async with self.runtime.uow() as uow:
            storage = await uow.storages.get(job.storage_id) if job.storage_id else None
            env, redact, federated = await self._environment(uow, job)
            plan_file = await uow.jobs.plan_file(job.plan_job_id) if job.plan_job_id else None
            plan_job = await uow.jobs.get(job.plan_job_id) if job.plan_job_id else None
            summary = plan_job.plan_summary if plan_job is not None else None
            # A first attempt's log is empty: only a run of the job writes it.
            next_number = await uow.logs.last_number(job.id) + 1 if job.attempt > 1 else 1
            resource_id = _vouched_resource(job)
            lock_file = await uow.provider_locks.get(resource_id, _lock_source(job)) if resource_id else ""
        grants = await self._tokens(job, federated, redact)  # outside the transaction: minting may write a key

        logs = LogWriter(self.runtime.uow, job.id, next_number, started)
        if previous_worker:
            logs.add("executor", f"attempt {job.attempt}: worker {previous_worker} stopped without finishing "
                                 f"(its lease expired); running the job again")
            if break_stale_lock(self.terraform, storage, job.state_path):
                logs.add("executor", "removed the stale state lock the stopped run left behind")
            if await self._remove_workdirs_left(job.id, up_to_attempt=job.attempt - 1):
                logs.add("executor", "removed the working directory the stopped run left behind")
        logs.add("executor", f"{job.action} job {job.id}, attempt {job.attempt}, on worker {cfg.worker_id}")
        if job.attempt == 1:
            metrics.JOB_QUEUED.observe(metrics.seconds_between(job.create_time, utcnow()))
        spec = RunSpec(job_id=job.id, action=job.action, repository_url=job.source.repository_url,
                       ref=job.commit or job.source.ref, path=job.source.path, variables=job.variables, env=env,
                       storage=storage, state_path=job.state_path, plan_file=plan_file,
                       plan_state=(summary.state_serial, summary.state_lineage) if summary else (0, ""),
                       attempt=job.attempt, lock_file=lock_file, oidc=grants)
        run = TerraformRun(self.terraform, spec, redact, logs.add)
        self._runs[job.id] = run
        try:
            result = await self._supervise(msg, job, run)
        except BaseException:
            self._runs.pop(job.id, None)
            await self._close_log(logs, job)
            raise
        self._runs.pop(job.id, None)
        try:
            await logs.stop()
            return await self._after_run(job, msg, result, logs, run)
        finally:
            await run.workdir_removed()

    async def _close_log(self, logs: LogWriter, job: Job) -> None:
        """Writes the last lines of a run that does not record the job's end."""
        try:
            await logs.close()
        except IntegrityError:  # a later attempt writes this job's log now: this run lost it
            log.warning("job %s: attempt %d lost the job to a later attempt; its last log lines are dropped",
                        job.id, job.attempt)

    async def _after_run(self, job: Job, msg, result, logs: LogWriter, run: TerraformRun) -> str:
        cfg = self.config
        if result.interrupted == "shutdown":
            await self._close_log(logs, job)
            async with self.runtime.uow() as uow:
                await uow.jobs.release(job.id, cfg.worker_id)
                if msg is None:  # started directly: a message for the next worker
                    await uow.enqueue(DISPATCH_SUBJECT, job.id.encode(), f"dispatch-{job.id}-released-{job.attempt}")
                await uow.commit()
            if msg is not None:
                await msg.nak(delay=0)
            return ""
        if result.interrupted == "lost":
            await self._close_log(logs, job)
            return ""  # another worker holds the job now; it finishes it
        status = {"cancelled": CANCELLED, "timed_out": TIMED_OUT}.get(
            result.interrupted, SUCCEEDED if result.exit_code == 0 else FAILED)
        error = result.error
        if status == TIMED_OUT:
            error = f"the job ran longer than its timeout of {job.timeout_seconds:g}s and was interrupted"
        elif status == CANCELLED:
            error = "cancelled while running; terraform was interrupted"
        lines = logs.take()
        try:
            return await self._record_end(job, msg, result, status, error, logs, lines, run)
        except IntegrityError:  # a later attempt writes this job's log now: this run lost it
            log.warning("job %s: attempt %d lost the job to a later attempt; its last log lines are dropped",
                        job.id, job.attempt)
            return await self._record_end(job, msg, result, status, error, logs, [], run)

    async def _record_end(self, job: Job, msg, result, status: str, error: str, logs: LogWriter, lines: list,
                          run: TerraformRun) -> str:
        """Records the job's end, with its last log lines, in one
        transaction, if this attempt still holds the job (else only the
        lines); acks its message. Returns the status it ended the job with
        ("" when it did not end it)."""
        cfg = self.config
        async with self.runtime.uow() as uow:
            await logs.write(uow, lines)
            current = await uow.jobs.get(job.id)
            ours = not (current is None or current.worker != cfg.worker_id or current.ended
                        or current.attempt != job.attempt)
            if ours:
                current.commit = result.commit or current.commit
                current.outputs = result.outputs
                current.plan_summary = result.plan_summary
                current.exit_code = result.exit_code
                await self._end(uow, current, status, error if status != SUCCEEDED else "")
                if result.plan_file is not None and status == SUCCEEDED:
                    await uow.jobs.set_plan_file(job.id, result.plan_file)
                if result.lock_file and (resource_id := _vouched_resource(job)):
                    await uow.provider_locks.record(resource_id, _lock_source(job), result.lock_file, utcnow())
            # Removed on a thread while this transaction was made: gone before the end can be seen.
            await run.workdir_removed()
            await uow.commit()
        logs.stored(lines)
        if msg is not None:
            await msg.ack()
        return status if ours else ""

    async def _end(self, uow, job: Job, status: str, error: str) -> None:
        job.status, job.error_message, job.end_time, job.lease_until = status, error, utcnow(), None
        tracing.annotate(status=status)
        await uow.jobs.save(job)
        await emit_job_event(uow, job)
        took = metrics.seconds_between(job.start_time, job.end_time)
        metrics.after_commit(uow, lambda: (metrics.JOBS.labels(job.action, status).inc(),
                                           metrics.JOB_DURATION.labels(job.action).observe(took)))

    async def _remove_workdirs_left(self, job_id: str, up_to_attempt: int) -> int:
        """Removes the working directories that runs of the job up to attempt
        `up_to_attempt` left under this process's work root, and returns how
        many. A run removes its own when it ends; one whose process was
        killed could not, and its directory holds the checkout, the variables
        file with every input (sensitive ones too) and the backend override.
        Called once the job's lease says those runs are over (the reaper's
        takeover, a re-run, the end of a job whose runner died); a run of
        this process that still goes on keeps its directory."""
        running_here = self._runs.get(job_id)
        try:
            left = [w for w in job_workdirs(self.terraform.work_dir, job_id)
                    if (w.attempt is None or w.attempt <= up_to_attempt)
                    and not (running_here is not None and w.attempt == running_here.spec.attempt)]
        except OSError as exc:  # an unreadable work root must not keep the job from running again
            log.warning("job %s: cannot look for working directories left behind: %s", job_id, exc)
            return 0
        removed = 0
        for workdir in left:
            if await asyncio.to_thread(remove_workdir, workdir.path):
                removed += 1
            else:
                log.warning("job %s: could not remove all of %s, which a stopped run left behind", job_id,
                            workdir.path)
        if removed:
            log.info("job %s: removed %d working directories stopped runs left behind", job_id, removed)
        return removed

    async def _environment(self, uow, job: Job) -> tuple[dict[str, str], Redactor, list[Integration]]:
        """The job's variables from its integrations and secrets, what to
        redact, and its OIDC integrations (their tokens: _tokens)."""
        env: dict[str, str] = {}
        redact = Redactor()
        federated = []
        for id_ in job.integration_ids:
            integration = await uow.integrations.get(id_)
            if integration is not None:
                env.update(integration_env(integration.provider, integration.credentials))
                redact.add(integration.credentials.values())
                if integration.provider == OIDC:
                    federated.append(integration)
        for id_ in job.secret_ids:
            secret = await uow.secrets.get(id_)
            if secret is not None:
                env.update(secret_env(secret.exposure, secret.values))
                redact.add(secret.values.values())
        for name in job.sensitive_variables:
            redact.add(sensitive_values(job.variables.get(name)))
        return env, redact, federated

    async def _tokens(self, job: Job, federated: list[Integration], redact: Redactor) -> list[OidcGrant]:
        """A token for this attempt per OIDC integration (no stored key), or why there is none."""
        grants = []
        # What each one's variables are named by: two of one cloud (two generic ones
        # naming the same variable) would overwrite each other's.
        slots = [(i.oidc.get("cloud", ""), i.oidc.get("token_file_env", "") if i.oidc.get("cloud") == "generic"
                  else "") for i in federated]
        for integration, slot in zip(federated, slots):
            if slots.count(slot) > 1:
                grants.append(OidcGrant(dict(integration.oidc), "", f"the job names {slots.count(slot)} OIDC "
                                                                    f"integrations for {slot[0]} that set the same "
                                                                    "variables: at most one"))
                continue
            try:
                token = await self.runtime.oidc.mint(self.runtime.uow, _claims(job, integration),
                                                     job.timeout_seconds, utcnow())
            except OidcUnavailable as exc:  # the run fails, saying why
                grants.append(OidcGrant(dict(integration.oidc), "", f"integration {integration.name}: {exc}"))
                continue
            redact.add([token])
            grants.append(OidcGrant(dict(integration.oidc), token))
        return grants

    async def _supervise(self, msg, job: Job, run: TerraformRun):
        """Runs terraform while watching the deadline, cancel requests and the lease."""
        task = asyncio.create_task(run.run())
        loop = asyncio.get_running_loop()
        deadline = loop.time() + job.timeout_seconds
        next_heartbeat = loop.time() + self.config.lease / 3
        next_cancel_check = loop.time() + 1.0
        while not task.done():
            # Woken by the run's end, or for the next check that is due (an
            # interrupted run has none left: it is waited for).
            due = None if run.interrupted else min(deadline, next_cancel_check, next_heartbeat)
            await asyncio.wait([task], timeout=None if due is None else max(0.0, due - loop.time()))
            if task.done() or run.interrupted:
                continue
            now = loop.time()
            if now >= deadline:
                run.interrupt("timed_out")
            elif now >= next_cancel_check:
                next_cancel_check = now + 1.0
                async with self.runtime.uow() as uow:
                    if await uow.jobs.cancel_requested(job.id):
                        run.interrupt("cancelled")
            if now >= next_heartbeat and not run.interrupted:
                next_heartbeat = now + self.config.lease / 3
                if msg is not None:
                    await quietly(msg.in_progress())
                async with self.runtime.uow() as uow:
                    kept = await uow.jobs.renew_lease(job.id, self.config.worker_id,
                                                      lease_deadline(self.config.lease), job.attempt)
                    await uow.commit()
                if not kept:
                    run.interrupt("lost")
        return task.result()


async def quietly(awaitable) -> None:
    try:
        await awaitable
    except Exception:  # noqa: BLE001 - best effort (connection may be gone)
        pass


def _lock_source(job: Job) -> str:
    """What a recorded provider lock is for: the module's source as the job
    names it (a new source code version records its own)."""
    return "\n".join((job.source.repository_url, job.source.path, job.source.ref))[:2400]


# The services whose word on a job's correlation is a fact: the resource
# service submits a resource's jobs from its own record, the workflow service a
# step's plan job from its own (a user calling SubmitJob may name anything).
VOUCHING = ("resource", "workflow")


def _vouched_resource(job: Job) -> str:
    """The resource a job works for, when a service that knows submitted it."""
    return job.correlation.resource_id if job.via in VOUCHING else ""


def _claims(job: Job, integration: Integration) -> dict:
    """What a job's OIDC token says (services/executor/adapters/oidc.py): the
    integration, and what the job is for (resource, or a workflow's step not
    yet having one; template, workflow, step) only when a service that knows
    submitted it; otherwise the job alone."""
    c = job.correlation
    known = job.via in VOUCHING
    if known and c.resource_id:
        subject = f"resource:{c.resource_id}"
    elif known and c.workflow_id and c.step_id:
        subject = f"workflow:{c.workflow_id}:step:{c.step_id}"
    else:
        subject = f"job:{job.id}"
    return {"sub": f"integration:{integration.id}:{subject}", "aud": audience_of(integration.oidc),
            "jti": f"{job.id}:{job.attempt}", "integration_id": integration.id,
            **{name: getattr(c, name) if known else "" for name in ("resource_id", "template_id", "workflow_id",
                                                                  "step_id")},
            "job_id": job.id, "attempt": job.attempt, "operation": job.action, "owner": job.creator}
