"""Object storage for generated files: where outputs live, never PostgreSQL or events.

`get()` is the configured store (EMP_STORAGE_URL): `file://` (emp_tasks.storage.files,
the default, served by the web process at `/outputs/<key>` behind an expiring
signature) or `s3://bucket/prefix` (emp_tasks.storage.s3, any S3-compatible store).
A store takes a stream (`put`), never a whole file in memory, and records what it
stored as a `Stored`: the key, size, sha256 and content type, and a URL clients fetch.

Keys are `<customer_id>/<step_id>/<attempt>/<n>.<ext>` (`output_key`): an attempt
writes only under its own number, so a superseded attempt can never overwrite an
output of the attempt that completed the step.
"""

from __future__ import annotations

import hashlib
import mimetypes
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import IO, Protocol

from emp_tasks.core.config import ConfigError, Settings, get_settings

KEY_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}(/[A-Za-z0-9][A-Za-z0-9._-]{0,199}){3}")
"""What an output key looks like: four safe path segments, none of them `.` or `..`."""
CHUNK_BYTES = 1024 * 1024

EXTENSIONS = {
    "image/png": "png",
    "image/jpeg": "jpg",
    "image/webp": "webp",
    "image/gif": "gif",
    "video/mp4": "mp4",
    "video/webm": "webm",
    "audio/mpeg": "mp3",
    "audio/wav": "wav",
    "application/json": "json",
    "text/plain": "txt",
    "application/octet-stream": "bin",
}


def extension_for(content_type: str) -> str:
    base = content_type.split(";")[0].strip().lower()
    return EXTENSIONS.get(base) or (mimetypes.guess_extension(base) or ".bin").lstrip(".")


def content_type_of(key: str) -> str:
    return mimetypes.guess_type(key)[0] or "application/octet-stream"


def _segment(value: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "_", value).lstrip("._-")[:200]
    return cleaned or "_"


def output_key(customer_id: str | None, step_id: str, attempt: int, n: int, ext: str) -> str:
    """The key of the `n`-th output of a step attempt."""
    return "/".join(
        [_segment(customer_id or "_"), _segment(step_id), str(int(attempt)), f"{n}.{ext}"]
    )


def valid_key(key: str) -> bool:
    return bool(KEY_PATTERN.fullmatch(key)) and ".." not in key


@dataclass(frozen=True)
class Stored:
    key: str
    url: str
    content_type: str
    size_bytes: int
    sha256: str


class HashingReader:
    """A read-only stream over another that counts and hashes what passes through it."""

    def __init__(self, source: IO[bytes]) -> None:
        self.source = source
        self.size = 0
        self._hash = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self.source.read(size if size is not None and size >= 0 else CHUNK_BYTES)
        self.size += len(data)
        self._hash.update(data)
        return data

    def chunks(self) -> Iterator[bytes]:
        while True:
            data = self.read(CHUNK_BYTES)
            if not data:
                return
            yield data

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()


class Store(Protocol):
    """Where outputs are kept. `put` streams; `open` reads one back; `url` is a client's."""

    def put(self, key: str, stream: IO[bytes], content_type: str) -> Stored: ...

    def open(self, key: str) -> IO[bytes]: ...

    def url(self, key: str) -> str: ...

    def key_of(self, url: str) -> str | None:
        """The key behind one of this store's URLs; None for any other URL."""

    def delete_older_than(self, cutoff: datetime) -> int:
        """Delete outputs stored before `cutoff`; return how many."""


_stores: dict[tuple, Store] = {}
_lock = threading.Lock()


def build(settings: Settings) -> Store:
    location = settings.storage_location
    if location.startswith("file://"):
        from emp_tasks.storage.files import FileStore

        return FileStore.from_settings(settings)
    if location.startswith("s3://"):
        from emp_tasks.storage.s3 import S3Store

        return S3Store.from_settings(settings)
    raise ConfigError(
        f"EMP_STORAGE_URL must be s3://bucket/prefix or file:///path, got {location!r}"
    )


def get() -> Store:
    """The configured store (one per configuration and process)."""
    settings = get_settings()
    identity = (
        settings.storage_location,
        settings.storage_endpoint_url,
        settings.storage_public_url,
        settings.storage_url_ttl_s,
        settings.api_base_url,
    )
    with _lock:
        if identity not in _stores:
            _stores[identity] = build(settings)
        return _stores[identity]
