"""Which job working directories a run that died left behind: how they are
named and found under the work root, and when one may be removed while other
executor replicas share that root."""
import datetime as dt
import tempfile
import uuid

import pytest

from services.executor.adapters.terraform import job_workdirs, remove_workdir, workdir_prefix
from services.executor.domain.model import JobLease, workdir_left_behind

NOW = dt.datetime(2024, 5, 1, 12, 0, tzinfo=dt.timezone.utc)
LIVE = NOW + dt.timedelta(seconds=5)
RAN_OUT = NOW - dt.timedelta(seconds=1)
HERE, THERE = "host:100", "host:200"


def test_a_runs_directory_names_its_job_and_attempt(tmp_path):
    job_id, other = str(uuid.uuid4()), str(uuid.uuid4())
    made = tempfile.mkdtemp(prefix=workdir_prefix(job_id, 2), dir=tmp_path)
    older = tempfile.mkdtemp(prefix=f"{job_id}-", dir=tmp_path)  # named before the attempt was in the name
    tempfile.mkdtemp(prefix=workdir_prefix(other, 1), dir=tmp_path)
    (tmp_path / "notes").mkdir()  # not a job's: ignored
    (tmp_path / f"{job_id}-file").write_text("not a directory")
    found = {(w.path.name, w.job_id, w.attempt) for w in job_workdirs(tmp_path, job_id)}
    assert found == {(made.rsplit("/", 1)[1], job_id, 2), (older.rsplit("/", 1)[1], job_id, None)}
    assert {w.job_id for w in job_workdirs(tmp_path)} == {job_id, other}
    assert job_workdirs(tmp_path / "missing") == []


def test_removing_a_directory_takes_all_of_it(tmp_path):
    workdir = tmp_path / "w"
    (workdir / "src" / ".terraform").mkdir(parents=True)
    (workdir / "src" / "infrakitchen.auto.tfvars.json").write_text('{"password": "x"}')
    assert remove_workdir(workdir) and not workdir.exists()


@pytest.mark.parametrize("lease, attempt, left", [
    (None, 1, False),  # a job this database does not know: another deployment's
    (JobLease("queued", 1, THERE, None), 1, True),  # handed back: no run has it
    (JobLease("succeeded", 1, THERE, None), 1, True),
    (JobLease("cancelled", 2, THERE, None), None, True),
    (JobLease("running", 2, THERE, LIVE), 1, True),  # an earlier attempt lost the job
    (JobLease("running", 2, THERE, LIVE), 2, False),  # another replica's live run
    (JobLease("running", 2, THERE, LIVE), None, False),
    (JobLease("running", 2, THERE, RAN_OUT), 2, True),  # its runner stopped renewing: dead
    (JobLease("running", 2, HERE, LIVE), 2, True),  # recorded on this worker, which runs none of it
])
def test_a_directory_is_left_behind_unless_a_live_run_may_use_it(lease, attempt, left):
    assert workdir_left_behind(lease, attempt, NOW, HERE) is left
