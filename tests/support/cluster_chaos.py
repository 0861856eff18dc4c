"""The platform on many machines' engines, with failures: a 3-node NATS
JetStream cluster (R3 streams), PostgreSQL, two replicas of every service
(the other services and the clients reach each pair through one gRPC target
listing both). Runs workflows of the seed's Production Environment, kills -9
one NATS node and one replica of each service while they run, and reports
what happened: the e2e test asserts on the report, `make bench-cluster`
writes it to docs/reliability.md."""
from __future__ import annotations

import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import sqlalchemy as sa

from infrakitchen.blueprint.v1 import blueprint_pb2 as bp
from infrakitchen.blueprint.v1 import blueprint_pb2_grpc
from infrakitchen.executor.v1 import executor_pb2 as ep
from infrakitchen.executor.v1 import executor_pb2_grpc
from infrakitchen.resource.v1 import resource_pb2 as rp
from infrakitchen.resource.v1 import resource_pb2_grpc
from infrakitchen.workflow.v1 import workflow_pb2 as wp
from infrakitchen.workflow.v1 import workflow_pb2_grpc
from services.common.config import SERVICES
from tests.support.nats_cluster import NatsCluster
from tests.support.processes import ROOT, ServiceProcesses, drop_streams
from tests.support.waiting import wait_for

ENDED = (wp.WORKFLOW_STATUS_DONE, wp.WORKFLOW_STATUS_ERROR)


@dataclass
class ChaosReport:
    workflows: int = 0
    workflows_done: int = 0
    steps: int = 0
    steps_done: int = 0
    kills: list[tuple[float, str]] = field(default_factory=list)  # (seconds into the run, what)
    apply_jobs: int = 0
    duplicate_applies: list[str] = field(default_factory=list)  # resources applied by more than one job
    reattempted_jobs: int = 0  # jobs run again by another executor after theirs died
    stuck: list[str] = field(default_factory=list)
    wall_seconds: float = 0.0
    after_kills_seconds: float = 0.0
    errors: list[str] = field(default_factory=list)


def run_cluster_chaos(work: Path, postgres, workflows: int = 10, kill_after_applies: int = 8,
                      timeout: float = 420.0) -> ChaosReport:
    report = ChaosReport(workflows=workflows)
    prefix = f"chaos{uuid.uuid4().hex[:6]}"
    # The services log in with their own NATS identities (made in their data directory).
    cluster = NatsCluster(work / "nats", identities=work / "data" / "nats-identities", prefix=prefix)
    cluster.start()
    databases = {name: postgres.create() for name in SERVICES}
    procs = ServiceProcesses(work / "data", prefix, cluster.url, database_urls=databases, extra_env={
        "IK_STREAM_REPLICAS": "3", "IK_LOG_LEVEL": "WARNING"})
    for name in SERVICES:
        procs.add_instance(f"{name}-b", name)
    for name in SERVICES:  # one target per service listing both replicas (pick_first fails over)
        procs.env[f"IK_{name.upper()}_TARGET"] = \
            f"ipv4:127.0.0.1:{procs.ports[name]},127.0.0.1:{procs.ports[name + '-b']}"
    try:
        procs.start(*procs.instances)
        md = procs.metadata()
        channels = {name: grpc.insecure_channel(procs.env[f"IK_{name.upper()}_TARGET"]) for name in SERVICES}
        workflow_api = workflow_pb2_grpc.WorkflowServiceStub(channels["workflow"])
        executor_api = executor_pb2_grpc.ExecutorServiceStub(channels["executor"])
        resource_api = resource_pb2_grpc.ResourceServiceStub(channels["resource"])
        blueprint_api = blueprint_pb2_grpc.BlueprintServiceStub(channels["blueprint"])

        env = {**procs.env, "IK_CONFIG_DIR": str(work / "config"), "IK_TOKEN": procs.token()}
        registered = subprocess.run([sys.executable, "-m", "cli", "example", "register"], cwd=ROOT, env=env,
                                    capture_output=True, text=True, timeout=240)
        if registered.returncode != 0:
            raise RuntimeError(f"example register failed: {registered.stdout}{registered.stderr}")
        [blueprint] = [b for b in blueprint_api.ListBlueprints(bp.ListBlueprintsRequest(), metadata=md).blueprints
                       if b.name == "Production Environment"]
        integrations = [i.id for i in executor_api.ListIntegrations(ep.ListIntegrationsRequest(),
                                                                    metadata=md).integrations]
        [storage] = executor_api.ListStorages(ep.ListStoragesRequest(), metadata=md).storages

        started = time.monotonic()
        ids = []
        for _ in range(workflows):
            w = workflow_api.CreateWorkflow(wp.CreateWorkflowRequest(
                blueprint_id=blueprint.id, integration_ids=integrations, storage_id=storage.id),
                metadata=md, timeout=60)
            workflow_api.ExecuteWorkflow(wp.ExecuteWorkflowRequest(id=w.id), metadata=md, timeout=60)
            ids.append(w.id)

        def applies_done() -> int:
            jobs = executor_api.ListJobs(ep.ListJobsRequest(page_size=1000), metadata=md).jobs
            return sum(j.action == ep.JOB_ACTION_APPLY and j.status == ep.JOB_STATUS_SUCCEEDED for j in jobs)
        wait_for(lambda: applies_done() >= kill_after_applies, timeout, f"{kill_after_applies} applies")
        # Mid-run: one NATS node, then the first replica of each service (the one every
        # pick_first target talks to), all with SIGKILL; none comes back.
        cluster.kill(0)
        report.kills.append((time.monotonic() - started, "NATS node 0"))
        for name in SERVICES:
            procs.stop(name, sig=signal.SIGKILL)
            report.kills.append((time.monotonic() - started, f"{name} replica a"))
        killed_at = time.monotonic()

        def all_ended():
            got = [workflow_api.GetWorkflow(wp.GetWorkflowRequest(id=i), metadata=md, timeout=10) for i in ids]
            return got if all(w.status in ENDED for w in got) else None
        try:
            ended = wait_for(all_ended, timeout, "the end of every workflow")
        except TimeoutError as exc:
            report.errors.append(str(exc))
            ended = [workflow_api.GetWorkflow(wp.GetWorkflowRequest(id=i), metadata=md, timeout=10) for i in ids]
        report.wall_seconds = time.monotonic() - started
        report.after_kills_seconds = time.monotonic() - killed_at
        report.workflows_done = sum(w.status == wp.WORKFLOW_STATUS_DONE for w in ended)
        report.steps = sum(len(w.steps) for w in ended)
        report.steps_done = sum(s.status == wp.STEP_STATUS_DONE for w in ended for s in w.steps)
        report.errors += [f"workflow {w.id}: {w.error_message}" for w in ended if w.status != wp.WORKFLOW_STATUS_DONE]

        time.sleep(3)  # the resource service applies the last events on its own
        jobs = [j for j in executor_api.ListJobs(ep.ListJobsRequest(page_size=1000), metadata=md).jobs
                if j.correlation.workflow_id in ids]
        applies: dict[str, list] = {}
        for j in jobs:
            if j.action == ep.JOB_ACTION_APPLY:
                applies.setdefault(j.correlation.resource_id, []).append(j)
            if j.status in (ep.JOB_STATUS_QUEUED, ep.JOB_STATUS_RUNNING):
                report.stuck.append(f"job {j.id} {ep.JobStatus.Name(j.status)}")
        report.apply_jobs = sum(len(v) for v in applies.values())
        report.duplicate_applies = [r for r, v in applies.items()
                                    if sum(j.status == ep.JOB_STATUS_SUCCEEDED for j in v) > 1 or len(v) > 1]
        report.reattempted_jobs = sum(j.attempt > 1 for j in jobs)
        for w in ended:
            for s in w.steps:
                r = resource_api.GetResource(rp.GetResourceRequest(id=s.resource_id), metadata=md) \
                    if s.resource_id else None
                if r is None or (r.state, r.status) != (rp.RESOURCE_STATE_PROVISIONED, rp.RESOURCE_STATUS_DONE):
                    report.stuck.append(f"step {s.id} resource {s.resource_id or '-'}: "
                                        f"{rp.ResourceState.Name(r.state) if r else 'none'}/"
                                        f"{rp.ResourceStatus.Name(r.status) if r else '-'}")
        report.stuck += _outbox_leftovers(databases)
        for channel in channels.values():
            channel.close()
    finally:
        procs.stop()
        try:
            drop_streams(cluster.url, prefix, cluster.connect_options())
        except Exception:  # noqa: BLE001 - the cluster goes away with its store anyway
            pass
        cluster.stop()
    return report


def _outbox_leftovers(databases: dict[str, str]) -> list[str]:
    """Outbox rows never published, per service database."""
    out = []
    for name, url in databases.items():
        engine = sa.create_engine(url)
        try:
            with engine.connect() as conn:
                count = conn.execute(sa.text("SELECT count(*) FROM outbox")).scalar_one()
        finally:
            engine.dispose()
        if count:
            out.append(f"{name}: {count} outbox rows unpublished")
    return out


def describe(report: ChaosReport) -> str:
    kills = ", ".join(f"{what} at {at:.0f} s" for at, what in report.kills)
    return (f"workflows {report.workflows_done}/{report.workflows} done, steps {report.steps_done}/{report.steps}, "
            f"kills: {kills}; apply jobs {report.apply_jobs}, duplicates {len(report.duplicate_applies)}, "
            f"jobs run again after their executor died {report.reattempted_jobs}, stuck {len(report.stuck)}; "
            f"{report.wall_seconds:.0f} s in all, {report.after_kills_seconds:.0f} s after the kills"
            + (f"; errors: {report.errors}" if report.errors else "") + (f"; stuck: {report.stuck}" if report.stuck
                                                                          else ""))
