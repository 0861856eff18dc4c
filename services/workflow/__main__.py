"""python -m services.workflow"""
from pathlib import Path

from services.common.clients import ServiceClients
from services.common.runtime import ServiceDefinition, run_service
from services.common.vault import Vault
from services.workflow.adapters.remote import Remote
from services.workflow.adapters.tables import metadata
from services.workflow.adapters.uow import WorkflowUnitOfWork
from services.workflow.api.servicer import register
from services.workflow.app.workflows import Workflows
from services.workflow.consumers.events import consumers, reconciler


def setup(runtime) -> None:
    vault = Vault.from_settings(runtime.settings)
    runtime.uow_options = {"vault": vault}
    runtime.clients = ServiceClients(runtime.settings, "workflow", runtime.identity)
    schedule = runtime.settings.env.get("IK_WORKFLOW_SCHEDULE", "ready")
    if schedule not in ("ready", "level"):
        raise ValueError("IK_WORKFLOW_SCHEDULE must be ready (the default) or level (benchmarks)")
    runtime.workflows = Workflows(Remote(runtime.clients), runtime.uow, hash_key=vault.derive("plan-inputs"),
                                  level_barrier=schedule == "level")


async def _finish_step_starts(runtime) -> None:
    await runtime.workflows.finish_starting(timeout=runtime.settings.shutdown_grace)


DEFINITION = ServiceDefinition(
    name="workflow",
    migrations_dir=Path(__file__).parent / "migrations",
    metadata=metadata,
    register=register,
    uow_class=WorkflowUnitOfWork,
    setup=setup,
    consumers=consumers,
    background=lambda runtime: [reconciler(runtime)],
    on_stop=[_finish_step_starts],
)

if __name__ == "__main__":
    run_service(DEFINITION)
