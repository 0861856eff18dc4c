"""Module code is untrusted: every terraform command of a job runs in a
bubblewrap sandbox. A module whose local-exec tries to read the platform's
keys, its databases, another resource's state, another job's working
directory, the executor's environment, and to signal the executor, gets
nowhere; the job log shows each attempt; the platform keeps running. The same
probe without the sandbox does read the key (so the probe can see a leak)."""
from __future__ import annotations

import asyncio
import os

import pytest

from infrakitchen.executor.v1 import executor_pb2 as ep
from infrakitchen.resource.v1 import resource_pb2 as rp
from tests.support.jobs import all_logs, log_text
from tests.support.platform import Platform, struct

PROBE = '''
variable "paths" {
  type = list(string)
}
variable "pid" {
  type = number
}
variable "seconds" {
  type    = number
  default = 0
}
resource "null_resource" "probe" {
  triggers = { paths = join(",", var.paths) }
  provisioner "local-exec" {
    command = <<EOT
sleep ${var.seconds}
for p in ${join(" ", var.paths)}; do
  if cat "$p" >/dev/null 2>&1 || ls "$p" >/dev/null 2>&1; then echo "LEAKED $p"; else echo "BLOCKED $p"; fi
done
if kill -0 ${var.pid} 2>/dev/null; then echo "LEAKED signal"; else echo "BLOCKED signal"; fi
if cat /proc/${var.pid}/environ >/dev/null 2>&1; then echo "LEAKED environ"; else echo "BLOCKED environ"; fi
if cat main.tf >/dev/null 2>&1; then echo "SEEN own module"; fi
EOT
  }
}
'''


async def probe_template(p) -> str:
    return await p.template_of("probe", PROBE)


async def run_probe(p, template_id: str, name: str, paths: list[str], seconds: int = 0) -> tuple[rp.Resource, str]:
    r = await p.resource.CreateResource(rp.CreateResourceRequest(resource=rp.Resource(
        name=name, template_id=template_id, variables=struct(paths=paths, pid=os.getpid(), seconds=seconds),
        integration_ids=[p.catalog.integration], storage_id=p.catalog.storage), provision=True), metadata=p.md)
    return r, r.last_job_id


@pytest.mark.parametrize("sandbox", ["bwrap", "off"])
async def test_a_module_cannot_reach_the_platform_or_other_jobs(tmp_path, event_prefix, nats_url, sandbox):
    async with Platform(tmp_path, event_prefix, nats_url, extra_env={"IK_EXECUTOR_SANDBOX": sandbox}) as p:
        data = tmp_path / "data"
        (data / "auth-secret").write_text("the-auth-secret")  # where a deployment keeps it
        assert (data / "encryption-key").exists()
        victim = await p.provisioned("network", "victim", variables={"cidr": "10.0.0.0/16"})
        victim_state = tmp_path / "states" / victim.storage_path / "terraform.tfstate"
        assert victim_state.exists()
        template_id = await probe_template(p)
        # Another job, running while the probe runs: its working directory.
        _, slow_job = await run_probe(p, template_id, "slow", ["/nonexistent"], seconds=60)
        work = data / "work"
        for _ in range(300):
            others = [d for d in work.iterdir()] if work.exists() else []
            if others:
                break
            await asyncio.sleep(0.1)
        assert others, "the slow job never started"
        targets = {"auth secret": data / "auth-secret", "encryption key": data / "encryption-key",
                   **{f"{svc} database": tmp_path / f"{svc}.db" for svc in
                      ("blueprint", "workflow", "resource", "executor", "approval")},
                   "another resource's state": victim_state, "another job's directory": others[0]}
        assert all(path.exists() for path in targets.values())
        probe, job_id = await run_probe(p, template_id, "probe", [str(path) for path in targets.values()])
        done = await p.wait(probe.id, rp.RESOURCE_STATE_PROVISIONED, rp.RESOURCE_STATUS_DONE)
        text = log_text(await all_logs(p.executor, done.last_job_id, p.admin))
        said = [line.split("(local-exec): ", 1)[1] for line in text.splitlines() if "(local-exec): " in line]
        assert "SEEN own module" in said, "the probe ran"
        if sandbox == "off":
            assert f"LEAKED {data / 'encryption-key'}" in said, "without the sandbox the probe sees the key"
            assert "sandbox: off" in text
        else:
            assert "sandbox: bwrap" in text
            for what, path in targets.items():
                assert f"BLOCKED {path}" in said, what
            assert "BLOCKED signal" in said and "BLOCKED environ" in said
            assert not [line for line in said if line.startswith("LEAKED")]
        await p.executor.CancelJob(ep.CancelJobRequest(id=slow_job), metadata=p.admin)
        # The platform keeps running: an ordinary module applies.
        after = await p.provisioned("network", "after", variables={"cidr": "10.1.0.0/16"})
        assert after.state == rp.RESOURCE_STATE_PROVISIONED
