"""gRPC servicer of ResourceService: parses, authorises, calls one use case in
a unit of work, converts the result. Methods not implemented yet answer
UNIMPLEMENTED (the generated base class)."""
from infrakitchen.resource.v1 import resource_pb2, resource_pb2_grpc

SERVICE_NAME = resource_pb2.DESCRIPTOR.services_by_name["ResourceService"].full_name


class ResourceServicer(resource_pb2_grpc.ResourceServiceServicer):
    def __init__(self, runtime):
        self.runtime = runtime


def register(server, runtime) -> list[str]:
    resource_pb2_grpc.add_ResourceServiceServicer_to_server(ResourceServicer(runtime), server)
    return [SERVICE_NAME]
