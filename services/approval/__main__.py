"""python -m services.approval"""
from pathlib import Path

from services.approval.adapters.tables import metadata
from services.approval.adapters.uow import ApprovalUnitOfWork
from services.approval.api.servicer import register
from services.approval.consumers.resource_events import consumers
from services.common.runtime import ServiceDefinition, run_service

DEFINITION = ServiceDefinition(
    name="approval",
    migrations_dir=Path(__file__).parent / "migrations",
    metadata=metadata,
    register=register,
    uow_class=ApprovalUnitOfWork,
    consumers=consumers,
)

if __name__ == "__main__":
    run_service(DEFINITION)
