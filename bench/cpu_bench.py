"""CPU figures of `make bench`: what each service spends per workflow step, and where.

One workflow of a 21-step chain of a no-op module, run alone (nothing else in
flight), after one such run to warm up:

1. CPU, measured from outside (/proc/<pid>/task/*/stat: the process's own
   threads, user + system; terraform's processes are not counted) from
   CreateWorkflow until the workflow is done and every service's outbox is
   empty, plus SETTLE seconds for the last events' consumers; then the same
   services idle for a period of the same length. CPU per step = (run -
   idle) / steps, in CPU_ROUNDS rounds (median, min-max). The bench watches
   the workflow's status in workflow.db (read from this process), not over
   gRPC, so its polling costs the services nothing. The machine's other load
   (from /proc/stat) is reported beside it.
2. Profiles (services/common/profiling.py; the services run with
   IK_PROFILE_DIR and IK_PROFILE_FROM=signal): the same chain run
   PROFILE_RUNS times under the CPU sampler (where the CPU goes, per function
   and line), once under cProfile (call counts, SQL statements and commits
   per step), and the idle period under the sampler (what runs when nothing
   happens). The files are written to the profile directory, named
   `<window>-<service>.*`; `summary.txt` there holds what this prints.
"""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import statistics
import time
from collections import defaultdict
from pathlib import Path

from services.common.config import SERVICES

STEPS = 21
SETTLE = 2.0  # seconds after the outboxes emptied, for the consumers of the last events
PROFILE_RUNS = 3
CPU_ROUNDS = 3  # measured runs, each with its idle period
TOP = 12
ROOT = Path(__file__).resolve().parents[1]


def _ours(function: str) -> bool:
    """A function of the services' code (not a library's)."""
    return "/services/" in function and "/site-packages/" not in function


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) so far of each thread of a process, by
    thread name ("main" for its first thread; threads of one name add up)."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = defaultdict(float)
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            raw = (task / "stat").read_text()
        except OSError:
            continue
        name = "main" if int(task.name) == pid else raw[raw.index("(") + 1:raw.rindex(")")]
        fields = raw.rsplit(")", 1)[1].split()
        out[name] += (int(fields[11]) + int(fields[12])) / tick
    return dict(out)


def _cpu_all(procs) -> dict[str, dict[str, float]]:
    return {name: thread_cpu(procs.procs[name].pid) for name in SERVICES}


def _delta(after, before) -> dict[str, dict[str, float]]:
    return {name: {t: after[name][t] - before[name].get(t, 0.0) for t in after[name]} for name in SERVICES}


def _scalar(data_dir: Path, db: str, sql: str, args=()):
    with sqlite3.connect(data_dir / db, timeout=5) as conn:
        return conn.execute(sql, args).fetchone()[0]


def _run_alone(bench, procs, blueprint_id: str, timeout: float = 600) -> float:
    """Runs one workflow to its end and waits until the services settled;
    returns its wall time (workflow done)."""
    started = time.monotonic()
    workflow_id = bench.run(blueprint_id)
    deadline = started + timeout
    while True:
        status = _scalar(procs.data_dir, "workflow.db", "SELECT status FROM workflows WHERE id = ?", (workflow_id,))
        if status == "error":
            raise SystemExit(f"workflow {workflow_id} failed")
        if status == "done":
            break
        if time.monotonic() > deadline:
            raise SystemExit("the CPU bench's workflow did not finish in time")
        time.sleep(0.2)
    wall = time.monotonic() - started
    while any(_scalar(procs.data_dir, f"{name}.db", "SELECT count(*) FROM outbox") for name in SERVICES):
        if time.monotonic() > deadline:
            raise SystemExit("the outboxes did not empty")
        time.sleep(0.2)
    time.sleep(SETTLE)
    return wall


class _Window:
    """A profiling window in every service: `window` file, SIGUSR1; at the end SIGUSR2 and its files."""

    def __init__(self, procs, directory: Path, label: str, mode: str):
        self.procs, self.directory, self.label, self.mode = procs, directory, label, mode

    def __enter__(self):
        (self.directory / "window").write_text(f"{self.label} {self.mode}\n")
        for name in SERVICES:
            os.kill(self.procs.procs[name].pid, signal.SIGUSR1)
        time.sleep(0.5)  # the services' loops take the signal
        return self

    def __exit__(self, *exc):
        for name in SERVICES:
            os.kill(self.procs.procs[name].pid, signal.SIGUSR2)
        deadline = time.monotonic() + 60
        files = [self.directory / f"{self.label}-{name}.json" for name in SERVICES]
        while not all(f.exists() for f in files):
            if time.monotonic() > deadline:
                raise SystemExit(f"profiles missing: {[str(f) for f in files if not f.exists()]}")
            time.sleep(0.2)
        time.sleep(0.3)  # the .json is written last; let the writes finish
        self.meta = {name: json.loads(f.read_text()) for name, f in zip(SERVICES, files)}


def _short(function: str) -> str:
    """A profile's function name, with the repository's and the library's paths cut."""
    if _ours(function):
        return "services/" + function.split("/services/", 1)[1]
    for root in ("/site-packages/", "/lib/python3.11/"):
        if root in function:
            return function.split(root, 1)[1]
    return function


def _machine() -> float:
    """Busy CPU seconds of the whole machine (all cores) so far: all but idle and iowait."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def _children_cpu(pid: int) -> float:
    """CPU seconds of a process's reaped children so far (the executor's: terraform)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK")


def _round(bench, procs, blueprint_id: str) -> dict:
    """One measured run and the idle period of the same length after it."""
    executor = procs.procs["executor"].pid
    before, busy0, tf0 = _cpu_all(procs), _machine(), _children_cpu(executor)
    started = time.monotonic()
    wall = _run_alone(bench, procs, blueprint_id)
    window = time.monotonic() - started
    run, busy, terraform = _delta(_cpu_all(procs), before), _machine() - busy0, _children_cpu(executor) - tf0
    before, busy0 = _cpu_all(procs), _machine()
    time.sleep(window)
    idle, idle_busy = _delta(_cpu_all(procs), before), _machine() - busy0
    services = sum(sum(run[n].values()) for n in SERVICES)
    idle_services = sum(sum(idle[n].values()) for n in SERVICES)
    return {"wall": wall, "window": window, "run": run, "idle": idle,
            "above": {n: (sum(run[n].values()) - sum(idle[n].values())) / STEPS for n in SERVICES},
            "main": {n: (run[n].get("main", 0.0) - idle[n].get("main", 0.0)) / STEPS for n in SERVICES},
            "terraform": terraform, "others": busy - services - terraform, "idle_others": idle_busy - idle_services}


def cpu_figures(bench, procs, chain_templates, profile_dir: Path, profile_runs: int = PROFILE_RUNS,
                rounds: int = CPU_ROUNDS) -> tuple[list[str], float]:
    """The report's lines, and the five services' CPU per step above idle
    (seconds; the median round's)."""
    profile_dir.mkdir(parents=True, exist_ok=True)
    blueprint_id = bench.blueprint_of(f"cpu{STEPS}", chain_templates[:STEPS],
                                      [(n, n + 1) for n in range(STEPS - 1)], {})
    _run_alone(bench, procs, blueprint_id)  # warm-up: the catalog copy, the checkout cache, lazy imports
    measured = [_round(bench, procs, blueprint_id) for _ in range(rounds)]
    with _Window(procs, profile_dir, f"chain{STEPS}-sample", "sample") as sampled:
        before = _cpu_all(procs)
        for _ in range(profile_runs):
            _run_alone(bench, procs, blueprint_id)
        sampled_cpu = _delta(_cpu_all(procs), before)
    with _Window(procs, profile_dir, f"chain{STEPS}-cprofile", "cprofile") as counted:
        _run_alone(bench, procs, blueprint_id)
    window = statistics.median(r["window"] for r in measured)
    with _Window(procs, profile_dir, "idle-sample", "sample") as idled:
        time.sleep(window)

    def spread(values) -> str:
        values = sorted(v * 1000 for v in values)
        return f"{statistics.median(values):.1f} ({values[0]:.1f}-{values[-1]:.1f})" if len(values) > 1 \
            else f"{values[0]:.1f}"
    whole_rounds = [sum(r["above"].values()) for r in measured]
    whole = statistics.median(whole_rounds)
    middle = sorted(measured, key=lambda r: sum(r["above"].values()))[len(measured) // 2]
    sampled_steps = STEPS * profile_runs
    run_cpu = {n: statistics.median(sum(r["run"][n].values()) for r in measured) for n in SERVICES}
    inflation = {n: sum(sampled_cpu[n].values()) / profile_runs / max(run_cpu[n], 1e-9) for n in SERVICES}
    others = statistics.median(r["others"] / r["window"] for r in measured)
    idle_others = statistics.median(r["idle_others"] / r["window"] for r in measured)
    out = [
        "## CPU per step",
        "",
        f"One workflow of a {STEPS}-step chain (no-op module) run alone after a warm-up run, in {rounds} rounds; "
        f"each service's CPU (user + system of its own threads, from /proc; terraform's processes are not counted) "
        f"from CreateWorkflow until the workflow is done, every outbox is empty and {SETTLE:g} s more (median "
        f"{window:.1f} s; the workflow took a median {statistics.median(r['wall'] for r in measured):.1f} s), minus "
        f"the same services' CPU over the idle period of the same length that follows, divided by {STEPS} steps: "
        f"median (min-max) of the rounds. SQL statements and commits per step are counted in the services "
        f"(SQLAlchemy events) over the run under cProfile. Beside the services' own CPU, the machine was busy "
        f"{others:.2f} cores on average during the runs (terraform's processes, of which only "
        f"{statistics.median(r['terraform'] for r in measured) / STEPS * 1000:.0f} ms per step reach the executor's "
        f"children's accounting; NATS; this bench; any other process) and {idle_others:.2f} cores during the idle "
        f"periods (anything else on the machine: near 0 when nothing else ran).",
        "",
        "| service | CPU per step above idle | of which the event loop's thread | run CPU | idle CPU (same length) "
        "| SQL statements per step | commits per step |",
        "|---|---|---|---|---|---|---|",
        *[f"| {n} | {spread(r['above'][n] for r in measured)} ms | {spread(r['main'][n] for r in measured)} ms | "
          f"{sum(middle['run'][n].values()) * 1000:.0f} ms | {sum(middle['idle'][n].values()) * 1000:.0f} ms | "
          f"{counted.meta[n]['sql']['statements'] / STEPS:.1f} | "
          f"{counted.meta[n]['sql']['commits'] / STEPS:.1f} |" for n in SERVICES],
        f"| all five | {spread(whole_rounds)} ms | {spread(sum(r['main'].values()) for r in measured)} ms | "
        f"{sum(sum(middle['run'][n].values()) for n in SERVICES) * 1000:.0f} ms | "
        f"{sum(sum(middle['idle'][n].values()) for n in SERVICES) * 1000:.0f} ms | "
        f"{sum(counted.meta[n]['sql']['statements'] for n in SERVICES) / STEPS:.1f} | "
        f"{sum(counted.meta[n]['sql']['commits'] for n in SERVICES) / STEPS:.1f} |",
        "",
        f"Target: the five services together <= 40 ms of CPU per step above idle: {whole * 1000:.1f} ms, "
        f"{'met' if whole <= 0.040 else 'missed'}.",
        "",
        f"Profiles of each service: {profile_dir} (`chain{STEPS}-sample-<service>.txt`: where the CPU goes, by "
        f"function and line, over {profile_runs} runs of the chain; `.collapsed` for a flame graph; "
        f"`chain{STEPS}-cprofile-<service>.prof`/`.txt`: call counts of one run; `idle-sample-<service>.txt`: what "
        f"runs while idle; `summary.txt`: this section and the hot spots below). CPU under the sampler, against "
        f"the runs above: " + ", ".join(f"{n} {inflation[n]:.2f}x" for n in SERVICES) + ".",
        "",
    ]
    shown = profile_dir.relative_to(ROOT) if profile_dir.is_relative_to(ROOT) else profile_dir
    out = [line.replace(str(profile_dir), str(shown)) for line in out]
    detail = _hot_spots(profile_dir, sampled.meta, counted.meta, idled.meta, sampled_steps)
    (profile_dir / "summary.txt").write_text("\n".join(out + detail) + "\n")
    return out + detail, whole


def _entries(path: Path) -> dict[str, float]:
    """CPU seconds of a sampled window by what the event loop was running: the
    task's coroutine (or callback) under the loop's `_run`, from `.collapsed`."""
    out: dict[str, float] = defaultdict(float)
    for line in path.read_text().splitlines():
        stack, _, weight = line.rpartition(" ")
        frames = stack.split(";")
        at = next((i for i, f in enumerate(frames) if f.startswith("_run (events.py")), None)
        if at is None:
            entry = "the loop itself (select, timers, wake-ups)"
        elif at + 1 < len(frames):
            entry = frames[at + 1]
        else:
            entry = "callbacks (futures, timers)"
        out[entry] += int(weight) / 1e6
    return out


def _calls(path: Path) -> dict[str, int]:
    """Function -> calls, from a cProfile window's .prof (coroutines count each resumption)."""
    import pstats
    return {f"{f}:{line}({n})": v[1] for (f, line, n), v in pstats.Stats(str(path)).stats.items()}


def _hot_spots(profile_dir: Path, sampled: dict, counted: dict, idled: dict, steps: int) -> list[str]:
    """Per service: CPU by what the loop ran (task entry), the top functions
    by own CPU per step (hottest lines), the service's own functions by
    cumulative CPU per step, call counts per step (cProfile), SQL statements
    per step, and what runs while idle. "above idle" subtracts the idle
    window's figure scaled to the run's length."""
    out = []
    for name in SERVICES:
        meta, im, sql = sampled[name], idled[name], counted[name]["sql"]
        scale = meta["wall_s"] / max(im["wall_s"], 1e-9)  # idle seconds -> the sampled window's length
        calls = _calls(profile_dir / f"{counted[name]['label']}-{name}.prof")

        def n_calls(function):
            c = calls.get(function)
            return f"{c / STEPS:.1f}" if c is not None else ""
        idle_own = {r["function"]: r["own_s"] for r in im["by_own"]}
        cpu = meta["cpu_user_s"] + meta["cpu_system_s"]
        idle_cpu = im["cpu_user_s"] + im["cpu_system_s"]
        out += [f"### {name}", "",
                f"Under the sampler: {cpu / steps * 1000:.1f} ms CPU per step ({(cpu - idle_cpu * scale) / steps * 1000:.1f} "
                f"above idle; event loop's thread {meta['thread_cpu_s'].get('main', 0) / steps * 1000:.1f} ms, of which "
                f"sampled {meta['sampled_s'] / steps * 1000:.1f} ms); {sql['statements'] / STEPS:.1f} SQL "
                f"statements and {sql['commits'] / STEPS:.1f} commits per step (cProfile's run).", "",
                "| CPU ms/step | above idle | what the loop ran (task or callback) |", "|---|---|---|"]
        run_entries = _entries(profile_dir / f"{meta['label']}-{name}.collapsed")
        idle_entries = _entries(profile_dir / f"{im['label']}-{name}.collapsed")
        for entry, seconds in sorted(run_entries.items(), key=lambda kv: -kv[1])[:10]:
            above = seconds - idle_entries.get(entry, 0.0) * scale
            out.append(f"| {seconds / steps * 1000:.2f} | {above / steps * 1000:.2f} | {entry} |")
        out += ["", "| own ms/step | above idle | cum ms/step | calls/step | function (hottest lines: own ms/step) |",
                "|---|---|---|---|---|"]
        for row in meta["by_own"][:TOP]:
            lines = ", ".join(f"{line}: {s / steps * 1000:.2f}" for line, s in row["lines"])
            above = row["own_s"] - idle_own.get(row["function"], 0.0) * scale
            out.append(f"| {row['own_s'] / steps * 1000:.2f} | {above / steps * 1000:.2f} | "
                       f"{row['cum_s'] / steps * 1000:.2f} | {n_calls(row['function'])} | "
                       f"{_short(row['function'])} ({lines}) |")
        roots = 0.9 * meta["sampled_s"]
        own = [r for r in meta["by_cum"] if _ours(r["function"]) and r["cum_s"] < roots][:TOP + 6]
        out += ["", f"{name}'s own code by cumulative CPU (coroutines: calls are resumptions):", "",
                "| cum ms/step | calls/step | function |", "|---|---|---|"]
        out += [f"| {r['cum_s'] / steps * 1000:.2f} | {n_calls(r['function'])} | {_short(r['function'])} |"
                for r in own]
        out += ["", "SQL per step (statements by kind; cProfile's run):", ""]
        out += [f"- {r['count'] / STEPS:.2f} x {r['statement']}" for r in sql["by_kind"][:TOP + 4]]
        busiest = sorted(((c, f) for f, c in calls.items() if not f.startswith("~")), reverse=True)[:10]
        out += ["", "Most called Python functions (cProfile, per step): " + "; ".join(
            f"{_short(f)} {c / STEPS:.0f}" for c, f in busiest)]
        out += ["", f"Idle ({im['wall_s']:.0f} s): {idle_cpu * 1000:.0f} ms CPU ({im['thread_cpu_s']}), "
                f"by task: " + "; ".join(
                    f"{e} {v * 1000:.1f} ms" for e, v in sorted(idle_entries.items(), key=lambda kv: -kv[1])[:6]), ""]
    return out
