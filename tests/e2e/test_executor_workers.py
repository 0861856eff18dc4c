"""Two executor processes share one work queue: every job runs exactly once,
and a process killed mid-job (SIGKILL) loses nothing: its jobs are run again
by the other process, never concurrently with the dead run."""
from __future__ import annotations

import asyncio
import signal
import time

import grpc
import pytest

from infrakitchen.executor.v1 import executor_pb2 as pb
from infrakitchen.executor.v1 import executor_pb2_grpc
from tests.support.jobs import all_logs, module_repo, submit_request, wait_job
from tests.support.processes import ServiceProcesses

pytestmark = pytest.mark.e2e

JOBS = 20


@pytest.fixture
def executors(tmp_path, event_prefix, nats_url):
    # The marker files the modules write are the one place outside a job's sandbox they may reach.
    (tmp_path / "markers").mkdir()
    procs = ServiceProcesses(tmp_path / "data", event_prefix, nats_url, extra_env={
        "IK_EXECUTOR_SANDBOX_BIND": str(tmp_path / "markers"),
        "IK_EXECUTOR_WORKERS": "2", "IK_TERRAFORM_LOCK_TIMEOUT": "20s"})  # the default lease (6 s)
    procs.add_instance("executor-b", "executor")
    procs.start("executor")  # first alone: it migrates the shared database
    procs.start("executor-b")
    yield procs
    procs.stop()


def marker_runs(path) -> list[tuple[float, float | None]]:
    """(start, end) of each run recorded in a marker file, in start order;
    end is None for a run that never finished (it died)."""
    runs: dict[str, list] = {}
    for line in path.read_text().splitlines():
        kind, run, moment = line.split()
        if kind == "start":
            runs[run] = [float(moment), None]
        else:
            runs[run][1] = float(moment)
    return sorted(tuple(r) for r in runs.values())


async def submit_all(stub, md, repo, tmp_path, seconds: int) -> list[str]:
    ids = []
    for n in range(JOBS):
        job = await stub.SubmitJob(submit_request(
            repo, "marker", f"jobs/{n}", variables={"marker": str(tmp_path / "markers" / f"marker-{n}"),
                                                    "seconds": seconds}),
            metadata=md)
        ids.append(job.id)
    return ids


async def test_two_processes_share_the_queue_and_run_each_job_once(executors, tmp_path):
    repo = module_repo(tmp_path / "modules")
    async with grpc.aio.insecure_channel(executors.target("executor")) as channel:
        stub = executor_pb2_grpc.ExecutorServiceStub(channel)
        md = executors.metadata()
        ids = await submit_all(stub, md, repo, tmp_path, seconds=1)
        jobs = [await wait_job(stub, id_, md, timeout=240) for id_ in ids]
    assert all(j.status == pb.JOB_STATUS_SUCCEEDED for j in jobs), [j.error_message for j in jobs]
    assert {j.attempt for j in jobs} == {1}
    pids = {j.worker.rsplit(":", 1)[1] for j in jobs}
    assert pids == {str(executors.procs["executor"].pid), str(executors.procs["executor-b"].pid)}
    for n in range(JOBS):
        runs = marker_runs(tmp_path / "markers" / f"marker-{n}")
        assert len(runs) == 1 and runs[0][1] is not None


async def test_a_killed_process_loses_no_job_and_none_runs_twice_at_once(executors, tmp_path):
    repo = module_repo(tmp_path / "modules")
    victim_pid = str(executors.procs["executor-b"].pid)
    async with grpc.aio.insecure_channel(executors.target("executor")) as channel:
        stub = executor_pb2_grpc.ExecutorServiceStub(channel)
        md = executors.metadata()
        ids = await submit_all(stub, md, repo, tmp_path, seconds=3)
        # Wait until the victim is inside terraform apply (its local-exec has started).
        while True:
            running = (await stub.ListJobs(pb.ListJobsRequest(status=pb.JOB_STATUS_RUNNING), metadata=md)).jobs
            inside = [j for j in running if j.worker.endswith(":" + victim_pid)
                      and (tmp_path / "markers" / f"marker-{ids.index(j.id)}").exists()]
            if inside:
                break
            await asyncio.sleep(0.1)
        executors.stop("executor-b", sig=signal.SIGKILL)
        jobs = [await wait_job(stub, id_, md, timeout=300) for id_ in ids]

    assert all(j.status == pb.JOB_STATUS_SUCCEEDED for j in jobs), [j.error_message for j in jobs]
    survivor = str(executors.procs["executor"].pid)
    for job in jobs:
        if job.id in {j.id for j in inside}:
            assert job.attempt == 2 and job.worker.endswith(":" + survivor)
    await asyncio.sleep(4)  # a run that outlived its process would write its end by now
    for n in range(JOBS):
        runs = marker_runs(tmp_path / "markers" / f"marker-{n}")
        finished = [r for r in runs if r[1] is not None]
        assert len(finished) == 1, f"job {n} finished {len(finished)} times"
        # Only the last run finished: the killed one died with its process
        # and never ran beside its re-run.
        assert runs[-1] == finished[0]
        assert len(runs) == 2 if ids[n] in {j.id for j in inside} else len(runs) <= 2


async def test_a_job_started_directly_by_a_killed_process_is_run_again_by_the_other(executors, tmp_path):
    """A job submitted to a process with an idle worker starts there at once,
    without the work queue; when that process dies, the other one's lease
    reaper puts the job back on the queue and it runs again."""
    repo = module_repo(tmp_path / "modules")
    victim = executors.procs["executor-b"].pid
    md = executors.metadata()
    async with grpc.aio.insecure_channel(executors.target("executor-b")) as channel:
        job = await executor_pb2_grpc.ExecutorServiceStub(channel).SubmitJob(submit_request(
            repo, "marker", "direct/0", variables={"marker": str(tmp_path / "markers" / "marker-direct"),
                                                   "seconds": 3}),
            metadata=md)
    assert job.status == pb.JOB_STATUS_RUNNING and job.worker.endswith(f":{victim}"), "started at submission"
    while not (tmp_path / "markers" / "marker-direct").exists():  # inside terraform apply
        await asyncio.sleep(0.1)
    killed = time.time()
    executors.stop("executor-b", sig=signal.SIGKILL)
    async with grpc.aio.insecure_channel(executors.target("executor")) as channel:
        stub = executor_pb2_grpc.ExecutorServiceStub(channel)
        done = await wait_job(stub, job.id, md, timeout=120)
        lines = await all_logs(stub, job.id, md)
    assert done.status == pb.JOB_STATUS_SUCCEEDED and done.attempt == 2, done.error_message
    assert done.worker.endswith(f":{executors.procs['executor'].pid}")
    # Failover in seconds (issue: within 10 s; asserted with room for a loaded CI machine).
    again = next(line for line in lines if line.text.startswith("attempt 2:")).time.ToDatetime().timestamp()
    print(f"failover: attempt 2 began {again - killed:.1f} s after the kill (default lease 6 s)")
    assert again - killed < 15
    await asyncio.sleep(4)  # a run that outlived its process would write its end by now
    runs = marker_runs(tmp_path / "markers" / "marker-direct")
    assert len(runs) == 2 and runs[0][1] is None and runs[1][1] is not None
