"""python -m services.blueprint"""
from pathlib import Path

from services.common.runtime import ServiceDefinition, run_service
from services.blueprint.adapters.tables import metadata
from services.blueprint.adapters.uow import BlueprintUnitOfWork
from services.blueprint.api.servicer import register

DEFINITION = ServiceDefinition(
    name="blueprint",
    migrations_dir=Path(__file__).parent / "migrations",
    metadata=metadata,
    register=register,
    uow_class=BlueprintUnitOfWork,
)

if __name__ == "__main__":
    run_service(DEFINITION)
