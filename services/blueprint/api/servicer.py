"""gRPC servicer of BlueprintService: parses, authorises, calls one use case in
a unit of work, converts the result. Methods not implemented yet answer
UNIMPLEMENTED (the generated base class)."""
from infrakitchen.blueprint.v1 import blueprint_pb2, blueprint_pb2_grpc

SERVICE_NAME = blueprint_pb2.DESCRIPTOR.services_by_name["BlueprintService"].full_name


class BlueprintServicer(blueprint_pb2_grpc.BlueprintServiceServicer):
    def __init__(self, runtime):
        self.runtime = runtime


def register(server, runtime) -> list[str]:
    blueprint_pb2_grpc.add_BlueprintServiceServicer_to_server(BlueprintServicer(runtime), server)
    return [SERVICE_NAME]
