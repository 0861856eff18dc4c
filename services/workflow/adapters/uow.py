from services.common.uow import UnitOfWork
from services.common.vault import Vault
from services.workflow.adapters.repositories import StepRepository, WorkflowRepository


class WorkflowUnitOfWork(UnitOfWork):
    def __init__(self, *args, vault: Vault, **kwargs):
        super().__init__(*args, **kwargs)
        self.vault = vault

    def _open(self) -> None:
        self.workflows = WorkflowRepository(self.session, self.touch, self.vault)
        self.steps = StepRepository(self.session, self.touch, self.vault)
