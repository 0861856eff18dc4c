"""Provider installation as operators run it (services/executor/adapters/
providers.py), with real terraform in the job's sandbox and network: a
provider network mirror over HTTPS (a test CA given to the executor), the
machine's shared cache, lock files honoured or recorded."""
from __future__ import annotations

import asyncio

import pytest

from infrakitchen.executor.v1 import executor_pb2 as pb
from services.executor.adapters.providers import hash1_of_dir
from tests.support.gitrepos import ModuleRepo
from tests.support.jobs import all_logs, log_text, start_executor, submit_request, wait_job
from tests.support.provider_mirror import NULL, TESTCLOUD, ProviderMirror, null_files, cloud_provider_files
from tests.testcloud.cloud import CloudServer

# Two providers: the test cloud's (its network is a real object in the cloud) and null.
TWO_PROVIDERS = '''
terraform {
  required_providers {
    testcloud = { source = "infrakitchen.test/ik/testcloud" }
    null      = { source = "hashicorp/null" }
  }
}
variable "name" {
  type = string
}
resource "testcloud_network" "this" {
  name = var.name
  cidr = "10.20.0.0/16"
}
resource "null_resource" "this" {
  triggers = { network = testcloud_network.this.id }
}
output "gateway" {
  value = testcloud_network.this.gateway
}
'''
# Needs the test cloud's provider, starts nothing of it but its schema.
ONLY_REQUIRES = '''
terraform {
  required_providers {
    testcloud = { source = "infrakitchen.test/ik/testcloud" }
    null      = { source = "hashicorp/null" }
  }
}
resource "null_resource" "this" {}
'''
LOCKED_TO_A_MISSING_VERSION = '''# This file is maintained automatically by "terraform init".
provider "infrakitchen.test/ik/testcloud" {
  version = "0.9.0"
  hashes = [
    "h1:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
  ]
}
'''


TROJAN = "#!/bin/sh\necho pwned > /tmp/pwned\n"


def _trojan_lock(tmp_path) -> str:
    """A lock file vouching for the trojan package a module ships in its own `.terraform`."""
    package = tmp_path / "trojan-package"
    package.mkdir()
    (package / "terraform-provider-testcloud_v9.9.9").write_text(TROJAN)
    return (f'provider "{TESTCLOUD}" {{\n  version = "9.9.9"\n  constraints = ">= 0.1.0"\n'
            f'  hashes = [\n    "{hash1_of_dir(package)}",\n  ]\n}}\n')


@pytest.fixture
def mirror(tmp_path):
    with ProviderMirror(tmp_path / "mirror", tmp_path / "certs") as m:
        m.add(NULL, "2.1.2", null_files())
        m.add(TESTCLOUD, "0.1.0", cloud_provider_files())
        yield m


@pytest.fixture
def cloud():
    with CloudServer() as server:
        server.cloud.tokens.add("test-token")
        yield server


@pytest.fixture
def modules(tmp_path):
    repo = ModuleRepo(tmp_path / "modules")
    repo.write("two/main.tf", TWO_PROVIDERS)
    repo.write("requires/main.tf", ONLY_REQUIRES)
    repo.write("locked/main.tf", ONLY_REQUIRES)
    repo.write("locked/.terraform.lock.hcl", LOCKED_TO_A_MISSING_VERSION)
    # Modules that ship a provider of their own in `.terraform` (with and without a lock vouching for it).
    trojan = f".terraform/providers/{TESTCLOUD}/9.9.9/linux_amd64/terraform-provider-testcloud_v9.9.9"
    for name in ("trojan", "trojan-locked"):
        repo.write(f"{name}/main.tf", ONLY_REQUIRES.replace('source = "infrakitchen.test/ik/testcloud"',
                                                            'source = "infrakitchen.test/ik/testcloud", '
                                                            'version = ">= 0.1.0"'))
        repo.write(f"{name}/{trojan}", TROJAN)
    repo.write("trojan-locked/.terraform.lock.hcl", _trojan_lock(tmp_path))
    repo.commit("modules", tag="v1")
    return repo


async def _executor(tmp_path, event_prefix, nats_url, mirror, cloud=None, **env):
    allow = [mirror.executor_env()["IK_EXECUTOR_EGRESS_ALLOW"]] + ([f"127.0.0.1:{cloud.port}"] if cloud else [])
    return await start_executor(f"sqlite:///{tmp_path / 'executor.db'}", event_prefix, nats_url, tmp_path / "data",
                                **{**mirror.executor_env(), "IK_EXECUTOR_EGRESS_ALLOW": ",".join(allow),
                                   "IK_TERRAFORM_PROVIDER_CACHE": str(tmp_path / "provider-cache"), **env})


async def _integration(svc, cloud) -> str:
    return (await svc.stub.CreateIntegration(pb.CreateIntegrationRequest(
        integration=pb.Integration(name="testcloud", provider=pb.INTEGRATION_PROVIDER_GENERIC),
        credentials={"TESTCLOUD_ENDPOINT": cloud.url, "TESTCLOUD_TOKEN": "test-token"}), metadata=svc.admin)).id


async def _run(svc, repo, module: str, state_path: str, resource_id: str, **kw) -> pb.Job:
    """A resource's job, submitted as the resource service submits it."""
    job = await svc.stub.SubmitJob(submit_request(repo, module, state_path, variables=kw.pop("variables", {}),
                                                  correlation=pb.JobCorrelation(resource_id=resource_id), **kw),
                                   metadata=svc.as_resource)
    return await wait_job(svc.stub, job.id, svc.md, timeout=180)


async def test_two_providers_from_a_network_mirror_are_fetched_once_per_machine(tmp_path, event_prefix, nats_url,
                                                                              mirror, cloud, modules):
    svc = await _executor(tmp_path, event_prefix, nats_url, mirror, cloud)
    try:
        integration = await _integration(svc, cloud)
        first = await _run(svc, modules, "two", "a", "resource-a", variables={"name": "net-a"},
                           integration_ids=[integration])
        text = log_text(await all_logs(svc.stub, first.id, svc.md))
        assert first.status == pb.JOB_STATUS_SUCCEEDED, first.error_message + text[-2000:]
        assert "providers: added to this machine's cache" in text
        assert {o.name: o.value.string_value for o in first.outputs} == {"gateway": "10.20.0.1"}  # the cloud's
        assert len(cloud.objects("networks")) == 1
        assert sorted(p.rsplit("/", 1)[1] for p in mirror.downloads()) == [
            "terraform-provider-null_2.1.2_linux_amd64.zip", "terraform-provider-testcloud_0.1.0_linux_amd64.zip"]

        # Another resource's job: both providers come from the machine's cache.
        second = await _run(svc, modules, "two", "b", "resource-b", variables={"name": "net-b"},
                            integration_ids=[integration])
        assert second.status == pb.JOB_STATUS_SUCCEEDED, second.error_message
        assert len(mirror.downloads()) == 2, mirror.downloads()
        assert len(cloud.objects("networks")) == 2
    finally:
        await svc.__aexit__(None, None, None)


async def test_ten_jobs_at_once_with_an_empty_cache_all_succeed(tmp_path, event_prefix, nats_url, mirror, modules):
    svc = await _executor(tmp_path, event_prefix, nats_url, mirror, IK_EXECUTOR_WORKERS="10")
    try:
        jobs = await asyncio.gather(*(_run(svc, modules, "requires", f"s{i}", f"resource-{i}") for i in range(10)))
        assert [j.status for j in jobs] == [pb.JOB_STATUS_SUCCEEDED] * 10, [j.error_message for j in jobs]
        cached = tmp_path / "provider-cache" / "providers"
        assert (cached / TESTCLOUD / "0.1.0" / "linux_amd64").is_dir()
        assert not list(cached.rglob("*.partial")), "no half-copied package is left"
        # Ten at once may each fetch what none had cached yet; the next fetches nothing.
        fetched = len(mirror.downloads())
        again = await _run(svc, modules, "requires", "s10", "resource-10")
        assert again.status == pb.JOB_STATUS_SUCCEEDED
        assert len(mirror.downloads()) == fetched
    finally:
        await svc.__aexit__(None, None, None)


async def test_a_tampered_provider_archive_is_refused(tmp_path, event_prefix, nats_url, mirror, modules):
    archive = mirror.root / TESTCLOUD / "terraform-provider-testcloud_0.1.0_linux_amd64.zip"
    data = bytearray(archive.read_bytes())
    data[len(data) // 2] ^= 0xFF  # the mirror still lists the genuine package's hashes
    archive.write_bytes(bytes(data))
    svc = await _executor(tmp_path, event_prefix, nats_url, mirror)
    try:
        job = await _run(svc, modules, "requires", "t", "resource-t")
        assert job.status == pb.JOB_STATUS_FAILED
        assert "checksum" in job.error_message.lower() or "doesn't match" in job.error_message.lower(), \
            job.error_message
        assert not (tmp_path / "provider-cache" / "providers" / TESTCLOUD).exists()
    finally:
        await svc.__aexit__(None, None, None)


async def test_a_lock_file_naming_a_missing_version_fails_with_a_clear_message(tmp_path, event_prefix, nats_url,
                                                                               mirror, modules):
    svc = await _executor(tmp_path, event_prefix, nats_url, mirror)
    try:
        job = await _run(svc, modules, "locked", "l", "resource-l")
        assert job.status == pb.JOB_STATUS_FAILED
        assert "0.9.0" in job.error_message and "lock file" in job.error_message, job.error_message
    finally:
        await svc.__aexit__(None, None, None)


async def test_a_module_without_a_lock_file_keeps_the_versions_of_its_first_run(tmp_path, event_prefix, nats_url,
                                                                                mirror, modules):
    svc = await _executor(tmp_path, event_prefix, nats_url, mirror)
    try:
        first = await _run(svc, modules, "requires", "p", "resource-p")
        assert first.status == pb.JOB_STATUS_SUCCEEDED, first.error_message
        # A newer version appears in the mirror: this resource keeps 0.1.0, a new one takes 0.2.0.
        mirror.add(TESTCLOUD, "0.2.0", cloud_provider_files())
        again = await _run(svc, modules, "requires", "p", "resource-p")
        text = log_text(await all_logs(svc.stub, again.id, svc.md))
        assert again.status == pb.JOB_STATUS_SUCCEEDED, again.error_message
        assert "recorded on this resource's first run" in text
        assert "testcloud v0.1.0" in text and "v0.2.0" not in text
        other = await _run(svc, modules, "requires", "q", "resource-q")
        assert other.status == pb.JOB_STATUS_SUCCEEDED, other.error_message
        assert "testcloud v0.2.0" in log_text(await all_logs(svc.stub, other.id, svc.md))
    finally:
        await svc.__aexit__(None, None, None)


async def test_a_provider_a_module_ships_in_its_own_terraform_folder_is_never_run_nor_cached(
        tmp_path, event_prefix, nats_url, mirror, modules):
    svc = await _executor(tmp_path, event_prefix, nats_url, mirror)
    try:
        # Without a lock: terraform installs from the sources the operator allows, not the shipped folder.
        plain = await _run(svc, modules, "trojan", "t1", "resource-t1")
        text = log_text(await all_logs(svc.stub, plain.id, svc.md))
        assert plain.status == pb.JOB_STATUS_SUCCEEDED, plain.error_message
        assert "testcloud v0.1.0" in text and "9.9.9" not in text
        # With a lock vouching for the shipped package: no source has it, so nothing runs.
        locked = await _run(svc, modules, "trojan-locked", "t2", "resource-t2")
        assert locked.status == pb.JOB_STATUS_FAILED and "9.9.9" in locked.error_message
        cached = tmp_path / "provider-cache" / "providers" / TESTCLOUD
        assert sorted(p.name for p in cached.iterdir() if not p.name.startswith(".")) == ["0.1.0"]
    finally:
        await svc.__aexit__(None, None, None)


async def test_recorded_versions_no_source_has_any_more_are_chosen_anew(tmp_path, event_prefix, nats_url, mirror,
                                                                        modules):
    svc = await _executor(tmp_path, event_prefix, nats_url, mirror, IK_TERRAFORM_PROVIDER_CACHE="off")
    try:
        first = await _run(svc, modules, "requires", "r", "resource-r")
        assert first.status == pb.JOB_STATUS_SUCCEEDED, first.error_message
        # The mirror serves another package as 0.1.0 (its own hashes listed): refused, never re-chosen.
        mirror.add(TESTCLOUD, "0.1.0", {**cloud_provider_files(), "EXTRA": (b"not the same package", 0o644)})
        swapped = await _run(svc, modules, "requires", "r", "resource-r")
        assert swapped.status == pb.JOB_STATUS_FAILED and "checksums" in swapped.error_message, \
            swapped.error_message
        # The mirror drops 0.1.0 for 0.2.0.
        mirror.add(TESTCLOUD, "0.2.0", cloud_provider_files())
        index = mirror.root / TESTCLOUD / "index.json"
        index.write_text('{"versions": {"0.2.0": {}}}')
        again = await _run(svc, modules, "requires", "r", "resource-r")
        text = log_text(await all_logs(svc.stub, again.id, svc.md))
        assert again.status == pb.JOB_STATUS_SUCCEEDED, again.error_message + text[-1500:]
        assert "cannot be installed; choosing anew" in text and "testcloud v0.2.0" in text
        # The new choice is recorded: the next run installs 0.2.0 from the lock.
        third = await _run(svc, modules, "requires", "r", "resource-r")
        text = log_text(await all_logs(svc.stub, third.id, svc.md))
        assert "recorded on this resource's first run" in text and "choosing anew" not in text
        # A user's own SubmitJob naming the resource neither uses nor records its lock.
        mine = await svc.stub.SubmitJob(submit_request(modules, "requires", "r2", correlation=pb.JobCorrelation(
            resource_id="resource-r")), metadata=svc.md)
        mine = await wait_job(svc.stub, mine.id, svc.md, timeout=180)
        assert "recorded on this resource's first run" not in log_text(await all_logs(svc.stub, mine.id, svc.md))
    finally:
        await svc.__aexit__(None, None, None)
