"""gRPC servicer of WorkflowService: parses, authorises, calls one use case in
a unit of work, converts the result."""
from __future__ import annotations

from google.protobuf import empty_pb2

from infrakitchen.workflow.v1 import workflow_pb2 as pb
from infrakitchen.workflow.v1 import workflow_pb2_grpc
from services.common.auth import current_principal
from services.common.interceptors import required_role
from services.common.filters import enum_word, merged, parse_filter, text, words_of
from services.workflow.api import convert

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["WorkflowService"].full_name
TEARDOWN_METHOD = f"/{SERVICE_NAME}/TeardownWorkflow"
# Commits of this process wake a watch at once (services.common.changes);
# the poll finds what another replica of the service committed.
WATCH_POLL_SECONDS = 1.0



# What ListWorkflows' `filter` may name, and how each value is read.
FILTERS = {"blueprint_id": text,
           "status": enum_word(words_of(convert.STATUS, pb.WorkflowStatus, "WORKFLOW_STATUS_"), "WORKFLOW_STATUS_")}

class WorkflowServicer(workflow_pb2_grpc.WorkflowServiceServicer):
    def __init__(self, runtime):
        self.uow = runtime.uow
        self.workflows = runtime.workflows
        self.changes = runtime.changes

    async def _read(self, id_: str) -> pb.Workflow:
        async with self.uow() as uow:
            w = await self.workflows.get(uow, id_)
            return convert.workflow_to_pb(w, await uow.steps.of(w.id))

    async def CreateWorkflow(self, request, context):
        variables, versions, parents = convert.overrides_from_pb(request)
        async with self.uow() as uow:
            w = await self.workflows.create(uow, current_principal(), request.blueprint_id, variables, versions,
                                            parents, list(request.integration_ids), list(request.secret_ids),
                                            request.storage_id, request.max_parallel_steps, request.request_id,
                                            convert.controls_from_pb(request))
            await uow.commit()
        return await self._read(w.id)

    async def GetWorkflow(self, request, context):
        return await self._read(request.id)

    async def ListWorkflows(self, request, context):
        async with self.uow() as uow:
            filters = merged(dict(blueprint_id=request.blueprint_id, status=convert.STATUS.get(request.status, "")),
                             parse_filter(request.filter, FILTERS))
            found, token = await self.workflows.list(uow, request.page_size, request.page_token,
                                                     filters["blueprint_id"], filters["status"], request.order_by)
            out = [convert.workflow_to_pb(w, await uow.steps.of(w.id)) for w in found]
        return pb.ListWorkflowsResponse(workflows=out, next_page_token=token)

    async def ExecuteWorkflow(self, request, context):
        async with self.uow() as uow:
            await self.workflows.execute(uow, current_principal(), request.id, request.plan_id)
            await uow.commit()
        return await self._read(request.id)

    async def UpdateWorkflow(self, request, context):
        variables, versions, parents = convert.overrides_from_pb(request.workflow)
        given = request.workflow
        mask = list(request.update_mask) or [
            *(f for f in ("variable_overrides", "source_code_version_overrides", "parent_overrides")
              if getattr(given, f)),
            *(["on_failure"] if given.on_failure else []),
            *(f for f in ("retry_policy", "expire_time") if given.HasField(f))]
        async with self.uow() as uow:
            await self.workflows.update(uow, current_principal(), request.workflow.id, variables, versions, parents,
                                        mask, request.workflow.etag, convert.controls_from_pb(request.workflow))
            await uow.commit()
        return await self._read(request.workflow.id)

    async def PlanWorkflow(self, request, context):
        async with self.uow() as uow:
            await self.workflows.plan(uow, current_principal(), request.id)
            await uow.commit()
        return await self._read(request.id)

    async def CancelWorkflow(self, request, context):
        async with self.uow() as uow:
            await self.workflows.cancel(uow, current_principal(), request.id)
            await uow.commit()
        return await self._read(request.id)

    async def DeleteWorkflow(self, request, context):
        async with self.uow() as uow:
            await self.workflows.delete(uow, current_principal(), request.id)
            await uow.commit()
        return empty_pb2.Empty()

    async def PreviewWorkflowTeardown(self, request, context):
        async with self.uow() as uow:
            items, external = await self.workflows.preview_teardown(uow, request.id)
        response = convert.teardown_to_pb(items, external)
        response.caller_can_teardown = current_principal().has(required_role(TEARDOWN_METHOD))
        return response

    async def TeardownWorkflow(self, request, context):
        async with self.uow() as uow:
            await self.workflows.teardown(uow, current_principal(), request.id)
            await uow.commit()
        return await self._read(request.id)

    async def WatchWorkflow(self, request, context):
        """Every change of the workflow or its steps, until it has ended (and
        a teardown or a plan under way has ended too; a pending workflow's
        stream ends with its plan when one runs)."""
        last = None
        with self.changes.watch(request.id) as watch:
            while True:
                seen = watch.changes  # before the read: a commit during it wakes the next wait at once
                current = await self._read(request.id)
                snapshot = current.SerializeToString(deterministic=True)
                if snapshot != last:
                    last = snapshot
                    yield pb.WatchWorkflowResponse(workflow=current)
                if current.status in (pb.WORKFLOW_STATUS_DONE, pb.WORKFLOW_STATUS_ERROR) \
                        and current.teardown_status != pb.TEARDOWN_STATUS_IN_PROGRESS \
                        and current.plan_status != pb.PLAN_STATUS_IN_PROGRESS:
                    return
                await watch.after(seen, WATCH_POLL_SECONDS)


def register(server, runtime) -> list[str]:
    workflow_pb2_grpc.add_WorkflowServiceServicer_to_server(WorkflowServicer(runtime), server)
    return [SERVICE_NAME]
