"""`make bench` (and `make bench-network`): what a job's own network costs,
against the machine's network, in the same run.

A job sets its network up once (the user and network namespaces, the
nftables rules, pasta: `setup`), then each of its terraform commands enters it
(nsenter) on the executor's whole way (the reaper, bubblewrap, the executor's
niceness), with the product's defaults. Commands: `terraform version` (a real
terraform command with no work of its own: the figure is the way in) and
`terraform init` of a one-resource null module from the plugin mirror (what
every job runs first). The two modes alternate job by job, so both see the
same machine; REPEATS of each, after WARMUP unrecorded ones. Writes
docs/performance-network.md with --write."""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import platform
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from services.executor.adapters.sandbox import Sandbox
from services.executor.adapters.terraform import _die_with_parent, _venv_plugin_dir, find_binary

REPEATS, WARMUP = 30, 3
MODULE = 'resource "null_resource" "this" {}\n'


def run_once(sandbox: Sandbox, argv: list[str], cwd: Path, network, writable: list[Path],
             readable: list[str]) -> float:
    wrapped = sandbox.wrap(argv, cwd=cwd, writable=writable, readable=readable, network=network)
    started = time.perf_counter()
    done = subprocess.run(_die_with_parent(wrapped, 10), cwd=cwd, capture_output=True, stdin=subprocess.DEVNULL,
                          env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(cwd),
                               "TF_IN_AUTOMATION": "1", "CHECKPOINT_DISABLE": "1"}, start_new_session=True)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{argv[1]} failed: {done.stderr.decode(errors='replace')[-500:]}")
    return elapsed


async def measure() -> dict[str, dict[str, list[float]]]:
    binary = find_binary(os.environ)
    plugins = os.environ.get("IK_TERRAFORM_PROVIDER_MIRROR") or _venv_plugin_dir()
    modes = {name: Sandbox.from_env({"IK_EXECUTOR_NETWORK": name}) for name in ("isolated", "shared")}
    figures: dict[str, dict[str, list[float]]] = {c: {m: [] for m in modes} for c in ("setup", "version", "init")}
    with tempfile.TemporaryDirectory(prefix="ik-network-bench-") as tmp:
        root = Path(tmp)
        for i in range(WARMUP + REPEATS):
            for mode, sandbox in modes.items():
                work = root / f"{mode}-{i}"
                work.mkdir()
                (work / "main.tf").write_text(MODULE)
                started = time.perf_counter()
                network = await sandbox.job_network()  # done by the executor before the job's first command
                setup = time.perf_counter() - started
                try:
                    common = dict(cwd=work, network=network, writable=[work], readable=[binary, plugins])
                    version = await asyncio.to_thread(run_once, sandbox, [binary, "version"], **common)
                    init = await asyncio.to_thread(run_once, sandbox, [binary, "init", "-input=false", "-no-color",
                                                                       f"-plugin-dir={plugins}"], **common)
                finally:
                    if network is not None:
                        await network.close()
                if i >= WARMUP:
                    figures["setup"][mode].append(setup)
                    figures["version"][mode].append(version)
                    figures["init"][mode].append(init)
                shutil.rmtree(work, ignore_errors=True)
    return figures


def p(values: list[float], q: float) -> float:
    return sorted(values)[min(len(values) - 1, int(q * len(values)))] * 1000


def report(figures, load: tuple[float, float, float]) -> str:
    rows = []
    for command, label in (("setup", "the job's network set up (once per job)"),
                           ("version", "`terraform version` (each command)"),
                           ("init", "`terraform init`, null module (each command)")):
        iso, shared = figures[command]["isolated"], figures[command]["shared"]
        added = statistics.median(iso) * 1000 - statistics.median(shared) * 1000
        rows.append(f"| {label} | {statistics.median(shared) * 1000:.0f} ms | {p(shared, 0.9):.0f} ms | "
                    f"{statistics.median(iso) * 1000:.0f} ms | {p(iso, 0.9):.0f} ms | **{added:+.0f} ms** | "
                    f"{'met' if added < 100 else 'MISSED'} |" if command != "setup" else
                    f"| {label} | - | - | {statistics.median(iso) * 1000:.0f} ms | {p(iso, 0.9):.0f} ms | "
                    f"**+{statistics.median(iso) * 1000:.0f} ms** per job | - |")
    return "\n".join([
        "# What a job's own network costs",
        "",
        f"Measured {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC by `make bench` "
        f"(`python -m bench.network_bench --write`) on {platform.node()}: {platform.machine()}, "
        f"{os.cpu_count()} cores, Python {platform.python_version()}, load average {load[0]:.1f} at the start "
        f"and {os.getloadavg()[0]:.1f} at the end (other work on the machine shows there). "
        f"Each command goes the executor's whole way (reaper, bubblewrap, niceness 10); the two modes "
        f"alternate job by job (one job: the set-up, then its commands); {REPEATS} of each after {WARMUP} "
        "unrecorded; page cache warm.",
        "",
        "| what | shared p50 | shared p90 | isolated p50 | isolated p90 | added (p50) | target < 100 ms |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
        "The set-up (once per job, before its first command): the rules computed from `ip -j addr`, "
        "`unshare` and a shell loading them with `nft`, and pasta connecting the namespace (its pid file "
        "says when), the two at once. Each command then only enters the namespace (`nsenter`) before its "
        "sandbox. A job runs 3 to 5 commands (init, plan or apply, output, show).",
        "",
    ])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--write", action="store_true", help="also write docs/performance-network.md")
    args = parser.parse_args()
    load = os.getloadavg()
    text = report(asyncio.run(measure()), load)
    print(text)
    if args.write:
        Path(__file__).resolve().parents[1].joinpath("docs", "performance-network.md").write_text(text)


if __name__ == "__main__":
    main()
