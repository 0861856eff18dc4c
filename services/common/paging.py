"""AIP-158 pagination: page_size (default 50, at most 1000) and an opaque
page_token, by keyset: the token carries the sort key of the last row of the
previous page, so the next page is an index range scan that costs the same
at any depth (an OFFSET reads and skips every earlier row), and rows
inserted or deleted meanwhile never make a page skip or repeat a row.

A token is bound to the listing it came from (the collection, its filters
and its order, as a digest): used with other filters it is INVALID_ARGUMENT,
never a silently different listing."""
from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import json
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import sqlalchemy as sa

from services.common.errors import FieldViolation, InvalidArgument

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
_VERSION = 2


def _scope_digest(scope: dict[str, Any]) -> str:
    text = json.dumps(scope, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _encode(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        return {"t": value.isoformat()}
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise TypeError(f"not a sort key value: {type(value).__name__}")


def _decode(value: Any) -> Any:
    if isinstance(value, dict):
        moment = dt.datetime.fromisoformat(str(value["t"]))
        return moment if moment.tzinfo else moment.replace(tzinfo=dt.timezone.utc)
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise ValueError("not a sort key value")


def _bad_token() -> InvalidArgument:
    return InvalidArgument.of("page_token", "is not a token from a previous List response")


def page_window(page_size: int, page_token: str, scope: dict[str, Any]) -> tuple[list | None, int]:
    """(the sort key to continue after, or None for the first page; the page size)."""
    if page_size < 0:
        raise InvalidArgument.of("page_size", "must not be negative")
    limit = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
    if not page_token:
        return None, limit
    try:
        token = json.loads(base64.urlsafe_b64decode(page_token.encode()).decode())
        if not isinstance(token, dict) or token.get("v") != _VERSION or not isinstance(token.get("k"), list):
            raise ValueError
        after = [_decode(v) for v in token["k"]]
        digest = token.get("s")
    except (ValueError, KeyError, TypeError, binascii.Error, UnicodeDecodeError):
        raise _bad_token() from None
    if digest != _scope_digest(scope):
        raise InvalidArgument.of("page_token", "was made for another listing (other filters or order); "
                                               "start again without a page_token")
    return after, limit


def next_page_token(key: Sequence[Any], scope: dict[str, Any]) -> str:
    token = {"v": _VERSION, "k": [_encode(v) for v in key], "s": _scope_digest(scope)}
    return base64.urlsafe_b64encode(json.dumps(token, separators=(",", ":")).encode()).decode()


# `order_by` values of the Lists that take one (AIP-132): creation order, oldest first by default.
ORDERS = {"": False, "create_time": False, "create_time asc": False, "create_time desc": True}
MAX_ORDER_BY = 64


def newest_first(order_by: str) -> bool:
    """Whether a List's `order_by` asks for newest first; INVALID_ARGUMENT for anything else we do not sort by."""
    normal = " ".join(order_by.lower().split()) if len(order_by) <= MAX_ORDER_BY else None
    if normal not in ORDERS:
        raise InvalidArgument("order_by is not one this list sorts by", [FieldViolation(
            "order_by", '"create_time" (oldest first, the default) or "create_time desc" (newest first)')])
    return ORDERS[normal]


def after_key(query, columns: Sequence[sa.Column], after: list | None, descending: bool = False):
    """The query ordered by `columns` (unique together; ascending, or all
    descending), continuing after the row whose sort key is `after`."""
    query = query.order_by(*(c.desc() for c in columns) if descending else columns)
    if after is None:
        return query
    if len(after) != len(columns):
        raise _bad_token()
    bound = [sa.literal(v, type_=c.type) for c, v in zip(columns, after)]
    return query.where(sa.tuple_(*columns) < sa.tuple_(*bound) if descending
                       else sa.tuple_(*columns) > sa.tuple_(*bound))


async def paginate(fetch: Callable[[list | None, int], Awaitable[list]], page_size: int, page_token: str,
                   scope: dict[str, Any], key: Callable[[Any], Sequence[Any]]):
    """Runs a List: `fetch(after, limit)` returns up to `limit` rows after
    the sort key `after`; one extra row is asked for to know whether another
    page follows. `key(row)` is a row's sort key. Returns (rows, next_page_token)."""
    after, limit = page_window(page_size, page_token, scope)
    found = await fetch(after, limit + 1)
    page = found[:limit]
    return page, next_page_token(key(page[-1]), scope) if len(found) > limit else ""


def by_creation(row) -> tuple:
    """The sort key of collections listed oldest first."""
    return row.create_time, row.id


async def filtered(fetch: Callable[[list | None, int], Awaitable[list]], keep: Callable[[Any], bool],
                   key: Callable[[Any], Sequence[Any]], after: list | None, limit: int, batch: int = 500) -> list:
    """Up to `limit` rows after `after` that `keep` accepts, read in keyset
    batches (for the small catalogs whose JSON label lists are matched in
    Python: a page costs the rows up to its last match, never the whole table)."""
    found: list = []
    while len(found) < limit:
        rows = await fetch(after, batch)
        found += [r for r in rows if keep(r)]
        if len(rows) < batch:
            break
        after = list(key(rows[-1]))
    return found[:limit]
