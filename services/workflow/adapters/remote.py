"""The workflow service's view of the blueprint, resource and executor services."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import grpc

from infrakitchen.approval.v1 import approval_pb2 as ap
from infrakitchen.approval.v1 import approval_pb2_grpc
from infrakitchen.blueprint.v1 import blueprint_pb2 as bp
from infrakitchen.blueprint.v1 import blueprint_pb2_grpc
from infrakitchen.executor.v1 import executor_pb2 as ep
from infrakitchen.executor.v1 import executor_pb2_grpc
from infrakitchen.resource.v1 import resource_pb2 as rp
from infrakitchen.resource.v1 import resource_pb2_grpc
from services.common.auth import Role
from services.common.clients import ServiceClients, found_or_none, unless
from services.common.values import from_struct, from_value, to_struct


@dataclass(frozen=True)
class ResourceInfo:
    id: str
    state: str
    status: str
    error_message: str
    last_job_id: str
    outputs: dict[str, Any]
    sensitive_outputs: tuple[str, ...]
    template_id: str = ""
    ever_provisioned: bool = False  # its revision moved past a provisioning
    storage_path: str = ""
    owners: tuple[str, ...] = ()
    approval_request_id: str = ""  # the request it waits for, while approval_pending


@dataclass(frozen=True)
class VersionVariables:
    names: frozenset[str]
    sensitive: tuple[str, ...]


_STATE = {v: k.lower().removeprefix("resource_state_") for k, v in rp.ResourceState.items()}
_STATUS = {v: k.lower().removeprefix("resource_status_") for k, v in rp.ResourceStatus.items()}


def resource_info(r) -> ResourceInfo:
    return ResourceInfo(r.id, _STATE[r.state], _STATUS[r.status], r.error_message, r.last_job_id,
                        {o.name: from_value(o.value) for o in r.outputs},
                        tuple(o.name for o in r.outputs if o.sensitive), r.template_id,
                        storage_path=r.storage_path, owners=tuple(r.owners),
                        approval_request_id=r.approval_request_id)


class Remote:
    def __init__(self, clients: ServiceClients):
        self.clients = clients
        self.blueprint = blueprint_pb2_grpc.BlueprintServiceStub(clients.channel("blueprint"))
        self.resource = resource_pb2_grpc.ResourceServiceStub(clients.channel("resource"))
        self.executor = executor_pb2_grpc.ExecutorServiceStub(clients.channel("executor"))
        self.approval = approval_pb2_grpc.ApprovalServiceStub(clients.channel("approval"))

    async def blueprint_and_plan(self, id_: str, revision: int = 0):
        """(blueprint, preview) or None when there is no such blueprint (at
        that revision; 0: the current one)."""
        b = await found_or_none(self.clients.call("blueprint", self.blueprint.GetBlueprint,
                                                  bp.GetBlueprintRequest(id=id_, revision=revision)))
        if b is None:
            return None
        plan = await self.clients.call("blueprint", self.blueprint.PreviewBlueprint,
                                       bp.PreviewBlueprintRequest(id=id_, revision=b.revision))
        return b, plan

    async def templates(self, ids: list[str]) -> dict:
        """Template id -> Template, in one call (every id must exist)."""
        if not ids:
            return {}
        got = await self.clients.call("blueprint", self.blueprint.BatchGetTemplates,
                                      bp.BatchGetTemplatesRequest(ids=list(dict.fromkeys(ids))))
        return {t.id: t for t in got.templates}

    async def versions_variables(self, ids: list[str]) -> dict[str, VersionVariables]:
        """Version id -> its variables, in one call (every id must exist)."""
        if not ids:
            return {}
        got = await self.clients.call("blueprint", self.blueprint.BatchGetSourceCodeVersions,
                                      bp.BatchGetSourceCodeVersionsRequest(ids=list(dict.fromkeys(ids))))
        return {v.id: VersionVariables(frozenset(x.name for x in v.variables),
                                       tuple(x.name for x in v.variables if x.sensitive))
                for v in got.source_code_versions}

    async def version_source(self, version_id: str) -> ep.JobSource:
        """Where the version's module is, as a job checks it out."""
        v = await self.clients.call("blueprint", self.blueprint.GetSourceCodeVersion,
                                    bp.GetSourceCodeVersionRequest(id=version_id))
        # The commit the version was read at: a plan is made of exactly that code.
        return ep.JobSource(repository_url=v.source.repository_url, ref=v.commit or v.source.ref, path=v.source.path)

    async def submit_plan(self, user: str, request: ep.SubmitJobRequest) -> str:
        """A plan job (idempotent by request id); returns its id."""
        job = await self.clients.call("executor", self.executor.SubmitJob, request, user=user, role=Role.WRITE)
        return job.id

    async def version_exists(self, id_: str, template_id: str) -> bool:
        v = await found_or_none(self.clients.call("blueprint", self.blueprint.GetSourceCodeVersion,
                                                  bp.GetSourceCodeVersionRequest(id=id_)))
        return v is not None and v.template_id == template_id

    async def create_resource(self, user: str, request: rp.CreateResourceRequest) -> ResourceInfo:
        return resource_info(await self.clients.call("resource", self.resource.CreateResource, request, user=user,
                                                     role=Role.WRITE))

    async def provision(self, user: str, resource_id: str, reviewed: rp.ReviewedPlan | None = None) -> ResourceInfo:
        return resource_info(await self.clients.call("resource", self.resource.ProvisionResource,
                                                     rp.ProvisionResourceRequest(id=resource_id, reviewed_plan=reviewed),
                                                     user=user, role=Role.WRITE))

    async def check_saved_plan(self, user: str, plan_job_id: str, storage_id: str, state_path: str) -> None:
        """Raises RemoteError (FAILED_PRECONDITION, STALE_PLAN or
        STATE_CHANGED_SINCE_PLAN) when the saved plan no longer fits its state."""
        await self.clients.call("executor", self.executor.SubmitJob, ep.SubmitJobRequest(
            action=ep.JOB_ACTION_APPLY, plan_job_id=plan_job_id, storage_id=storage_id, state_path=state_path,
            validate_only=True), user=user, role=Role.WRITE)

    async def job(self, id_: str):
        """The executor's Job message, or None when there is no such job."""
        return await found_or_none(self.clients.call("executor", self.executor.GetJob, ep.GetJobRequest(id=id_)))

    async def approval_request(self, id_: str):
        """The approval service's ApprovalRequest, or None when there is no such request."""
        return await found_or_none(self.clients.call("approval", self.approval.GetApprovalRequest,
                                                     ap.GetApprovalRequestRequest(id=id_)))

    async def cancel_job(self, user: str, job_id: str) -> None:
        """Interrupts a job (SIGINT first); a job that has ended already is left as it is."""
        await unless(self.clients.call("executor", self.executor.CancelJob, ep.CancelJobRequest(id=job_id),
                                       user=user, role=Role.WRITE),
                     grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND)

    async def cancel_approval(self, user: str, request_id: str, comment: str) -> bool:
        """Withdraws an open approval request of a cancelled workflow (as the
        workflow service, which may: whoever cancels a workflow ends what it
        waits for). True when it is withdrawn or decided already, False when
        the approval service has no such request (yet)."""
        try:
            await self.clients.call("approval", self.approval.CancelApprovalRequest,
                                    ap.CancelApprovalRequestRequest(id=request_id, comment=comment),
                                    user=user, role=Role.ADMIN)
        except RemoteError as err:
            if err.code == grpc.StatusCode.NOT_FOUND:
                return False
            if err.code != grpc.StatusCode.FAILED_PRECONDITION:
                raise
        return True

    async def approval_flow(self) -> bool:
        flow = await self.clients.call("approval", self.approval.GetApprovalFlow, ap.GetApprovalFlowRequest(),
                                       timeout=5)
        return flow.enabled

    async def request_plan_approval(self, user: str, request: ap.ApprovalRequest) -> None:
        """Opens the approval request (its id chosen by the workflow, so a
        repeat after a crash finds it: ALREADY_EXISTS is success)."""
        await unless(self.clients.call("approval", self.approval.CreateApprovalRequest,
                                       ap.CreateApprovalRequestRequest(approval_request=request,
                                                                       request_id=request.id),
                                       user=user, role=Role.WRITE),
                     grpc.StatusCode.ALREADY_EXISTS)

    async def update_inputs(self, user: str, resource_id: str, variables: dict, version_id: str,
                            parent_ids: list[str]) -> ResourceInfo:
        """New inputs of a resource never provisioned (a step run again after UpdateWorkflow)."""
        return resource_info(await self.clients.call("resource", self.resource.UpdateResource, rp.UpdateResourceRequest(
            resource=rp.Resource(id=resource_id, variables=to_struct(variables), source_code_version_id=version_id,
                                 parent_ids=parent_ids),
            update_mask=["variables", "source_code_version_id", "parent_ids"]), user=user, role=Role.WRITE))

    async def destroy(self, user: str, resource_id: str) -> ResourceInfo:
        return resource_info(await self.clients.call("resource", self.resource.DestroyResource,
                                                     rp.DestroyResourceRequest(id=resource_id), user=user,
                                                     role=Role.ADMIN))

    async def delete_resource(self, user: str, resource_id: str) -> None:
        await self.clients.call("resource", self.resource.DeleteResource, rp.DeleteResourceRequest(id=resource_id),
                                user=user, role=Role.ADMIN)

    async def find_resource(self, resource_id: str) -> ResourceInfo | None:
        """The resource, or None when it no longer exists."""
        return await found_or_none(self.get_resource(resource_id))

    async def children(self, resource_id: str) -> list[ResourceInfo]:
        found, token = [], ""
        while True:
            page = await self.clients.call("resource", self.resource.ListResources, rp.ListResourcesRequest(
                parent_id=resource_id, page_size=200, page_token=token))
            found += [resource_info(r) for r in page.resources]
            if not (token := page.next_page_token):
                return found

    async def get_resource(self, resource_id: str) -> ResourceInfo:
        return resource_info(await self.clients.call("resource", self.resource.GetResource,
                                                     rp.GetResourceRequest(id=resource_id)))

    async def sensitive_outputs(self, job_id: str) -> dict[str, Any]:
        """Clear values of a job's sensitive outputs, to wire them downstream."""
        got = await self.clients.call("executor", self.executor.GetJobSensitiveOutputs,
                                      ep.GetJobSensitiveOutputsRequest(job_id=job_id))
        return {o.name: from_value(o.value) for o in got.outputs if o.sensitive}


def struct(values: dict) -> Any:
    return to_struct(values)


def from_pb_struct(s) -> dict:
    return from_struct(s)
