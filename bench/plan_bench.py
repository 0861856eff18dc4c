"""Plan figures of `make bench`: how long PlanWorkflow takes for the product
example and for a 30-step DAG whose every step can be planned (plan jobs run
in parallel), each against a baseline measured in the same run.

- the example (VPC, then EKS and RDS wired from it): VPC is planned, EKS and
  RDS are deferred; baseline: the VPC plan job's own duration (executor
  start to end), so the ratio is what orchestration adds;
- the DAG: 30 no-op templates with wiring edges, every wired input given at
  runtime (an override wins over the wiring, so no step is deferred);
  baseline: the same workflow planned with max_parallel_steps 1 (plan jobs
  take the parallelism limit), i.e. one plan job after another.
Each is repeated (a new workflow each time) and reported as min / median / max."""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import grpc
from google.protobuf import struct_pb2

from examples.production_environment import publish_modules, register
from infrakitchen.executor.v1 import executor_pb2 as ep
from infrakitchen.workflow.v1 import workflow_pb2 as wp

PLAN_DAG_STEPS = 30
REPEATS = 3


def _plan(bench, workflow_id: str, timeout: float = 600) -> wp.Workflow:
    bench.workflow.PlanWorkflow(wp.PlanWorkflowRequest(id=workflow_id), metadata=bench.md, timeout=60)
    deadline = time.monotonic() + timeout
    while True:
        w = bench.workflow.GetWorkflow(wp.GetWorkflowRequest(id=workflow_id), metadata=bench.md)
        if w.plan_status == wp.PLAN_STATUS_DONE:
            return w
        if w.plan_status == wp.PLAN_STATUS_ERROR:
            raise SystemExit(f"the plan of workflow {w.id} failed: {w.plan_error_message}")
        if time.monotonic() > deadline:
            raise SystemExit("the plan did not finish in time")
        time.sleep(0.5)  # the figures come from the service's timestamps


def _seconds(w: wp.Workflow) -> float:
    return (w.plan_completion_time.ToDatetime() - w.plan_start_time.ToDatetime()).total_seconds()


def _plan_jobs(bench, workflow_id: str) -> list[ep.Job]:
    found = bench.executor.ListJobs(ep.ListJobsRequest(workflow_id=workflow_id, page_size=1000), metadata=bench.md)
    return [j for j in found.jobs if j.action == ep.JOB_ACTION_PLAN]


def _job_seconds(j: ep.Job) -> float:
    return (j.end_time.ToDatetime() - j.start_time.ToDatetime()).total_seconds()


def _spread(values: list[float]) -> str:
    return f"{min(values):.1f} / {statistics.median(values):.1f} / {max(values):.1f} s"


def plan_figures(bench, blueprint_target: str, work: Path, dag_templates, dag_edges) -> list[str]:
    example = register(grpc.insecure_channel(blueprint_target), bench.md, publish_modules(work / "example-modules"),
                       prefix="bench-")
    example_runs, example_jobs = [], []
    for n in range(REPEATS):
        vpc = wp.TemplateVariables(template_id=example.template_ids["vpc"])
        vpc.variables.update({"cidr_block": f"10.{50 + n}.0.0/16"})
        w = bench.workflow.CreateWorkflow(wp.CreateWorkflowRequest(
            blueprint_id=example.blueprint.id, integration_ids=[bench.integration], variable_overrides=[vpc]),
            metadata=bench.md, timeout=60)
        done = _plan(bench, w.id)
        example_runs.append(_seconds(done))
        example_jobs += [_job_seconds(j) for j in _plan_jobs(bench, w.id)]
    planned = sum(1 for s in done.steps if s.plan.status == wp.STEP_PLAN_STATUS_PLANNED)
    deferred = len(done.steps) - planned

    overrides = []
    for tid, _ in dag_templates:
        values = struct_pb2.Struct()
        values.update({"in1": "given", "in2": "given", "in3": "given"})
        overrides.append(wp.TemplateVariables(template_id=tid, variables=values))
    dag_bp = bench.blueprint_of("plan-dag", dag_templates, dag_edges, {})
    runs: dict[int, list[float]] = {0: [], 1: []}  # max_parallel_steps: 0 (no limit, the default), 1
    for _ in range(REPEATS):
        for limit in runs:
            w = bench.workflow.CreateWorkflow(wp.CreateWorkflowRequest(
                blueprint_id=dag_bp, integration_ids=[bench.integration], variable_overrides=overrides,
                max_parallel_steps=limit), metadata=bench.md, timeout=60)
            done = _plan(bench, w.id)
            if len(jobs := _plan_jobs(bench, w.id)) != PLAN_DAG_STEPS:
                raise SystemExit(f"expected {PLAN_DAG_STEPS} plan jobs, found {len(jobs)}")
            runs[limit].append(_seconds(done))
    dag_runs, sequential = runs[0], runs[1]
    ratio = [s / r for s, r in zip(sequential, dag_runs)]
    return [
        "## Planning (PlanWorkflow)",
        "",
        f"PlanWorkflow start to the plan's end (the workflow service's own timestamps), {REPEATS} runs each "
        "(a new workflow each time), min / median / max; catalog copy warm (the templates were just used), "
        "same processes and workers as above, nothing else running.",
        "",
        "| measure | value | baseline (same run) | ratio (median) |",
        "|---|---|---|---|",
        f"| plan the example ({planned} step planned, {deferred} deferred) | "
        f"{_spread(example_runs)} | its plan job alone, median {statistics.median(example_jobs):.1f} s | "
        f"{statistics.median(example_runs) / statistics.median(example_jobs):.2f} |",
        f"| plan a {PLAN_DAG_STEPS}-step DAG, every step planned (no parallelism limit, the default) | "
        f"{_spread(dag_runs)} | the same workflow planned one step at a time (max_parallel_steps 1), "
        f"{_spread(sequential)} | {statistics.median(ratio):.2f}x faster |",
        "",
        "The DAG's plan jobs run in parallel (no parallelism limit on the workflow), but on two cores: each "
        "no-op `terraform init` + `plan` + `show` costs CPU, so the speed-up is bounded by the cores, not by "
        "the scheduler.",
        "",
    ]
