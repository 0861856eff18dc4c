"""gRPC clients of the other services. Calls carry a token signed with this
service's own key (services.common.identities) naming the user on whose
behalf the call is made (the calling service already authorised that user),
and an explicit deadline.
UNAVAILABLE / DEADLINE_EXCEEDED become `Unavailable` (the dependency is down);
ABORTED for a concurrent change inside the callee (two writers of one row,
no etag of ours involved) is asked again: its transaction was rolled back.
Other errors are re-raised as RemoteError for the caller to translate."""
from __future__ import annotations

import asyncio

import grpc

from services.common import tracing
from services.common.auth import Role
from services.common.config import Settings
from services.common.errors import Unavailable
from services.common.grpc_errors import status_details
from services.common.identities import ServiceIdentity
from services.common.tls import GrpcTls

DEFAULT_DEADLINE = 10.0
CONFLICT_RETRY_DELAYS = (0.02, 0.1, 0.3)


class RemoteError(Exception):
    def __init__(self, service: str, err: grpc.aio.AioRpcError):
        super().__init__(f"{service}: {err.code().name}: {err.details()}")
        self.service = service
        self.code = err.code()
        self.details = err.details() or ""
        # What the callee said was wrong, field by field: the caller's own
        # error (e.g. a workflow step's message) keeps it for the user.
        found = status_details(err)
        self.violations = [f"{v.field}: {v.description}" for v in getattr(found.get("BadRequest"),
                                                                           "field_violations", [])]
        self.violations += [f"{v.subject}: {v.description}" for v in getattr(found.get("PreconditionFailure"),
                                                                              "violations", [])]

    def describe(self) -> str:
        """The callee's message with its violations."""
        return "; ".join([self.details, *self.violations]) if self.violations else self.details


class ServiceClients:
    def __init__(self, settings: Settings, caller: str, identity: ServiceIdentity | None = None):
        self.settings = settings
        self.caller = caller
        self._identity = identity
        self._channels: dict[str, grpc.aio.Channel] = {}

    @property
    def identity(self) -> ServiceIdentity:
        if self._identity is None:
            self._identity = ServiceIdentity.from_settings(self.caller, self.settings.env, self.settings.data_dir)
        return self._identity

    def channel(self, service: str) -> grpc.aio.Channel:
        if service not in self._channels:
            self._channels[service] = GrpcTls.from_env(self.settings.env).aio_channel(
                self.settings.targets[service], interceptors=tracing.client_interceptors() or None)
        return self._channels[service]

    def metadata(self, callee: str, user: str, role: Role = Role.ADMIN) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {self.identity.token(callee, user, role)}")]

    async def call(self, service: str, method, request, user: str = "", role: Role = Role.ADMIN,
                   timeout: float = DEFAULT_DEADLINE):
        for delay in (*CONFLICT_RETRY_DELAYS, None):
            try:
                return await method(request, metadata=self.metadata(service, user, role), timeout=timeout)
            except grpc.aio.AioRpcError as err:
                if err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise Unavailable(f"the {service} service is not reachable; try again shortly",
                                      reason=f"{service.upper()}_UNAVAILABLE") from None
                if delay is None or not _concurrent_change(err):
                    raise RemoteError(service, err) from None
            await asyncio.sleep(delay)

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()


def _concurrent_change(err: grpc.aio.AioRpcError) -> bool:
    if err.code() != grpc.StatusCode.ABORTED:
        return False
    info = status_details(err).get("ErrorInfo")
    return info is not None and info.reason == "CONCURRENT_CHANGE"


async def unless(call, *codes: grpc.StatusCode):
    """The answer of a remote call, or None when the callee answers one of
    `codes` (an outcome the caller expects, e.g. a job that ended already)."""
    try:
        return await call
    except RemoteError as err:
        if err.code in codes:
            return None
        raise


async def found_or_none(call):
    """The answer of a remote read, or None when the callee says NOT_FOUND."""
    return await unless(call, grpc.StatusCode.NOT_FOUND)
