"""A platform in the test's event loop (blueprint, executor, approval and
resource services, real NATS, real terraform), with modules in a real git
repository and templates registered through the blueprint API."""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from google.protobuf import struct_pb2

from infrakitchen.approval.v1 import approval_pb2_grpc
from infrakitchen.blueprint.v1 import blueprint_pb2 as bp
from infrakitchen.blueprint.v1 import blueprint_pb2_grpc
from infrakitchen.executor.v1 import executor_pb2 as ep
from infrakitchen.executor.v1 import executor_pb2_grpc
from infrakitchen.resource.v1 import resource_pb2 as rp
from infrakitchen.resource.v1 import resource_pb2_grpc
from services.approval.__main__ import DEFINITION as APPROVAL
from services.blueprint.__main__ import DEFINITION as BLUEPRINT
from services.common.auth import Role
from services.executor.__main__ import DEFINITION as EXECUTOR
from services.resource.__main__ import DEFINITION as RESOURCE
from services.workflow.__main__ import DEFINITION as WORKFLOW
from infrakitchen.workflow.v1 import workflow_pb2_grpc
from tests.support.gitrepos import ModuleRepo
from tests.support.inprocess import InProcessPlatform

MODULES = {
    "network/main.tf": '''
variable "cidr" {
  type = string
}
variable "region" {
  type    = string
  default = "eu-west-1"
}
variable "tag_name" {
  type    = string
  default = ""
}
resource "null_resource" "vpc" {
  triggers = { cidr = var.cidr, region = var.region }
}
output "vpc_id" {
  value = "vpc-${null_resource.vpc.id}"
}
output "cidr" {
  value = var.cidr
}
''',
    "app/main.tf": '''
variable "vpc_id" {
  type = string
}
variable "size" {
  type    = number
  default = 1
}
variable "password" {
  type      = string
  default   = "changeme"
  sensitive = true
}
resource "null_resource" "app" {
  triggers = { vpc = var.vpc_id, size = var.size }
}
output "endpoint" {
  value = "app-${var.size}.${var.vpc_id}"
}
output "secret_url" {
  value     = "https://admin:${var.password}@app"
  sensitive = true
}
''',
    # Fails until the gate file exists; sleeps `seconds` first.
    "gated/main.tf": '''
variable "gate" {
  type = string
}
variable "seconds" {
  type    = number
  default = 0
}
resource "null_resource" "this" {
  triggers = { gate = var.gate }
  provisioner "local-exec" {
    command = "sleep ${var.seconds}; test -f ${var.gate} || { echo gate closed; exit 1; }"
  }
}
output "gate" {
  value = var.gate
}
''',
    "leaf/main.tf": '''
variable "upstream" {
  type = string
}
variable "seconds" {
  type    = number
  default = 0
}
resource "null_resource" "leaf" {
  triggers = { upstream = var.upstream }
  provisioner "local-exec" {
    command = "sleep ${var.seconds}"
  }
}
output "seen" {
  value = var.upstream
}
''',
}


def struct(**values) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(values)
    return s


@dataclass
class Catalog:
    """Ids of what the tests create resources from."""
    templates: dict[str, str] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    integration: str = ""
    storage: str = ""


class Platform:
    def __init__(self, tmp_path, event_prefix: str, nats_url: str, extra_env: dict[str, str] | None = None,
                 database_urls: dict[str, str] | None = None):
        names = ("blueprint", "executor", "approval", "resource", "workflow")
        # Files the test modules' local-execs read (gates) live here: the one
        # directory outside a job's sandbox they may reach.
        self.shared = tmp_path / "shared"
        self.shared.mkdir(exist_ok=True)
        dbs = {n: f"sqlite:///{tmp_path / (n + '.db')}" for n in names}
        dbs.update(database_urls or {})
        self.inner = InProcessPlatform(
            {"blueprint": BLUEPRINT, "executor": EXECUTOR, "approval": APPROVAL, "resource": RESOURCE,
             "workflow": WORKFLOW}, dbs,
            event_prefix, nats_url, tmp_path / "data",
            # No catalog cache: tests disable templates and expect the next create to see it.
            {"IK_RESOURCE_RECONCILE_INTERVAL": "30", "IK_TERRAFORM_LOCK_TIMEOUT": "5s",
             "IK_EXECUTOR_SANDBOX_BIND": str(self.shared),
             "IK_RESOURCE_CATALOG_CACHE_SECONDS": "0", **(extra_env or {})})
        self.tmp_path = tmp_path
        self.catalog = Catalog()

    async def __aenter__(self) -> "Platform":
        await self.inner.start()
        svc = self.inner.services
        self.blueprint = blueprint_pb2_grpc.BlueprintServiceStub(svc["blueprint"].channel)
        self.executor = executor_pb2_grpc.ExecutorServiceStub(svc["executor"].channel)
        self.approval = approval_pb2_grpc.ApprovalServiceStub(svc["approval"].channel)
        self.resource = resource_pb2_grpc.ResourceServiceStub(svc["resource"].channel)
        self.workflow = workflow_pb2_grpc.WorkflowServiceStub(svc["workflow"].channel)
        self.md = self.as_("alice", Role.WRITE)
        self.admin = self.as_("root", Role.ADMIN)
        await self._catalog()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.inner.stop()

    def as_(self, user: str, role: Role = Role.WRITE):
        return self.inner.metadata(role, user)

    async def restart(self, name: str) -> None:
        await self.inner.stop(name)
        await self.inner.start(name)
        channel = self.inner[name].channel
        stub = {"resource": resource_pb2_grpc.ResourceServiceStub, "approval": approval_pb2_grpc.ApprovalServiceStub,
                "executor": executor_pb2_grpc.ExecutorServiceStub,
                "blueprint": blueprint_pb2_grpc.BlueprintServiceStub,
                "workflow": workflow_pb2_grpc.WorkflowServiceStub}[name](channel)
        setattr(self, name, stub)

    async def _catalog(self) -> None:
        repo = ModuleRepo(self.tmp_path / "modules")
        for path, text in MODULES.items():
            repo.write(path, text)
        repo.commit("modules", tag="v1")
        c = self.catalog

        async def template(key, parents=(), abstract=False):
            t = await self.blueprint.CreateTemplate(bp.CreateTemplateRequest(template=bp.Template(
                key=key, name=key.title(), enabled=True, abstract=abstract,
                parent_template_ids=[c.templates[p] for p in parents])), metadata=self.admin)
            c.templates[key] = t.id

        async def version(key, path, configs=()):
            v = await self.blueprint.CreateSourceCodeVersion(bp.CreateSourceCodeVersionRequest(
                template_id=c.templates[key], source=bp.ModuleSource(repository_url=repo.url, ref="v1", path=path),
                is_default=True, variable_configs=list(configs)), metadata=self.admin)
            c.versions[key] = v.id

        await template("team", abstract=True)
        await template("region", abstract=True)
        await template("network", parents=("team", "region"))
        await template("app", parents=("network",))
        await template("gated", parents=("network",))
        await template("leaf", parents=("gated", "app"))
        await template("tail", parents=("app",))
        await version("network", "network", [bp.VariableConfig(name="region", frozen=True),
                                             bp.VariableConfig(name="tag_name", unique=True)])
        await version("app", "app")
        await version("gated", "gated")
        await version("leaf", "leaf")
        await version("tail", "leaf")
        integration = await self.executor.CreateIntegration(ep.CreateIntegrationRequest(
            integration=ep.Integration(name="cloud", provider=ep.INTEGRATION_PROVIDER_GENERIC),
            credentials={"CLOUD_TOKEN": "token-value-123"}), metadata=self.admin)
        c.integration = integration.id
        storage = await self.executor.CreateStorage(ep.CreateStorageRequest(storage=ep.Storage(
            name="states", kind=ep.STORAGE_KIND_LOCAL, local_directory=str(self.tmp_path / "states"))),
            metadata=self.admin)
        c.storage = storage.id

    def new(self, template: str, name: str, parents=(), metadata=None, **kw) -> rp.CreateResourceRequest:
        variables = kw.pop("variables", {})
        abstract = template in ("team", "region")
        extra = {} if abstract else {"integration_ids": [self.catalog.integration], "storage_id": self.catalog.storage}
        extra.update(kw)
        return rp.CreateResourceRequest(resource=rp.Resource(
            name=name, template_id=self.catalog.templates[template], variables=struct(**variables),
            parent_ids=list(parents), **extra))

    async def create(self, template: str, name: str, parents=(), metadata=None, **kw) -> rp.Resource:
        return await self.resource.CreateResource(self.new(template, name, parents, **kw),
                                                  metadata=metadata or self.md)

    async def get(self, id_: str) -> rp.Resource:
        return await self.resource.GetResource(rp.GetResourceRequest(id=id_), metadata=self.md)

    async def wait(self, id_: str, state: int, status: int, timeout: float = 90) -> rp.Resource:
        deadline = time.monotonic() + timeout
        while True:
            r = await self.get(id_)
            if (r.state, r.status) == (state, status):
                return r
            if time.monotonic() > deadline:
                raise AssertionError(f"resource {r.name} is {rp.ResourceState.Name(r.state)}/"
                                     f"{rp.ResourceStatus.Name(r.status)} ({r.error_message}), expected "
                                     f"{rp.ResourceState.Name(state)}/{rp.ResourceStatus.Name(status)}")
            await asyncio.sleep(0.1)

    async def provisioned(self, template: str, name: str, parents=(), **kw) -> rp.Resource:
        r = await self.create(template, name, parents, **kw)
        if r.state == rp.RESOURCE_STATE_PROVISIONED:
            return r
        await self.resource.ProvisionResource(rp.ProvisionResourceRequest(id=r.id), metadata=self.md)
        return await self.wait(r.id, rp.RESOURCE_STATE_PROVISIONED, rp.RESOURCE_STATUS_DONE)

    async def template_of(self, key: str, module: str) -> str:
        """A template (its id) whose default version is `module`, the text of a main.tf."""
        repo = ModuleRepo(self.tmp_path / f"{key}-repo")
        repo.write(f"{key}/main.tf", module)
        repo.commit(key, tag="v1")
        t = await self.blueprint.CreateTemplate(bp.CreateTemplateRequest(template=bp.Template(
            key=key, name=key.title(), enabled=True)), metadata=self.admin)
        await self.blueprint.CreateSourceCodeVersion(bp.CreateSourceCodeVersionRequest(
            template_id=t.id, source=bp.ModuleSource(repository_url=repo.url, ref="v1", path=key), is_default=True),
            metadata=self.admin)
        return t.id

    async def blueprint_of(self, name: str, templates: dict[str, dict], wiring: list[tuple[str, str, str, str]],
                           **kw) -> bp.Blueprint:
        """A blueprint of the catalog's templates: key -> default variables; (source, output, target, variable)."""
        c = self.catalog
        return await self.blueprint.CreateBlueprint(bp.CreateBlueprintRequest(blueprint=bp.Blueprint(
            name=name, templates=[bp.BlueprintTemplate(template_id=c.templates[k], source_code_version_id=c.versions[k],
                                                       default_variables=struct(**d), **kw.get(k, {}))
                                  for k, d in templates.items()],
            wiring_rules=[bp.WiringRule(source_template_id=c.templates[s], source_output=o,
                                        target_template_id=c.templates[t], target_variable=v)
                          for s, o, t, v in wiring])), metadata=self.admin)

    async def base(self) -> tuple[rp.Resource, rp.Resource]:
        """An abstract team and region: the parents a network needs to exist."""
        team = await self.create("team", "platform")
        region = await self.create("region", "eu")
        return team, region
