"""Keyset pagination: items sorted by a unique text key; the page token is an opaque
encoding of the last key returned."""

from __future__ import annotations

import base64
import binascii
import sqlite3
from collections.abc import Callable, Sequence
from typing import TypeVar

from isovisor.host.errors import InvalidRequest
from isovisor.host.models import Page

T = TypeVar("T")
MAX_LIMIT = 200
DEFAULT_LIMIT = 50
_SCAN_BATCH = 200  # rows read per query while filtering for visibility


def encode_token(key: str) -> str:
    return base64.urlsafe_b64encode(b"k1:" + key.encode()).decode().rstrip("=")


def decode_token(token: str | None) -> str:
    if not token:
        return ""
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    except (binascii.Error, ValueError):
        raise InvalidRequest("pageToken is not a token returned by this API") from None
    if not raw.startswith(b"k1:"):
        raise InvalidRequest("pageToken is not a token returned by this API")
    try:
        return raw[3:].decode()
    except UnicodeDecodeError:
        raise InvalidRequest("pageToken is not a token returned by this API") from None


def check_limit(limit: int | None) -> int:
    if limit is None:
        return DEFAULT_LIMIT
    if not 1 <= limit <= MAX_LIMIT:
        raise InvalidRequest(f"limit must be between 1 and {MAX_LIMIT}")
    return limit


def paginate(
    conn: sqlite3.Connection,
    query: str,
    params: Sequence[object],
    key: str,
    convert: Callable[[sqlite3.Row], T],
    limit: int | None,
    token: str | None,
    keep: Callable[[T], bool] = lambda _item: True,
) -> Page[T]:
    """`query` selects rows with a WHERE clause ending so that `AND {key} > ?` can follow."""
    n = check_limit(limit)
    after = decode_token(token)
    items: list[T] = []
    while True:
        rows = conn.execute(f"{query} AND {key} > ? ORDER BY {key} LIMIT ?",
                            (*params, after, _SCAN_BATCH)).fetchall()
        for row in rows:
            item = convert(row)
            after = row[key]
            if keep(item):
                items.append(item)
                if len(items) == n:
                    more = conn.execute(f"SELECT 1 FROM ({query} AND {key} > ?) LIMIT 1",
                                        (*params, after)).fetchone()
                    return Page(items, encode_token(after) if more else None)
        if len(rows) < _SCAN_BATCH:
            return Page(items, None)
