"""Job workers: pull job ids from the work-queue stream and run them (the run
of one claimed job, from its start to its recorded end, is runs.py's).

Any number of executor processes, each with a pool of workers, share one
durable pull consumer of the work queue, so every job goes to one worker at a
time. A worker owns a job through a lease in the database (claimed with one
conditional update, renewed with the message's in_progress heartbeat). When a
worker dies, its message is redelivered after ack_wait and its lease expires
at about the same time; the next worker claims the job, breaks the dead run's
stale state lock and runs the job again (attempt + 1). Two live workers never
run one job: the claim succeeds only for a queued job or an expired lease.

Direct start: a job submitted to a process with an idle worker is stored
already claimed by that worker and starts the moment its submission commits,
without a trip through the work queue (the way of every workflow step). The
idle worker lends its turn: while the job runs it fetches nothing (a message
its last fetch still brings is handed back to the queue). Such a job has no
message to be redelivered if its process dies; the lease reaper of any
executor process puts a job whose lease ran out back on the queue instead.

Leftovers: a run removes its working directory when it ends, but a run
whose process was killed cannot. Its job's directory (the checkout, the
variables file with every input, sensitive ones too, the backend override)
is removed when the job is taken over (the reaper queues it again, a worker
claims it again, or it ends without its runner), by a process sharing that
work root, and at start every directory under the work root that no live
run can use is removed (see workdir_left_behind).

Step hold: when a workflow step's job succeeds while other jobs wait on the
queue, its worker waits a moment (IK_EXECUTOR_STEP_HOLD) for that workflow's
next job instead of taking the oldest queued one: the next step's job arrives
some tens of milliseconds later (the completion event, the workflow, the
resource service), and without the hold it would wait for a whole job of
another workflow to end. Workflows started first thus finish first. Fairness
bound: no worker holds while a queued job has waited longer than
IK_EXECUTOR_STEP_HOLD_MAX_WAIT, so a busy workflow cannot keep the workers
from everyone else for long. A next job that came too late for its hold is
run by the next worker a later-started workflow's step frees (see _hold)."""
from __future__ import annotations

import asyncio
import logging
import os
import socket
from dataclasses import dataclass

from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import AckPolicy, ConsumerConfig, RetentionPolicy, StorageType, StreamConfig
from sqlalchemy.exc import IntegrityError

from services.common import metrics, tracing
from services.common.config import Settings
from services.common.uow import utcnow
from services.executor.adapters.pg_state import left_on_disk, write_back_leftovers
from services.executor.adapters.terraform import PG_STATES, TerraformConfig, TerraformRun, job_workdirs, remove_workdir
from services.executor.app.jobs import DISPATCH_SUBJECT, cap_reason, emit_job_event, lease_deadline
from services.executor.app.runs import JobRuns, quietly
from services.executor.domain.model import CANCELLED, FAILED, QUEUED, RUNNING, SUCCEEDED, Job, workdir_left_behind

log = logging.getLogger(__name__)

DURABLE = "executor-workers"
CAPPED, TAKEN = "capped", "taken"  # why a worker did not claim a job


@dataclass(frozen=True)
class ExecutorConfig:
    workers: int
    default_timeout: float
    lease: float
    max_attempts: int
    worker_id: str
    cap_retry: float = 2.0  # seconds before a job held back by an integration's cap is looked at again
    step_hold: float = 0.3  # seconds a worker waits for a workflow's next job (0: never)
    step_hold_max_wait: float = 120.0  # no holds while a queued job has waited longer than this

    @classmethod
    def from_settings(cls, settings: Settings) -> "ExecutorConfig":
        env = settings.env
        return cls(
            workers=int(env.get("IK_EXECUTOR_WORKERS", "2")),
            default_timeout=float(env.get("IK_EXECUTOR_JOB_TIMEOUT", "3600")),
            lease=float(env.get("IK_EXECUTOR_LEASE", "6")),  # a dead worker's job runs again within seconds
            max_attempts=int(env.get("IK_EXECUTOR_MAX_ATTEMPTS", "3")),
            worker_id=env.get("IK_EXECUTOR_WORKER_ID") or f"{socket.gethostname()}:{os.getpid()}",
            cap_retry=float(env.get("IK_EXECUTOR_CAP_RETRY", "2")),
            step_hold=float(env.get("IK_EXECUTOR_STEP_HOLD", "0.3")),
            step_hold_max_wait=float(env.get("IK_EXECUTOR_STEP_HOLD_MAX_WAIT", "120")),
        )


def work_queue(names) -> StreamConfig:
    return StreamConfig(
        name=names.stream("IK_EXECUTOR_JOBS"),
        subjects=[names.subject(DISPATCH_SUBJECT)],
        retention=RetentionPolicy.WORK_QUEUE,
        storage=StorageType.FILE,
        duplicate_window=120.0,
    )


class JobWorkers(JobRuns):
    def __init__(self, runtime, config: ExecutorConfig, terraform: TerraformConfig):
        self.runtime = runtime
        self.config = config
        self.terraform = terraform
        self._stopping = asyncio.Event()
        self._runs: dict[str, TerraformRun] = {}
        self._tasks: list[asyncio.Task] = []
        self._idle: list[int] = []  # workers waiting in a fetch, whose turn can be lent
        self._lent: dict[int, asyncio.Event] = {}  # worker -> set when the job it lent its turn to ended
        self._held: dict[int, tuple[str, asyncio.Event]] = {}  # worker -> (workflow it waits for, set when taken)

    async def run(self) -> None:
        """Background task of the service: the worker pool."""
        # Before any worker starts, so no run of this process has a directory yet.
        await self._remove_workdirs_left_at_start()
        # Off the workers' way: a state a live run of another replica holds waits for its lock.
        pg_states = asyncio.create_task(self._write_back_pg_states_left_at_start())
        bus = self.runtime.bus
        stream = bus.names.stream("IK_EXECUTOR_JOBS")
        await bus.js.add_consumer(stream, ConsumerConfig(
            durable_name=DURABLE, ack_policy=AckPolicy.EXPLICIT, ack_wait=self.config.lease,
            max_deliver=10 * self.config.max_attempts, max_ack_pending=10_000,
            filter_subject=bus.names.subject(DISPATCH_SUBJECT)))
        self._tasks = [asyncio.create_task(self._work(stream, n), name=f"executor-worker-{n}")
                       for n in range(self.config.workers)]
        self._tasks.append(asyncio.create_task(self._reap(), name="executor-lease-reaper"))
        self._tasks.append(pg_states)
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def reserve(self, workflow_id: str = "") -> "Turn | None":
        """An idle worker's turn for a job about to be submitted, or None: the
        worker held for the job's workflow first, else one waiting in a fetch."""
        if self._stopping.is_set():
            return None
        held = next((n for n, (w, _) in self._held.items() if workflow_id and w == workflow_id), None)
        if held is not None:
            n = held
            self._held.pop(n)[1].set()
            metrics.STEP_HOLDS.labels("taken").inc()
        elif self._idle:
            n = self._idle.pop()
        else:
            return None
        ended = asyncio.Event()
        self._lent[n] = ended
        return Turn(self, n, ended)

    def start_claimed(self, turn: "Turn", job: Job) -> None:
        """Runs a job stored claimed by this process (after its commit)."""
        if job.status != RUNNING or job.worker != self.config.worker_id:
            # Not ours to run (e.g. kept queued by an integration's cap): its run
            # would overlap the one a worker starts when it claims the job.
            log.error("job %s is %s on worker %r, not running here: not started", job.id, job.status, job.worker)
            turn.give_back()
            return
        async def run() -> None:
            try:
                self._ended(turn.worker, job, await self._execute(job, None, previous_worker=""))
            except Exception:  # noqa: BLE001 - its lease runs out and the reaper queues it again
                log.exception("job %s failed to run", job.id)
            finally:
                turn.give_back()
        task = asyncio.create_task(run(), name=f"executor-job-{job.id}")
        self._tasks.append(task)
        task.add_done_callback(lambda t: self._tasks.remove(t) if t in self._tasks else None)

    async def _remove_workdirs_left_at_start(self) -> None:
        """Removes the job working directories under the work root that runs
        which died left behind (a kill -9 of an executor leaves every job it
        ran there), keeping those live runs of other replicas sharing the
        root still use. Trouble here is logged, never fatal: the next start
        or the job's takeover tries again."""
        try:
            # Listed before the jobs are read: a directory a run makes after
            # that read (a claim moments later) is not in this list, and a
            # listed one whose job reads queued or ended belongs to no run.
            workdirs = job_workdirs(self.terraform.work_dir)  # one directory listing: no thread needed
            if not workdirs:
                return
            async with self.runtime.read_uow() as uow:
                leases = await uow.jobs.leases(sorted({w.job_id for w in workdirs}))
            now, removed, unknown = utcnow(), [], []
            for w in workdirs:
                if w.job_id not in leases:
                    unknown.append(w.path.name)
                elif w.job_id not in self._runs and workdir_left_behind(leases[w.job_id], w.attempt, now,
                                                                        self.config.worker_id):
                    if await asyncio.to_thread(remove_workdir, w.path):
                        removed.append(w.job_id)
                    else:
                        log.warning("could not remove all of %s, which a stopped run left behind", w.path)
            if removed:
                log.warning("removed %d working directories of jobs whose runs stopped without removing them "
                            "(jobs %s)", len(removed), ", ".join(sorted(set(removed))[:20]))
            if unknown:
                log.warning("left alone %d directories under %s that name jobs this database does not know: %s",
                            len(unknown), self.terraform.work_dir, ", ".join(sorted(unknown)[:20]))
        except Exception as exc:  # noqa: BLE001 - the takeover of each job removes its own
            log.warning("cannot look for working directories left behind: %s", exc)

    async def _write_back_pg_states_left_at_start(self) -> None:
        """State files of pg storages that runs killed mid-way left on disk
        (they hold every value in clear): written back when newer than the
        database's copy, then removed (pg_state). Never fatal: the next run
        of each state does the same."""
        try:
            left = left_on_disk(self.terraform.work_dir / PG_STATES)
            if not left:
                return
            async with self.runtime.read_uow() as uow:
                storages = {i: await uow.storages.get(i) for i in {storage_id for storage_id, _, _ in left}}
            await write_back_leftovers(left, {k: v for k, v in storages.items() if v is not None},
                                       self.terraform.lock_seconds)
        except Exception as exc:  # noqa: BLE001 - logged; each state's next run writes it back too
            log.warning("cannot look for pg states left on disk: %s", type(exc).__name__)

    async def _reap(self) -> None:
        """Jobs whose runner stopped renewing its lease for a whole lease (its
        process died) go back on the work queue, once per attempt; a job that
        came through the queue usually got there first by redelivery."""
        while not self._stopping.is_set():
            try:
                async with asyncio.timeout(self.config.lease / 2):
                    await self._stopping.wait()
                return
            except TimeoutError:
                pass
            try:
                async with self.runtime.db.leading("executor-lease-reaper") as mine:
                    if not mine:  # another replica reaps this round
                        continue
                    async with self.runtime.uow() as uow:
                        # Its lease ran out: the runner renewed nothing for a whole lease.
                        lost = await uow.jobs.lease_expired_before(utcnow())
                    for job_id, attempt in lost:
                        # Its runner died: what its run left on this machine goes before the job runs again.
                        await self._remove_workdirs_left(job_id, up_to_attempt=attempt)
                        await self._requeue(job_id, attempt)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - database or NATS trouble: next round
                log.warning("lease reaper: %s", exc)

    async def _requeue(self, job_id: str, attempt: int) -> None:
        try:
            async with self.runtime.uow() as uow:
                await uow.enqueue(DISPATCH_SUBJECT, job_id.encode(), f"dispatch-{job_id}-lost-{attempt}")
                await uow.commit()
            log.warning("job %s: its runner's lease ran out (attempt %d); queued again", job_id, attempt)
        except IntegrityError:
            pass  # another executor process queued it already

    async def stop(self) -> None:
        """Shutdown: take no new jobs; interrupt running ones and hand them
        back (lease released, message redelivered) for another worker."""
        self._stopping.set()
        for run in list(self._runs.values()):
            run.interrupt("shutdown")
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=self.terraform.cancel_grace + 3)

    async def _work(self, stream: str, n: int) -> None:
        sub = await self.runtime.bus.js.pull_subscribe_bind(DURABLE, stream)
        try:
            while not self._stopping.is_set():
                if n in self._lent:  # its turn runs a job started directly
                    await self._lent[n].wait()
                    del self._lent[n]
                    continue
                if n in self._held:  # its last job was a workflow step's: that workflow's next one may come
                    await self._hold(n)
                    continue  # lent meanwhile, or back to the queue
                self._idle.append(n)
                try:
                    msgs = await sub.fetch(1, timeout=1.0)
                except (NatsTimeoutError, asyncio.TimeoutError):
                    continue
                except Exception as exc:  # noqa: BLE001 - connection trouble: wait and fetch again
                    log.warning("worker %d: fetch failed: %s", n, exc)
                    await asyncio.sleep(1.0)
                    continue
                finally:
                    if n in self._idle:
                        self._idle.remove(n)
                for msg in msgs:
                    if n in self._lent:  # the turn was lent while this fetch waited: back to the queue
                        await quietly(msg.nak(delay=0))
                        continue
                    if self.runtime.verifier.refuses(msg, DURABLE):
                        # Not the executor's own dispatch: dropped (the job, if real, is found by the reaper).
                        await quietly(msg.term())
                        continue
                    try:
                        # The work-queue message carries the trace of the submission.
                        with tracing.consuming("executor dispatch", msg.headers):
                            if (ran := await self._handle(msg)) is not None:
                                self._ended(n, *ran)
                    except Exception:  # noqa: BLE001 - the message is redelivered; keep working
                        log.exception("worker %d: job %s failed to run", n, msg.data[:64])
                        await quietly(msg.nak(delay=5))
        finally:
            await quietly(sub.unsubscribe())

    def _ended(self, n: int, job: Job, status: str) -> None:
        """Worker n ran `job` to `status`: after a workflow step's success it
        holds for the workflow's next job at once, before anything awaits, so
        a next job submitted this very moment finds it."""
        if status == SUCCEEDED and job.correlation.workflow_id and self.config.step_hold > 0:
            self._held[n] = (job.correlation.workflow_id, asyncio.Event())

    async def _hold(self, n: int) -> None:
        """Waits up to `step_hold` for the held-for workflow's next job
        (reserve() lends this worker's turn to it), when jobs wait on the queue
        and none has waited too long. With nothing queued the worker is
        simply idle, which any submission may take.

        Instead of holding, it runs at once, taken by id rather than in the
        queue's order, a queued job of this workflow (one of several
        submitted at once: a plan's plan jobs, a DAG's branches), or a next
        job of a workflow started earlier that missed its own hold (it came
        late: its worker had taken the oldest queued job, a later
        workflow's), which would otherwise wait behind every workflow whose
        workers keep holding. Not a later workflow's: giving it the worker
        would make this workflow's next job late in turn, and so on, every
        step of every workflow then waiting for a whole job of another (one
        slow dispatch would start that for good)."""
        workflow_id, taken = self._held[n]
        try:
            async with self.runtime.read_uow() as uow:
                oldest = await uow.jobs.oldest_waiting()
                stalled = await uow.jobs.oldest_waiting_next_step(started_before=workflow_id) \
                    if oldest is not None else None
            if oldest is None or (utcnow() - oldest).total_seconds() > self.config.step_hold_max_wait:
                return
            if stalled is not None and not taken.is_set():
                del self._held[n]  # no await since the check: reserve() cannot have taken it meanwhile
                if (ran := await self._take_waiting(stalled)) is not None:
                    self._ended(n, *ran)
                return
            async with asyncio.timeout(self.config.step_hold):
                await taken.wait()
        except TimeoutError:
            metrics.STEP_HOLDS.labels("expired").inc()
        except Exception as exc:  # noqa: BLE001 - no hold this time; the queue goes on
            log.warning("worker %d: cannot look at the queue: %s", n, exc)
        finally:
            if self._held.get(n, (None, None))[1] is taken:
                del self._held[n]

    async def _take_waiting(self, job_id: str) -> tuple[Job, str] | None:
        """Claims a queued job by id, outside the queue's order, and runs it
        as a job started directly (its work-queue message, fetched later,
        finds it running or ended). None when it was not run: another worker
        claimed it first, or an integration's cap holds it back."""
        async with self.runtime.uow() as uow:
            job = await uow.jobs.get(job_id)
            if job is None or job.status != QUEUED:
                return None
            job = await self._claim(uow, job, utcnow())
        if not isinstance(job, Job):
            return None
        metrics.STEP_HOLDS.labels("late").inc()
        try:
            return job, await self._execute(job, None, previous_worker="")
        except Exception:  # noqa: BLE001 - its lease runs out and the reaper queues it again
            log.exception("job %s failed to run", job.id)
            return None

    async def _handle(self, msg) -> tuple[Job, str] | None:
        """Claims and runs the job of a work-queue message: (the job, how it
        ended here), or None when it was not run."""
        job_id = msg.data.decode()
        cfg = self.config
        async with self.runtime.uow() as uow:
            job = await uow.jobs.get(job_id)
            if job is None or job.ended:
                await msg.ack()
                return None
            now = utcnow()
            if job.status == RUNNING and job.lease_until is not None and job.lease_until > now:
                if job.id in self._runs and job.worker == cfg.worker_id:
                    # It runs in this very process (started directly, or taken by id
                    # ahead of the queue): its lease and the reaper look after it, as
                    # for any direct start, so this copy of its message is not needed.
                    await msg.ack()
                    return None
                # Its worker is alive (a late heartbeat made NATS redeliver): not ours.
                await msg.nak(delay=(job.lease_until - now).total_seconds() + 0.5)
                return None
            previous_worker = job.worker if job.status == RUNNING else ""
            if job.status == RUNNING and (job.cancel_requested or job.attempt >= cfg.max_attempts):
                reason = ("cancelled while its worker was gone" if job.cancel_requested else
                          f"its worker stopped without finishing {job.attempt} times; not run again")
                await self._end(uow, job, CANCELLED if job.cancel_requested else FAILED, reason)
                await uow.commit()
                await self._remove_workdirs_left(job.id, up_to_attempt=job.attempt)
                await msg.ack()
                return None
            claimed = await self._claim(uow, job, now)
        if not isinstance(claimed, Job):  # the message comes back: after the cap's retry, or in a second
            await msg.nak(delay=cfg.cap_retry if claimed == CAPPED else 1)
            return None
        return claimed, await self._execute(claimed, msg, previous_worker)

    async def _claim(self, uow, job: Job, now) -> Job | str:
        """Makes this worker the job's runner and commits: the job as claimed,
        or CAPPED (an integration it uses is at its cap: it stays queued,
        saying why) or TAKEN (another worker claimed it first)."""
        if job.status == QUEUED and (reason := await cap_reason(uow, job)):
            if reason != job.queue_reason:
                await uow.jobs.set_queue_reason(job.id, reason)
                await uow.commit()
            return CAPPED
        if not await uow.jobs.claim(job.id, self.config.worker_id, now, lease_deadline(self.config.lease)):
            await uow.rollback()
            return TAKEN
        job = await uow.jobs.get(job.id)
        await emit_job_event(uow, job)
        await uow.commit()
        return job


class Turn:
    """An idle worker's turn, lent to a job submitted to this process."""

    def __init__(self, workers: JobWorkers, worker: int, ended: asyncio.Event):
        self.workers = workers
        self.worker = worker
        self._ended = ended

    def give_back(self) -> None:
        """The job ended, or its submission did not commit: the worker fetches again."""
        self._ended.set()

