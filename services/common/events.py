"""Building and reading event envelopes (infrakitchen.events.v1.Envelope).

The subject of each event is declared in the proto, as the event_subject
option of the envelope's body field, so producers, consumers and clients in
other languages share one catalogue."""
from __future__ import annotations

import uuid
from functools import cache

from google.protobuf import timestamp_pb2
from google.protobuf.message import Message

from infrakitchen.common.v1 import options_pb2
from infrakitchen.events.v1 import events_pb2

Envelope = events_pb2.Envelope
Correlation = events_pb2.Correlation


@cache
def subject_of(body_field: str) -> str:
    """Unprefixed subject of an envelope body field, e.g. 'job_succeeded' ->
    'ik.executor.job.succeeded'."""
    field = Envelope.DESCRIPTOR.fields_by_name.get(body_field)
    if field is None or field.containing_oneof is None:
        raise KeyError(f"{body_field!r} is not an event body of Envelope")
    return field.GetOptions().Extensions[options_pb2.event_subject]


def catalogue() -> dict[str, str]:
    """Every body field and its subject."""
    oneof = Envelope.DESCRIPTOR.oneofs_by_name["body"]
    return {f.name: subject_of(f.name) for f in oneof.fields}


def new_event(source: str, body_field: str, body: Message, *, actor: str = "",
              correlation: Correlation | None = None) -> Envelope:
    env = Envelope(event_id=str(uuid.uuid4()), type=subject_of(body_field), source=source, actor=actor)
    env.occur_time.CopyFrom(timestamp_pb2.Timestamp())
    env.occur_time.GetCurrentTime()
    if correlation is not None:
        env.correlation.CopyFrom(correlation)
    getattr(env, body_field).CopyFrom(body)
    return env


def body_of(env: Envelope) -> tuple[str, Message]:
    name = env.WhichOneof("body")
    if name is None:
        raise ValueError(f"event {env.event_id} has no body")
    return name, getattr(env, name)


def context_of(subject: str) -> str:
    """'ik.executor.job.succeeded' -> 'executor'."""
    parts = subject.split(".")
    if len(parts) < 3 or parts[0] != "ik":
        raise ValueError(f"not an InfraKitchen subject: {subject!r}")
    return parts[1]
