"""python -m services.workflow"""
from pathlib import Path

from services.common.runtime import ServiceDefinition, run_service
from services.workflow.adapters.tables import metadata
from services.workflow.api.servicer import register

DEFINITION = ServiceDefinition(
    name="workflow",
    migrations_dir=Path(__file__).parent / "migrations",
    metadata=metadata,
    register=register,
)

if __name__ == "__main__":
    run_service(DEFINITION)
