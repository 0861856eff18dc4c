"""python -m services.executor"""
from pathlib import Path

from services.common import metrics
from services.common.clients import ServiceClients
from services.common.runtime import ServiceDefinition, StartupError, run_service
from services.executor.adapters.providers import ProviderSettingsError
from services.executor.adapters.resources import ResourceUsers
from services.executor.adapters.sandbox import SandboxUnavailable
from services.executor.adapters.tables import metadata
from services.executor.adapters.terraform import TerraformConfig
from services.executor.adapters.uow import ExecutorUnitOfWork
from services.common.vault import Vault
from services.executor.api.servicer import register
from services.executor.app.worker import ExecutorConfig, JobWorkers, work_queue


def setup(runtime) -> None:
    settings = runtime.settings
    runtime.clients = ServiceClients(settings, "executor", runtime.identity)
    runtime.resource_users = ResourceUsers(runtime.clients)
    runtime.uow_options = {"vault": Vault.from_settings(settings)}
    runtime.executor_config = ExecutorConfig.from_settings(settings)
    try:
        terraform = TerraformConfig.from_settings(settings)
    except (ProviderSettingsError, SandboxUnavailable) as exc:  # the operator's settings: say which, no trace
        raise StartupError(str(exc)) from None
    runtime.workers = JobWorkers(runtime, runtime.executor_config, terraform)


async def _stop_workers(runtime) -> None:
    await runtime.workers.stop()


async def _job_gauges(runtime) -> None:
    """The queue's depth and the jobs running, across every executor sharing the database."""
    async with runtime.uow() as uow:
        counts = await uow.jobs.count_by_status(("queued", "running"))
    for status, count in counts.items():
        metrics.JOBS_NOW.labels(status).set(count)


DEFINITION = ServiceDefinition(
    name="executor",
    migrations_dir=Path(__file__).parent / "migrations",
    metadata=metadata,
    register=register,
    uow_class=ExecutorUnitOfWork,
    setup=setup,
    streams=lambda runtime: [work_queue(runtime.bus.names)],
    background=lambda runtime: [runtime.workers.run()],
    on_stopping=[_stop_workers],
    gauges=_job_gauges,
)

if __name__ == "__main__":
    run_service(DEFINITION)
