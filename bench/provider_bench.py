"""`make bench` (and `make bench-providers`): a job's time with the machine's
provider cache warm against cold, in the same run, on the test cloud's module.

One executor (the product's defaults: 2 workers, the sandbox, the job's own
network), its providers from a network mirror over HTTPS on loopback, as an
operator's mirror would serve them (the test cloud's provider, 13 MB zipped,
and null). Each job applies the Team Network example module (a network in
the test cloud, on loopback) for a resource of its own, one job at a time.
Cold: the cache emptied before the job (it downloads, unpacks and caches the
packages); warm: the cache holds them (init links them). The two alternate,
REPEATS of each after one unrecorded of each. Figures: the job's run (start
to end, as the executor records it), and the packages fetched from the
mirror. Writes docs/performance-providers.md with --write."""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import platform
import shutil
import statistics
import tempfile
import uuid
from pathlib import Path

from infrakitchen.executor.v1 import executor_pb2 as pb
from tests.support.gitrepos import ModuleRepo
from tests.support.jobs import start_executor, submit_request, wait_job
from tests.support.provider_mirror import NULL, TESTCLOUD, ProviderMirror, cloud_provider_files, null_files
from tests.testcloud.cloud import CloudServer

REPEATS = 8
MODULE = Path(__file__).resolve().parents[1] / "examples" / "modules" / "team-network" / "main.tf"


async def measure(nats_url: str) -> tuple[dict[str, list[float]], dict[str, list[int]]]:
    times: dict[str, list[float]] = {"cold": [], "warm": []}
    fetched: dict[str, list[int]] = {"cold": [], "warm": []}
    with tempfile.TemporaryDirectory(prefix="ik-provider-bench-") as tmp, CloudServer() as cloud, \
            ProviderMirror(Path(tmp) / "mirror", Path(tmp) / "certs") as mirror:
        root = Path(tmp)
        cloud.cloud.tokens.add("bench")
        mirror.add(NULL, "2.1.2", null_files())
        mirror.add(TESTCLOUD, "0.1.0", cloud_provider_files())
        repo = ModuleRepo(root / "modules")
        repo.write("network/main.tf", MODULE.read_text())
        repo.commit("module", tag="v1")
        cache = root / "provider-cache"
        env = {**mirror.executor_env(), "IK_TERRAFORM_PROVIDER_CACHE": str(cache),
               "IK_EXECUTOR_EGRESS_ALLOW": f"{mirror.executor_env()['IK_EXECUTOR_EGRESS_ALLOW']},"
                                           f"127.0.0.1:{cloud.port}"}
        svc = await start_executor(f"sqlite:///{root / 'executor.db'}", f"bench{uuid.uuid4().hex[:6]}", nats_url,
                                   root / "data", **env)
        try:
            integration = (await svc.stub.CreateIntegration(pb.CreateIntegrationRequest(
                integration=pb.Integration(name="testcloud", provider=pb.INTEGRATION_PROVIDER_GENERIC),
                credentials={"TESTCLOUD_ENDPOINT": cloud.url, "TESTCLOUD_TOKEN": "bench"}), metadata=svc.admin)).id
            for i in range(REPEATS + 1):
                for mode in ("cold", "warm"):
                    if mode == "cold":
                        shutil.rmtree(cache / "providers", ignore_errors=True)
                        shutil.rmtree(cache / "hashes", ignore_errors=True)
                        (cache / "providers").mkdir(parents=True)
                    before = len(mirror.downloads())
                    job = await svc.stub.SubmitJob(submit_request(
                        repo, "network", f"{mode}-{i}", variables={"name": f"net-{mode}-{i}"},
                        integration_ids=[integration],
                        correlation=pb.JobCorrelation(resource_id=f"{mode}-{i}")), metadata=svc.md)
                    job = await wait_job(svc.stub, job.id, svc.md, timeout=300)
                    if job.status != pb.JOB_STATUS_SUCCEEDED:
                        raise SystemExit(f"job failed: {job.error_message}")
                    if i == 0:
                        continue  # unrecorded
                    times[mode].append((job.end_time.ToDatetime() - job.start_time.ToDatetime()).total_seconds())
                    fetched[mode].append(len(mirror.downloads()) - before)
        finally:
            await svc.__aexit__(None, None, None)
    return times, fetched


def report(times, fetched, load) -> str:
    cold, warm = statistics.median(times["cold"]), statistics.median(times["warm"])
    return "\n".join([
        "# A job's time with the provider cache warm and cold",
        "",
        f"Measured {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC by `make bench` "
        f"(`python -m bench.provider_bench --write`) on {platform.node()}: {platform.machine()}, "
        f"{os.cpu_count()} cores, Python {platform.python_version()}, load average {load[0]:.1f} at the start and "
        f"{os.getloadavg()[0]:.1f} at the end. One executor with the product's defaults (2 workers, the sandbox, "
        "the job's own network); providers from a network mirror over HTTPS on loopback (the test cloud's, "
        "13 MB zipped, and null); one job at a time, each applying the Team Network example module (a network "
        f"in the test cloud) for a resource of its own; cold (cache emptied first) and warm alternate, {REPEATS} "
        "of each after one unrecorded of each; page cache warm.",
        "",
        "| cache | job p50 | job min-max | packages fetched per job |",
        "|---|---|---|---|",
        f"| cold | {cold:.2f} s | {min(times['cold']):.2f}-{max(times['cold']):.2f} s | "
        f"{statistics.median(fetched['cold']):.0f} |",
        f"| warm | {warm:.2f} s | {min(times['warm']):.2f}-{max(times['warm']):.2f} s | "
        f"{statistics.median(fetched['warm']):.0f} |",
        "",
        f"Warm against cold: **{warm / cold:.2f}x** the time, {cold - warm:.2f} s less per job. A cold job "
        "downloads each package, unpacks it, checks its hash against the lock file terraform wrote and copies it "
        "into the cache; a warm one links the cached package (no download, no unpacking). Big providers "
        "(AWS: about 100 MB zipped) save more.",
        "",
    ])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--write", action="store_true", help="also write docs/performance-providers.md")
    parser.add_argument("--nats", default=os.environ.get("IK_NATS_URL", "nats://127.0.0.1:4222"))
    args = parser.parse_args()
    load = os.getloadavg()
    times, fetched = asyncio.run(measure(args.nats))
    text = report(times, fetched, load)
    print(text)
    if args.write:
        Path(__file__).resolve().parents[1].joinpath("docs", "performance-providers.md").write_text(text)


if __name__ == "__main__":
    main()
