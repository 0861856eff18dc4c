"""ExecutorService through gRPC with real Terraform, real git and real NATS:
apply/plan/destroy, state in local and pg storages, failures, cancel,
timeout, live logs, saved plans and secrets that never leak."""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging

import grpc
import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from infrakitchen.events.v1 import events_pb2
from infrakitchen.executor.v1 import executor_pb2 as pb
from services.common.auth import Role
from services.common.values import from_value
from services.executor.adapters.resources import ResourceUsers
from tests.support.events import read_events as _read_events
from tests.support.grpc_asserts import field_violations, precondition_violations, reason, rpc_error
from tests.support.jobs import all_logs, log_text, module_repo, start_executor, submit_request, wait_job
from tests.support.waiting import eventually

SUCCEEDED, FAILED = pb.JOB_STATUS_SUCCEEDED, pb.JOB_STATUS_FAILED


@pytest.fixture
def repo(tmp_path):
    return module_repo(tmp_path / "modules")


@pytest.fixture
async def executor(tmp_path, event_prefix, nats_url):
    svc = await start_executor(f"sqlite:///{tmp_path / 'executor.db'}", event_prefix, nats_url, tmp_path / "data")
    yield svc
    await svc.__aexit__(None, None, None)


async def local_storage(svc, directory, name="local") -> pb.Storage:
    return await svc.stub.CreateStorage(pb.CreateStorageRequest(storage=pb.Storage(
        name=name, kind=pb.STORAGE_KIND_LOCAL, local_directory=str(directory))), metadata=svc.admin)


def _libpq(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


async def read_events(svc, count: int) -> list[events_pb2.Envelope]:
    return await _read_events(svc.runtime.bus, "executor", count, subject="ik.executor.job.>")


# --- apply, outputs, destroy, state location -------------------------------------

@pytest.mark.parametrize("storage_kind", ["local", "pg"])
async def test_apply_returns_outputs_and_destroy_removes_the_resource(executor, repo, tmp_path, postgres,
                                                                      storage_kind):
    if storage_kind == "local":
        storage = await local_storage(executor, tmp_path / "states")
    else:
        state_db = postgres.create()
        storage = await executor.stub.CreateStorage(pb.CreateStorageRequest(storage=pb.Storage(
            name="pg", kind=pb.STORAGE_KIND_PG, pg_connection_string=_libpq(state_db) + "?sslmode=disable",
            pg_schema="ik_states")), metadata=executor.admin)
        assert not storage.pg_connection_string  # input only: it holds credentials
    applied = await executor.stub.SubmitJob(submit_request(
        repo, "ok", "team/vpc", storage_id=storage.id, variables={"name": "vpc"},
        correlation=pb.JobCorrelation(resource_id="r-1", workflow_id="w-1", step_id="s-1")), metadata=executor.md)
    # An idle worker of the process takes a job as it is stored (started at once); else it is queued.
    assert applied.status in (pb.JOB_STATUS_QUEUED, pb.JOB_STATUS_RUNNING) and applied.creator == "alice"
    job = await wait_job(executor.stub, applied.id, executor.md)
    assert job.status == SUCCEEDED, job.error_message
    outputs = {o.name: (from_value(o.value), o.sensitive) for o in job.outputs}
    assert outputs["names"] == (["vpc", "vpc-2"], False)
    assert outputs["connection_string"] == ("***", True)
    resource_id = outputs["id"][0]
    assert resource_id.isdigit() and job.attempt == 1 and job.start_time.seconds and job.end_time.seconds
    # start_time is the worker's own start: after the job was stored, no later than its first log line.
    first = await wait_until_logged(executor, job.id, f"on worker {job.worker}")
    assert job.create_time.ToDatetime() <= job.start_time.ToDatetime() <= first.time.ToDatetime()

    if storage_kind == "local":
        state = json.loads((tmp_path / "states" / "team" / "vpc" / "terraform.tfstate").read_text())
        assert state["resources"][0]["instances"][0]["attributes"]["id"] == resource_id
    else:
        with psycopg.connect(_libpq(state_db)) as conn:
            name, data = conn.execute("SELECT name, data FROM ik_states.states").fetchone()
        assert name == "team__vpc" and resource_id in data

    destroyed = await executor.stub.SubmitJob(submit_request(
        repo, "ok", "team/vpc", action=pb.JOB_ACTION_DESTROY, storage_id=storage.id, variables={"name": "vpc"},
        correlation=pb.JobCorrelation(resource_id="r-1")), metadata=executor.md)
    done = await wait_job(executor.stub, destroyed.id, executor.md)
    assert done.status == SUCCEEDED, done.error_message
    assert not done.outputs
    if storage_kind == "local":
        state = json.loads((tmp_path / "states" / "team" / "vpc" / "terraform.tfstate").read_text())
        assert state["resources"] == []
    else:
        with psycopg.connect(_libpq(state_db)) as conn:
            data = conn.execute("SELECT data FROM ik_states.states WHERE name='team__vpc'").fetchone()[0]
        assert json.loads(data)["resources"] == []

    # Nothing of the run is left on disk (pg: the directory that holds states during runs, empty).
    assert not [p for p in (tmp_path / "data" / "work").rglob("*") if p.name != "pg-states"]


async def test_sensitive_outputs_only_through_the_admin_read(executor, repo):
    job = await executor.stub.SubmitJob(submit_request(
        repo, "ok", "p/one", variables={"name": "db", "password": "hunter2-long"},
        sensitive_variables=["password"]), metadata=executor.md)
    assert job.variables["password"] == "***"
    job = await wait_job(executor.stub, job.id, executor.md)
    assert job.status == SUCCEEDED, job.error_message
    denied = await rpc_error(executor.stub.GetJobSensitiveOutputs(
        pb.GetJobSensitiveOutputsRequest(job_id=job.id), metadata=executor.md))
    assert denied.code() == grpc.StatusCode.PERMISSION_DENIED
    revealed = await executor.stub.GetJobSensitiveOutputs(pb.GetJobSensitiveOutputsRequest(job_id=job.id),
                                                          metadata=executor.admin)
    values = {o.name: from_value(o.value) for o in revealed.outputs}
    assert values["connection_string"] == "postgres://app:hunter2-long@db/db"


# --- failures --------------------------------------------------------------------

async def test_bad_hcl_fails_with_the_error_and_logs(executor, repo):
    job = await executor.stub.SubmitJob(submit_request(repo, "bad", "f/bad"), metadata=executor.md)
    job = await wait_job(executor.stub, job.id, executor.md)
    assert job.status == FAILED and job.exit_code != 0
    assert job.error_message.startswith("Error: Invalid expression") and "main.tf line 3" in job.error_message
    text = log_text(await all_logs(executor.stub, job.id, executor.md))
    assert "$ terraform init" in text and job.error_message.splitlines()[0].strip() in text


async def test_failing_local_exec_fails_with_the_error_and_full_logs(executor, repo):
    job = await executor.stub.SubmitJob(submit_request(repo, "failing", "f/exec"), metadata=executor.md)
    job = await wait_job(executor.stub, job.id, executor.md)
    assert job.status == FAILED
    message = " ".join(job.error_message.split())
    assert "local-exec provisioner error" in message and "exit status 3" in message
    lines = await all_logs(executor.stub, job.id, executor.md)
    assert [line.number for line in lines] == list(range(1, len(lines) + 1))
    assert "about to fail" in log_text(lines) and any(line.stream == "stderr" for line in lines)


async def test_a_missing_module_folder_fails_the_job(executor, repo):
    job = await executor.stub.SubmitJob(submit_request(repo, "nowhere", "f/none"), metadata=executor.md)
    job = await wait_job(executor.stub, job.id, executor.md)
    assert job.status == FAILED and "'nowhere' is not a folder" in job.error_message


# --- cancel and timeout ----------------------------------------------------------

async def test_cancel_interrupts_terraform_and_leaves_the_state_unlocked(executor, repo, tmp_path):
    storage = await local_storage(executor, tmp_path / "states")
    job = await executor.stub.SubmitJob(submit_request(repo, "slow", "c/slow", storage_id=storage.id,
                                                       variables={"seconds": 120}), metadata=executor.md)
    await wait_until_logged(executor, job.id, "tick 2")
    started = asyncio.get_running_loop().time()
    answer = await executor.stub.CancelJob(pb.CancelJobRequest(id=job.id), metadata=executor.md)
    assert answer.status == pb.JOB_STATUS_RUNNING  # asked to stop; it ends shortly
    job = await wait_job(executor.stub, job.id, executor.md, timeout=30)
    assert job.status == pb.JOB_STATUS_CANCELLED
    assert asyncio.get_running_loop().time() - started < 10
    logged = log_text(await all_logs(executor.stub, job.id, executor.md))
    assert "interrupting terraform (cancelled)" in logged
    # Terraform itself got the interrupt, in its sandbox, and stopped as it does, to the end
    # (its state written): the sandbox's own process died of the interrupt and took terraform
    # down at once, right after "Stopping operation...".
    assert "Gracefully shutting down" in logged and "Error: execution halted" in logged, logged[-2000:]
    # Same state path again: with a 2 s lock timeout this only succeeds if
    # the cancelled run released its lock.
    again = await executor.stub.SubmitJob(submit_request(repo, "slow", "c/slow", storage_id=storage.id,
                                                         variables={"seconds": 1}), metadata=executor.md)
    again = await wait_job(executor.stub, again.id, executor.md)
    assert again.status == SUCCEEDED, again.error_message
    ended = await rpc_error(executor.stub.CancelJob(pb.CancelJobRequest(id=again.id), metadata=executor.md))
    assert ended.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_a_job_over_its_timeout_ends_timed_out(executor, repo):
    job = await executor.stub.SubmitJob(submit_request(repo, "slow", "t/slow", variables={"seconds": 60},
                                                       timeout=3), metadata=executor.md)
    job = await wait_job(executor.stub, job.id, executor.md, timeout=40)
    assert job.status == pb.JOB_STATUS_TIMED_OUT and "timeout of 3s" in job.error_message
    assert job.end_time.seconds - job.start_time.seconds < 15


async def wait_until_logged(svc, job_id: str, text: str, timeout: float = 60) -> pb.LogLine:
    async with asyncio.timeout(timeout):
        async for chunk in svc.stub.StreamJobLogs(pb.StreamJobLogsRequest(job_id=job_id), metadata=svc.md):
            for line in chunk.lines:
                if text in line.text:
                    return line
    raise AssertionError(f"{text!r} never logged")


# --- live logs -------------------------------------------------------------------

async def test_log_lines_arrive_while_the_job_runs(executor, repo):
    job = await executor.stub.SubmitJob(submit_request(repo, "slow", "l/slow", variables={"seconds": 4}),
                                        metadata=executor.md)
    seen_running = False
    numbers = []
    async for chunk in executor.stub.StreamJobLogs(pb.StreamJobLogsRequest(job_id=job.id), metadata=executor.md):
        for line in chunk.lines:
            numbers.append(line.number)
            if "tick 1" in line.text:
                now = await executor.stub.GetJob(pb.GetJobRequest(id=job.id), metadata=executor.md)
                seen_running = now.status == pb.JOB_STATUS_RUNNING
        if chunk.final_status:
            assert chunk.final_status == SUCCEEDED
    assert seen_running, "the tick line should arrive before the job ends"
    assert numbers == list(range(1, len(numbers) + 1))
    # Replay from a line number gives only what follows it.
    later = [line.number async for chunk in executor.stub.StreamJobLogs(
        pb.StreamJobLogsRequest(job_id=job.id, after_line=5), metadata=executor.md) for line in chunk.lines]
    assert later == numbers[5:]


# --- saved plans -----------------------------------------------------------------

async def pg_storage(svc, postgres) -> pb.Storage:
    return await svc.stub.CreateStorage(pb.CreateStorageRequest(storage=pb.Storage(
        name="pg", kind=pb.STORAGE_KIND_PG, pg_connection_string=_libpq(postgres.create()) + "?sslmode=disable",
        pg_schema="ik_states")), metadata=svc.admin)


@pytest.mark.parametrize("storage_kind", ["default", "pg"])
async def test_apply_of_a_plan_job_applies_that_plan_and_refuses_once_state_moved(executor, repo, postgres,
                                                                                   storage_kind):
    storage = {"storage_id": (await pg_storage(executor, postgres)).id} if storage_kind == "pg" else {}
    plan = await executor.stub.SubmitJob(submit_request(repo, "ok", "p/plan", action=pb.JOB_ACTION_PLAN,
                                                        variables={"name": "planned"}, **storage),
                                         metadata=executor.md)
    plan = await wait_job(executor.stub, plan.id, executor.md)
    assert plan.status == SUCCEEDED, plan.error_message
    assert (plan.plan_summary.add, plan.plan_summary.change, plan.plan_summary.destroy) == (1, 0, 0)
    assert [(c.address, list(c.actions)) for c in plan.plan_summary.resource_changes] == \
        [("null_resource.this", ["create"])]

    apply = await executor.stub.SubmitJob(pb.SubmitJobRequest(action=pb.JOB_ACTION_APPLY, plan_job_id=plan.id,
                                                              state_path="p/plan", **storage), metadata=executor.md)
    assert apply.source.repository_url == repo.url and apply.variables["name"] == "planned"
    apply = await wait_job(executor.stub, apply.id, executor.md)
    assert apply.status == SUCCEEDED, apply.error_message
    assert "applying the saved plan" in log_text(await all_logs(executor.stub, apply.id, executor.md))

    stale = await rpc_error(executor.stub.SubmitJob(pb.SubmitJobRequest(
        action=pb.JOB_ACTION_APPLY, plan_job_id=plan.id, state_path="p/plan", **storage), metadata=executor.md))
    assert stale.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert precondition_violations(stale) == [("STATE_CHANGED_SINCE_PLAN", f"jobs/{apply.id}",
                                               "this job changed the state after the plan was made; plan again")]
    other = await rpc_error(executor.stub.SubmitJob(pb.SubmitJobRequest(
        action=pb.JOB_ACTION_APPLY, plan_job_id=apply.id, state_path="p/plan", **storage), metadata=executor.md))
    assert other.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert precondition_violations(other)[0][0] == "JOB_NOT_A_PLAN"


async def test_a_saved_plan_is_refused_once_its_state_moved_even_outside_any_job(executor, repo, tmp_path):
    """The state a plan was made against is recorded (serial, lineage). A
    state that moved since (here: written by hand, as an operator running
    terraform outside the platform would) makes the saved plan STALE_PLAN:
    terraform itself would apply a plan made against no state over it."""
    storage = await local_storage(executor, tmp_path / "states")
    plan = await executor.stub.SubmitJob(submit_request(repo, "ok", "p/oob", action=pb.JOB_ACTION_PLAN,
                                                        variables={"name": "planned"}, storage_id=storage.id),
                                         metadata=executor.md)
    plan = await wait_job(executor.stub, plan.id, executor.md)
    assert plan.status == SUCCEEDED, plan.error_message
    assert (plan.plan_summary.state_serial, plan.plan_summary.state_lineage) == (0, "")
    check = pb.SubmitJobRequest(action=pb.JOB_ACTION_APPLY, plan_job_id=plan.id, storage_id=storage.id,
                                state_path="p/oob", validate_only=True)
    fits = await executor.stub.SubmitJob(check, metadata=executor.md)
    assert fits.plan_job_id == plan.id
    jobs = await executor.stub.ListJobs(pb.ListJobsRequest(page_size=100), metadata=executor.md)
    assert [j.id for j in jobs.jobs] == [plan.id], "validate_only stores and runs nothing"

    state = tmp_path / "states" / "p" / "oob" / "terraform.tfstate"
    state.write_text(json.dumps({"version": 4, "serial": 3, "lineage": "by-hand", "resources": [], "outputs": {}}))
    for request in (check, pb.SubmitJobRequest(action=pb.JOB_ACTION_APPLY, plan_job_id=plan.id,
                                               storage_id=storage.id, state_path="p/oob")):
        stale = await rpc_error(executor.stub.SubmitJob(request, metadata=executor.md))
        assert stale.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert precondition_violations(stale) == [("STALE_PLAN", f"jobs/{plan.id}",
                                                   "the state moved since the plan (serial 0, now 3); plan again")]


# --- secrets never leak ----------------------------------------------------------

async def test_secret_values_never_appear_in_logs_events_errors_or_responses(executor, repo, caplog):
    caplog.set_level(logging.DEBUG)
    token, key, pw, word = "tok-SENTINEL-1f2e", "AKIA-SENTINEL-9d8c", "pw-SENTINEL-77aa", "word-SENTINEL-4b4b"
    label = "label-SENTINEL-0c0c"
    integration = await executor.stub.CreateIntegration(pb.CreateIntegrationRequest(
        integration=pb.Integration(name="aws-dev", provider=pb.INTEGRATION_PROVIDER_AWS),
        credentials={"access_key_id": key}), metadata=executor.admin)
    tf_var = await executor.stub.CreateSecret(pb.CreateSecretRequest(
        secret=pb.Secret(name="api", exposure=pb.SECRET_EXPOSURE_TF_VAR), values={"token": token}),
        metadata=executor.md)
    env = await executor.stub.CreateSecret(pb.CreateSecretRequest(
        secret=pb.Secret(name="word", exposure=pb.SECRET_EXPOSURE_ENV), values={"SECRET_WORD": word}),
        metadata=executor.md)
    assert list(integration.credential_keys) == ["access_key_id"] and list(tf_var.keys) == ["token"]

    ok = await executor.stub.SubmitJob(submit_request(
        repo, "ok", "s/ok", variables={"name": "x", "password": pw, "label": label},
        sensitive_variables=["password", "label"],
        integration_ids=[integration.id], secret_ids=[tf_var.id]), metadata=executor.md)
    failing = await executor.stub.SubmitJob(submit_request(repo, "failing", "s/failing", secret_ids=[env.id]),
                                            metadata=executor.md)
    ok = await wait_job(executor.stub, ok.id, executor.md)
    failing = await wait_job(executor.stub, failing.id, executor.md)
    assert ok.status == SUCCEEDED and failing.status == FAILED
    ok_logs = log_text(await all_logs(executor.stub, ok.id, executor.md))
    # The values did reach terraform (masked where printed) ...
    assert "creating x with token=*** key=*** label=***" in ok_logs
    failing_logs = log_text(await all_logs(executor.stub, failing.id, executor.md))
    assert "about to fail with ***" in failing_logs and "***" in failing.error_message

    # ... and appear nowhere a user or a consumer can see them.
    seen = [ok_logs, failing_logs, str(ok), str(failing), caplog.text]
    for listing in [await executor.stub.ListJobs(pb.ListJobsRequest(), metadata=executor.md),
                    await executor.stub.ListSecrets(pb.ListSecretsRequest(), metadata=executor.md),
                    await executor.stub.ListIntegrations(pb.ListIntegrationsRequest(), metadata=executor.md),
                    await executor.stub.GetSecret(pb.GetSecretRequest(id=env.id), metadata=executor.md)]:
        seen.append(str(listing))
    events = await read_events(executor, 6)
    assert len(events) == 6
    seen += [e.SerializeToString().decode(errors="replace") for e in events]
    for value in (token, key, pw, word, label):
        for text in seen:
            assert value not in text
    # At rest too: the database holds only ciphertext.
    db_bytes = (executor.settings.data_dir.parent / "executor.db").read_bytes()
    for value in (token, key, pw, word):
        assert value.encode() not in db_bytes


async def test_job_events_carry_the_correlation_ids(executor, repo):
    job = await executor.stub.SubmitJob(submit_request(
        repo, "ok", "e/ok", variables={"name": "e"},
        correlation=pb.JobCorrelation(resource_id="r-9", resource_revision=2, workflow_id="w-9", step_id="s-9")),
        metadata=executor.md)
    await wait_job(executor.stub, job.id, executor.md)
    events = await read_events(executor, 3)
    assert [e.type for e in events] == ["ik.executor.job.queued", "ik.executor.job.started",
                                        "ik.executor.job.succeeded"]
    for e in events:
        assert (e.correlation.job_id, e.correlation.resource_id, e.correlation.workflow_id,
                e.correlation.step_id) == (job.id, "r-9", "w-9", "s-9")
    done = events[-1].job_succeeded
    assert done.correlation.resource_revision == 2 and {o.name for o in done.outputs} == \
        {"id", "names", "connection_string"}
    assert from_value(next(o for o in done.outputs if o.name == "connection_string").value) == "***"


# --- validation, storages and state path claims ---------------------------------

async def test_bad_job_requests_change_nothing(executor, repo):
    err = await rpc_error(executor.stub.SubmitJob(pb.SubmitJobRequest(
        source=pb.JobSource(path="../up"), state_path="/abs/../x", storage_id="nope",
        integration_ids=["missing"], sensitive_variables=["ghost"]), metadata=executor.md))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert set(field_violations(err)) == {"action", "source.repository_url", "source.ref", "source.path",
                                          "state_path", "storage_id", "integration_ids[0]",
                                          "sensitive_variables[0]"}
    # An absolute module path and a transport the platform does not support
    # are refused up front, the same way as "../up" (not at run time).
    for source in (pb.JobSource(repository_url=repo.url, ref="v1", path="/etc"),
                   pb.JobSource(repository_url="fd::17", ref="v1", path="ok"),
                   pb.JobSource(repository_url="ext::sh -c id", ref="v1", path="ok")):
        request = submit_request(repo, "ok", "y")
        request.source.CopyFrom(source)
        err = await rpc_error(executor.stub.SubmitJob(request, metadata=executor.md))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert set(field_violations(err)) == {"source.path" if source.path == "/etc" else "source.repository_url"}
    listed = await executor.stub.ListJobs(pb.ListJobsRequest(), metadata=executor.md)
    assert not listed.jobs
    read_only = await rpc_error(executor.stub.SubmitJob(submit_request(repo, "ok", "x"),
                                                        metadata=executor.metadata(Role.READ)))
    assert read_only.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_a_state_path_belongs_to_one_resource(executor, repo, tmp_path):
    storage = await local_storage(executor, tmp_path / "states")
    claim = await executor.stub.ClaimStatePath(pb.ClaimStatePathRequest(
        storage_id=storage.id, state_path="net/vpc", resource_id="r-1"), metadata=executor.md)
    assert claim.resource_id == "r-1"
    again = await executor.stub.ClaimStatePath(pb.ClaimStatePathRequest(
        storage_id=storage.id, state_path="net/vpc", resource_id="r-1"), metadata=executor.md)
    assert again.create_time == claim.create_time
    taken = await rpc_error(executor.stub.ClaimStatePath(pb.ClaimStatePathRequest(
        storage_id=storage.id, state_path="net/vpc", resource_id="r-2"), metadata=executor.md))
    assert taken.code() == grpc.StatusCode.ALREADY_EXISTS
    job = await rpc_error(executor.stub.SubmitJob(submit_request(
        repo, "ok", "net/vpc", storage_id=storage.id, correlation=pb.JobCorrelation(resource_id="r-2")),
        metadata=executor.md))
    assert job.code() == grpc.StatusCode.ALREADY_EXISTS
    in_use = await rpc_error(executor.stub.DeleteStorage(pb.DeleteStorageRequest(id=storage.id),
                                                         metadata=executor.admin))
    assert in_use.code() == grpc.StatusCode.FAILED_PRECONDITION
    await executor.stub.ReleaseStatePath(pb.ReleaseStatePathRequest(
        storage_id=storage.id, state_path="net/vpc", resource_id="r-1"), metadata=executor.md)
    await executor.stub.ClaimStatePath(pb.ClaimStatePathRequest(
        storage_id=storage.id, state_path="net/vpc", resource_id="r-2"), metadata=executor.md)


async def _no_resources(self, field: str, id_: str) -> list[tuple[str, str]]:
    return []  # no resource service here: no resource names it


async def _what_jobs_use(svc, tmp_path) -> tuple[pb.Integration, pb.Secret, pb.Storage, list]:
    """An integration (at most one job at once), a secret and a storage, and
    their deletes as (call, request)."""
    integration = await svc.stub.CreateIntegration(pb.CreateIntegrationRequest(
        integration=pb.Integration(name="acct", provider=pb.INTEGRATION_PROVIDER_GENERIC, max_concurrent_jobs=1),
        credentials={"ACCOUNT": "one"}), metadata=svc.admin)
    secret = await svc.stub.CreateSecret(pb.CreateSecretRequest(
        secret=pb.Secret(name="api", exposure=pb.SECRET_EXPOSURE_TF_VAR), values={"token": "t-1"}),
        metadata=svc.md)
    storage = await local_storage(svc, tmp_path / "states")
    deletes = [(svc.stub.DeleteIntegration, pb.DeleteIntegrationRequest(id=integration.id)),
               (svc.stub.DeleteSecret, pb.DeleteSecretRequest(id=secret.id)),
               (svc.stub.DeleteStorage, pb.DeleteStorageRequest(id=storage.id))]
    return integration, secret, storage, deletes


async def _refused_naming(call, request, svc, jobs) -> None:
    err = await rpc_error(call(request, metadata=svc.admin))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, err.details()
    assert reason(err) == "IN_USE_BY_JOBS"
    assert precondition_violations(err) == [("IN_USE", f"jobs/{j.id}", f"job {j.id} is queued or running with it")
                                            for j in jobs]


async def test_what_a_queued_job_names_is_not_deleted_until_the_job_ended(repo, tmp_path, event_prefix, nats_url,
                                                                         monkeypatch):
    """A job that has not started holds its integration, secret and storage
    as a running one does (it would start without them). No workers here, so
    every job stays queued; a delete names the oldest 20 of them, and goes
    through once they ended."""
    monkeypatch.setattr(ResourceUsers, "of", _no_resources)
    svc = await start_executor(f"sqlite:///{tmp_path / 'executor.db'}", event_prefix, nats_url, tmp_path / "data",
                               IK_EXECUTOR_WORKERS="0")
    try:
        integration, secret, storage, deletes = await _what_jobs_use(svc, tmp_path)
        jobs = [await svc.stub.SubmitJob(submit_request(
            repo, "ok", f"q/{n}", variables={"name": "q"}, integration_ids=[integration.id], secret_ids=[secret.id],
            storage_id=storage.id), metadata=svc.md) for n in range(25)]
        assert {j.status for j in jobs} == {pb.JOB_STATUS_QUEUED}
        for call, request in deletes:
            await _refused_naming(call, request, svc, jobs[:20])
        for j in jobs[:-1]:
            await svc.stub.CancelJob(pb.CancelJobRequest(id=j.id), metadata=svc.md)
        for call, request in deletes:  # one still queued is enough
            await _refused_naming(call, request, svc, jobs[-1:])
        await svc.stub.CancelJob(pb.CancelJobRequest(id=jobs[-1].id), metadata=svc.md)
        for call, request in deletes:
            await call(request, metadata=svc.admin)
        gone = await rpc_error(svc.stub.GetIntegration(pb.GetIntegrationRequest(id=integration.id),
                                                       metadata=svc.admin))
        assert gone.code() == grpc.StatusCode.NOT_FOUND
    finally:
        await svc.__aexit__(None, None, None)


async def test_a_job_held_back_by_its_integrations_cap_holds_what_it_names(executor, repo, tmp_path, monkeypatch):
    """The integration's cap keeps the second job queued behind the running
    first: the secret only the queued job names is not deleted either, and
    the integration is named for both."""
    monkeypatch.setattr(ResourceUsers, "of", _no_resources)
    integration, secret, storage, deletes = await _what_jobs_use(executor, tmp_path)
    running = await executor.stub.SubmitJob(submit_request(
        repo, "slow", "cap/a", variables={"seconds": 60}, integration_ids=[integration.id]), metadata=executor.md)
    await wait_until_logged(executor, running.id, "tick 1")
    queued = await executor.stub.SubmitJob(submit_request(
        repo, "ok", "cap/b", variables={"name": "b"}, integration_ids=[integration.id], secret_ids=[secret.id],
        storage_id=storage.id), metadata=executor.md)
    queued = await wait_job(executor.stub, queued.id, executor.md, statuses={pb.JOB_STATUS_QUEUED})
    await _refused_naming(*deletes[0], executor, [running, queued])
    await _refused_naming(*deletes[1], executor, [queued])
    await _refused_naming(*deletes[2], executor, [queued])
    for job in (queued, running):
        await executor.stub.CancelJob(pb.CancelJobRequest(id=job.id), metadata=executor.md)
        assert (await wait_job(executor.stub, job.id, executor.md, timeout=30)).status == pb.JOB_STATUS_CANCELLED
    for call, request in deletes:
        await call(request, metadata=executor.admin)


async def test_storage_and_credential_validation(executor):
    err = await rpc_error(executor.stub.CreateStorage(pb.CreateStorageRequest(storage=pb.Storage(
        name="", kind=pb.STORAGE_KIND_PG, pg_connection_string="mysql://x", pg_schema="Bad-Schema")),
        metadata=executor.admin))
    assert set(field_violations(err)) == {"storage.name", "storage.pg_connection_string", "storage.pg_schema"}
    err = await rpc_error(executor.stub.CreateIntegration(pb.CreateIntegrationRequest(
        integration=pb.Integration(name="x"), credentials={"bad key": "v"}), metadata=executor.admin))
    assert set(field_violations(err)) == {"integration.provider", "credentials['bad key']"}
    writer = await rpc_error(executor.stub.CreateIntegration(pb.CreateIntegrationRequest(
        integration=pb.Integration(name="x", provider=pb.INTEGRATION_PROVIDER_GENERIC), credentials={"K": "v"}),
        metadata=executor.md))
    assert writer.code() == grpc.StatusCode.PERMISSION_DENIED
    first = await executor.stub.CreateSecret(pb.CreateSecretRequest(
        secret=pb.Secret(name="s", exposure=pb.SECRET_EXPOSURE_ENV), values={"K": "value-1"}, request_id="r1"),
        metadata=executor.md)
    retried = await executor.stub.CreateSecret(pb.CreateSecretRequest(
        secret=pb.Secret(name="s", exposure=pb.SECRET_EXPOSURE_ENV), values={"K": "value-1"}, request_id="r1"),
        metadata=executor.md)
    assert retried.id == first.id
    updated = await executor.stub.UpdateSecret(pb.UpdateSecretRequest(
        secret=pb.Secret(id=first.id, etag=first.etag), values={"K": "value-2", "L": "value-3"}),
        metadata=executor.md)
    assert list(updated.keys) == ["K", "L"] and updated.etag != first.etag
    stale = await rpc_error(executor.stub.UpdateSecret(pb.UpdateSecretRequest(
        secret=pb.Secret(id=first.id, etag=first.etag), values={"K": "value-4"}), metadata=executor.md))
    assert stale.code() == grpc.StatusCode.ABORTED
    # Credentials may not set what changes how terraform, the shell or the linker run.
    for name in ("PATH", "LD_PRELOAD", "TF_CLI_CONFIG_FILE", "TF_PLUGIN_CACHE_DIR", "TF_DATA_DIR", "HOME"):
        refused = await rpc_error(executor.stub.CreateSecret(pb.CreateSecretRequest(
            secret=pb.Secret(name=f"env-{name}", exposure=pb.SECRET_EXPOSURE_ENV), values={name: "x"}),
            metadata=executor.md))
        assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "changes how terraform" in field_violations(refused)[f"values[{name!r}]"]
        refused = await rpc_error(executor.stub.CreateIntegration(pb.CreateIntegrationRequest(
            integration=pb.Integration(name=f"i-{name}", provider=pb.INTEGRATION_PROVIDER_GENERIC),
            credentials={name: "x"}), metadata=executor.admin))
        assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT
    refused = await rpc_error(executor.stub.UpdateSecret(pb.UpdateSecretRequest(
        secret=pb.Secret(id=first.id), values={"LD_LIBRARY_PATH": "/tmp"}), metadata=executor.md))
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT
    # As TF_VAR_<key> the same names are plain terraform variables.
    await executor.stub.CreateSecret(pb.CreateSecretRequest(secret=pb.Secret(
        name="tf-vars", exposure=pb.SECRET_EXPOSURE_TF_VAR), values={"PATH": "x"}), metadata=executor.md)


async def test_a_run_that_lost_its_job_to_a_later_attempt_stops_renewing_it(executor, repo):
    """One process's worker tasks share a worker id: the attempt tells a run whose
    lease ran out (and whose job was claimed again) from the new one."""
    import datetime as dt

    from services.common.uow import utcnow
    job = await executor.stub.SubmitJob(submit_request(repo, "slow", "l/lost", variables={"seconds": 1}),
                                        metadata=executor.md)
    job = await wait_job(executor.stub, job.id, executor.md, timeout=60)
    runtime = executor.runtime
    worker = runtime.executor_config.worker_id
    async with runtime.uow() as uow:  # as if its lease had run out and a worker had claimed it again
        stored = await uow.jobs.get(job.id)
        await uow.session.execute(sa.text("UPDATE jobs SET status='running', worker=:w, attempt=:a WHERE id=:id"),
                                  {"w": worker, "a": stored.attempt + 1, "id": job.id})
        await uow.commit()
    later = utcnow() + dt.timedelta(seconds=30)
    async with runtime.uow() as uow:
        assert not await uow.jobs.renew_lease(job.id, worker, later, attempt=stored.attempt)  # the old run
        assert await uow.jobs.renew_lease(job.id, worker, later, attempt=stored.attempt + 1)  # the new one
        await uow.commit()


# --- step hold: a workflow's next step keeps the worker its previous step freed ----------

@contextlib.asynccontextmanager
async def one_worker(tmp_path, event_prefix, nats_url, **env):
    """An executor with a single worker, so the tests decide which job it runs next."""
    svc = await start_executor(f"sqlite:///{tmp_path / 'executor.db'}", event_prefix, nats_url, tmp_path / "data",
                               IK_EXECUTOR_WORKERS="1", **env)
    try:
        # Its worker waits in a fetch (its first job starts directly on it), which
        # on a busy machine may come a moment after the service serves.
        await eventually(lambda: svc.runtime.workers._idle, timeout=30)
        yield svc
    finally:
        await svc.__aexit__(None, None, None)


def step_job(repo, state_path: str, workflow_id: str, step_id: str, seconds: int = 0) -> pb.SubmitJobRequest:
    """A workflow step's job that sleeps `seconds`."""
    return submit_request(repo, "slow", state_path, variables={"seconds": seconds},
                          correlation=pb.JobCorrelation(workflow_id=workflow_id, step_id=step_id))


@pytest.mark.parametrize("max_wait, next_step_first", [("120", True), ("0", False)],
                         ids=["held-for-the-workflow", "fairness-bound-reached"])
async def test_a_workflow_step_keeps_its_worker_for_the_next_step(repo, tmp_path, event_prefix, nats_url,
                                                                  max_wait, next_step_first):
    """One worker, a step's job running and another workflow's job queued: when
    the step ends, its workflow's next job (submitted a moment later, as the
    workflow service does) runs before the queued one, unless a queued job
    has waited longer than IK_EXECUTOR_STEP_HOLD_MAX_WAIT."""
    async with one_worker(tmp_path, event_prefix, nats_url, IK_EXECUTOR_STEP_HOLD="10",
                          IK_EXECUTOR_STEP_HOLD_MAX_WAIT=max_wait) as svc:
        first = await svc.stub.SubmitJob(step_job(repo, "h/a1", "w-a", "a1"), metadata=svc.md)
        assert first.status == pb.JOB_STATUS_RUNNING  # started directly on the only worker
        other = await svc.stub.SubmitJob(step_job(repo, "h/b1", "w-b", "b1"), metadata=svc.md)
        assert other.status == pb.JOB_STATUS_QUEUED
        assert (await wait_job(svc.stub, first.id, svc.md, timeout=60)).status == SUCCEEDED
        following = await svc.stub.SubmitJob(step_job(repo, "h/a2", "w-a", "a2"), metadata=svc.md)
        following = await wait_job(svc.stub, following.id, svc.md, timeout=60)
        other = await wait_job(svc.stub, other.id, svc.md, timeout=60)
        assert following.status == other.status == SUCCEEDED
        started_before = following.start_time.ToDatetime() < other.start_time.ToDatetime()
        assert started_before == next_step_first


async def test_a_next_step_that_missed_its_hold_runs_before_older_queued_jobs(repo, tmp_path, event_prefix,
                                                                              nats_url):
    """A workflow's next job that came too late for its worker's hold waits on
    the queue behind another workflow's older job: the next worker that frees
    runs it first, instead of leaving it behind every holding workflow."""
    async with one_worker(tmp_path, event_prefix, nats_url) as svc:
        # The workflow's first step.
        done = await svc.stub.SubmitJob(step_job(repo, "m/a0", "w-a", "a0"), metadata=svc.md)
        assert (await wait_job(svc.stub, done.id, svc.md, timeout=60)).status == SUCCEEDED
        running = await svc.stub.SubmitJob(step_job(repo, "m/c1", "w-c", "c1", seconds=3), metadata=svc.md)
        running = await wait_job(svc.stub, running.id, svc.md, timeout=60, statuses={pb.JOB_STATUS_RUNNING})
        assert running.status == pb.JOB_STATUS_RUNNING  # the only worker is busy from here on
        older = await svc.stub.SubmitJob(step_job(repo, "m/b1", "w-b", "b1"), metadata=svc.md)
        # w-a's next step, queued last.
        late = await svc.stub.SubmitJob(step_job(repo, "m/a1", "w-a", "a1"), metadata=svc.md)
        assert older.status == late.status == pb.JOB_STATUS_QUEUED
        late = await wait_job(svc.stub, late.id, svc.md, timeout=60)
        older = await wait_job(svc.stub, older.id, svc.md, timeout=60)
        assert late.status == older.status == SUCCEEDED
        assert late.start_time.ToDatetime() < older.start_time.ToDatetime()
        assert late.attempt == older.attempt == 1  # each ran once, its queue message notwithstanding


async def test_a_worker_keeps_holding_for_its_workflow_before_a_later_workflows_late_step(repo, tmp_path,
                                                                                         event_prefix, nats_url):
    """Workflows started first finish first, also when one came late: a
    worker freed by a step of the workflow started first holds for that
    workflow's next job rather than run a later workflow's queued next step,
    which would make this workflow late in turn (and every step of every
    workflow would then wait for a whole job of another)."""
    async with one_worker(tmp_path, event_prefix, nats_url, IK_EXECUTOR_STEP_HOLD="10") as svc:
        # w-a started first, then w-c.
        for first in (step_job(repo, "k/a0", "w-a", "a0"), step_job(repo, "k/c0", "w-c", "c0")):
            done = await svc.stub.SubmitJob(first, metadata=svc.md)
            assert (await wait_job(svc.stub, done.id, svc.md, timeout=60)).status == SUCCEEDED
        # The job's end is visible a moment before its worker waits in a fetch again.
        await eventually(lambda: svc.runtime.workers._idle, timeout=30)
        running = await svc.stub.SubmitJob(step_job(repo, "k/a1", "w-a", "a1", seconds=2), metadata=svc.md)
        assert running.status == pb.JOB_STATUS_RUNNING  # the only worker is busy from here on
        # w-c's next step waits.
        later = await svc.stub.SubmitJob(step_job(repo, "k/c1", "w-c", "c1"), metadata=svc.md)
        assert later.status == pb.JOB_STATUS_QUEUED
        assert (await wait_job(svc.stub, running.id, svc.md, timeout=60)).status == SUCCEEDED
        following = await svc.stub.SubmitJob(step_job(repo, "k/a2", "w-a", "a2"), metadata=svc.md)
        following = await wait_job(svc.stub, following.id, svc.md, timeout=60)
        later = await wait_job(svc.stub, later.id, svc.md, timeout=60)
        assert following.status == later.status == SUCCEEDED
        assert following.start_time.ToDatetime() < later.start_time.ToDatetime()


async def test_a_worker_freed_by_a_step_runs_its_own_workflows_queued_job_without_holding(repo, tmp_path,
                                                                                         event_prefix, nats_url):
    """A workflow whose jobs wait on the queue already (a plan's parallel plan
    jobs, a DAG's branches): the worker its step frees takes the next of
    them at once instead of holding for a submission that will not come."""
    async with one_worker(tmp_path, event_prefix, nats_url, IK_EXECUTOR_STEP_HOLD="10") as svc:
        running = await svc.stub.SubmitJob(step_job(repo, "p/a", "w-p", "a", seconds=1), metadata=svc.md)
        assert running.status == pb.JOB_STATUS_RUNNING
        sibling = await svc.stub.SubmitJob(step_job(repo, "p/b", "w-p", "b"), metadata=svc.md)
        assert sibling.status == pb.JOB_STATUS_QUEUED
        running = await wait_job(svc.stub, running.id, svc.md, timeout=60)
        sibling = await wait_job(svc.stub, sibling.id, svc.md, timeout=60)
        assert running.status == sibling.status == SUCCEEDED
        waited = (sibling.start_time.ToDatetime() - running.end_time.ToDatetime()).total_seconds()
        assert waited < 5, f"the sibling waited {waited:.1f} s: the worker held for nothing"


@pytest.mark.parametrize("kind", ["integration", "secret", "storage"])
async def test_a_delete_racing_a_submission_waits_for_it_and_sees_its_job(repo, tmp_path, event_prefix, nats_url,
                                                                         postgres, monkeypatch, kind):
    """PostgreSQL, two transactions at once: a SubmitJob that has read what
    its job names but not committed yet, and a delete of one of those. The
    delete waits for the submission and is then refused naming its job; it
    never deletes what a job stored a moment later names."""
    from services.common.auth import Principal, Role
    from services.executor.api import convert
    from services.executor.app import jobs as job_use_cases
    monkeypatch.setattr(ResourceUsers, "of", _no_resources)
    svc = await start_executor(postgres.create(), event_prefix, nats_url, tmp_path / "data", IK_EXECUTOR_WORKERS="0")
    try:
        integration, secret, storage, deletes = await _what_jobs_use(svc, tmp_path)
        call, request = deletes[["integration", "secret", "storage"].index(kind)]
        submission = convert.job_from_submit(submit_request(
            repo, "ok", "race/1", variables={"name": "r"}, integration_ids=[integration.id], secret_ids=[secret.id],
            storage_id=storage.id))
        async with svc.runtime.uow() as uow:
            job, _ = await job_use_cases.submit_job(uow, Principal("alice", Role.WRITE), submission, 60)
            delete = asyncio.ensure_future(call(request, metadata=svc.admin))
            await asyncio.sleep(1)
            assert not delete.done(), "the delete did not wait for the submission holding what it names"
            await uow.commit()
        await _refused_naming(lambda req, metadata: delete, request, svc, [job])
    finally:
        await svc.__aexit__(None, None, None)


# --- a job's end: its last lines with it, its directory gone before it ------------------

async def test_the_last_log_lines_are_stored_in_the_transaction_that_ends_the_job(executor, repo, tmp_path,
                                                                                  monkeypatch):
    """A job's end, its last log lines (here every line: no timed write in
    between) and its start time are committed together, so a follower that
    sees the job ended has its whole log; the run's working directory,
    removed on a thread while that transaction is made, is gone by its
    commit."""
    from services.executor.app import runs
    monkeypatch.setattr(runs, "FLUSH_INTERVAL", 600)
    engine = executor.runtime.db.engine.sync_engine
    work = tmp_path / "data" / "work"
    open_transactions: dict[int, list] = {}
    committed: list[tuple[list, list]] = []  # (statements, what the work root held at the commit)

    def before_execute(conn, cursor, statement, parameters, context, executemany):
        open_transactions.setdefault(id(conn.connection.dbapi_connection), []).append((statement, parameters))

    def on_commit(conn):
        statements = open_transactions.pop(id(conn.connection.dbapi_connection), [])
        if statements:
            committed.append((statements, sorted(p.name for p in work.iterdir()) if work.exists() else []))
    sa.event.listen(engine, "before_cursor_execute", before_execute)
    sa.event.listen(engine, "commit", on_commit)
    try:
        job = await executor.stub.SubmitJob(submit_request(repo, "ok", "end/lines", variables={"name": "x"}),
                                            metadata=executor.md)
        job = await wait_job(executor.stub, job.id, executor.md)
    finally:
        sa.event.remove(engine, "before_cursor_execute", before_execute)
        sa.event.remove(engine, "commit", on_commit)
    assert job.status == SUCCEEDED, job.error_message
    assert job.start_time.seconds > 0
    writes = [(statements, held) for statements, held in committed
              if any(s.startswith("INSERT INTO job_logs") and job.id in str(p) for s, p in statements)]
    assert len(writes) == 1, "one transaction writes the lines"
    [(statements, held)] = writes
    assert any(s.startswith("UPDATE jobs SET") and "succeeded" in str(p) for s, p in statements), \
        "the lines go with the end"
    assert not [name for name in held if name.startswith(job.id)], "the directory was there at the end's commit"
    lines = await all_logs(executor.stub, job.id, executor.md)
    assert [line.number for line in lines] == list(range(1, len(lines) + 1))
    assert "Apply complete!" in log_text(lines)


async def test_the_cap_check_locks_an_integration_only_when_it_has_a_cap(repo, tmp_path, event_prefix, nats_url,
                                                                        postgres):
    """PostgreSQL. A submission that may start its job at once reads its
    integrations' caps in the statement that holds what it names (FOR KEY
    SHARE): without a cap nothing more is read or locked. With one, the
    integration's row is locked FOR NO KEY UPDATE for the check, so two
    submissions at once take turns and never both take the last slot."""
    from services.common.auth import Principal, Role
    from services.executor.api import convert
    from services.executor.app import jobs as job_use_cases
    svc = await start_executor(postgres.create(), event_prefix, nats_url, tmp_path / "data", IK_EXECUTOR_WORKERS="0")
    alice = Principal("alice", Role.WRITE)
    try:
        free = await svc.stub.CreateIntegration(pb.CreateIntegrationRequest(
            integration=pb.Integration(name="free", provider=pb.INTEGRATION_PROVIDER_GENERIC),
            credentials={"ACCOUNT": "free"}), metadata=svc.admin)
        capped = await svc.stub.CreateIntegration(pb.CreateIntegrationRequest(
            integration=pb.Integration(name="capped", provider=pb.INTEGRATION_PROVIDER_GENERIC,
                                       max_concurrent_jobs=1), credentials={"ACCOUNT": "capped"}), metadata=svc.admin)

        def submission(integration: pb.Integration, path: str):
            return convert.job_from_submit(submit_request(repo, "ok", path, variables={"name": "c"},
                                                          integration_ids=[integration.id]))
        engine = svc.runtime.db.engine.sync_engine
        reads: list[str] = []

        def before_execute(conn, cursor, statement, parameters, context, executemany):
            if "FROM integrations" in statement:
                reads.append(statement)
        sa.event.listen(engine, "before_cursor_execute", before_execute)
        try:
            async with svc.runtime.uow() as uow:
                job, _ = await job_use_cases.submit_job(uow, alice, submission(free, "cap/free"), 60,
                                                        start_as=("worker-1", 60))
                await uow.rollback()
        finally:
            sa.event.remove(engine, "before_cursor_execute", before_execute)
        assert job.status == "running"
        assert len(reads) == 1 and "FOR KEY SHARE" in reads[0], reads

        async with svc.runtime.uow() as first:
            one, _ = await job_use_cases.submit_job(first, alice, submission(capped, "cap/1"), 60,
                                                    start_as=("worker-1", 60))
            assert one.status == "running"

            async def second_submission():
                async with svc.runtime.uow() as uow:
                    job, _ = await job_use_cases.submit_job(uow, alice, submission(capped, "cap/2"), 60,
                                                            start_as=("worker-2", 60))
                    await uow.rollback()
                    return job
            second = asyncio.ensure_future(second_submission())
            await asyncio.sleep(1)
            assert not second.done(), "the second cap check did not wait for the first"
            await first.commit()
        two = await second
        assert two.status == "queued" and "runs 1 of at most 1 jobs" in two.queue_reason
    finally:
        await svc.__aexit__(None, None, None)
