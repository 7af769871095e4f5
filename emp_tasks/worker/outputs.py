"""Storing what a connector made, before its step completes.

A result's `outputs` may hold OutputFile objects: each is streamed into the configured
store under this attempt's key (`<customer>/<step>/<attempt>/<n>.<ext>`) and replaced
by its entry. Entries a connector already made (dicts) stay as they are. A store that
cannot take a file fails the attempt as a retryable `network` failure.
"""

from __future__ import annotations

import io
import logging
import struct
from collections.abc import Callable
from typing import IO, Any

from emp_tasks import storage
from emp_tasks.connectors.base import (
    FailureType,
    OutputFile,
    StepFailure,
    StepInterrupted,
    StepRun,
)

logger = logging.getLogger(__name__)

SNIFF_BYTES = 64 * 1024
"""Read ahead of an upload to learn an image's size from its header."""


def has_files(result: Any) -> bool:
    return isinstance(result, dict) and any(
        isinstance(item, OutputFile) for item in result.get("outputs") or []
    )


def store_files(run: StepRun, result: Any, cancel_requested: Callable[[], bool]) -> Any:
    """`result` with every OutputFile in its `outputs` stored and replaced by its entry."""
    if not has_files(result):
        return result
    store = storage.get()
    entries = []
    for n, item in enumerate(result["outputs"]):
        if not isinstance(item, OutputFile):
            entries.append(item)
            continue
        if cancel_requested():
            raise StepInterrupted()
        entries.append(_store_one(store, run, n, item))
    return {**result, "outputs": entries}


def _store_one(store: storage.Store, run: StepRun, n: int, item: OutputFile) -> dict[str, Any]:
    content_type = item.content_type or "application/octet-stream"
    key = storage.output_key(
        run.customer_id, run.step_id, run.attempt, n, storage.extension_for(content_type)
    )
    with item.open() as source:
        head = source.read(SNIFF_BYTES)
        width, height = image_size(head) or (item.width, item.height)
        try:
            stored = store.put(key, _Rejoined(head, source), content_type)
        except StepFailure:
            raise
        except Exception as exc:
            logger.warning(
                "Output upload failed",
                extra={"action": "output_upload_failed", "step_id": run.step_id, "key": key},
            )
            raise StepFailure(
                f"could not store output {n} ({key}): {type(exc).__name__}: {exc}",
                type=FailureType.NETWORK,
                code="OUTPUT_UPLOAD_FAILED",
            ) from exc
    entry: dict[str, Any] = {
        "url": stored.url,
        "key": stored.key,
        "content_type": stored.content_type,
        "size_bytes": stored.size_bytes,
        "sha256": stored.sha256,
    }
    if width is not None and height is not None:
        entry.update(width=width, height=height)
    if item.node_id is not None:
        entry["node_id"] = item.node_id
    return entry


class _Rejoined(io.RawIOBase):
    """The bytes read ahead, then the rest of the source: one stream again."""

    def __init__(self, head: bytes, rest: IO[bytes]) -> None:
        self._head = head
        self._rest = rest

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        if self._head:
            if size is None or size < 0 or size >= len(self._head):
                data, self._head = self._head, b""
                return data
            data, self._head = self._head[:size], self._head[size:]
            return data
        return self._rest.read(size) if size is not None and size >= 0 else self._rest.read()

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def image_size(head: bytes) -> tuple[int, int] | None:
    """Width and height from the first bytes of a PNG, GIF, JPEG or WebP file."""
    if head.startswith(b"\x89PNG\r\n\x1a\n") and head[12:16] == b"IHDR":
        return struct.unpack(">II", head[16:24])
    if head[:6] in (b"GIF87a", b"GIF89a") and len(head) >= 10:
        return struct.unpack("<HH", head[6:10])
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP" and len(head) >= 30:
        chunk = head[12:16]
        if chunk == b"VP8X":
            return 1 + int.from_bytes(head[24:27], "little"), 1 + int.from_bytes(
                head[27:30], "little"
            )
        if chunk == b"VP8 ":
            w, h = struct.unpack("<HH", head[26:30])
            return w & 0x3FFF, h & 0x3FFF
        if chunk == b"VP8L" and len(head) >= 25:
            bits = int.from_bytes(head[21:25], "little")
            return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if head[:2] == b"\xff\xd8":
        return _jpeg_size(head)
    return None


def _jpeg_size(head: bytes) -> tuple[int, int] | None:
    at = 2
    while at + 9 < len(head):
        if head[at] != 0xFF:
            return None
        marker = head[at + 1]
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            at += 2
            continue
        length = int.from_bytes(head[at + 2 : at + 4], "big")
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            height, width = struct.unpack(">HH", head[at + 5 : at + 9])
            return width, height
        at += 2 + length
    return None
