"""The seed's Production Environment, end to end: the five services as
separate processes with real NATS and real terraform, driven by the `ik`
command line the way a person would, then checked through gRPC."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from infrakitchen.executor.v1 import executor_pb2 as ep
from infrakitchen.executor.v1 import executor_pb2_grpc
from infrakitchen.resource.v1 import resource_pb2 as rp
from infrakitchen.resource.v1 import resource_pb2_grpc
from infrakitchen.workflow.v1 import workflow_pb2 as wp
from infrakitchen.workflow.v1 import workflow_pb2_grpc
from services.common.config import SERVICES
from tests.support.processes import ROOT, ServiceProcesses, free_port

pytestmark = pytest.mark.e2e


@pytest.fixture
def platform(tmp_path, event_prefix, nats_url):
    ports = {name: free_port() for name in SERVICES}  # each service's Prometheus endpoint
    procs = ServiceProcesses(tmp_path / "data", event_prefix, nats_url, extra_env={
        "IK_METRICS_INTERVAL": "0.5", **{f"IK_{n.upper()}_METRICS_PORT": str(p) for n, p in ports.items()},
        "IK_TRACES_EXPORTER": "file", "IK_LOG_FORMAT": "json"})
    procs.metrics_ports = ports
    procs.start()
    yield procs
    procs.stop()


def scrape(platform, service: str) -> dict[tuple[str, tuple], float]:
    """(sample name, sorted labels) -> value, from the service's /metrics."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{platform.metrics_ports[service]}/metrics", timeout=10).read()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text.decode()) for s in family.samples}


def spans(platform) -> list[dict]:
    """Every span the services exported so far (IK_TRACES_EXPORTER=file)."""
    found = []
    for path in (platform.data_dir / "traces").glob("*.jsonl"):
        found += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return found


def ik(platform, tmp_path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "IK_DATA_DIR": str(platform.data_dir), "IK_CONFIG_DIR": str(tmp_path / "config"),
           "COLUMNS": "160", "IK_TRACES_EXPORTER": "file",  # the command's own span, as the services'
           **{f"IK_{s.upper()}_TARGET": platform.target(s) for s in SERVICES}}
    return subprocess.run([sys.executable, "-m", "cli", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=240)


def test_the_production_environment_runs_end_to_end(platform, tmp_path):
    assert ik(platform, tmp_path, "login", "--token", platform.token()).returncode == 0
    registered = ik(platform, tmp_path, "example", "register")
    assert registered.returncode == 0, registered.stdout + registered.stderr
    run = ik(platform, tmp_path, "workflow", "run", "Production Environment", "--var", "vpc.cidr_block=10.42.0.0/16",
             "--on-failure", "continue-independent", "--retries", "2", "--ttl", "8h")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "done" in run.stdout

    with grpc.insecure_channel(platform.target("workflow")) as wc, \
            grpc.insecure_channel(platform.target("resource")) as rc:
        workflows = workflow_pb2_grpc.WorkflowServiceStub(wc)
        resources = resource_pb2_grpc.ResourceServiceStub(rc)
        md = platform.metadata()
        [w] = workflows.ListWorkflows(wp.ListWorkflowsRequest(), metadata=md).workflows
        assert w.status == wp.WORKFLOW_STATUS_DONE
        assert w.create_time.seconds and w.start_time.seconds and w.completion_time.seconds
        assert w.on_failure == wp.FAILURE_POLICY_CONTINUE_INDEPENDENT and w.retry_policy.max_attempts == 3
        assert 7.9 * 3600 < w.expire_time.seconds - w.create_time.seconds <= 8 * 3600
        cancel = ik(platform, tmp_path, "workflow", "cancel", w.id)
        assert cancel.returncode != 0 and "not running" in cancel.stdout + cancel.stderr
        steps = {s.template_name: s for s in w.steps}
        vpc, eks, rds = steps["VPC"], steps["EKS Cluster"], steps["RDS Database"]
        assert (vpc.position, eks.position, rds.position) == (0, 1, 1)
        # EKS and RDS ran side by side once the VPC was done.
        assert eks.start_time.ToDatetime() < rds.completion_time.ToDatetime()
        assert rds.start_time.ToDatetime() < eks.completion_time.ToDatetime()
        assert vpc.completion_time.ToDatetime() <= min(eks.start_time.ToDatetime(), rds.start_time.ToDatetime())

        # The resource service applies the same executor events on its own, so
        # it may be a moment behind the workflow.
        deadline = time.monotonic() + 20
        while True:
            got = {name: resources.GetResource(rp.GetResourceRequest(id=s.resource_id), metadata=md)
                   for name, s in steps.items()}
            if all((r.state, r.status) == (rp.RESOURCE_STATE_PROVISIONED, rp.RESOURCE_STATUS_DONE)
                   for r in got.values()) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        for r in got.values():
            assert (r.state, r.status) == (rp.RESOURCE_STATE_PROVISIONED, rp.RESOURCE_STATUS_DONE) and r.outputs
        vpc_outputs = {o.name: o.value for o in got["VPC"].outputs}
        vpc_id = vpc_outputs["vpc_id"].string_value
        subnets = [v.string_value for v in vpc_outputs["private_subnet_ids"].list_value.values]
        assert vpc_id.startswith("vpc-") and len(subnets) >= 2
        assert eks.resolved_variables["vpc_id"] == vpc_id and rds.resolved_variables["vpc_id"] == vpc_id
        assert list(eks.resolved_variables["subnet_ids"]) == subnets
        assert vpc.resolved_variables["cidr_block"] == "10.42.0.0/16"
        assert list(got["EKS Cluster"].parent_ids) == [got["VPC"].id]

        # Each service's Prometheus endpoint counted the run.
        executor, workflow = scrape(platform, "executor"), scrape(platform, "workflow")
        assert executor[("ik_jobs_total", (("action", "apply"), ("outcome", "succeeded")))] == 3
        assert executor[("ik_job_duration_seconds_count", (("action", "apply"),))] == 3
        assert workflow[("ik_workflow_duration_seconds_count", (("outcome", "done"),))] == 1
        assert workflow[("ik_step_duration_seconds_count", (("outcome", "done"),))] == 3
        assert workflow[("ik_rpc_duration_seconds_count", (("code", "OK"), ("method", "ExecuteWorkflow"),
                                                           ("service", "workflow")))] == 1
        assert scrape(platform, "resource")[("ik_rpc_duration_seconds_count", (
            ("code", "OK"), ("method", "CreateResource"), ("service", "resource")))] == 3
        # The backlog gauges: every consumer and outbox catches up after the run.
        assert executor[("ik_job_queue_seconds_count", ())] == 3  # submission to the worker's start

        def caught_up():
            samples = scrape(platform, "workflow")
            lag = [v for (name, _), v in samples.items() if name == "ik_consumer_pending"]
            jobs = scrape(platform, "executor")  # the queue's depth: nothing queued or running after the run
            return len(lag) == 3 and not any(lag) and samples[("ik_outbox_backlog", ())] == 0 and \
                jobs.get(("ik_jobs_current", (("status", "queued"),))) == 0 and \
                jobs.get(("ik_jobs_current", (("status", "running"),))) == 0
        deadline = time.monotonic() + 30
        while not caught_up():
            assert time.monotonic() < deadline, "the workflow service's consumers never caught up"
            time.sleep(0.5)

    # One trace: `ik workflow run` (the command's span, the parent of its calls) -> CreateWorkflow, which
    # reads the blueprint service, and ExecuteWorkflow -> each step's CreateResource and SubmitJob -> each job
    # and its terraform commands -> the completion events, consumed by the workflow, resource and approval
    # services, which start the next steps. Every span's parent is in the trace; its one root is the CLI's.
    def the_run_trace():
        found = spans(platform)
        [execute] = [x for x in found if x["name"].endswith("WorkflowService/ExecuteWorkflow")
                     and x["kind"] == "SpanKind.SERVER"]
        return [x for x in found if x["context"]["trace_id"] == execute["context"]["trace_id"]]
    deadline = time.monotonic() + 20
    while True:
        run_trace = the_run_trace()
        jobs = [x for x in run_trace if x["name"] == "job apply"]
        if len(jobs) == 3 and sum(x["name"].startswith("workflow-") and "job.succeeded" in x["name"]
                                  for x in run_trace) == 3 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    services = {x["resource"]["attributes"]["service.name"] for x in run_trace}
    assert services == {f"infrakitchen-{name}" for name in (*SERVICES, "cli")}
    assert len(jobs) == 3 and {x["attributes"]["ik.step_id"] for x in jobs} == {s.id for s in w.steps}
    ids = {x["context"]["span_id"] for x in run_trace}
    [root] = [x for x in run_trace if x["parent_id"] is None]
    assert root["name"] == "ik workflow run" and root["resource"]["attributes"]["service.name"] == "infrakitchen-cli"
    assert all(x["parent_id"] in ids for x in run_trace if x is not root), "a span whose parent was never exported"
    by_id = {x["context"]["span_id"]: x for x in run_trace}
    commands = [x for x in run_trace if x["name"] == "terraform apply"]
    assert len(commands) == 3 and all(by_id[x["parent_id"]]["name"] == "job apply" for x in commands)
    # A dependent step's job descends from its upstream job (through the completion event).
    vpc_job = next(x for x in jobs if x["attributes"]["ik.step_id"] == vpc.id)
    eks_job = next(x for x in jobs if x["attributes"]["ik.step_id"] == eks.id)
    ancestors, at = set(), eks_job
    while at["parent_id"] in by_id:
        at = by_id[at["parent_id"]]
        ancestors.add(at["context"]["span_id"])
    assert vpc_job["context"]["span_id"] in ancestors
    # Spans carry ids and names, never variables or outputs.
    assert vpc_id not in json.dumps(run_trace) and "10.42.0.0/16" not in json.dumps(run_trace)

    # JSON log lines at INFO name what they are about: a served call the ids its request names.
    def lines(service: str) -> list[dict]:
        return [json.loads(line) for line in platform.log(service).splitlines() if line.startswith("{")]
    created = [x for x in lines("resource") if x.get("method", "").endswith("/CreateResource")]
    assert {x.get("workflow_id") for x in created} == {w.id} and {x.get("step_id") for x in created} == \
        {s.id for s in w.steps}
    submitted = [x for x in lines("executor") if x.get("method", "").endswith("/SubmitJob")]
    assert len(submitted) >= 3 and all(x.get("workflow_id") == w.id and x.get("resource_id") for x in submitted)
    # Each call's own: a GetJob (the services' confirmations, after those SubmitJobs) names its job only.
    confirmed = [x for x in lines("executor") if x.get("method", "").endswith("/GetJob")]
    assert confirmed and all(x.get("job_id") and "workflow_id" not in x for x in confirmed)
    got = [x for x in lines("workflow") if x.get("method", "").endswith(("/ExecuteWorkflow", "/WatchWorkflow"))]
    assert got and all(x.get("workflow_id") == w.id for x in got)

    shown = ik(platform, tmp_path, "workflow", "show", w.id)
    assert shown.returncode == 0 and "EKS Cluster" in shown.stdout and vpc_id in shown.stdout
    logs = ik(platform, tmp_path, "resource", "logs", vpc.resource_id, "--follow")
    assert logs.returncode == 0 and "Apply complete!" in logs.stdout

    # Tear it down: EKS and RDS first (side by side), then the VPC.
    preview = ik(platform, tmp_path, "workflow", "teardown", w.id, "--preview")
    assert preview.returncode == 0 and all(name in preview.stdout for name in steps), preview.stdout
    torn = ik(platform, tmp_path, "workflow", "teardown", w.id, "--yes")
    assert torn.returncode == 0, torn.stdout + torn.stderr
    assert "teardown done" in torn.stdout
    with grpc.insecure_channel(platform.target("resource")) as rc:
        resources = resource_pb2_grpc.ResourceServiceStub(rc)
        deadline = time.monotonic() + 20
        while True:
            got = {name: resources.GetResource(rp.GetResourceRequest(id=s.resource_id), metadata=md)
                   for name, s in steps.items()}
            if all(r.state == rp.RESOURCE_STATE_DESTROYED for r in got.values()) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert all((r.state, r.status) == (rp.RESOURCE_STATE_DESTROYED, rp.RESOURCE_STATUS_DONE) and not r.outputs
                   for r in got.values())


def test_a_failed_workflow_is_fixed_and_resumed_through_the_cli(platform, tmp_path):
    """workflows.md, "Error Recovery", as a user does it: a wrong override
    fails a step with a message that says which variable is wrong; `ik
    workflow update` fixes it, `ik workflow plan` shows what is left to do,
    `ik workflow execute` resumes; the done steps ran once."""
    assert ik(platform, tmp_path, "login", "--token", platform.token()).returncode == 0
    assert ik(platform, tmp_path, "example", "register").returncode == 0
    run = ik(platform, tmp_path, "workflow", "run", "Production Environment", "--var", "vpc.cidr_block=10.43.0.0/16",
             "--var", 'rds.instance_class=["not", "a", "string"]')
    assert run.returncode == 1, run.stdout + run.stderr
    with grpc.insecure_channel(platform.target("workflow")) as wc:
        workflows = workflow_pb2_grpc.WorkflowServiceStub(wc)
        md = platform.metadata()
        [w] = workflows.ListWorkflows(wp.ListWorkflowsRequest(), metadata=md).workflows
        assert w.status == wp.WORKFLOW_STATUS_ERROR
        steps = {s.template_name: s for s in w.steps}
        assert steps["RDS Database"].status == wp.STEP_STATUS_ERROR
        assert "instance_class" in steps["RDS Database"].error_message, "the callee's field violation is kept"
        vpc_resource = steps["VPC"].resource_id
        fixed = ik(platform, tmp_path, "workflow", "update", w.id, "--var", "rds.instance_class=db.t3.small")
        assert fixed.returncode == 0, fixed.stdout + fixed.stderr
        # Before applying anything, the plan of what is left: RDS would create its database.
        plan = ik(platform, tmp_path, "workflow", "plan", w.id)
        assert plan.returncode == 0, plan.stdout + plan.stderr
        [rds_row] = [line for line in plan.stdout.splitlines() if "RDS Database" in line]
        assert "planned" in rds_row and "create null_resource" in rds_row
        [plan_id] = [line.split("--plan ")[1].strip() for line in plan.stdout.splitlines() if "--plan " in line]
        resumed = ik(platform, tmp_path, "workflow", "execute", w.id, "--plan", plan_id)
        assert resumed.returncode == 0, resumed.stdout + resumed.stderr
        done = workflows.GetWorkflow(wp.GetWorkflowRequest(id=w.id), metadata=md)
        assert done.status == wp.WORKFLOW_STATUS_DONE
        steps = {s.template_name: s for s in done.steps}
        assert steps["VPC"].resource_id == vpc_resource
        assert steps["RDS Database"].resolved_variables["instance_class"] == "db.t3.small"
    with grpc.insecure_channel(platform.target("executor")) as ec:
        jobs = executor_pb2_grpc.ExecutorServiceStub(ec).ListJobs(ep.ListJobsRequest(workflow_id=w.id),
                                                                  metadata=md).jobs
    applies = [j.correlation.resource_id for j in jobs if j.action == ep.JOB_ACTION_APPLY]
    assert applies.count(vpc_resource) == 1 and len(applies) == 3
    # The resumed step applied the plan shown, not a fresh apply.
    rds_plan = steps["RDS Database"].plan.job_id
    assert [j.plan_job_id for j in jobs if j.correlation.resource_id == steps["RDS Database"].resource_id
            and j.action == ep.JOB_ACTION_APPLY] == [rds_plan]
