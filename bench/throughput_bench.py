"""Throughput figures of `make bench`: 20 workflows of a 10-step chain of a
no-op module started at once, 3 rounds, with the product's defaults; steps per second,
each service's CPU per step (from /proc), and the executor's own time per job
before terraform's first command (checkout, files, sandbox set-up), against
the job's whole duration, from the job logs' timestamps."""
from __future__ import annotations

import datetime as dt
import os
import sqlite3
import statistics
import time

from services.common.config import SERVICES

WORKFLOWS = 20
STEPS = 10


def _cpu_seconds(pid: int) -> tuple[float, float]:
    """(user + system CPU of the process itself, of its finished children) so far."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / tick, (int(fields[13]) + int(fields[14])) / tick


def _first_command_times(data_dir, job_ids: list[str]) -> dict[str, dt.datetime]:
    """Job id -> the time of its first terraform command line in its log."""
    marks = ",".join("?" * len(job_ids))
    with sqlite3.connect(data_dir / "executor.db") as conn:
        rows = conn.execute(f"SELECT job_id, MIN(time) FROM job_logs WHERE job_id IN ({marks}) "
                            f"AND text LIKE '$ %' GROUP BY job_id", job_ids).fetchall()
    out = {}
    for job_id, text in rows:
        moment = dt.datetime.fromisoformat(text)
        out[job_id] = moment if moment.tzinfo else moment.replace(tzinfo=dt.timezone.utc)
    return out


def throughput_figures(bench, procs, chain_templates, repeats: int = 3) -> list[str]:
    blueprint_id = bench.blueprint_of("throughput", chain_templates[:STEPS], [(n, n + 1) for n in range(STEPS - 1)],
                                      {})
    rates, cpu, terraform_cpu, overhead, whole = [], {name: 0.0 for name in SERVICES}, 0.0, [], []
    for _ in range(repeats):
        before = {name: _cpu_seconds(procs.procs[name].pid) for name in SERVICES}
        started = time.monotonic()
        runs = bench.wait([bench.run(blueprint_id) for _ in range(WORKFLOWS)])
        rates.append(WORKFLOWS * STEPS / (time.monotonic() - started))
        after = {name: _cpu_seconds(procs.procs[name].pid) for name in SERVICES}
        for name in SERVICES:
            cpu[name] += after[name][0] - before[name][0]
        terraform_cpu += after["executor"][1] - before["executor"][1]
        jobs = [j for w in runs for j in bench.jobs(w.id).values()]
        first = _first_command_times(procs.data_dir, [j.id for j in jobs])
        for j in jobs:
            start, end = j.start_time.ToDatetime(dt.timezone.utc), j.end_time.ToDatetime(dt.timezone.utc)
            if j.id in first:
                overhead.append((first[j.id] - start).total_seconds())
                whole.append((end - start).total_seconds())
    steps = WORKFLOWS * STEPS * repeats
    share = statistics.median(overhead) / statistics.median(whole)
    rates.sort()
    return [
        "## Throughput",
        "",
        f"{WORKFLOWS} workflows of a {STEPS}-step chain (no-op module) started at once, the product's defaults "
        f"(2 executor workers), {repeats} rounds; CPU read from /proc for each service process over the rounds.",
        "",
        "| measure | value | baseline (same run) | ratio |",
        "|---|---|---|---|",
        f"| steps per second, min / median / max of {repeats} rounds | {rates[0]:.2f} / "
        f"{statistics.median(rates):.2f} / {rates[-1]:.2f} | | |",
        *[f"| {name} service CPU per step | {cpu[name] / steps * 1000:.0f} ms | terraform's CPU per step "
          f"(the executor's children) {terraform_cpu / steps * 1000:.0f} ms | "
          f"{cpu[name] / max(terraform_cpu, 1e-9):.2f} |" for name in SERVICES],
        f"| executor's own time before terraform's first command, per job (p50 of {len(overhead)}) | "
        f"{statistics.median(overhead) * 1000:.0f} ms | the job's whole duration, p50 "
        f"{statistics.median(whole) * 1000:.0f} ms | {share:.2f} ({'met' if share <= 0.10 else 'missed'}: <= 0.10) |",
        "",
        "The executor's own time counts from the job's start (stamped by the worker as it begins) to the log line "
        "of terraform's first command: the source tree (a commit checked out before is copied, not cloned), the "
        "backend and variable files, the sandbox's set-up. Terraform's own process start inside the sandbox is part "
        "of the commands' time, not of this figure. A service's CPU is its own process's; terraform's is counted "
        "apart.",
        "",
    ]
