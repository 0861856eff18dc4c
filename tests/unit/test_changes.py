"""The change feed that wakes streams at commit (services.common.changes)."""
import asyncio

from services.common.changes import ChangeFeed


async def test_a_watch_wakes_on_a_change_of_its_key_only():
    feed = ChangeFeed()
    with feed.watch("w1") as watch:
        seen = watch.changes
        waiting = asyncio.create_task(watch.after(seen, timeout=30))
        await asyncio.sleep(0)
        feed.notify(["w2"])
        await asyncio.sleep(0.01)
        assert not waiting.done()
        feed.notify(["w1", "w2"])
        async with asyncio.timeout(1):
            await waiting
        assert watch.changes == seen + 1


async def test_a_change_between_read_and_wait_is_not_missed():
    feed = ChangeFeed()
    with feed.watch("w1") as watch:
        seen = watch.changes
        feed.notify(["w1"])  # committed while the stream was reading
        async with asyncio.timeout(1):
            await watch.after(seen, timeout=30)


async def test_without_a_change_the_wait_ends_at_its_timeout_and_watches_are_released():
    feed = ChangeFeed()
    with feed.watch("w1") as watch:
        await watch.after(watch.changes, timeout=0.01)
        assert watch.changes == 0
    feed.notify(["w1"])
    assert feed._watches == {}
