"""Reading what a service published, straight from its JetStream stream."""
from __future__ import annotations

import asyncio

from infrakitchen.events.v1 import events_pb2


async def read_events(bus, context: str, count: int, subject: str | None = None,
                      timeout: float = 20) -> list[events_pb2.Envelope]:
    """The first `count` events on the context's stream (optionally under one
    subject filter), waiting up to `timeout` for them to arrive."""
    sub = await bus.js.pull_subscribe(bus.names.subject(subject or f"ik.{context}.>"), durable=None,
                                      stream=bus.names.context_stream(context))
    msgs = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    try:
        while len(msgs) < count and loop.time() < deadline:
            try:
                msgs += await sub.fetch(count - len(msgs), timeout=1)
            except Exception:  # noqa: BLE001 - nothing yet
                pass
    finally:
        await sub.unsubscribe()
    return [events_pb2.Envelope.FromString(m.data) for m in msgs]


async def publish_as(service: str, runtime, env: events_pb2.Envelope, msg_id: str | None = None) -> None:
    """Publishes `env` signed by `service` (whose key lies in the data
    directory of `runtime`'s installation), as that service would."""
    from services.common.bus import EventBus
    from services.common.identities import ServiceIdentity
    from services.common.signing import EventSigner

    signer = EventSigner(ServiceIdentity.from_settings(service, runtime.settings.env, runtime.settings.data_dir))
    bus = EventBus(runtime.bus.nats_url, runtime.bus.names.prefix, signer=signer)
    await bus.connect(attempts=3)
    try:
        await bus.publish(bus.names.subject(env.type), env.SerializeToString(), msg_id=msg_id or env.event_id)
    finally:
        await bus.close()
