"""gRPC servicer of BlueprintService: parses, authorises, calls one use case in
a unit of work, converts the result."""
from google.protobuf import empty_pb2

from infrakitchen.blueprint.v1 import blueprint_pb2 as pb
from infrakitchen.blueprint.v1 import blueprint_pb2_grpc
from services.blueprint.adapters.module_reader import read_module
from services.blueprint.api import convert
from services.blueprint.app import catalog
from services.common.auth import current_principal

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["BlueprintService"].full_name

_ENABLED = {pb.ENABLED_FILTER_ENABLED: True, pb.ENABLED_FILTER_DISABLED: False}


class BlueprintServicer(blueprint_pb2_grpc.BlueprintServiceServicer):
    def __init__(self, runtime):
        self.uow = runtime.uow

    async def CreateTemplate(self, request, context):
        async with self.uow() as uow:
            t = await catalog.create_template(uow, current_principal(), convert.template_from_pb(request.template),
                                              request.request_id)
            await uow.commit()
        return convert.template_to_pb(t)

    async def GetTemplate(self, request, context):
        async with self.uow() as uow:
            return convert.template_to_pb(await catalog.get_template(uow, request.id))

    async def BatchGetTemplates(self, request, context):
        async with self.uow() as uow:
            found = await catalog.batch_get(uow.templates, "template", list(request.ids))
        return pb.BatchGetTemplatesResponse(templates=[convert.template_to_pb(t) for t in found])

    async def BatchGetSourceCodeVersions(self, request, context):
        async with self.uow() as uow:
            found = await catalog.batch_get(uow.versions, "source code version", list(request.ids))
        return pb.BatchGetSourceCodeVersionsResponse(source_code_versions=[convert.version_to_pb(v) for v in found])

    async def ListTemplates(self, request, context):
        async with self.uow() as uow:
            found, token = await catalog.list_templates(uow, request.page_size, request.page_token, request.label,
                                                        _ENABLED.get(request.enabled))
        return pb.ListTemplatesResponse(templates=[convert.template_to_pb(t) for t in found], next_page_token=token)

    async def UpdateTemplate(self, request, context):
        mask = list(request.update_mask) or convert.populated(request.template, catalog.TEMPLATE_FIELDS)
        async with self.uow() as uow:
            t = await catalog.update_template(uow, current_principal(), convert.template_from_pb(request.template),
                                              mask, request.template.etag)
            await uow.commit()
        return convert.template_to_pb(t)

    async def DeleteTemplate(self, request, context):
        async with self.uow() as uow:
            await catalog.delete_template(uow, current_principal(), request.id, request.etag)
            await uow.commit()
        return empty_pb2.Empty()

    async def CreateSourceCodeVersion(self, request, context):
        async with self.uow() as uow:
            v = await catalog.create_source_code_version(
                uow, current_principal(), read_module, request.template_id, convert.source_from_pb(request.source),
                request.description, request.is_default, [convert.config_from_pb(c) for c in request.variable_configs],
                request.request_id)
            await uow.commit()
        return convert.version_to_pb(v)

    async def GetSourceCodeVersion(self, request, context):
        async with self.uow() as uow:
            return convert.version_to_pb(await catalog.get_source_code_version(uow, request.id))

    async def ListSourceCodeVersions(self, request, context):
        async with self.uow() as uow:
            found, token = await catalog.list_source_code_versions(uow, request.page_size, request.page_token,
                                                                   request.template_id)
        return pb.ListSourceCodeVersionsResponse(source_code_versions=[convert.version_to_pb(v) for v in found],
                                                 next_page_token=token)

    async def UpdateSourceCodeVersion(self, request, context):
        async with self.uow() as uow:
            v = await catalog.update_source_code_version(
                uow, current_principal(), request.id, request.etag,
                request.description if request.HasField("description") else None,
                request.is_default if request.HasField("is_default") else None,
                [convert.config_from_pb(c) for c in request.variable_configs])
            await uow.commit()
        return convert.version_to_pb(v)

    async def DeleteSourceCodeVersion(self, request, context):
        async with self.uow() as uow:
            await catalog.delete_source_code_version(uow, current_principal(), request.id, request.etag)
            await uow.commit()
        return empty_pb2.Empty()

    async def CreateBlueprint(self, request, context):
        async with self.uow() as uow:
            b = await catalog.create_blueprint(uow, current_principal(), convert.blueprint_from_pb(request.blueprint),
                                               request.request_id)
            await uow.commit()
        return convert.blueprint_to_pb(b)

    async def GetBlueprint(self, request, context):
        async with self.uow() as uow:
            return convert.blueprint_to_pb(await catalog.get_blueprint(uow, request.id, request.revision))

    async def ListBlueprints(self, request, context):
        async with self.uow() as uow:
            found, token = await catalog.list_blueprints(uow, request.page_size, request.page_token, request.label)
        return pb.ListBlueprintsResponse(blueprints=[convert.blueprint_to_pb(b) for b in found],
                                         next_page_token=token)

    async def UpdateBlueprint(self, request, context):
        mask = list(request.update_mask) or convert.populated(request.blueprint, catalog.BLUEPRINT_FIELDS)
        async with self.uow() as uow:
            b = await catalog.update_blueprint(uow, current_principal(), convert.blueprint_from_pb(request.blueprint),
                                               mask, request.blueprint.etag)
            await uow.commit()
        return convert.blueprint_to_pb(b)

    async def DeleteBlueprint(self, request, context):
        async with self.uow() as uow:
            await catalog.delete_blueprint(uow, current_principal(), request.id, request.etag)
            await uow.commit()
        return empty_pb2.Empty()

    async def PreviewBlueprint(self, request, context):
        async with self.uow() as uow:
            b, plan = await catalog.preview_blueprint(uow, request.id, request.revision)
        return convert.plan_to_pb(b, plan)


def register(server, runtime) -> list[str]:
    blueprint_pb2_grpc.add_BlueprintServiceServicer_to_server(BlueprintServicer(runtime), server)
    return [SERVICE_NAME]
