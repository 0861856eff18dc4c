"""Reading rich gRPC errors in tests."""
from __future__ import annotations

import grpc
import pytest

from services.common.grpc_errors import status_details


async def rpc_error(awaitable) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await awaitable
    return info.value


def field_violations(err: grpc.RpcError) -> dict[str, str]:
    bad = status_details(err).get("BadRequest")
    return {v.field: v.description for v in bad.field_violations} if bad else {}


def precondition_violations(err: grpc.RpcError) -> list[tuple[str, str, str]]:
    failure = status_details(err).get("PreconditionFailure")
    return [(v.type, v.subject, v.description) for v in failure.violations] if failure else []


def reason(err: grpc.RpcError) -> str:
    info = status_details(err).get("ErrorInfo")
    return info.reason if info else ""
