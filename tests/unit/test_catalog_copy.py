"""The resource service's copy of the catalog: what events keep current is
trusted however old; the rest ages out."""
import asyncio
import time

from services.resource.adapters.catalog import CatalogCache


class Loads:
    def __init__(self):
        self.count = 0

    async def __call__(self):
        self.count += 1
        return self.count, f"value {self.count}"


def get(cache, key, load):
    return asyncio.run(cache.get(key, load))


def test_an_entry_stored_while_events_are_followed_does_not_expire(monkeypatch):
    cache = CatalogCache(max_age=300)
    cache.following(True)
    load = Loads()
    assert get(cache, ("template", "t1"), load) == "value 1"
    later = time.monotonic() + 600  # not refreshed by any event for 10 minutes
    monkeypatch.setattr(time, "monotonic", lambda: later)
    assert get(cache, ("template", "t1"), load) == "value 1"
    assert load.count == 1  # no read over gRPC


def test_without_the_follower_entries_age_out(monkeypatch):
    cache = CatalogCache(max_age=300)
    load = Loads()
    get(cache, ("version", "v1"), load)
    cache.following(True)  # what was stored before it subscribed may have missed an event
    later = time.monotonic() + 600
    monkeypatch.setattr(time, "monotonic", lambda: later)
    assert get(cache, ("version", "v1"), load) == "value 2"
    cache.following(False)
    after = later + 600
    monkeypatch.setattr(time, "monotonic", lambda: after)
    assert get(cache, ("version", "v1"), load) == "value 3"


def test_what_no_event_announces_ages_out_even_while_following(monkeypatch):
    cache = CatalogCache(max_age=300)
    cache.following(True)
    load = Loads()
    get(cache, ("integration", "i1"), load)
    later = time.monotonic() + 600
    monkeypatch.setattr(time, "monotonic", lambda: later)
    get(cache, ("integration", "i1"), load)
    assert load.count == 2


def test_events_replace_and_forget_entries_by_revision():
    cache = CatalogCache(max_age=300)
    cache.following(True)
    cache.put(("template", "t1"), 3, "third")
    cache.put(("template", "t1"), 2, "second, late")  # an older event arriving late changes nothing
    assert get(cache, ("template", "t1"), Loads()) == "third"
    cache.forget(("template", "t1"), 4)
    assert get(cache, ("template", "t1"), Loads()) is None
