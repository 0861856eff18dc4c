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
