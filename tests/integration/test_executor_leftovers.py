"""Nothing of a killed job stays on disk. An executor killed with SIGKILL
leaves its runs' working directories behind (the checkout, the variables
file holding every input, sensitive ones too, the backend override): the
executor removes them when it starts again, and the lease reaper of a
replica sharing the work root removes a dead run's directory when it takes
the job over, before the job runs again. A live run of another replica
keeps its directory. The executors run as processes here, to be killed."""
from __future__ import annotations

import shutil
import signal
import time
import uuid

import grpc
import pytest

from infrakitchen.executor.v1 import executor_pb2 as pb
from infrakitchen.executor.v1 import executor_pb2_grpc
from services.executor.adapters.terraform import job_workdirs
from tests.support.jobs import ENDED, module_repo, submit_request
from tests.support.processes import ServiceProcesses

pytestmark = pytest.mark.e2e

LEASE = 2  # seconds: a dead run's lease runs out quickly, its job is taken over within a few seconds
SENSITIVE = "pw-LEFTOVER-" + uuid.uuid4().hex[:8]


@pytest.fixture
def procs(tmp_path, event_prefix, nats_url):
    procs = ServiceProcesses(tmp_path / "data", event_prefix, nats_url, extra_env={
        "IK_EXECUTOR_WORKERS": "1", "IK_EXECUTOR_LEASE": str(LEASE), "IK_EXECUTOR_CANCEL_GRACE": "5"})
    yield procs
    procs.stop()


def stub_of(procs, name: str = "executor"):
    return executor_pb2_grpc.ExecutorServiceStub(grpc.insecure_channel(procs.target(name)))


def start_slow_job(procs, name: str, repo, state_path: str) -> pb.Job:
    """A job that runs a minute on executor `name` (whose only worker is
    idle; the other one's is busy), once it is inside terraform apply; its
    working directory holds a sensitive value."""
    stub, md = stub_of(procs, name), procs.metadata()
    job = stub.SubmitJob(submit_request(repo, "slow", state_path, variables={"seconds": 60, "marker": SENSITIVE},
                                        sensitive_variables=["marker"]), metadata=md)
    wait_logged(stub, md, job.id, "tick 1")
    job = stub.GetJob(pb.GetJobRequest(id=job.id), metadata=md)
    assert job.worker.endswith(f":{procs.procs[name].pid}")
    return job


def wait_logged(stub, md, job_id: str, *texts: str, timeout: float = 60) -> None:
    """Follows the job's log until `texts` were logged, in that order."""
    waiting = list(texts)
    stream = stub.StreamJobLogs(pb.StreamJobLogsRequest(job_id=job_id), metadata=md, timeout=timeout)
    for chunk in stream:
        for line in chunk.lines:
            if waiting and waiting[0] in line.text:
                waiting.pop(0)
        if not waiting:
            stream.cancel()
            return
    raise AssertionError(f"{waiting[0]!r} never logged for job {job_id}")


def wait_until(check, what: str, timeout: float = 20):
    deadline = time.monotonic() + timeout
    while not (got := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout}s")
        time.sleep(0.1)
    return got


def wait_ended(stub, md, job_id: str) -> pb.Job:
    return wait_until(lambda: (j := stub.GetJob(pb.GetJobRequest(id=job_id), metadata=md)).status in ENDED and j,
                      f"job {job_id} ended", timeout=30)


def holds_the_sensitive_value(workdir) -> bool:
    return any(SENSITIVE in f.read_text(errors="replace") for f in workdir.rglob("*.tfvars.json"))


def test_a_restarted_executor_removes_the_directories_its_killed_runs_left(procs, tmp_path):
    repo = module_repo(tmp_path / "modules")
    work = procs.data_dir / "work"
    procs.start("executor")
    stub, md = stub_of(procs), procs.metadata()
    done = stub.SubmitJob(submit_request(repo, "ok", "r/done", variables={"name": "done"}), metadata=md)
    assert wait_ended(stub, md, done.id).status == pb.JOB_STATUS_SUCCEEDED
    killed = start_slow_job(procs, "executor", repo, "r/killed")
    [left] = job_workdirs(work, killed.id)
    assert left.attempt == 1 and holds_the_sensitive_value(left.path)

    procs.stop("executor", sig=signal.SIGKILL)
    assert left.path.is_dir(), "a killed run cannot remove its own directory"
    # As a run of the ended job would have left it (killed after its end was
    # recorded elsewhere), and what is not this deployment's: left alone.
    ended_left = work / f"{done.id}-attempt1-x1y2z3w4"
    shutil.copytree(left.path, ended_left, symlinks=True)
    strangers = [work / f"{uuid.uuid4()}-attempt1-a1b2c3d4", work / "notes"]
    for path in strangers:
        path.mkdir()
    time.sleep(LEASE + 0.5)  # the killed run's lease ran out: no live run can use its directory

    procs.start("executor")
    wait_until(lambda: not left.path.exists() and not ended_left.exists(), "the leftovers removed at start")
    assert "removed 2 working directories of jobs whose runs stopped" in procs.log("executor")
    assert all(path.is_dir() for path in strangers)
    # The reaper then queues the job again; its next run starts clean.
    wait_logged(stub, md, killed.id, "attempt 2:", "tick 1")
    stub.CancelJob(pb.CancelJobRequest(id=killed.id), metadata=md)
    assert wait_ended(stub, md, killed.id).status == pb.JOB_STATUS_CANCELLED
    assert sorted(work.iterdir()) == sorted(strangers)


def test_the_reaper_removes_a_dead_runs_directory_before_the_job_runs_again(procs, tmp_path):
    """Two executors share the data directory, hence the work root. The second
    one's start keeps the first one's live run; the first one's reaper removes
    the directory of the second one's killed run when it takes that job over,
    before running it again."""
    repo = module_repo(tmp_path / "modules")
    work = procs.data_dir / "work"
    procs.add_instance("executor-b", "executor")
    procs.start("executor")  # first alone: it migrates the shared database
    stub, md = stub_of(procs), procs.metadata()
    busy = start_slow_job(procs, "executor", repo, "t/busy")  # keeps the first one's only worker
    [busy_dir] = job_workdirs(work, busy.id)

    procs.start("executor-b")
    victim = start_slow_job(procs, "executor-b", repo, "t/victim")  # so its start (and look for leftovers) is over
    assert busy_dir.path.is_dir(), "another replica's live run keeps its directory"
    [left] = job_workdirs(work, victim.id)
    assert holds_the_sensitive_value(left.path)

    procs.stop("executor-b", sig=signal.SIGKILL)
    wait_until(lambda: not left.path.exists(), "the dead run's directory removed by the reaper")
    assert f"job {victim.id}: removed 1 working directories" in procs.log("executor")
    # Removed before the job ran again: the only worker that could run it is still busy.
    again = stub.GetJob(pb.GetJobRequest(id=victim.id), metadata=md)
    assert (again.status, again.attempt) == (pb.JOB_STATUS_RUNNING, 1)
    assert busy_dir.path.is_dir()

    stub.CancelJob(pb.CancelJobRequest(id=busy.id), metadata=md)
    assert wait_ended(stub, md, busy.id).status == pb.JOB_STATUS_CANCELLED
    wait_logged(stub, md, victim.id, "attempt 2:", "tick 1")
    [rerun] = job_workdirs(work, victim.id)
    assert rerun.attempt == 2
    stub.CancelJob(pb.CancelJobRequest(id=victim.id), metadata=md)
    assert wait_ended(stub, md, victim.id).status == pb.JOB_STATUS_CANCELLED
    assert list(work.iterdir()) == []
