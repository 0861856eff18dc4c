"""Terraform modules for executor tests (null_resource + local-exec; no
network) and helpers to submit jobs and wait for them through gRPC."""
from __future__ import annotations

import asyncio
import time

from google.protobuf import duration_pb2, struct_pb2

from infrakitchen.executor.v1 import executor_pb2 as pb
from infrakitchen.executor.v1 import executor_pb2_grpc
from services.common.auth import Role
from services.common.identities import ServiceIdentity
from services.executor.__main__ import DEFINITION
from tests.support.gitrepos import ModuleRepo
from tests.support.inprocess import InProcessService

MODULES = {
    # Outputs of every kind, a sensitive variable and a sensitive output; the
    # local-exec prints what the secret env and TF_VAR bring, to prove redaction.
    "ok/main.tf": '''
variable "name" {
  type = string
}
variable "password" {
  type      = string
  default   = "unset"
  sensitive = true
}
variable "token" {
  type    = string
  default = ""
}
variable "label" {
  type    = string
  default = ""
}
resource "null_resource" "this" {
  triggers = { name = var.name }
  provisioner "local-exec" {
    command = "echo creating $NAME with token=$TOKEN key=$AWS_ACCESS_KEY_ID label=$LABEL"
    environment = { NAME = var.name, TOKEN = var.token, LABEL = var.label }
  }
}
output "id" {
  value = null_resource.this.id
}
output "names" {
  value = [var.name, "${var.name}-2"]
}
output "connection_string" {
  value     = "postgres://app:${var.password}@db/${var.name}"
  sensitive = true
}
''',
    "bad/main.tf": 'resource "null_resource" "this" {\n  triggers = {\n',
    "failing/main.tf": '''
resource "null_resource" "this" {
  provisioner "local-exec" {
    command = "echo about to fail with $SECRET_WORD; exit 3"
  }
}
''',
    # Sleeps `seconds`, printing a tick each second.
    "slow/main.tf": '''
variable "seconds" {
  type    = number
  default = 60
}
variable "marker" {
  type    = string
  default = ""
}
resource "null_resource" "this" {
  provisioner "local-exec" {
    command = "for i in $(seq 1 ${var.seconds}); do echo tick $i; sleep 1; done"
  }
}
''',
    # Records each run's start and end (with the run's shell pid) in a marker file.
    "marker/main.tf": '''
variable "marker" {
  type = string
}
variable "seconds" {
  type    = number
  default = 1
}
# Lets a blueprint chain markers (wired from the previous one's output).
variable "upstream" {
  type    = string
  default = ""
}
resource "null_resource" "this" {
  triggers = { marker = var.marker }
  provisioner "local-exec" {
    # A run's id: not $$, which every sandbox (a pid namespace of its own) numbers alike.
    command = "run=$(cat /proc/sys/kernel/random/uuid); echo start $run $(date +%s.%N) >> ${var.marker}; sleep ${var.seconds}; echo end $run $(date +%s.%N) >> ${var.marker}"
  }
}
output "marker" {
  value = var.marker
}
''',
}


def module_repo(path) -> ModuleRepo:
    repo = ModuleRepo(path)
    for name, text in MODULES.items():
        repo.write(name, text)
    repo.commit("modules", tag="v1")
    return repo


def struct(**values) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(values)
    return s


def submit_request(repo: ModuleRepo, module: str, state_path: str, action=pb.JOB_ACTION_APPLY,
                   timeout: float = 0, **kw) -> pb.SubmitJobRequest:
    variables = kw.pop("variables", {})
    req = pb.SubmitJobRequest(action=action, source=pb.JobSource(repository_url=repo.url, ref="v1", path=module),
                              variables=struct(**variables), state_path=state_path, **kw)
    if timeout:
        req.timeout.CopyFrom(duration_pb2.Duration(seconds=int(timeout)))
    return req


ENDED = {pb.JOB_STATUS_SUCCEEDED, pb.JOB_STATUS_FAILED, pb.JOB_STATUS_CANCELLED, pb.JOB_STATUS_TIMED_OUT}


async def wait_job(stub, job_id: str, metadata, timeout: float = 120, statuses=ENDED) -> pb.Job:
    deadline = time.monotonic() + timeout
    while True:
        job = await stub.GetJob(pb.GetJobRequest(id=job_id), metadata=metadata)
        if job.status in statuses:
            return job
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} still {pb.JobStatus.Name(job.status)} after {timeout}s")
        await asyncio.sleep(0.1)


async def all_logs(stub, job_id: str, metadata) -> list[pb.LogLine]:
    lines = []
    async for chunk in stub.StreamJobLogs(pb.StreamJobLogsRequest(job_id=job_id), metadata=metadata):
        lines.extend(chunk.lines)
    return lines


def log_text(lines) -> str:
    return "\n".join(line.text for line in lines)


def service_metadata(svc: InProcessService, service: str = "resource", user: str = "alice",
                     role: Role = Role.WRITE) -> list[tuple[str, str]]:
    """Metadata of a call `service` makes to `svc` for `user` (signed with that
    service's own key, made beside svc's keys): e.g. the resource service
    submitting a resource's job."""
    identity = ServiceIdentity.from_settings(service, svc.settings.env, svc.settings.data_dir)
    return [("authorization", f"Bearer {identity.token(svc.definition.name, user, role)}")]


async def start_executor(database_url, event_prefix, nats_url, data_dir, **env) -> InProcessService:
    """An executor in the test's event loop, with `stub`, `md` (a writer), `admin`
    and `as_resource` (the resource service, for alice) metadata."""
    svc = InProcessService(DEFINITION, database_url, event_prefix, nats_url, data_dir,
                           extra_env={"IK_EXECUTOR_CANCEL_GRACE": "5", "IK_TERRAFORM_LOCK_TIMEOUT": "2s", **env})
    await svc.__aenter__()
    svc.stub = executor_pb2_grpc.ExecutorServiceStub(svc.channel)
    svc.md = svc.metadata(Role.WRITE, "alice")
    svc.admin = svc.metadata(Role.ADMIN, "root")
    svc.as_resource = service_metadata(svc)
    return svc
