"""`make bench-cluster`: the platform on a 3-node NATS cluster (R3 streams),
PostgreSQL and two replicas of every service, with one NATS node and one
replica of each service killed (SIGKILL) mid-run; 10 workflows of the seed's
example per run, 3 runs. Writes docs/reliability.md with --write."""
from __future__ import annotations

import argparse
import datetime as dt
import platform
import statistics
import tempfile
from pathlib import Path

from tests.support.cluster_chaos import describe, run_cluster_chaos
from tests.support.databases import PostgresDatabases

RUNS = 3
WORKFLOWS = 10


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--write", action="store_true", help="also write docs/reliability.md")
    parser.add_argument("--runs", type=int, default=RUNS)
    args = parser.parse_args()
    databases = PostgresDatabases()
    reports = []
    try:
        for n in range(args.runs):
            print(f"run {n + 1}/{args.runs} ...", flush=True)
            reports.append(run_cluster_chaos(Path(tempfile.mkdtemp(prefix="ik-cluster-")), databases,
                                             workflows=WORKFLOWS))
            print(describe(reports[-1]), flush=True)
    finally:
        databases.drop_all()
    walls = sorted(r.wall_seconds for r in reports)
    after = sorted(r.after_kills_seconds for r in reports)
    lines = [
        "# Reliability",
        "",
        f"Measured {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC by `make bench-cluster` "
        f"(`python -m bench.cluster_bench --write`) on {platform.node()}: {platform.machine()}, Python "
        f"{platform.python_version()}, everything on this one 2-core machine: a 3-node NATS JetStream cluster "
        "(three nats-server processes on loopback ports, streams with 3 replicas), PostgreSQL (one database per "
        "service), two replicas of every service (the others reach each pair through one gRPC target listing "
        "both, pick_first), the product's defaults otherwise (2 workers per executor, 6 s job lease, "
        f"reconcilers every 5 s). Each run starts {WORKFLOWS} workflows of the seed's Production Environment "
        "(VPC, then EKS and RDS: 3 steps each) at once; once 8 applies succeeded it kills with SIGKILL NATS "
        "node 0 and the first replica of each of the five services, and none of them comes back.",
        "",
        "| run | workflows done | steps done | kills | apply jobs | duplicate applies | jobs run again "
        "(their executor died) | stuck | wall time | after the kills |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *[f"| {n + 1} | {r.workflows_done}/{r.workflows} | {r.steps_done}/{r.steps} | {len(r.kills)} | "
          f"{r.apply_jobs} | {len(r.duplicate_applies)} | {r.reattempted_jobs} | {len(r.stuck)} | "
          f"{r.wall_seconds:.0f} s | {r.after_kills_seconds:.0f} s |" for n, r in enumerate(reports)],
        "",
        f"Wall time min / median / max: {walls[0]:.0f} / {statistics.median(walls):.0f} / {walls[-1]:.0f} s; "
        f"from the kills to the last workflow's end: {after[0]:.0f} / {statistics.median(after):.0f} / "
        f"{after[-1]:.0f} s.",
        "",
        "Duplicate applies count resources applied by more than one job (a duplicated event that started a "
        "second job); a job run again is one job whose executor died mid-apply, taken by the other executor "
        "once its lease ran out (its attempts never overlap: the lease). Stuck counts jobs still queued or "
        "running, resources not provisioned/done and outbox rows never published after every workflow ended. "
        "`tests/e2e/test_cluster.py` runs the same scenario once in CI and asserts every workflow done, no "
        "duplicate and nothing stuck.",
        "",
    ]
    report = "\n".join(lines)
    print(report)
    if args.write:
        Path(__file__).resolve().parents[1].joinpath("docs", "reliability.md").write_text(report)


if __name__ == "__main__":
    main()
