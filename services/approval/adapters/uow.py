from services.approval.adapters.repositories import (ApprovalFlowRepository, ApprovalRequestRepository,
                                                     ResourceOwnersRepository)
from services.common.uow import UnitOfWork


class ApprovalUnitOfWork(UnitOfWork):
    def _open(self) -> None:
        self.requests = ApprovalRequestRepository(self.session)
        self.flow = ApprovalFlowRepository(self.session)
        self.owners = ResourceOwnersRepository(self.session)
