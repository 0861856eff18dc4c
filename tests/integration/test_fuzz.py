"""Bad input never breaks the platform: every unary and server-streaming
method of the five services, called through gRPC with empty requests,
undecodable bytes, huge strings and lists, NUL bytes, NaN and kind-less
values, and forged page tokens, answers a canonical error other than UNKNOWN
or INTERNAL within 5 s, and every service is still SERVING afterwards."""
from __future__ import annotations

import asyncio
import base64
import math

import grpc
from google.protobuf import struct_pb2
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc

from infrakitchen.approval.v1 import approval_pb2
from infrakitchen.blueprint.v1 import blueprint_pb2
from infrakitchen.executor.v1 import executor_pb2
from infrakitchen.resource.v1 import resource_pb2
from infrakitchen.workflow.v1 import workflow_pb2
from google.protobuf import symbol_database
from tests.support.platform import Platform

MODULES = {"blueprint": blueprint_pb2, "workflow": workflow_pb2, "resource": resource_pb2,
           "executor": executor_pb2, "approval": approval_pb2}
FORBIDDEN = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
# Calls that would change the platform's own set-up for the rest of the run.
SKIP = {"UpdateApprovalFlow"}


def _fill(message: Message, text: str, depth: int = 0) -> Message:
    """Every string field of the message (two levels deep) set to `text`,
    every repeated string to a long list, every Struct to a NaN, every Value
    to a value without a kind."""
    for fd in message.DESCRIPTOR.fields:
        if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
            if fd.message_type.fields_by_name["value"].type == fd.TYPE_STRING:
                getattr(message, fd.name)[text[:2000]] = text
            continue
        if fd.type == fd.TYPE_STRING:
            if fd.is_repeated:
                getattr(message, fd.name).extend([text[:300]] * 3000)
            elif not fd.containing_oneof:
                setattr(message, fd.name, text)
        elif fd.type == fd.TYPE_MESSAGE and not fd.is_repeated and fd.containing_oneof is None:
            name = fd.message_type.full_name
            if name == "google.protobuf.Struct":
                getattr(message, fd.name).update({"n": math.nan, "i": math.inf})
            elif name == "google.protobuf.Value":
                getattr(message, fd.name).CopyFrom(struct_pb2.Value())
                getattr(message, fd.name).SetInParent()
            elif depth < 2 and not name.startswith("google.protobuf."):
                _fill(getattr(message, fd.name), text, depth + 1)
    return message


def _page_token(message: Message, token: str) -> Message | None:
    if "page_token" not in message.DESCRIPTOR.fields_by_name:
        return None
    message.page_token = base64.urlsafe_b64encode(token.encode()).decode()
    return message


def _cases(request_cls) -> list[tuple[str, bytes]]:
    cases = [("empty", b""), ("garbage", b"\x0a\xff\xff\xff\xff\x0f\x12"),
             ("wrong type", struct_pb2.Struct(fields={"x": struct_pb2.Value(number_value=1)}).SerializeToString())]
    for label, text in (("huge", "h" * 200_000), ("nul", "a\x00b")):
        try:
            cases.append((label, _fill(request_cls(), text).SerializeToString()))
        except (ValueError, TypeError):
            pass
    for token in ("o:" + "9" * 40, "o:99999999999", "x:1", "not base64 ~~"):
        forged = _page_token(request_cls(), token)
        if forged is not None:
            cases.append((f"page token {token[:8]}", forged.SerializeToString()))
    return cases


async def _call(channel, path: str, streaming: bool, payload: bytes, md) -> grpc.StatusCode:
    identity = lambda b: b  # noqa: E731 - raw bytes in, raw bytes out
    try:
        async with asyncio.timeout(5):
            if streaming:
                call = channel.unary_stream(path, request_serializer=identity, response_deserializer=identity)(
                    payload, metadata=md)
                async for _ in call:
                    break  # one message is an answer: the method took the request
                call.cancel()
                return grpc.StatusCode.OK
            await channel.unary_unary(path, request_serializer=identity, response_deserializer=identity)(
                payload, metadata=md)
            return grpc.StatusCode.OK
    except grpc.aio.AioRpcError as err:
        return err.code()


async def test_every_method_answers_bad_input_with_a_clear_error_and_nothing_breaks(tmp_path, event_prefix,
                                                                                     nats_url):
    async with Platform(tmp_path, event_prefix, nats_url) as p:
        md = p.admin
        bad: list[str] = []
        calls = 0
        for service, module in MODULES.items():
            channel = p.inner[service].channel
            for svc in module.DESCRIPTOR.services_by_name.values():
                for method in svc.methods:
                    if method.name in SKIP or method.client_streaming:
                        continue
                    request_cls = symbol_database.Default().GetSymbol(method.input_type.full_name)
                    for label, payload in _cases(request_cls):
                        calls += 1
                        try:
                            code = await _call(channel, f"/{svc.full_name}/{method.name}", method.server_streaming,
                                               payload, md)
                        except TimeoutError:
                            bad.append(f"{method.name} [{label}]: no answer within 5 s")
                            continue
                        if code in FORBIDDEN:
                            bad.append(f"{method.name} [{label}]: {code.name}")
        assert calls > 300
        assert not bad, "\n".join(bad)
        for service in MODULES:
            health = health_pb2_grpc.HealthStub(p.inner[service].channel)
            answer = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING, service
