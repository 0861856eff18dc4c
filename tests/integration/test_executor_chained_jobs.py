"""Jobs submitted after another job (a workflow's next step, submitted ahead
by the resource service): they wait, take the upstream's outputs as their
wired variables the moment it succeeds and run on the worker it frees, or
end with it. Real executor, Terraform, git and NATS."""
from __future__ import annotations

import grpc
import pytest

from infrakitchen.executor.v1 import executor_pb2 as pb
from services.common.auth import Role
from services.common.identities import ServiceIdentity
from services.common.values import from_value
from tests.integration.test_executor_jobs import one_worker, step_job
from tests.support.grpc_asserts import field_violations, rpc_error
from tests.support.jobs import all_logs, log_text, module_repo, submit_request, wait_job

SUCCEEDED, WAITING = pb.JOB_STATUS_SUCCEEDED, pb.JOB_STATUS_WAITING


@pytest.fixture
def repo(tmp_path):
    return module_repo(tmp_path / "modules")


def as_resource_service(svc) -> list[tuple[str, str]]:
    """Calls as the resource service (the only one that may chain jobs) acting for alice."""
    identity = ServiceIdentity.from_settings("resource", {}, svc.settings.data_dir)
    return [("authorization", f"Bearer {identity.token('executor', 'alice', Role.WRITE)}")]


def upstream_job(repo, state_path: str, workflow_id: str, seconds: int = 0, module: str = "upstream"):
    return submit_request(repo, module, state_path, variables={"seconds": seconds} if module == "upstream" else {},
                          correlation=pb.JobCorrelation(workflow_id=workflow_id, step_id="s1"))


def next_job(repo, state_path: str, after: pb.Job, *wires: tuple[str, str, str]) -> pb.SubmitJobRequest:
    """The "ok" module as the next step of `after`'s workflow, its label given
    as the fallback of what it is wired from."""
    return submit_request(repo, "ok", state_path, variables={"name": "down", "label": "fallback"},
                          correlation=pb.JobCorrelation(workflow_id=after.correlation.workflow_id, step_id="s2"),
                          after_job_id=after.id,
                          wired_variables=[pb.WiredVariable(variable=v, output=o, type=t) for v, o, t in wires])


async def test_a_job_after_another_waits_then_runs_at_once_on_its_worker_with_its_outputs(
        repo, tmp_path, event_prefix, nats_url):
    """One worker runs the upstream; another job is queued before the next
    one is submitted to wait for it. When the upstream succeeds its worker
    runs the next job at once, ahead of the queued one (no workflow here, so
    no step hold does it), with the
    upstream's outputs: plain ones as they are, a sensitive one kept
    sensitive (masked, never in the log), an absent one leaving the fallback."""
    async with one_worker(tmp_path, event_prefix, nats_url) as svc:
        resource = as_resource_service(svc)
        up = await svc.stub.SubmitJob(upstream_job(repo, "c/up", "", seconds=3), metadata=svc.md)
        assert up.status == pb.JOB_STATUS_RUNNING  # on the only worker
        other = await svc.stub.SubmitJob(step_job(repo, "c/other", "w-b", "b1"), metadata=svc.md)
        assert other.status == pb.JOB_STATUS_QUEUED
        request = next_job(repo, "c/down", up, ("label", "id", "string"), ("password", "secret", "string"),
                           ("token", "absent", "string"))
        request.sensitive_variables.append("token")  # a wired variable may be named sensitive before it has a value
        chained = await svc.stub.SubmitJob(request, metadata=resource)
        assert chained.status == WAITING and chained.after_job_id == up.id
        assert [w.output for w in chained.wired_variables] == ["id", "secret", "absent"]

        chained = await wait_job(svc.stub, chained.id, svc.md, timeout=90)
        up = await svc.stub.GetJob(pb.GetJobRequest(id=up.id), metadata=svc.md)
        other = await wait_job(svc.stub, other.id, svc.md, timeout=90)
        assert chained.status == up.status == other.status == SUCCEEDED, chained.error_message
        outputs = {o.name: from_value(o.value) for o in up.outputs}
        variables = {k: from_value(v) for k, v in chained.variables.fields.items()}
        assert variables["label"] == outputs["id"]  # wired
        assert variables["password"] == "***" and "password" in chained.sensitive_variables  # from a sensitive output
        assert "token" not in variables  # no such output: the variable keeps what it was given (nothing)
        assert chained.start_time.ToDatetime() >= up.end_time.ToDatetime()
        assert chained.start_time.ToDatetime() < other.start_time.ToDatetime()  # the freed worker ran it first
        assert chained.attempt == 1
        revealed = await svc.stub.GetJobSensitiveOutputs(pb.GetJobSensitiveOutputsRequest(job_id=up.id),
                                                         metadata=svc.admin)
        secret = next(from_value(o.value) for o in revealed.outputs if o.name == "secret")
        assert secret.startswith("s3cret-")
        text = log_text(await all_logs(svc.stub, chained.id, svc.md))
        assert f"label={outputs['id']}" in text and secret not in text


async def test_a_waiting_job_ends_with_an_upstream_that_does_not_succeed(repo, tmp_path, event_prefix, nats_url):
    """Cancelled when its upstream fails (or was cancelled, or ended before
    the submission); cancelled by CancelJob while it waits; failed, before
    terraform runs, when an output does not fit its variable's type; queued
    at once after an upstream that already succeeded."""
    async with one_worker(tmp_path, event_prefix, nats_url) as svc:
        resource = as_resource_service(svc)
        failing = await svc.stub.SubmitJob(upstream_job(repo, "e/fail", "w-f", module="failing"), metadata=svc.md)
        waits = await svc.stub.SubmitJob(next_job(repo, "e/a", failing, ("label", "id", "string")), metadata=resource)
        failing = await wait_job(svc.stub, failing.id, svc.md, timeout=90)
        assert failing.status == pb.JOB_STATUS_FAILED
        waits = await wait_job(svc.stub, waits.id, svc.md, timeout=30)
        assert waits.status == pb.JOB_STATUS_CANCELLED and failing.id in waits.error_message
        assert waits.start_time.ToSeconds() == 0  # never ran
        late = await svc.stub.SubmitJob(next_job(repo, "e/b", failing, ("label", "id", "string")), metadata=resource)
        assert late.status == pb.JOB_STATUS_CANCELLED

        up = await svc.stub.SubmitJob(upstream_job(repo, "e/up", "w-g", seconds=2), metadata=svc.md)
        cancelled = await svc.stub.SubmitJob(next_job(repo, "e/c", up, ("label", "id", "string")), metadata=resource)
        misfit = await svc.stub.SubmitJob(next_job(repo, "e/d", up, ("label", "names", "string")), metadata=resource)
        assert cancelled.status == misfit.status == WAITING
        cancelled = await svc.stub.CancelJob(pb.CancelJobRequest(id=cancelled.id), metadata=svc.md)
        assert cancelled.status == pb.JOB_STATUS_CANCELLED
        misfit = await wait_job(svc.stub, misfit.id, svc.md, timeout=90)
        assert misfit.status == pb.JOB_STATUS_FAILED
        assert "label" in misfit.error_message and "must be of type string" in misfit.error_message
        assert (await svc.stub.GetJob(pb.GetJobRequest(id=up.id), metadata=svc.md)).status == SUCCEEDED

        after_done = await svc.stub.SubmitJob(next_job(repo, "e/e", up, ("label", "id", "string")),
                                              metadata=resource)
        assert after_done.status in (pb.JOB_STATUS_QUEUED, pb.JOB_STATUS_RUNNING)
        assert (await wait_job(svc.stub, after_done.id, svc.md, timeout=90)).status == SUCCEEDED


async def test_only_the_resource_service_submits_a_job_after_another(repo, tmp_path, event_prefix, nats_url):
    """A user, even an admin, cannot chain a job after another (it would read
    that job's sensitive outputs); bad chains are field violations; nothing
    is stored."""
    async with one_worker(tmp_path, event_prefix, nats_url) as svc:
        up = await svc.stub.SubmitJob(upstream_job(repo, "p/up", "w-p"), metadata=svc.md)
        for metadata in (svc.md, svc.admin):
            denied = await rpc_error(svc.stub.SubmitJob(next_job(repo, "p/a", up, ("label", "id", "")),
                                                        metadata=metadata))
            assert denied.code() == grpc.StatusCode.PERMISSION_DENIED
        resource = as_resource_service(svc)
        unknown = next_job(repo, "p/b", up, ("label", "id", ""))
        unknown.after_job_id = "no-such-job"
        twice = next_job(repo, "p/c", up, ("label", "id", ""), ("label", "names", ""))
        loose = submit_request(repo, "ok", "p/d", variables={"name": "x"},
                               wired_variables=[pb.WiredVariable(variable="label", output="id")])
        for request, field in ((unknown, "after_job_id"), (twice, "wired_variables"), (loose, "wired_variables")):
            error = await rpc_error(svc.stub.SubmitJob(request, metadata=resource))
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert field in field_violations(error)
        listed = await svc.stub.ListJobs(pb.ListJobsRequest(), metadata=svc.md)
        assert [j.id for j in listed.jobs] == [up.id]
