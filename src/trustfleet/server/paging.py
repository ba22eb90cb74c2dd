"""Cursor pagination for listings that can grow without bound (the audit log, terminals).

A page is ``{"items": [...], "next_cursor": "..." | null}``. The cursor is opaque to
clients: pass it back as ``cursor`` with the same filters to get the next page; ``null``
means there is none. Inside, it is the listing's name and the key of the last item sent,
as base64url JSON, so that a cursor of one listing is refused by another and a page never
repeats or skips an item that was there when the first page was read.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Annotated, Any

from fastapi import Query

from trustfleet.errors import InvalidInput

MAX_CURSOR_CHARS = 512
DEFAULT_LIMIT = 100
MAX_LIMIT = 1000

CursorParam = Annotated[
    str | None,
    Query(max_length=MAX_CURSOR_CHARS, description="The previous page's next_cursor"),
]
LimitParam = Annotated[int, Query(ge=1, le=MAX_LIMIT, description="At most this many items")]


class InvalidCursor(InvalidInput):
    code = "invalid-cursor"
    title = "The cursor is not one this listing gave out"


def encode_cursor(listing: str, after: Any) -> str:
    """The cursor of the page after the item whose key is ``after`` (JSON-able)."""
    raw = json.dumps({"l": listing, "a": after}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def decode_cursor(listing: str, cursor: str | None) -> Any:
    """The key a cursor of ``listing`` carries (None for no cursor)."""
    if cursor is None:
        return None
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        decoded = json.loads(raw)
    except (binascii.Error, ValueError):
        raise InvalidCursor("the cursor is malformed") from None
    if not isinstance(decoded, dict) or decoded.get("l") != listing or "a" not in decoded:
        raise InvalidCursor(f"the cursor is not one of the {listing} listing")
    return decoded["a"]
