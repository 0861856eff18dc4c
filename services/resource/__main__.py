"""python -m services.resource"""
from pathlib import Path

from services.common.clients import ServiceClients
from services.common.runtime import ServiceDefinition, run_service
from services.common.vault import Vault
from services.resource.adapters.catalog import CatalogFollower, follow
from services.resource.adapters.remote import Remote, template_info, version_info
from services.resource.adapters.tables import metadata
from services.resource.adapters.uow import ResourceUnitOfWork
from services.resource.api.servicer import register
from services.resource.app.lifecycle import Lifecycle
from services.resource.consumers.events import consumers, reconciler


def setup(runtime) -> None:
    runtime.uow_options = {"vault": Vault.from_settings(runtime.settings)}
    runtime.clients = ServiceClients(runtime.settings, "resource", runtime.identity)
    cache = float(runtime.settings.env.get("IK_RESOURCE_CATALOG_CACHE_SECONDS", "300"))
    remote = Remote(runtime.clients, cache)
    runtime.lifecycle = Lifecycle(remote, runtime.uow)
    runtime.catalog = CatalogFollower(runtime.bus, remote.cache, template_info, version_info, runtime.verifier)


def background(runtime) -> list:
    return [reconciler(runtime), follow(runtime.catalog)]


DEFINITION = ServiceDefinition(
    name="resource",
    migrations_dir=Path(__file__).parent / "migrations",
    metadata=metadata,
    register=register,
    uow_class=ResourceUnitOfWork,
    setup=setup,
    consumers=consumers,
    background=background,
)

if __name__ == "__main__":
    run_service(DEFINITION)
