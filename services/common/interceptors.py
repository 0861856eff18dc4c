"""Server interceptors: one maps errors and logs every call, one
authenticates the caller and checks the method's required role (declared in
the proto with the infrakitchen.common.v1.required_role option)."""
from __future__ import annotations

import asyncio
import inspect
import logging
import time
import uuid
from functools import cache

import grpc
from google.protobuf import descriptor_pool
from sqlalchemy.exc import IntegrityError

from infrakitchen.common.v1 import options_pb2
from services.common import auth, errors, limits, logs, metrics
from services.common.grpc_errors import to_grpc_status
from services.common.identities import ALGORITHM as SERVICE_ALGORITHM
from services.common.identities import ServiceIdentity
from services.common.oidc import OidcVerifier

log = logging.getLogger("infrakitchen.calls")

# Health checks and reflection stay open to everybody (load balancers, grpcurl).
OPEN_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")


async def _call_unary(behavior, request, context):
    result = behavior(request, context)
    if inspect.isawaitable(result):
        result = await result
    return result


async def _iterate(behavior, request, context):
    result = behavior(request, context)
    if inspect.isasyncgen(result):
        async for item in result:
            yield item
    elif inspect.isawaitable(result):
        await result  # context.write() style
    else:
        for item in result:
            yield item


class Undecodable:
    """Stands for request bytes that are not the method's message: grpcio
    would answer UNKNOWN for a deserializer that raises, so the error
    interceptor's deserializer returns this and the call answers
    INVALID_ARGUMENT instead."""


def _lenient(deserializer):
    if deserializer is None:
        return None

    def deserialize(data: bytes):
        try:
            return deserializer(data)
        except Exception:  # noqa: BLE001 - DecodeError and friends: the caller sent garbage
            return Undecodable()
    return deserialize


def _rewrap(handler: grpc.RpcMethodHandler, around_unary, around_stream,
            lenient: bool = False) -> grpc.RpcMethodHandler:
    deserializer = _lenient(handler.request_deserializer) if lenient else handler.request_deserializer
    if handler.unary_unary is not None:
        behavior = handler.unary_unary

        async def unary_unary(request, context):
            return await around_unary(behavior, request, context)

        return grpc.unary_unary_rpc_method_handler(
            unary_unary, request_deserializer=deserializer,
            response_serializer=handler.response_serializer)
    if handler.unary_stream is not None:
        behavior = handler.unary_stream

        async def unary_stream(request, context):
            async for item in around_stream(behavior, request, context):
                yield item

        return grpc.unary_stream_rpc_method_handler(
            unary_stream, request_deserializer=deserializer,
            response_serializer=handler.response_serializer)
    return handler  # client streaming is not part of the API


def _decoded(request) -> None:
    if isinstance(request, Undecodable):
        raise errors.InvalidArgument("the request is not a valid protobuf message of this method",
                                     reason="UNDECODABLE_REQUEST")


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Outermost: turns DomainError into its canonical status with details,
    NotImplementedError into UNIMPLEMENTED, anything else into INTERNAL with
    a reference id (the stack trace goes to the log, never to the caller)."""

    def __init__(self, service: str):
        self.service = service

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_PREFIXES):
            return handler
        method = details.method

        # The call's records (its own line included) carry the ids its request names;
        # set in the call's own context, as the principal is (see AuthInterceptor).
        async def around_unary(behavior, request, context):
            started = time.perf_counter()
            logs.bind(**logs.request_ids(method, request))
            try:
                _decoded(request)
                response = await _call_unary(behavior, request, context)
            except BaseException as exc:
                await self._fail(method, exc, context, started)
                raise
            self._log(method, "OK", started)
            return response

        async def around_stream(behavior, request, context):
            started = time.perf_counter()
            logs.bind(**logs.request_ids(method, request))
            try:
                _decoded(request)
                async for item in _iterate(behavior, request, context):
                    yield item
            except BaseException as exc:
                await self._fail(method, exc, context, started)
                raise
            self._log(method, "OK", started)

        return _rewrap(handler, around_unary, around_stream, lenient=True)

    def _log(self, method: str, code: str, started: float, extra: str = "") -> None:
        elapsed = time.perf_counter() - started
        try:
            user = auth.current_principal().user
        except errors.Unauthenticated:
            user = "-"
        metrics.RPC_DURATION.labels(self.service, method.rsplit("/", 1)[-1], code).observe(elapsed)
        log.info("%s %s %s %.1fms%s", method, code, user, elapsed * 1000, extra, extra={
            "method": method, "code": code, "user": user, "duration_ms": round(elapsed * 1000, 1),
            "reason": extra.strip()})

    async def _fail(self, method: str, exc: BaseException, context, started: float) -> None:
        if isinstance(exc, errors.DomainError):
            status = to_grpc_status(exc)
            self._log(method, status.code.name, started, f" {exc.reason}")
            await context.abort(status.code, status.details, status.trailing_metadata)
        if isinstance(exc, NotImplementedError):
            self._log(method, "UNIMPLEMENTED", started)
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{method} is not implemented yet")
        if isinstance(exc, grpc.aio.AbortError) or not isinstance(exc, Exception):
            return  # already a status, or cancellation: let it through
        if isinstance(exc, IntegrityError):
            # A unique index noticed what a check should have (two racing
            # writers): the transaction rolled back, nothing changed.
            log.warning("%s: a database constraint refused the write: %s", method, exc.orig)
            status = to_grpc_status(errors.Aborted("a concurrent change conflicts with this request; read again and "
                                                   "retry", reason="CONFLICTING_WRITE"))
            self._log(method, status.code.name, started, " CONFLICTING_WRITE")
            await context.abort(status.code, status.details, status.trailing_metadata)
        ref = uuid.uuid4().hex[:12]
        log.exception("%s INTERNAL ref=%s", method, ref)
        await context.abort(grpc.StatusCode.INTERNAL, f"internal error (reference {ref})")


@cache
def required_role(method: str) -> auth.Role:
    """The role a method declares in the proto; admin when it declares none."""
    full_name = method.lstrip("/").replace("/", ".")
    try:
        descriptor = descriptor_pool.Default().FindMethodByName(full_name)
    except KeyError:
        return auth.Role.ADMIN
    value = descriptor.GetOptions().Extensions[options_pb2.required_role]
    return auth.Role(value) if value else auth.Role.ADMIN


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Checks 'authorization: Bearer <token>' and the method's required role,
    and makes the caller available as auth.current_principal(); then checks
    the request against the documented bounds (services.common.limits), so an
    authenticated caller learns what is wrong with the request."""

    def __init__(self, secret: str, oidc: OidcVerifier | None = None, identity: ServiceIdentity | None = None):
        self.secret = secret  # empty: local tokens are off
        self.oidc = oidc
        self.identity = identity

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_PREFIXES):
            return handler
        method = details.method
        needed = required_role(method)

        async def authenticate(context) -> auth.Principal:
            metadata = dict(context.invocation_metadata() or ())
            token = auth.bearer_token(metadata.get("authorization"))
            algorithm = auth.token_algorithm(token)
            if algorithm == SERVICE_ALGORITHM and self.identity is not None:
                principal = self.identity.verify(token)  # another service, acting for a user
            elif self.oidc is not None and not algorithm.upper().startswith("HS"):
                # A thread: verifying may fetch the provider's keys.
                principal = await asyncio.to_thread(self.oidc.verify, token)
            elif not self.secret:
                raise errors.Unauthenticated("local tokens are off here (IK_LOCAL_TOKENS=off)",
                                             reason="LOCAL_TOKENS_OFF")
            else:
                principal = auth.verify_token(self.secret, token)
            auth.require_role(principal, needed, method.rsplit("/", 1)[-1])
            return principal

        # Each RPC runs in its own asyncio task with its own context, so the
        # principal set here is visible to the servicer and to the outer
        # (logging) interceptor, and to nothing else.
        async def around_unary(behavior, request, context):
            auth.set_current_principal(await authenticate(context))
            limits.check_request(request)
            return await _call_unary(behavior, request, context)

        async def around_stream(behavior, request, context):
            auth.set_current_principal(await authenticate(context))
            limits.check_request(request)
            async for item in _iterate(behavior, request, context):
                yield item

        return _rewrap(handler, around_unary, around_stream)
