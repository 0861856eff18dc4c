from services.common.uow import UnitOfWork
from services.executor.adapters.repositories import (IntegrationRepository, JobLogRepository, JobRepository,
                                                     OidcKeyRepository, ProviderLockRepository, SecretRepository, StorageRepository)
from services.common.vault import Vault


class ExecutorUnitOfWork(UnitOfWork):
    def __init__(self, *args, vault: Vault, **kwargs):
        super().__init__(*args, **kwargs)
        self.vault = vault

    def _open(self) -> None:
        self.jobs = JobRepository(self.session, self.vault, self.touch)
        self.logs = JobLogRepository(self.session, self.touch)
        self.integrations = IntegrationRepository(self.session, self.vault)
        self.secrets = SecretRepository(self.session, self.vault)
        self.storages = StorageRepository(self.session, self.vault)
        self.provider_locks = ProviderLockRepository(self.session)
        self.oidc_keys = OidcKeyRepository(self.session, self.vault)
