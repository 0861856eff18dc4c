"""Server reflection, grpc.reflection.v1 and v1alpha, answering with the
protos' comments.

grpcio-reflection serves descriptors copied out of the generated code, which
carry no source info: grpcurl `describe` and other tools then show no
documentation. `make proto` also writes the descriptor set of protos/ with
source info and imports (gen/infrakitchen/descriptors.binpb); this servicer
answers from it, and from the process's default pool for what the set does
not hold (health, reflection itself).

Both versions have the same messages under two packages; v1's classes are
made here from v1alpha's descriptor with the package renamed, so no second
copy of the proto is vendored."""
from __future__ import annotations

import logging
from collections.abc import AsyncIterable
from pathlib import Path

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from grpc_reflection.v1alpha import reflection_pb2 as v1alpha

log = logging.getLogger(__name__)

DESCRIPTOR_SET = "descriptors.binpb"
V1_SERVICE = "grpc.reflection.v1.ServerReflection"
V1ALPHA_SERVICE = "grpc.reflection.v1alpha.ServerReflection"


def descriptor_set_path() -> Path | None:
    """Where `make proto` wrote the descriptor set, beside the generated code."""
    try:
        import infrakitchen
    except ImportError:
        return None
    for directory in list(getattr(infrakitchen, "__path__", [])):
        path = Path(directory) / DESCRIPTOR_SET
        if path.exists():
            return path
    return None


class Descriptors:
    """Files by name (serialized, with source info) and the file of each symbol."""

    def __init__(self, files: list[descriptor_pb2.FileDescriptorProto]):
        self.protos = {f.name: f for f in files}
        self.serialized = {f.name: f.SerializeToString() for f in files}
        self.symbols: dict[str, str] = {}
        self.extensions: dict[tuple[str, int], str] = {}
        for f in files:
            prefix = f"{f.package}." if f.package else ""
            for m in f.message_type:
                self._message(f.name, prefix, m)
            for e in f.enum_type:
                self._enum(f.name, prefix, e)
            for s in f.service:
                self.symbols[prefix + s.name] = f.name
                for method in s.method:
                    self.symbols[f"{prefix}{s.name}.{method.name}"] = f.name
            for x in f.extension:
                self.symbols[prefix + x.name] = f.name
                self.extensions[(x.extendee.lstrip("."), x.number)] = f.name

    def _message(self, file: str, prefix: str, m) -> None:
        name = prefix + m.name
        self.symbols[name] = file
        for field in m.field:
            self.symbols[f"{name}.{field.name}"] = file
        for nested in m.nested_type:
            self._message(file, name + ".", nested)
        for e in m.enum_type:
            self._enum(file, name + ".", e)
        for x in m.extension:
            self.symbols[f"{name}.{x.name}"] = file
            self.extensions[(x.extendee.lstrip("."), x.number)] = file

    def _enum(self, file: str, prefix: str, e) -> None:
        self.symbols[prefix + e.name] = file
        for value in e.value:  # enum values are scoped beside their enum
            self.symbols[prefix + value.name] = file

    @classmethod
    def load(cls, path: Path) -> "Descriptors":
        return cls(list(descriptor_pb2.FileDescriptorSet.FromString(path.read_bytes()).file))

    def with_dependencies(self, name: str) -> list[bytes] | None:
        """The file and every file it imports, transitively (the file first)."""
        if name not in self.protos:
            return None
        out, seen, todo = [], set(), [name]
        while todo:
            current = todo.pop(0)
            if current in seen:
                continue
            seen.add(current)
            if current in self.serialized:
                out.append(self.serialized[current])
                todo += list(self.protos[current].dependency)
            else:
                out += _from_default_pool(current) or []
        return out


def _from_default_pool(name: str) -> list[bytes] | None:
    """A file the descriptor set does not hold, from the generated code (no comments)."""
    pool = descriptor_pool.Default()
    try:
        descriptor = pool.FindFileByName(name)
    except KeyError:
        return None
    out, seen, todo = [], set(), [descriptor]
    while todo:
        d = todo.pop(0)
        if d.name in seen:
            continue
        seen.add(d.name)
        proto = descriptor_pb2.FileDescriptorProto()
        d.CopyToProto(proto)
        _with_json_names(proto, d)
        out.append(proto.SerializeToString())
        todo += list(d.dependencies)
    return out


def _with_json_names(proto: descriptor_pb2.FileDescriptorProto, file) -> None:
    """CopyToProto leaves json_name out, and tools then print a field by its
    proto name; protoc's descriptor set has it. Filled in, every message a
    client sees (the error details included) has lowerCamelCase JSON names."""
    def fill(message_proto, message) -> None:
        for field_proto in message_proto.field:
            field_proto.json_name = message.fields_by_name[field_proto.name].json_name
        for nested_proto in message_proto.nested_type:
            fill(nested_proto, message.nested_types_by_name[nested_proto.name])
    for message_proto in proto.message_type:
        fill(message_proto, file.message_types_by_name[message_proto.name])


def _file_of_symbol_in_default_pool(symbol: str) -> str | None:
    try:
        return descriptor_pool.Default().FindFileContainingSymbol(symbol).name
    except KeyError:
        return None


def _v1_messages():
    """grpc.reflection.v1's message classes: v1alpha's descriptor, package renamed."""
    proto = descriptor_pb2.FileDescriptorProto()
    v1alpha.DESCRIPTOR.CopyToProto(proto)
    proto.name = "grpc/reflection/v1/reflection.proto"
    proto.package = "grpc.reflection.v1"
    for m in proto.message_type:
        for field in m.field:
            if field.type_name.startswith(".grpc.reflection.v1alpha."):
                field.type_name = field.type_name.replace(".v1alpha.", ".v1.")
    for s in proto.service:
        for method in s.method:
            method.input_type = method.input_type.replace(".v1alpha.", ".v1.")
            method.output_type = method.output_type.replace(".v1alpha.", ".v1.")
    pool = descriptor_pool.Default()
    try:
        pool.FindFileByName(proto.name)
    except KeyError:
        pool.Add(proto)
    classes = message_factory.GetMessages([proto], pool=pool)
    return (classes["grpc.reflection.v1.ServerReflectionRequest"],
            classes["grpc.reflection.v1.ServerReflectionResponse"])


V1Request, V1Response = _v1_messages()


class ReflectionServicer:
    """Answers ServerReflectionInfo for one protocol version (its response class)."""

    def __init__(self, service_names: list[str], descriptors: Descriptors, response_class):
        self.service_names = sorted(service_names)
        self.descriptors = descriptors
        self.response = response_class

    async def ServerReflectionInfo(self, requests: AsyncIterable, context) -> AsyncIterable:
        async for request in requests:
            yield self.answer(request)

    def answer(self, request):
        kind = request.WhichOneof("message_request")
        files = None
        if kind == "file_by_filename":
            files = self._files(request.file_by_filename)
        elif kind == "file_containing_symbol":
            symbol = request.file_containing_symbol.lstrip(".")
            name = self.descriptors.symbols.get(symbol) or _file_of_symbol_in_default_pool(symbol)
            files = self._files(name) if name else None
        elif kind == "file_containing_extension":
            ext = request.file_containing_extension
            name = self.descriptors.extensions.get((ext.containing_type, ext.extension_number))
            files = self._files(name) if name else None
        elif kind == "all_extension_numbers_of_type":
            # Answered for every message this server knows, the error details
            # (google.rpc.BadRequest...) of the default pool included: grpcurl
            # asks it before it decodes a detail, and shows the detail as raw
            # base64 when the answer is NOT_FOUND.
            type_name = request.all_extension_numbers_of_type
            numbers = sorted(n for (t, n) in self.descriptors.extensions if t == type_name)
            if numbers or type_name in self.descriptors.symbols or _file_of_symbol_in_default_pool(type_name):
                response = self.response(original_request=request)
                response.all_extension_numbers_response.base_type_name = type_name
                response.all_extension_numbers_response.extension_number.extend(numbers)
                return response
        elif kind == "list_services":
            response = self.response(original_request=request)
            for name in self.service_names:
                response.list_services_response.service.add(name=name)
            return response
        if files is None:
            response = self.response(original_request=request)
            response.error_response.error_code = grpc.StatusCode.NOT_FOUND.value[0]
            response.error_response.error_message = "not found"
            return response
        response = self.response(original_request=request)
        response.file_descriptor_response.file_descriptor_proto.extend(files)
        return response

    def _files(self, name: str) -> list[bytes] | None:
        return self.descriptors.with_dependencies(name) or _from_default_pool(name)


def enable(server: grpc.aio.Server, service_names: list[str]) -> None:
    """Serves reflection v1 and v1alpha on `server` for these services (plus both reflections)."""
    path = descriptor_set_path()
    if path is None:
        log.warning("no descriptor set beside the generated code (run `make proto`): reflection answers "
                    "without the protos' comments")
        descriptors = Descriptors([])
    else:
        descriptors = Descriptors.load(path)
    names = [*service_names, V1_SERVICE, V1ALPHA_SERVICE]
    alpha = ReflectionServicer(names, descriptors, v1alpha.ServerReflectionResponse)
    v1 = ReflectionServicer(names, descriptors, V1Response)
    server.add_generic_rpc_handlers([
        grpc.method_handlers_generic_handler(V1ALPHA_SERVICE, {"ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
            alpha.ServerReflectionInfo, request_deserializer=v1alpha.ServerReflectionRequest.FromString,
            response_serializer=v1alpha.ServerReflectionResponse.SerializeToString)}),
        grpc.method_handlers_generic_handler(V1_SERVICE, {"ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
            v1.ServerReflectionInfo, request_deserializer=V1Request.FromString,
            response_serializer=V1Response.SerializeToString)}),
    ])
