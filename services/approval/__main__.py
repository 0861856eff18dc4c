"""python -m services.approval"""
from pathlib import Path

from services.common.runtime import ServiceDefinition, run_service
from services.approval.adapters.tables import metadata
from services.approval.api.servicer import register

DEFINITION = ServiceDefinition(
    name="approval",
    migrations_dir=Path(__file__).parent / "migrations",
    metadata=metadata,
    register=register,
)

if __name__ == "__main__":
    run_service(DEFINITION)
