"""The `filter` of the Lists that take one (AIP-160, the part users need):
conditions `name = value` joined by `AND`, e.g.

    state = PROVISIONED AND label = "team-payments"

A value is a bare word (letters, digits, `_ . : / -`) or a double-quoted
string (`\\"` and `\\\\` escapes). Each List names the fields it filters on
and turns a value into what its query wants (an enum name into its stored
word, say); anything else is INVALID_ARGUMENT naming `filter`. The typed
request fields still work; a condition that contradicts one is refused."""
from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from services.common.errors import FieldViolation, InvalidArgument

MAX_FILTER = 1024
_TERM = re.compile(r'\s*([a-z_]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([A-Za-z0-9_.:/\-]+))\s*')


def _bad(why: str) -> InvalidArgument:
    return InvalidArgument("filter is not one this list understands", [FieldViolation("filter", why)])


def parse_filter(text: str, fields: dict[str, Callable[[str], Any]]) -> dict[str, Any]:
    """The conditions of `text` as {field: converted value}. `fields` maps each
    field this List filters on to the function converting a value (it raises
    ValueError for a value the field cannot take)."""
    if len(text) > MAX_FILTER:
        raise _bad(f"at most {MAX_FILTER} characters")
    found: dict[str, Any] = {}
    position, terms = 0, 0
    while position < len(text) and text[position:].strip():
        if terms:
            joined = re.compile(r"\s*AND\b").match(text, position)
            if joined is None:
                raise _bad(f"conditions are joined by AND (at character {position + 1})")
            position = joined.end()
        match = _TERM.match(text, position)
        if match is None:
            raise _bad(f"expected <field> = <value> at character {position + 1}; fields: {', '.join(sorted(fields))}")
        name, quoted, bare = match.groups()
        if name not in fields:
            raise _bad(f"cannot filter on {name[:40]!r}; fields: {', '.join(sorted(fields))}")
        raw = re.sub(r"\\(.)", r"\1", quoted) if quoted is not None else bare
        try:
            value = fields[name](raw)
        except ValueError as exc:
            raise _bad(f"{name}: {exc}") from None
        if name in found and found[name] != value:
            raise _bad(f"{name} is given twice with different values")
        found[name] = value
        position, terms = match.end(), terms + 1
    return found


def merged(typed: dict[str, Any], filtered: dict[str, Any]) -> dict[str, Any]:
    """The typed request fields and the filter's conditions together; a
    condition that contradicts a set typed field is INVALID_ARGUMENT."""
    out = dict(typed)
    for name, value in filtered.items():
        if out.get(name) and out[name] != value:
            raise _bad(f"{name} differs from the request's {name} field")
        out[name] = value
    return out


def enum_word(choices: dict[str, str], prefix: str) -> Callable[[str], str]:
    """A converter for an enum field: its value name, with or without the
    prefix, any case (`PROVISIONED`, `resource_state_provisioned`), to the
    stored word."""
    def convert(raw: str) -> str:
        key = raw.upper().removeprefix(prefix)
        if key not in choices:
            raise ValueError(f"one of {', '.join(sorted(choices))}")
        return choices[key]
    return convert


def words_of(numbers_to_words: dict[int, str], enum, prefix: str) -> dict[str, str]:
    """{value name without prefix: stored word} of an enum the API converts."""
    return {enum.Name(n).removeprefix(prefix): word for n, word in numbers_to_words.items()}


def text(raw: str) -> str:
    if not raw or len(raw) > 256:
        raise ValueError("1 to 256 characters")
    return raw
