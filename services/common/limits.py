"""Bounds of everything a caller sends, checked once for every method before
the servicer runs (the ErrorInterceptor calls `check_request`).

Why one generic walk instead of checks per method: a bound forgotten on one
field of one of ~80 methods is enough to let a 1 MB user name into an event
that NATS then refuses (and that used to hold every later event back). The
walk covers every string, list, map and `google.protobuf.Struct`/`Value` of
every request, nested messages included; fields with a larger need are named
below. The bounds are documented in docs/architecture.md ("Bounds").

Violations name the field path and the bound, never the value."""
from __future__ import annotations

import math

from google.protobuf import struct_pb2

from services.common.errors import FieldViolation, InvalidArgument

MAX_STRING = 1024  # ids, names, keys, user names, refs, paths, tokens
MAX_LIST = 2000  # items of any repeated field or map
MAX_STRUCT_BYTES = 256 * 1024  # one Struct / Value (variables, defaults, configs), serialized
MAX_STRUCT_DEPTH = 32
MAX_STRUCT_KEY = 256

# Fields allowed more than MAX_STRING characters (by field name).
LONGER_STRINGS = {
    "description": 8192,
    "repository_url": 2048,
    "credentials": 64 * 1024,  # map values of integration credentials
    "values": 64 * 1024,  # map values of secrets
    "page_token": 2048,
}

_STRUCT_TYPES = {"google.protobuf.Struct", "google.protobuf.Value", "google.protobuf.ListValue"}
# Checking stops after this many problems: enough to fix the request, small enough to send back.
_MAX_VIOLATIONS = 20


class _Problems(list):
    def add(self, field: str, description: str) -> None:
        if len(self) < _MAX_VIOLATIONS:
            self.append(FieldViolation(field, description))


def _check_string(value: str, field: str, name: str, problems: _Problems) -> None:
    limit = LONGER_STRINGS.get(name, MAX_STRING)
    if len(value) > limit:
        problems.add(field, f"is longer than {limit} characters")
    elif "\x00" in value:
        problems.add(field, "contains a NUL character")


def check_value(value: struct_pb2.Value, field: str, problems: _Problems, depth: int = 0) -> None:
    """A Value must have its kind set (a client that sent `{}` or misspelled
    `string_value` would otherwise store null), numbers must be finite, and
    nesting and keys are bounded."""
    if depth > MAX_STRUCT_DEPTH:
        problems.add(field, f"is nested deeper than {MAX_STRUCT_DEPTH} levels")
        return
    kind = value.WhichOneof("kind")
    if kind is None:
        problems.add(field, "has no value: set one of null_value, number_value, string_value, bool_value, "
                            "struct_value, list_value")
    elif kind == "number_value" and not math.isfinite(value.number_value):
        problems.add(field, "must be a finite number (not NaN or Infinity)")
    elif kind == "string_value" and "\x00" in value.string_value:
        problems.add(field, "contains a NUL character")
    elif kind == "struct_value":
        check_struct(value.struct_value, field, problems, depth + 1)
    elif kind == "list_value":
        for i, item in enumerate(value.list_value.values):
            check_value(item, f"{field}[{i}]", problems, depth + 1)


def check_struct(struct: struct_pb2.Struct, field: str, problems: _Problems, depth: int = 0) -> None:
    for key, value in struct.fields.items():
        if len(key) > MAX_STRUCT_KEY or not key or "\x00" in key:
            problems.add(field, f"has a key that is empty, longer than {MAX_STRUCT_KEY} characters or contains NUL")
            continue
        check_value(value, f"{field}.{key}", problems, depth)


def _check_message(message, prefix: str, problems: _Problems) -> None:
    for fd, value in message.ListFields():
        field = f"{prefix}{fd.name}"
        is_map = fd.message_type is not None and fd.message_type.GetOptions().map_entry
        if fd.is_repeated:
            if len(value) > MAX_LIST:
                problems.add(field, f"has more than {MAX_LIST} items")
                continue
            if is_map:
                value_fd = fd.message_type.fields_by_name["value"]
                for key, item in value.items():
                    if isinstance(key, str):
                        _check_string(key, f"{field}[]", "key", problems)
                    if isinstance(item, str):
                        _check_string(item, f"{field}[]", fd.name, problems)
                    elif value_fd.message_type is not None:
                        _check_nested(item, f"{field}[]", problems)
                continue
            for i, item in enumerate(value):
                if isinstance(item, str):
                    _check_string(item, f"{field}[{i}]", fd.name, problems)
                elif fd.message_type is not None:
                    _check_nested(item, f"{field}[{i}]", problems)
        elif isinstance(value, str):
            _check_string(value, field, fd.name, problems)
        elif fd.message_type is not None:
            _check_nested(value, field, problems)


def _check_nested(message, field: str, problems: _Problems) -> None:
    name = message.DESCRIPTOR.full_name
    if name in _STRUCT_TYPES:
        if message.ByteSize() > MAX_STRUCT_BYTES:
            problems.add(field, f"is larger than {MAX_STRUCT_BYTES // 1024} KiB")
        elif name == "google.protobuf.Struct":
            check_struct(message, field, problems)
        elif name == "google.protobuf.Value":
            check_value(message, field, problems)
        else:
            for i, item in enumerate(message.values):
                check_value(item, f"{field}[{i}]", problems)
        return
    _check_message(message, f"{field}.", problems)


def request_problems(message) -> list[FieldViolation]:
    problems = _Problems()
    _check_message(message, "", problems)
    return list(problems)


def check_request(message) -> None:
    """INVALID_ARGUMENT listing every field over its bound (or malformed)."""
    problems = request_problems(message)
    if problems:
        raise InvalidArgument("the request has fields over their bounds or malformed values", problems)
