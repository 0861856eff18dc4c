"""DESIGN §7: kill any service mid-workflow. The five services run as
processes; while a chain of steps executes, each service is killed with
SIGKILL and started again, the executor while a step's terraform apply runs.
The workflow still finishes, every resource ends provisioned (none stuck in
progress), no apply of a step ever ran beside another of the same step, and
no job started before the workflow service had started its step."""
from __future__ import annotations

import signal
import time

import grpc
import pytest
from google.protobuf import struct_pb2

from infrakitchen.blueprint.v1 import blueprint_pb2 as bp
from infrakitchen.blueprint.v1 import blueprint_pb2_grpc
from infrakitchen.executor.v1 import executor_pb2 as ep
from infrakitchen.executor.v1 import executor_pb2_grpc
from infrakitchen.resource.v1 import resource_pb2 as rp
from infrakitchen.resource.v1 import resource_pb2_grpc
from infrakitchen.workflow.v1 import workflow_pb2 as wp
from infrakitchen.workflow.v1 import workflow_pb2_grpc
from tests.e2e.test_executor_workers import marker_runs
from tests.support.jobs import module_repo
from tests.support.processes import ServiceProcesses
from tests.support.waiting import wait_for

pytestmark = pytest.mark.e2e

STEPS = 6
VICTIMS = ("workflow", "resource", "executor", "approval", "blueprint")


@pytest.fixture
def platform(tmp_path, event_prefix, nats_url):
    # The marker files the modules write are the one place outside a job's sandbox they may reach.
    (tmp_path / "markers").mkdir()
    procs = ServiceProcesses(tmp_path / "data", event_prefix, nats_url, extra_env={
        "IK_EXECUTOR_SANDBOX_BIND": str(tmp_path / "markers"),
        "IK_EXECUTOR_LEASE": "4", "IK_WORKFLOW_RECONCILE_INTERVAL": "3", "IK_RESOURCE_RECONCILE_INTERVAL": "3",
        "IK_TERRAFORM_LOCK_TIMEOUT": "30s"})
    procs.start()
    yield procs
    procs.stop()


def test_killing_each_service_mid_workflow_loses_nothing_and_runs_no_apply_twice_at_once(platform, tmp_path):
    repo = module_repo(tmp_path / "modules")
    md = platform.metadata()

    def stub(service, cls):
        return cls(grpc.insecure_channel(platform.target(service)))
    blueprints = stub("blueprint", blueprint_pb2_grpc.BlueprintServiceStub)
    templates = []
    for n in range(STEPS):
        t = blueprints.CreateTemplate(bp.CreateTemplateRequest(template=bp.Template(
            key=f"link-{n}", name=f"Link {n}", enabled=True)), metadata=md)
        v = blueprints.CreateSourceCodeVersion(bp.CreateSourceCodeVersionRequest(
            template_id=t.id, source=bp.ModuleSource(repository_url=repo.url, ref="v1", path="marker"),
            is_default=True), metadata=md, timeout=60)
        defaults = struct_pb2.Struct()
        defaults.update({"marker": str(tmp_path / "markers" / f"marker-{n}"), "seconds": 2})
        templates.append(bp.BlueprintTemplate(template_id=t.id, source_code_version_id=v.id,
                                              default_variables=defaults))
    # A chain: each link waits for the one before (wired through a no-op: the marker path).
    wiring = [bp.WiringRule(source_template_id=templates[n].template_id, source_output="marker",
                            target_template_id=templates[n + 1].template_id, target_variable="upstream")
              for n in range(STEPS - 1)]
    chain = blueprints.CreateBlueprint(bp.CreateBlueprintRequest(blueprint=bp.Blueprint(
        name="chain", templates=templates, wiring_rules=wiring)), metadata=md)
    integration = stub("executor", executor_pb2_grpc.ExecutorServiceStub).CreateIntegration(
        ep.CreateIntegrationRequest(integration=ep.Integration(name="cloud", provider=ep.INTEGRATION_PROVIDER_GENERIC),
                                    credentials={"TOKEN": "x"}), metadata=md)
    workflows = stub("workflow", workflow_pb2_grpc.WorkflowServiceStub)
    w = workflows.CreateWorkflow(wp.CreateWorkflowRequest(blueprint_id=chain.id, integration_ids=[integration.id]),
                                 metadata=md, timeout=60)
    workflows.ExecuteWorkflow(wp.ExecuteWorkflowRequest(id=w.id), metadata=md)

    for n, victim in enumerate(VICTIMS):
        # Step n's apply is running (its local-exec wrote its start): kill one service, start it again.
        wait_for(lambda: (tmp_path / "markers" / f"marker-{n}").exists(), 120, f"the apply of step {n}")
        platform.stop(victim, sig=signal.SIGKILL)
        platform.start(victim)
        workflows = stub("workflow", workflow_pb2_grpc.WorkflowServiceStub)

    done = wait_for(lambda: (lambda got: got if got.status in (wp.WORKFLOW_STATUS_DONE, wp.WORKFLOW_STATUS_ERROR)
                             else None)(workflows.GetWorkflow(wp.GetWorkflowRequest(id=w.id), metadata=md)),
                    240, "the end of the workflow")
    assert done.status == wp.WORKFLOW_STATUS_DONE, done.error_message
    assert all(s.status == wp.STEP_STATUS_DONE and s.resource_id for s in done.steps)

    # One owner of every step: each job of the workflow was submitted, and started, only after the
    # workflow service had recorded its step in progress (the step's start_time), never ahead of it.
    jobs = stub("executor", executor_pb2_grpc.ExecutorServiceStub).ListJobs(
        ep.ListJobsRequest(workflow_id=w.id, page_size=100), metadata=md).jobs
    step_started = {s.id: s.start_time.ToDatetime() for s in done.steps}
    assert len(jobs) >= STEPS and all(j.correlation.step_id in step_started for j in jobs)
    for j in jobs:
        assert step_started[j.correlation.step_id] <= j.create_time.ToDatetime(), f"job {j.id} ahead of its step"
        if j.HasField("start_time"):
            assert step_started[j.correlation.step_id] <= j.start_time.ToDatetime(), f"job {j.id} ahead of its step"

    resources = stub("resource", resource_pb2_grpc.ResourceServiceStub)
    for s in done.steps:
        r = wait_for(lambda: (lambda got: got if (got.state, got.status) == (
            rp.RESOURCE_STATE_PROVISIONED, rp.RESOURCE_STATUS_DONE) else None)(
            resources.GetResource(rp.GetResourceRequest(id=s.resource_id), metadata=md)), 30,
            f"resource of {s.template_name} provisioned/done")
        assert r.revision >= 1
    time.sleep(3)  # a run that outlived its killed executor would write its end by now
    for n in range(STEPS):
        runs = marker_runs(tmp_path / "markers" / f"marker-{n}")
        finished = [run for run in runs if run[1] is not None]
        assert len(finished) == 1, f"step {n}: {len(finished)} finished applies"
        for earlier, later in zip(runs, runs[1:]):  # never two at once: each run ended (or died) before the next
            assert earlier[1] is None or earlier[1] <= later[0], f"step {n}: applies overlapped"
        assert runs[-1] == finished[0], f"step {n}: a run after the one that finished"
        if VICTIMS[n:n + 1] == ("executor",):  # its apply died with the executor and ran again
            assert len(runs) == 2 and runs[0][1] is None, runs
