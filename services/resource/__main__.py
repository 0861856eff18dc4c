"""python -m services.resource"""
from pathlib import Path

from services.common.clients import ServiceClients
from services.common.runtime import ServiceDefinition, run_service
from services.resource.adapters.remote import Remote
from services.resource.adapters.tables import metadata
from services.resource.adapters.uow import ResourceUnitOfWork
from services.resource.api.servicer import register
from services.resource.app.lifecycle import Lifecycle
from services.resource.consumers.events import consumers, reconciler


def setup(runtime) -> None:
    runtime.clients = ServiceClients(runtime.settings, "resource")
    cache = float(runtime.settings.env.get("IK_RESOURCE_CATALOG_CACHE_SECONDS", "5"))
    runtime.lifecycle = Lifecycle(Remote(runtime.clients, cache), runtime.uow)


DEFINITION = ServiceDefinition(
    name="resource",
    migrations_dir=Path(__file__).parent / "migrations",
    metadata=metadata,
    register=register,
    uow_class=ResourceUnitOfWork,
    setup=setup,
    consumers=consumers,
    background=lambda runtime: [reconciler(runtime)],
)

if __name__ == "__main__":
    run_service(DEFINITION)
