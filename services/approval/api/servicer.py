"""gRPC servicer of ApprovalService: parses, authorises, calls one use case in
a unit of work, converts the result."""
from infrakitchen.approval.v1 import approval_pb2 as pb
from infrakitchen.approval.v1 import approval_pb2_grpc
from services.approval.api import convert
from services.approval.app import approvals
from services.approval.domain.model import APPROVED, REJECTED
from services.common.auth import current_principal

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ApprovalService"].full_name


class ApprovalServicer(approval_pb2_grpc.ApprovalServiceServicer):
    def __init__(self, runtime):
        self.uow = runtime.uow

    async def CreateApprovalRequest(self, request, context):
        async with self.uow() as uow:
            r = await approvals.create_request(uow, current_principal(),
                                               convert.request_from_pb(request.approval_request), request.request_id)
            await uow.commit()
        return convert.request_to_pb(r)

    async def GetApprovalRequest(self, request, context):
        async with self.uow() as uow:
            return convert.request_to_pb(await approvals.get_request(uow, request.id))

    async def ListApprovalRequests(self, request, context):
        async with self.uow() as uow:
            found, token = await approvals.list_requests(
                uow, current_principal(), request.page_size, request.page_token, request.resource_id,
                convert.STATUS.get(request.status, ""), request.awaiting_my_decision)
        return pb.ListApprovalRequestsResponse(approval_requests=[convert.request_to_pb(r) for r in found],
                                               next_page_token=token)

    async def ApproveRequest(self, request, context):
        return await self._decide(request, APPROVED)

    async def RejectRequest(self, request, context):
        return await self._decide(request, REJECTED)

    async def _decide(self, request, outcome: str):
        async with self.uow() as uow:
            r = await approvals.decide(uow, current_principal(), request.id, outcome, request.comment)
            await uow.commit()
        return convert.request_to_pb(r)

    async def CancelApprovalRequest(self, request, context):
        async with self.uow() as uow:
            r = await approvals.cancel(uow, current_principal(), request.id, request.comment)
            await uow.commit()
        return convert.request_to_pb(r)

    async def GetApprovalFlow(self, request, context):
        async with self.uow() as uow:
            return convert.flow_to_pb(await approvals.get_flow(uow))

    async def UpdateApprovalFlow(self, request, context):
        async with self.uow() as uow:
            flow = await approvals.set_flow(uow, current_principal(), request.enabled)
            await uow.commit()
        return convert.flow_to_pb(flow)


def register(server, runtime) -> list[str]:
    approval_pb2_grpc.add_ApprovalServiceServicer_to_server(ApprovalServicer(runtime), server)
    return [SERVICE_NAME]
