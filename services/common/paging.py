"""AIP-158 pagination: page_size (default 50, at most 1000) and an opaque page_token."""
from __future__ import annotations

import base64
import binascii

from services.common.errors import InvalidArgument

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
# Larger offsets cannot come from a real listing, and overflow SQLite's integers.
MAX_OFFSET = 2 ** 31


def page_window(page_size: int, page_token: str) -> tuple[int, int]:
    """(offset, limit) for a List request; bad input is INVALID_ARGUMENT."""
    if page_size < 0:
        raise InvalidArgument.of("page_size", "must not be negative")
    limit = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
    if not page_token:
        return 0, limit
    try:
        kind, _, offset = base64.urlsafe_b64decode(page_token.encode()).decode().partition(":")
        if kind != "o" or not offset.isdigit() or len(offset) > 12 or int(offset) > MAX_OFFSET:
            raise ValueError
        return int(offset), limit
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise InvalidArgument.of("page_token", "is not a token from a previous List response") from None


def next_page_token(offset: int, limit: int, returned: int) -> str:
    """Callers fetch limit + 1 rows; a full page plus one means there is more."""
    if returned <= limit:
        return ""
    return base64.urlsafe_b64encode(f"o:{offset + limit}".encode()).decode()


async def paginate(fetch, page_size: int, page_token: str):
    """Runs a List: `fetch(offset, limit)` returns rows; one extra row is
    asked for to know whether another page follows. Returns (rows, next_page_token)."""
    offset, limit = page_window(page_size, page_token)
    found = await fetch(offset, limit + 1)
    return found[:limit], next_page_token(offset, limit, len(found))
