"""google.protobuf.Value / Struct <-> plain Python values."""
from __future__ import annotations

from typing import Any

from google.protobuf import json_format, struct_pb2, timestamp_pb2


def _tidy(value: Any) -> Any:
    # Struct stores every number as a double; give integral ones back as int.
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, list):
        return [_tidy(v) for v in value]
    if isinstance(value, dict):
        return {k: _tidy(v) for k, v in value.items()}
    return value


def from_value(value: struct_pb2.Value) -> Any:
    return _tidy(json_format.MessageToDict(value)) if value.WhichOneof("kind") else None


def to_value(py: Any) -> struct_pb2.Value:
    value = struct_pb2.Value()
    json_format.ParseDict(py, value)
    return value


def from_struct(struct: struct_pb2.Struct) -> dict[str, Any]:
    return _tidy(json_format.MessageToDict(struct))


def to_struct(py: dict[str, Any] | None) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    if py:
        json_format.ParseDict(py, struct)
    return struct


def to_timestamp(moment) -> "timestamp_pb2.Timestamp | None":
    """datetime -> Timestamp (None stays unset)."""
    if moment is None:
        return None
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(moment)
    return ts
