from services.blueprint.adapters.repositories import (BlueprintRepository, SourceCodeVersionRepository,
                                                      TemplateRepository)
from services.common.uow import UnitOfWork


class BlueprintUnitOfWork(UnitOfWork):
    def _open(self) -> None:
        self.templates = TemplateRepository(self.session)
        self.versions = SourceCodeVersionRepository(self.session)
        self.blueprints = BlueprintRepository(self.session)
