"""Wakes the streams of this process (WatchWorkflow, WatchResource,
StreamJobLogs) when one of its transactions commits a change to what they
follow, so the change reaches the client at once instead of at the next
poll. Streams still read the database and still poll, slowly, for changes
another process committed (a second replica of the service).

Keys are the ids the streams follow (a workflow id, a resource id, a job
id); repositories mark them on their unit of work as they write."""
from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable, Iterator


class Watch:
    """One stream's view of one key: `changes` counts commits that touched it."""

    def __init__(self) -> None:
        self.changes = 0
        self._woken = asyncio.Event()

    def _touched(self) -> None:
        self.changes += 1
        self._woken.set()

    async def after(self, seen: int, timeout: float) -> None:
        """Returns once a commit newer than `seen` touched the key (at once if
        one already has), or after `timeout` seconds."""
        if self.changes != seen:
            return
        self._woken.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._woken.wait(), timeout)


class ChangeFeed:
    def __init__(self) -> None:
        self._watches: dict[str, set[Watch]] = {}

    async def listen(self, database_url: str, channel: str) -> None:
        """Background task on PostgreSQL: commits of every replica of this
        service NOTIFY the ids they touched (services.common.uow); LISTEN
        wakes this process's streams for them. Reconnects after a failure;
        the slow poll of the streams covers the gap."""
        import logging

        import psycopg
        from sqlalchemy.engine import make_url
        conninfo = make_url(database_url).set(drivername="postgresql").render_as_string(hide_password=False)
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as conn:
                    await conn.execute(f"LISTEN {channel}")
                    async for note in conn.notifies():
                        self.notify([note.payload])
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the database may be restarting: listen again
                logging.getLogger(__name__).warning("listening for changes: %s; again in 2 s", exc)
                await asyncio.sleep(2)

    @contextlib.contextmanager
    def watch(self, key: str) -> Iterator[Watch]:
        watch = Watch()
        self._watches.setdefault(key, set()).add(watch)
        try:
            yield watch
        finally:
            watches = self._watches.get(key)
            if watches is not None:
                watches.discard(watch)
                if not watches:
                    del self._watches[key]

    def notify(self, keys: Iterable[str]) -> None:
        for key in keys:
            for watch in self._watches.get(key, ()):
                watch._touched()
