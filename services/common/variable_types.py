"""The outer HCL type of a variable's value, checked before terraform runs
(pure Python: the resource service and the executor's domains use it)."""
from __future__ import annotations

import re
from typing import Any


_COLLECTION = re.compile(r"^(list|set|tuple)\b")
_MAPPING = re.compile(r"^(map|object)\b")


def type_problem(type_expr: str, value: Any) -> str:
    """Why `value` cannot be given for a variable of HCL type `type_expr`
    ('' when it can). Only the outer type is checked; terraform checks the
    rest. The resource service checks a resource's variables with it, the
    executor the values a waiting job takes from its upstream's outputs."""
    t = (type_expr or "any").strip()
    if value is None or t in ("any", ""):
        return ""
    if t == "string":
        ok = isinstance(value, str)
    elif t == "number":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif t == "bool":
        ok = isinstance(value, bool)
    elif _COLLECTION.match(t):
        ok = isinstance(value, list)
    elif _MAPPING.match(t):
        ok = isinstance(value, dict)
    else:
        ok = True
    return "" if ok else f"must be of type {t}"
