from services.common.uow import UnitOfWork
from services.workflow.adapters.repositories import StepRepository, WorkflowRepository


class WorkflowUnitOfWork(UnitOfWork):
    def _open(self) -> None:
        self.workflows = WorkflowRepository(self.session, self.touch)
        self.steps = StepRepository(self.session, self.touch)
