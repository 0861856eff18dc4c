"""python -m services.blueprint"""
from pathlib import Path

from services.common.runtime import ServiceDefinition, run_service
from services.blueprint.adapters.tables import metadata
from services.blueprint.api.servicer import register

DEFINITION = ServiceDefinition(
    name="blueprint",
    migrations_dir=Path(__file__).parent / "migrations",
    metadata=metadata,
    register=register,
)

if __name__ == "__main__":
    run_service(DEFINITION)
