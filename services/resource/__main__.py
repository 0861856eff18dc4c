"""python -m services.resource"""
from pathlib import Path

from services.common.runtime import ServiceDefinition, run_service
from services.resource.adapters.tables import metadata
from services.resource.api.servicer import register

DEFINITION = ServiceDefinition(
    name="resource",
    migrations_dir=Path(__file__).parent / "migrations",
    metadata=metadata,
    register=register,
)

if __name__ == "__main__":
    run_service(DEFINITION)
