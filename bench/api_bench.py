"""`make bench-api`: reads and catalog operations at scale, with the five
services as separate processes (product defaults), measured from a gRPC
client on the same machine.

1. Resources: N resources seeded straight into the resource service's
   database (SQLite, then PostgreSQL; a benchmark may write there, services
   never do), then GetResource and ListResources pages of 100: p50 of the
   first page, and the last page (reached by following the tokens) against
   the first;
2. The catalog at 500 templates: CreateBlueprint, PreviewBlueprint and
   CreateWorkflow of a 500-template blueprint (a chain of wiring rules);
3. A burst of 10,000 CreateResource calls, 8 in flight (SQLite): the peak
   size of each service's WAL file at any moment (sampled every 5 ms), the
   bound being the default IK_SQLITE_WAL_LIMIT.
Each figure: min / median / max over the repeats stated beside it."""
from __future__ import annotations

import argparse
import concurrent.futures
import datetime as dt
import platform
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import grpc
import sqlalchemy as sa

from bench.workflow_bench import MODULE
from infrakitchen.blueprint.v1 import blueprint_pb2 as bp
from infrakitchen.blueprint.v1 import blueprint_pb2_grpc
from infrakitchen.resource.v1 import resource_pb2 as rp
from infrakitchen.resource.v1 import resource_pb2_grpc
from infrakitchen.workflow.v1 import workflow_pb2 as wp
from infrakitchen.workflow.v1 import workflow_pb2_grpc
from services.common.config import SERVICES
from services.common.db import DEFAULT_WAL_LIMIT, create_sync_engine
from services.resource.adapters.tables import resource_labels, resources
from tests.support.databases import PostgresDatabases
from tests.support.gitrepos import ModuleRepo
from tests.support.processes import ServiceProcesses, drop_streams

REPEATS = 30


def timed(call) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def spread_ms(values: list[float]) -> str:
    return f"{min(values) * 1000:.1f} / {statistics.median(values) * 1000:.1f} / {max(values) * 1000:.1f} ms"


def seed(url: str, template_id: str, count: int) -> list[str]:
    """`count` abstract resources (records only), oldest first, every tenth labelled."""
    engine = create_sync_engine(url)
    base = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    ids = [str(uuid.uuid4()) for _ in range(count)]
    try:
        with engine.begin() as conn:
            for start in range(0, count, 5000):
                rows, labels = [], []
                for n in range(start, min(count, start + 5000)):
                    moment = base + dt.timedelta(milliseconds=n)
                    rows.append(dict(
                        id=ids[n], name=f"r-{n:06d}", template_id=template_id, source_code_version_id="",
                        description="", state="provisioned", status="done", abstract=True, variables={},
                        sensitive_variables=[], outputs=[], parent_ids=[], dependency_tags=[],
                        dependency_configs=[], integration_ids=[], secret_ids=[], storage_id="", storage_path="",
                        workspace="", labels=["tenth"] if n % 10 == 0 else [], revision=1, owners=["bench"],
                        creator="bench", error_message="", last_job_id="", last_job_action="", job_request_id="",
                        pending_operation="", temporary_state_id="", plan_job_id="", approval_request_id="",
                        workflow_id="", step_id="", ever_provisioned=False, last_dry_run={}, create_time=moment,
                        update_time=moment, version=1))
                    if n % 10 == 0:
                        labels.append(dict(label="tenth", resource_id=ids[n], create_time=moment))
                conn.execute(sa.insert(resources), rows)
                conn.execute(sa.insert(resource_labels), labels)
        if engine.dialect.name == "postgresql":  # statistics, as autovacuum keeps them on a live database
            with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                conn.execute(sa.text("ANALYZE resources"))
                conn.execute(sa.text("ANALYZE resource_labels"))
    finally:
        engine.dispose()
    return ids


def resource_figures(procs: ServiceProcesses, url: str, count: int, label: str) -> list[str]:
    md = procs.metadata()
    blueprint = blueprint_pb2_grpc.BlueprintServiceStub(grpc.insecure_channel(procs.target("blueprint")))
    stub = resource_pb2_grpc.ResourceServiceStub(grpc.insecure_channel(procs.target("resource")))
    template = blueprint.CreateTemplate(bp.CreateTemplateRequest(template=bp.Template(
        key=f"seed-{uuid.uuid4().hex[:6]}", name="Seed", enabled=True, abstract=True)), metadata=md)
    print(f"{label}: seeding {count} resources ...", flush=True)
    ids = seed(url, template.id, count)
    picks = [ids[(n * 7919) % count] for n in range(REPEATS * 4)]
    get = [timed(lambda i=i: stub.GetResource(rp.GetResourceRequest(id=i), metadata=md)) for i in picks]
    first = [timed(lambda: stub.ListResources(rp.ListResourcesRequest(page_size=100), metadata=md))
             for _ in range(REPEATS)]
    print(f"{label}: following every page ...", flush=True)
    token, pages, walk = "", 0, time.perf_counter()
    while True:
        page = stub.ListResources(rp.ListResourcesRequest(page_size=100, page_token=token), metadata=md)
        pages += 1
        if not page.next_page_token:
            break
        last_token, token = token, page.next_page_token
    walk = time.perf_counter() - walk
    last = [timed(lambda: stub.ListResources(rp.ListResourcesRequest(page_size=100, page_token=last_token),
                                             metadata=md)) for _ in range(REPEATS)]
    labelled = [timed(lambda: stub.ListResources(rp.ListResourcesRequest(page_size=100, label="tenth"),
                                                 metadata=md)) for _ in range(REPEATS)]
    ratio = statistics.median(last) / statistics.median(first)
    return [
        f"| {label}: GetResource at {count} resources ({len(get)} calls) | {spread_ms(get)} | p50 <= 2 ms | "
        f"{'met' if statistics.median(get) <= 0.002 else 'missed'} |",
        f"| {label}: first page of 100 ({REPEATS} calls) | {spread_ms(first)} | p50 <= 10 ms | "
        f"{'met' if statistics.median(first) <= 0.010 else 'missed'} |",
        f"| {label}: last page of 100 (page {pages}, {REPEATS} calls) | {spread_ms(last)} | <= 1.2x the first | "
        f"{ratio:.2f}x, {'met' if ratio <= 1.2 else 'missed'} |",
        f"| {label}: first page of a label on every tenth ({REPEATS} calls) | {spread_ms(labelled)} | | |",
        f"| {label}: all {pages} pages, one after another | {walk:.1f} s | | |",
    ]


def catalog_figures(procs: ServiceProcesses, repo_url: str, count: int) -> list[str]:
    md = procs.metadata()
    blueprint = blueprint_pb2_grpc.BlueprintServiceStub(grpc.insecure_channel(procs.target("blueprint")))
    workflow = workflow_pb2_grpc.WorkflowServiceStub(grpc.insecure_channel(procs.target("workflow")))
    print(f"catalog: registering {count} templates ...", flush=True)
    members = []
    for n in range(count):
        t = blueprint.CreateTemplate(bp.CreateTemplateRequest(template=bp.Template(
            key=f"cat-{n}", name=f"cat {n:03d}", enabled=True)), metadata=md)
        v = blueprint.CreateSourceCodeVersion(bp.CreateSourceCodeVersionRequest(
            template_id=t.id, source=bp.ModuleSource(repository_url=repo_url, ref="v1", path="step"),
            is_default=True), metadata=md, timeout=60)
        members.append(bp.BlueprintTemplate(template_id=t.id, source_code_version_id=v.id))
    wiring = [bp.WiringRule(source_template_id=members[n].template_id, source_output="done",
                            target_template_id=members[n + 1].template_id, target_variable="in1")
              for n in range(count - 1)]
    create, preview, workflows, made = [], [], [], []
    for n in range(3):
        started = time.perf_counter()
        b = blueprint.CreateBlueprint(bp.CreateBlueprintRequest(blueprint=bp.Blueprint(
            name=f"catalog-{n}", templates=members, wiring_rules=wiring)), metadata=md, timeout=120)
        create.append(time.perf_counter() - started)
        made.append(b.id)
    for b in made:
        preview.append(timed(lambda b=b: blueprint.PreviewBlueprint(bp.PreviewBlueprintRequest(id=b), metadata=md,
                                                                     timeout=120)))
        workflows.append(timed(lambda b=b: workflow.CreateWorkflow(wp.CreateWorkflowRequest(blueprint_id=b),
                                                                   metadata=md, timeout=120)))

    def row(what, values, target):
        met = "met" if statistics.median(values) <= target else "missed"
        return (f"| {what} | {min(values):.2f} / {statistics.median(values):.2f} / {max(values):.2f} s | "
                f"<= {target} s | {met} |")
    return [row(f"CreateBlueprint of {count} templates (3 blueprints)", create, 0.3),
            row(f"PreviewBlueprint of {count} templates (3 calls)", preview, 0.1),
            row(f"CreateWorkflow of {count} steps (3 workflows)", workflows, 0.5)]


def burst_figures(procs: ServiceProcesses, data_dir: Path, count: int = 10_000, inflight: int = 8) -> list[str]:
    """`count` creates of records (an abstract template: no job), `inflight`
    at a time, while a thread samples every service's WAL file size."""
    md = procs.metadata()
    blueprint = blueprint_pb2_grpc.BlueprintServiceStub(grpc.insecure_channel(procs.target("blueprint")))
    stub = resource_pb2_grpc.ResourceServiceStub(grpc.insecure_channel(procs.target("resource")))
    template = blueprint.CreateTemplate(bp.CreateTemplateRequest(template=bp.Template(
        key=f"burst-{uuid.uuid4().hex[:6]}", name="Burst", enabled=True, abstract=True)), metadata=md)
    peaks = dict.fromkeys(SERVICES, 0)
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            for name in SERVICES:
                try:
                    peaks[name] = max(peaks[name], (data_dir / f"{name}.db-wal").stat().st_size)
                except FileNotFoundError:
                    pass
            stop.wait(0.005)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    print(f"burst: {count} CreateResource, {inflight} in flight ...", flush=True)
    started = time.perf_counter()
    try:
        with concurrent.futures.ThreadPoolExecutor(inflight) as pool:
            list(pool.map(lambda n: stub.CreateResource(rp.CreateResourceRequest(resource=rp.Resource(
                name=f"burst-{n:05d}", template_id=template.id)), metadata=md, timeout=60), range(count)))
        took = time.perf_counter() - started
        time.sleep(5)  # the consumers of the creates' events catch up
    finally:
        stop.set()
        sampler.join()
    worst = max(peaks.values())
    sizes = ", ".join(f"{name} {peaks[name] / 2**20:.1f}" for name in SERVICES)
    return [f"| SQLite: peak WAL size during {count} CreateResource ({inflight} in flight, {took:.0f} s, then 5 s) "
            f"by service, MiB | {sizes} | <= {DEFAULT_WAL_LIMIT // 2**20} MiB | "
            f"{'met' if worst <= DEFAULT_WAL_LIMIT else 'missed'} |"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nats", default="nats://127.0.0.1:4222")
    parser.add_argument("--resources", type=int, default=100_000)
    parser.add_argument("--templates", type=int, default=500)
    parser.add_argument("--burst", type=int, default=10_000, help="CreateResource calls of the write burst")
    parser.add_argument("--write", action="store_true", help="also write docs/performance-api.md")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ik-bench-api-"))
    repo = ModuleRepo(work / "modules")
    repo.write("step/main.tf", MODULE)
    repo.commit("bench module", tag="v1")
    lines = [
        "# Performance at scale (reads and the catalog)\n",
        f"Measured {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC by `make bench-api` on {platform.node()}: "
        f"{platform.machine()}, Python {platform.python_version()}; the five services as processes with the "
        "product's defaults (2 executor workers, catalog cache on), NATS {nats}; one client calling one request "
        "at a time, nothing else running. min / median / max.\n".replace("{nats}", args.nats),
        "| measure | value | target | |", "|---|---|---|---|"]
    pg = PostgresDatabases()
    for label, urls in (("SQLite", {}), ("PostgreSQL", {"resource": pg.create()})):
        prefix = f"benchapi{uuid.uuid4().hex[:6]}"
        procs = ServiceProcesses(work / f"data-{label}", prefix, args.nats, database_urls=urls,
                                 extra_env={"IK_LOG_LEVEL": "WARNING"})
        procs.start()
        try:
            url = urls.get("resource") or f"sqlite:///{work / f'data-{label}' / 'resource.db'}"
            lines += resource_figures(procs, url, args.resources, label)
            if label == "SQLite":
                lines += catalog_figures(procs, repo.url, args.templates)
                lines += burst_figures(procs, work / f"data-{label}", args.burst)
        finally:
            procs.stop()
            drop_streams(args.nats, prefix)
    pg.drop_all()
    report = "\n".join(lines) + "\n"
    print(report)
    if args.write:
        Path(__file__).resolve().parents[1].joinpath("docs", "performance-api.md").write_text(report)


if __name__ == "__main__":
    sys.exit(main())
