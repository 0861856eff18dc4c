import asyncio
import time


async def eventually(check, timeout: float = 15.0, interval: float = 0.05, message: str = ""):
    """Awaits `check()` (sync or async) until it returns a truthy value."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s {message}")
        await asyncio.sleep(interval)


def wait_for(check, timeout: float, what: str, interval: float = 0.2):
    """Calls `check()` until it returns a truthy value (a gRPC error counts as
    not yet: a service restarting, or one replica of a pair going away);
    raises TimeoutError naming `what` after `timeout` seconds."""
    import grpc
    deadline = time.monotonic() + timeout
    while True:
        try:
            got = check()
        except grpc.RpcError:
            got = None
        if got:
            return got
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not within {timeout:.0f}s")
        time.sleep(interval)
