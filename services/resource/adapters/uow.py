from services.common.uow import UnitOfWork
from services.resource.adapters.repositories import (AuditRepository, ResourceRepository, RevisionRepository,
                                                     SettingsRepository, TemporaryStateRepository)


class ResourceUnitOfWork(UnitOfWork):
    def _open(self) -> None:
        self.resources = ResourceRepository(self.session, self.touch)
        self.temporary_states = TemporaryStateRepository(self.session)
        self.revisions = RevisionRepository(self.session)
        self.audit = AuditRepository(self.session)
        self.settings = SettingsRepository(self.session)
