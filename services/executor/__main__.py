"""python -m services.executor"""
from pathlib import Path

from services.common import metrics
from services.common.clients import ServiceClients
from services.common.runtime import ServiceDefinition, StartupError, run_service
from services.executor.adapters.oidc import OidcIssuer, OidcSettings, OidcUnavailable
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
    vault = Vault.from_settings(settings)
    runtime.uow_options = {"vault": vault}
    runtime.executor_config = ExecutorConfig.from_settings(settings)
    try:
        terraform = TerraformConfig.from_settings(settings)
        runtime.oidc = OidcIssuer(OidcSettings.from_env(settings.env), vault)
        runtime.oidc.serve(settings.host)
    except (ProviderSettingsError, SandboxUnavailable, OidcUnavailable) as exc:  # the operator's: say which
        raise StartupError(str(exc)) from None
    except OSError as exc:  # the discovery port is taken
        raise StartupError(f"IK_EXECUTOR_OIDC_PORT: {exc.strerror}") from None
    runtime.workers = JobWorkers(runtime, runtime.executor_config, terraform)


async def _stop_workers(runtime) -> None:
    await runtime.workers.stop()
    runtime.oidc.close()


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
    background=lambda runtime: [runtime.workers.run(), runtime.oidc.keep_rotating(runtime.uow)],
    on_stopping=[_stop_workers],
    gauges=_job_gauges,
)

if __name__ == "__main__":
    run_service(DEFINITION)
