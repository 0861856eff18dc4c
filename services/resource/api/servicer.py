"""gRPC servicer of ResourceService: parses, authorises, calls one use case in
a unit of work, converts the result."""
from __future__ import annotations

from google.protobuf import empty_pb2

from infrakitchen.resource.v1 import resource_pb2 as pb
from infrakitchen.resource.v1 import resource_pb2_grpc
from services.common.auth import current_principal
from services.common.filters import enum_word, merged, parse_filter, text, words_of
from services.common.paging import paginate
from services.resource.api import convert
from services.resource.app.reviewed_plans import ReviewedPlan

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ResourceService"].full_name

# Commits of this process wake a watch at once (services.common.changes);
# the poll finds what another replica of the service committed.
WATCH_POLL_SECONDS = 1.0
_METADATA_FIELDS = ("description", "labels", "dependency_tags", "dependency_configs", "variables")
_TS_FIELDS = ("description", "source_code_version_id", "variables", "integration_ids", "secret_ids", "labels",
              "workspace")


# What ListResources' `filter` may name, and how each value is read.
FILTERS = {"template_id": text, "label": text, "parent_id": text, "workflow_id": text,
           "state": enum_word(words_of(convert.STATE, pb.ResourceState, "RESOURCE_STATE_"), "RESOURCE_STATE_"),
           "status": enum_word(words_of(convert.STATUS, pb.ResourceStatus, "RESOURCE_STATUS_"), "RESOURCE_STATUS_")}


class ResourceServicer(resource_pb2_grpc.ResourceServiceServicer):
    def __init__(self, runtime):
        self.uow = runtime.uow
        self.read_uow = runtime.read_uow
        self.changes = runtime.changes
        self.lc = runtime.lifecycle

    async def _run(self, use_case, *args, reread: str | None = None):
        """Runs a command and returns the resource as stored after commit (a
        job submission may have changed it after the use case returned)."""
        async with self.uow() as uow:
            result = await use_case(uow, current_principal(), *args)
            await uow.commit()
        if reread is None:
            return result
        async with self.uow() as uow:
            return await self.lc.get(uow, reread)

    async def CreateResource(self, request, context):
        r = convert.resource_from_pb(request.resource)
        r.workflow_id, r.step_id = request.workflow_id, request.step_id
        r.sensitive_variables = list(dict.fromkeys(request.sensitive_variables))
        created = await self._run(self.lc.create, r, request.request_id, request.provision,
                                  _reviewed(request))
        if request.provision:  # the job submission ran after the commit
            async with self.uow() as uow:
                created = await self.lc.get(uow, created.id)
        return convert.resource_to_pb(created)

    async def GetResource(self, request, context):
        async with self.read_uow() as uow:
            return convert.resource_to_pb(await self.lc.get(uow, request.id))

    async def ListResources(self, request, context):
        filters = merged(dict(template_id=request.template_id, state=convert.STATE.get(request.state, ""),
                              status=convert.STATUS.get(request.status, ""), label=request.label,
                              parent_id=request.parent_id, workflow_id=request.workflow_id,
                              integration_id=request.integration_id, secret_id=request.secret_id),
                         parse_filter(request.filter, FILTERS))
        async with self.read_uow() as uow:
            found, token = await self.lc.list(uow, request.page_size, request.page_token, order_by=request.order_by,
                                              **filters)
        return pb.ListResourcesResponse(resources=[convert.resource_to_pb(r) for r in found], next_page_token=token)

    async def UpdateResource(self, request, context):
        mask = list(request.update_mask) or [f for f in _METADATA_FIELDS if getattr(request.resource, f)]
        mask += [f for f in ("name", "template_id", "storage_id", "storage_path")
                 if f not in mask and getattr(request.resource, f) and not request.update_mask]
        r = convert.resource_from_pb(request.resource)
        updated = await self._run(self.lc.update, r, mask, request.resource.etag)
        return convert.resource_to_pb(updated)

    async def DeleteResource(self, request, context):
        await self._run(self.lc.delete, request.id, request.etag)
        return empty_pb2.Empty()

    async def ProvisionResource(self, request, context):
        return convert.resource_to_pb(await self._run(self.lc.provision, request.id, request.etag, _reviewed(request),
                                                      reread=request.id))

    async def DryRunResource(self, request, context):
        return convert.resource_to_pb(await self._run(self.lc.dry_run, request.id, reread=request.id))

    async def RecreateResource(self, request, context):
        return convert.resource_to_pb(await self._run(self.lc.recreate, request.id, request.etag, reread=request.id))

    async def DestroyResource(self, request, context):
        return convert.resource_to_pb(await self._run(self.lc.destroy, request.id, request.etag, reread=request.id))

    async def CancelResourceDestroy(self, request, context):
        return convert.resource_to_pb(await self._run(self.lc.cancel_destroy, request.id))

    async def GetResourceTree(self, request, context):
        async with self.read_uow() as uow:
            parents, (root, kids) = await self.lc.tree(uow, request.id)

        def node(pair):
            r, children = pair
            return convert.tree_node(r, [node(c) for c in children])
        return pb.GetResourceTreeResponse(parents=[convert.tree_node(p) for p in parents], root=node((root, kids)))

    async def ListResourceRevisions(self, request, context):
        async with self.read_uow() as uow:
            await self.lc.get(uow, request.resource_id)
            found, token = await paginate(lambda a, n: uow.revisions.list(request.resource_id, a, n),
                                          request.page_size, request.page_token,
                                          {"list": "revisions", "resource_id": request.resource_id},
                                          lambda r: (r.revision,))
        return pb.ListResourceRevisionsResponse(revisions=[convert.revision_to_pb(r) for r in found],
                                                next_page_token=token)

    async def ListResourceEvents(self, request, context):
        # The audit trail outlives the resource, so a deleted resource's entries stay readable.
        async with self.read_uow() as uow:
            found, token = await paginate(lambda a, n: uow.audit.list(request.resource_id, a, n),
                                          request.page_size, request.page_token,
                                          {"list": "audit", "resource_id": request.resource_id}, lambda e: (e.seq,))
        return pb.ListResourceEventsResponse(entries=[convert.audit_to_pb(e) for e in found], next_page_token=token)

    async def AddResourceOwner(self, request, context):
        return convert.resource_to_pb(await self._run(self.lc.add_owner, request.id, request.user))

    async def RemoveResourceOwner(self, request, context):
        return convert.resource_to_pb(await self._run(self.lc.remove_owner, request.id, request.user))

    async def WatchResource(self, request, context):
        """Sends the resource now and after every change, until the client leaves
        or the resource is deleted."""
        version = None
        with self.changes.watch(request.id) as watch:
            while True:
                seen = watch.changes  # before the read: a commit during it wakes the next wait at once
                async with self.uow() as uow:
                    r = await uow.resources.get(request.id)
                if r is None:
                    if version is None:
                        async with self.uow() as uow:
                            await self.lc.get(uow, request.id)  # NOT_FOUND
                    return
                if r.version != version:
                    version = r.version
                    yield pb.WatchResourceResponse(resource=convert.resource_to_pb(r))
                await watch.after(seen, WATCH_POLL_SECONDS)

    async def _sensitive(self, resource_id: str) -> list[str]:
        async with self.read_uow() as uow:
            r = await uow.resources.get(resource_id)
        return r.sensitive_variables if r else []

    async def CreateTemporaryState(self, request, context):
        t = await self._run(self.lc.create_temporary_state, convert.temporary_state_from_pb(request.temporary_state),
                            request.request_id)
        return convert.temporary_state_to_pb(t, await self._sensitive(t.resource_id))

    async def GetTemporaryState(self, request, context):
        async with self.read_uow() as uow:
            t = await self.lc.get_temporary_state(uow, request.id)
        return convert.temporary_state_to_pb(t, await self._sensitive(t.resource_id))

    async def ListTemporaryStates(self, request, context):
        async with self.read_uow() as uow:
            found, token = await self.lc.list_temporary_states(uow, request.resource_id, request.page_size,
                                                               request.page_token)
        return pb.ListTemporaryStatesResponse(
            temporary_states=[convert.temporary_state_to_pb(t, await self._sensitive(t.resource_id)) for t in found],
            next_page_token=token)

    async def UpdateTemporaryState(self, request, context):
        ts = request.temporary_state
        mask = list(request.update_mask) or [f for f in _TS_FIELDS if (
            ts.HasField(f) if f in ("description", "source_code_version_id", "workspace") else getattr(ts, f))]
        t = await self._run(self.lc.update_temporary_state, convert.temporary_state_from_pb(ts), mask, ts.etag)
        return convert.temporary_state_to_pb(t, await self._sensitive(t.resource_id))

    async def DryRunTemporaryState(self, request, context):
        t = await self._run(self.lc.dry_run_temporary_state, request.id)
        return convert.temporary_state_to_pb(t, await self._sensitive(t.resource_id))

    async def SubmitTemporaryState(self, request, context):
        await self._run(self.lc.submit_temporary_state, request.id, request.etag)
        async with self.uow() as uow:
            t = await self.lc.get_temporary_state(uow, request.id)
        return convert.temporary_state_to_pb(t, await self._sensitive(t.resource_id))

    async def DiscardTemporaryState(self, request, context):
        await self._run(self.lc.discard_temporary_state, request.id)
        return empty_pb2.Empty()


def register(server, runtime) -> list[str]:
    resource_pb2_grpc.add_ResourceServiceServicer_to_server(ResourceServicer(runtime), server)
    return [SERVICE_NAME]


def _reviewed(request) -> ReviewedPlan | None:
    if not request.HasField("reviewed_plan") or not request.reviewed_plan.plan_job_id:
        return None
    return ReviewedPlan(request.reviewed_plan.plan_job_id, request.reviewed_plan.approval_request_id)
