"""python -m services.executor"""
from pathlib import Path

from services.common.runtime import ServiceDefinition, run_service
from services.executor.adapters.tables import metadata
from services.executor.api.servicer import register

DEFINITION = ServiceDefinition(
    name="executor",
    migrations_dir=Path(__file__).parent / "migrations",
    metadata=metadata,
    register=register,
)

if __name__ == "__main__":
    run_service(DEFINITION)
