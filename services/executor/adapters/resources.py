"""The executor's one question to the resource service: which resources use
an integration or a secret (asked before either is deleted, so the next job
of such a resource does not fail on a credential that is gone)."""
from __future__ import annotations

from infrakitchen.resource.v1 import resource_pb2 as rp
from infrakitchen.resource.v1 import resource_pb2_grpc
from services.common.clients import ServiceClients

# Enough to name in an error; the user deals with these, then asks again.
MAX_NAMED = 20


class ResourceUsers:
    def __init__(self, clients: ServiceClients):
        self.clients = clients
        self.stub = resource_pb2_grpc.ResourceServiceStub(clients.channel("resource"))

    async def of(self, field: str, id_: str) -> list[tuple[str, str]]:
        """(id, name) of up to MAX_NAMED resources whose `field`
        ("integration_id" or "secret_id") is `id_`. Unavailable when the
        resource service is down: nothing is deleted unchecked."""
        page = await self.clients.call("resource", self.stub.ListResources,
                                       rp.ListResourcesRequest(page_size=MAX_NAMED, **{field: id_}))
        return [(r.id, r.name) for r in page.resources]
