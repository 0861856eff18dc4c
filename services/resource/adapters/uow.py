from services.common.uow import UnitOfWork
from services.common.vault import Vault
from services.resource.adapters.repositories import (AuditRepository, ResourceRepository, RevisionRepository,
                                                     SettingsRepository, TemporaryStateRepository)


class ResourceUnitOfWork(UnitOfWork):
    def __init__(self, *args, vault: Vault, **kwargs):
        super().__init__(*args, **kwargs)
        self.vault = vault

    def _open(self) -> None:
        self.resources = ResourceRepository(self.session, self.touch, self.vault)
        self.temporary_states = TemporaryStateRepository(self.session, self.vault)
        self.revisions = RevisionRepository(self.session)
        self.audit = AuditRepository(self.session)
        self.settings = SettingsRepository(self.session)
