"""The resource service's view of the blueprint, executor and approval
services, over gRPC. Everything returned is plain Python (domain-facing)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


from infrakitchen.approval.v1 import approval_pb2, approval_pb2_grpc
from infrakitchen.blueprint.v1 import blueprint_pb2, blueprint_pb2_grpc
from infrakitchen.executor.v1 import executor_pb2, executor_pb2_grpc
from services.common.auth import Role
from services.common.clients import ServiceClients, found_or_none
from services.common.values import from_value, to_struct
from services.resource.adapters.catalog import INTEGRATION_SECONDS, CatalogCache, revision_of
from services.resource.domain.model import Output


@dataclass(frozen=True)
class TemplateInfo:
    id: str
    key: str
    enabled: bool
    abstract: bool
    parent_template_ids: tuple[str, ...]


@dataclass(frozen=True)
class VariableInfo:
    name: str
    type: str
    required: bool
    has_default: bool
    default: Any
    sensitive: bool
    frozen: bool
    unique: bool
    # The default is the platform team's (a variable_configs default), not the module's.
    platform_default: bool = False


@dataclass(frozen=True)
class VersionInfo:
    id: str
    template_id: str
    repository_url: str
    ref: str
    path: str
    commit: str
    is_default: bool
    variables: tuple[VariableInfo, ...]

    def variable(self, name: str) -> VariableInfo | None:
        return next((v for v in self.variables if v.name == name), None)


@dataclass(frozen=True)
class JobInfo:
    id: str
    action: str
    status: str  # queued | running | succeeded | failed | cancelled | timed_out
    outputs: tuple[Output, ...] = ()
    error_message: str = ""
    plan_add: int = 0
    plan_change: int = 0
    plan_destroy: int = 0


_JOB_STATUS = {executor_pb2.JOB_STATUS_QUEUED: "queued", executor_pb2.JOB_STATUS_RUNNING: "running",
               executor_pb2.JOB_STATUS_SUCCEEDED: "succeeded", executor_pb2.JOB_STATUS_FAILED: "failed",
               executor_pb2.JOB_STATUS_CANCELLED: "cancelled", executor_pb2.JOB_STATUS_TIMED_OUT: "timed_out"}
_JOB_ACTION = {executor_pb2.JOB_ACTION_PLAN: "plan", executor_pb2.JOB_ACTION_APPLY: "apply",
               executor_pb2.JOB_ACTION_DESTROY: "destroy"}
_ACTION_PB = {v: k for k, v in _JOB_ACTION.items()}


def job_info(job) -> JobInfo:
    """From an executor Job or an events JobChanged."""
    return JobInfo(
        id=getattr(job, "id", "") or getattr(job, "job_id", ""), action=_JOB_ACTION.get(job.action, ""),
        status=_JOB_STATUS.get(job.status, ""),
        outputs=tuple(Output(o.name, from_value(o.value), o.sensitive) for o in job.outputs),
        error_message=job.error_message, plan_add=job.plan_summary.add, plan_change=job.plan_summary.change,
        plan_destroy=job.plan_summary.destroy)


@dataclass
class JobSubmission:
    action: str
    version: VersionInfo
    variables: dict[str, Any]
    sensitive_variables: list[str]
    integration_ids: list[str]
    secret_ids: list[str]
    storage_id: str
    state_path: str
    resource_id: str
    revision: int
    workflow_id: str = ""
    step_id: str = ""
    temporary_state_id: str = ""
    plan_job_id: str = ""
    request_id: str = ""
    template_id: str = ""  # a job's OIDC token names it
    correlation: dict = field(default_factory=dict)


class Remote:
    def __init__(self, clients: ServiceClients, cache_seconds: float = 300.0):
        self.clients = clients
        self.cache = CatalogCache(cache_seconds)
        self.blueprint = blueprint_pb2_grpc.BlueprintServiceStub(clients.channel("blueprint"))
        self.executor = executor_pb2_grpc.ExecutorServiceStub(clients.channel("executor"))
        self.approval = approval_pb2_grpc.ApprovalServiceStub(clients.channel("approval"))

    async def template(self, id_: str) -> TemplateInfo | None:
        return await self.cache.get(("template", id_), lambda: self._template(id_))

    async def _template(self, id_: str) -> tuple[int, TemplateInfo | None]:
        t = await found_or_none(self.clients.call("blueprint", self.blueprint.GetTemplate,
                                                  blueprint_pb2.GetTemplateRequest(id=id_)))
        return (0, None) if t is None else (revision_of(t.etag), template_info(t))

    async def version(self, id_: str) -> VersionInfo | None:
        return await self.cache.get(("version", id_), lambda: self._version_of(id_))

    async def _version_of(self, id_: str) -> tuple[int, VersionInfo | None]:
        v = await found_or_none(self.clients.call("blueprint", self.blueprint.GetSourceCodeVersion,
                                                  blueprint_pb2.GetSourceCodeVersionRequest(id=id_)))
        return (0, None) if v is None else (revision_of(v.etag), version_info(v))

    async def default_version(self, template_id: str) -> VersionInfo | None:
        page = await self.clients.call("blueprint", self.blueprint.ListSourceCodeVersions,
                                       blueprint_pb2.ListSourceCodeVersionsRequest(template_id=template_id,
                                                                                   page_size=1000))
        versions = [version_info(v) for v in page.source_code_versions]
        return next((v for v in versions if v.is_default), versions[-1] if versions else None)

    async def integration_exists(self, id_: str) -> bool:
        return bool(await self.cache.get(("integration", id_), lambda: self._integration_exists(id_),
                                         max_age=INTEGRATION_SECONDS))

    async def _integration_exists(self, id_: str) -> tuple[int, bool | None]:
        found = await found_or_none(self.clients.call("executor", self.executor.GetIntegration,
                                                      executor_pb2.GetIntegrationRequest(id=id_)))
        return 0, (None if found is None else True)

    async def storage_exists(self, id_: str) -> bool:
        return bool(await self.cache.get(("storage", id_), lambda: self._storage_exists(id_),
                                         max_age=INTEGRATION_SECONDS))

    async def _storage_exists(self, id_: str) -> tuple[int, bool | None]:
        found = await found_or_none(self.clients.call("executor", self.executor.GetStorage,
                                                      executor_pb2.GetStorageRequest(id=id_)))
        return 0, (None if found is None else True)

    async def release_state_path(self, storage_id: str, path: str, resource_id: str) -> None:
        await self.clients.call("executor", self.executor.ReleaseStatePath, executor_pb2.ReleaseStatePathRequest(
            storage_id=storage_id, state_path=path, resource_id=resource_id))

    async def submit_job(self, s: JobSubmission, user: str) -> str:
        request = executor_pb2.SubmitJobRequest(
            action=_ACTION_PB[s.action], variables=to_struct(s.variables),
            sensitive_variables=s.sensitive_variables, integration_ids=s.integration_ids, secret_ids=s.secret_ids,
            storage_id=s.storage_id, state_path=s.state_path, plan_job_id=s.plan_job_id, request_id=s.request_id,
            correlation=executor_pb2.JobCorrelation(resource_id=s.resource_id, resource_revision=s.revision,
                                                    workflow_id=s.workflow_id, step_id=s.step_id,
                                                    temporary_state_id=s.temporary_state_id,
                                                    template_id=s.template_id))
        if not s.plan_job_id:
            request.source.CopyFrom(executor_pb2.JobSource(repository_url=s.version.repository_url,
                                                           ref=s.version.commit or s.version.ref,
                                                           path=s.version.path))
        job = await self.clients.call("executor", self.executor.SubmitJob, request, user=user, role=Role.WRITE)
        return job.id

    async def job(self, id_: str) -> JobInfo | None:
        job = await self.job_detail(id_)
        return job_info(job) if job is not None else None

    async def job_detail(self, id_: str):
        """The executor's Job message (correlation, state path, plan summary), or None."""
        return await found_or_none(self.clients.call("executor", self.executor.GetJob,
                                                     executor_pb2.GetJobRequest(id=id_)))

    async def approval_request(self, id_: str):
        return await found_or_none(self.clients.call("approval", self.approval.GetApprovalRequest,
                                                     approval_pb2.GetApprovalRequestRequest(id=id_)))

    async def approval_flow(self) -> bool:
        flow = await self.clients.call("approval", self.approval.GetApprovalFlow,
                                       approval_pb2.GetApprovalFlowRequest(), timeout=3)
        return flow.enabled


def template_info(t) -> TemplateInfo:
    return TemplateInfo(t.id, t.key, t.enabled, t.abstract, tuple(t.parent_template_ids))


def version_info(v) -> VersionInfo:
    return VersionInfo(
        id=v.id, template_id=v.template_id, repository_url=v.source.repository_url, ref=v.source.ref,
        path=v.source.path, commit=v.commit, is_default=v.is_default,
        variables=tuple(VariableInfo(x.name, x.type, x.required, x.has_default,
                                     from_value(x.default) if x.has_default else None, x.sensitive, x.frozen,
                                     x.unique, x.platform_default) for x in v.variables))
