"""How read commands print: tables and trees for people, or `-o json` for
scripts (the messages as the proto3 JSON mapping, field names as in the
protos, one JSON document per command). Ids are never shortened; values are
shown as JSON, never as protobuf text."""
from __future__ import annotations

import json

from google.protobuf import json_format
from google.protobuf.message import Message
import typer
from rich.table import Table

from cli.connection import console, options


def as_json(message: Message | list) -> str:
    if isinstance(message, list):
        return json.dumps([_dict(m) for m in message], indent=2)
    return json.dumps(_dict(message), indent=2)


def _dict(message: Message) -> dict:
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def wants_json() -> bool:
    return options.output == "json"


def emit(message: Message | list, render) -> None:
    """`-o json`: the message(s) as JSON; else what `render()` builds for people."""
    if wants_json():
        typer.echo(as_json(message))  # plain text: no wrapping, no colours
    else:
        console.print(render())


def value(v) -> str:
    """A google.protobuf.Value (or Struct field) as compact JSON."""
    return json.dumps(json_format.MessageToDict(v) if isinstance(v, Message) else v, separators=(",", ":"))


def table(*columns: str) -> Table:
    """A table whose cells fold rather than cut (ids stay whole at any width)."""
    t = Table()
    for column in columns:
        t.add_column(column, overflow="fold")
    return t


def enum_name(enum, number: int, prefix: str) -> str:
    return enum.Name(number).removeprefix(prefix).lower() if number else ""
