"""Coarse compatibility of Terraform values: can an output of one module feed
a variable of another? Only what is certain is refused; anything unknown
passes (Terraform itself checks at apply time)."""
from __future__ import annotations

import re

_COLLECTION = {"list", "set", "tuple"}
_MAPPING = {"map", "object"}


def kind_of_type(type_expr: str) -> str:
    """'list(string)' -> 'list', 'object({...})' -> 'map', 'string' -> 'string', '' / 'any' -> ''."""
    head = re.split(r"[\s(]", type_expr.strip(), maxsplit=1)[0] if type_expr.strip() else ""
    if head in _COLLECTION:
        return "list"
    if head in _MAPPING:
        return "map"
    if head in ("string", "number", "bool"):
        return head
    return ""


_LIST_FUNCS = ("tolist(", "toset(", "concat(", "flatten(", "distinct(", "keys(", "values(", "split(",
               "sort(", "compact(", "slice(", "reverse(", "setunion(", "range(")
_MAP_FUNCS = ("tomap(", "merge(", "zipmap(")
_STRING_FUNCS = ("tostring(", "format(", "join(", "jsonencode(", "lower(", "upper(", "trimspace(",
                 "replace(", "substr(", "base64encode(", "md5(", "sha256(", "uuid(", "cidrsubnet(")
_NUMBER_FUNCS = ("tonumber(", "length(", "max(", "min(", "sum(", "abs(", "ceil(", "floor(")


def kind_of_expression(value) -> str:
    """What an output's value expression (as python-hcl2 reads it) produces."""
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, list):
        return "list"
    if isinstance(value, dict):
        return "map"
    if not isinstance(value, str):
        return ""
    text = value.strip()
    if text.startswith('"'):
        return "string"  # a quoted template, with or without interpolation
    if text.startswith("${") and text.endswith("}"):
        inner = text[2:-1].strip()
        if inner.startswith("[") or "[*]" in inner or re.search(r"\.\*(\.|$)", inner):
            return "list"
        if inner.startswith("{"):
            return "map"
        if inner in ("true", "false"):
            return "bool"
        if re.fullmatch(r"-?\d+(\.\d+)?", inner):
            return "number"
        for prefix, kind in ((_LIST_FUNCS, "list"), (_MAP_FUNCS, "map"), (_STRING_FUNCS, "string"),
                             (_NUMBER_FUNCS, "number")):
            if inner.startswith(prefix):
                return kind
    return ""


def compatible(output_kind: str, variable_kind: str) -> bool:
    if not output_kind or not variable_kind:
        return True
    if output_kind == variable_kind:
        return True
    if variable_kind == "string":
        return output_kind in ("number", "bool")  # Terraform converts primitives to string
    if variable_kind in ("number", "bool"):
        return output_kind == "string"  # converted when the text is a number / bool
    return False
