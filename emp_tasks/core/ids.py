"""Identifiers: time-ordered UUIDs (version 7 layout) so that ids sort by creation.

A list's page cursor is the last id of the previous page (`decode_cursor`).
"""

from __future__ import annotations

import os
import time
import uuid

from emp_tasks.core.errors import InvalidCursor


def new_id() -> str:
    """A UUIDv7 string: 48-bit Unix milliseconds, then random bits."""
    millis = time.time_ns() // 1_000_000
    value = (millis & ((1 << 48) - 1)) << 80 | int.from_bytes(os.urandom(10), "big")
    value &= ~(0xF << 76)
    value |= 0x7 << 76  # version 7
    value &= ~(0x3 << 62)
    value |= 0x2 << 62  # RFC 4122 variant
    return str(uuid.UUID(int=value))


def decode_cursor(cursor: str) -> str:
    """The id a page cursor names; InvalidCursor if it is not one the API returned."""
    try:
        return str(uuid.UUID(cursor))
    except ValueError as exc:
        raise InvalidCursor("cursor is not one this API returned") from exc
