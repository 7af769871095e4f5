"""The `file` store: outputs in a local folder, served by the web process.

An output is written to a temporary file beside its place and renamed into it, so a
reader never sees half a file. Its URL is `<EMP_PUBLIC_URL>/outputs/<key>?expires=
<unix seconds>&signature=<hex>`, the signature an HMAC-SHA256 of the key and the expiry
under a secret every process sharing the folder reads from it (`.signing-key`, made
on first use unless EMP_STORAGE_SECRET gives one). `check` is what the web process
asks before it serves a file.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import secrets
import time
from datetime import datetime
from pathlib import Path
from typing import IO
from urllib.parse import parse_qs, urlencode, urlsplit

from emp_tasks.core.config import Settings
from emp_tasks.storage import HashingReader, Stored, valid_key

KEY_FILE = ".signing-key"
PREFIX = "/outputs/"


class FileStore:
    def __init__(self, root: Path, base_url: str, ttl_s: int, secret: bytes | None = None):
        self.root = root
        self.base_url = base_url.rstrip("/")
        self.ttl_s = ttl_s
        self._secret = secret

    @classmethod
    def from_settings(cls, settings: Settings) -> FileStore:
        root = Path(urlsplit(settings.storage_location).path)
        secret = os.environ.get("EMP_STORAGE_SECRET")
        return cls(
            root,
            settings.storage_public_url or settings.api_base_url,
            settings.storage_url_ttl_s,
            secret.encode() if secret else None,
        )

    # --- the secret ------------------------------------------------------------------------

    @property
    def secret(self) -> bytes:
        if self._secret is None:
            self.root.mkdir(parents=True, exist_ok=True)
            path = self.root / KEY_FILE
            with contextlib.suppress(FileExistsError):
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "w") as out:
                    out.write(secrets.token_hex(32))
            for _ in range(50):  # another process may be writing it this instant
                text = path.read_text().strip()
                if text:
                    break
                time.sleep(0.01)
            self._secret = text.encode()
        return self._secret

    def signature(self, key: str, expires: int) -> str:
        return hmac.new(self.secret, f"{key}\n{expires}".encode(), hashlib.sha256).hexdigest()

    def check(self, key: str, expires: str | None, signature: str | None) -> bool:
        """Whether a request for `key` carries a valid, unexpired signature."""
        if not valid_key(key) or not expires or not signature or not expires.isdigit():
            return False
        if int(expires) < time.time():
            return False
        return hmac.compare_digest(self.signature(key, int(expires)), signature)

    # --- the store -------------------------------------------------------------------------

    def path_of(self, key: str) -> Path:
        if not valid_key(key):
            raise ValueError(f"not an output key: {key!r}")
        return self.root / key

    def put(self, key: str, stream: IO[bytes], content_type: str) -> Stored:
        path = self.path_of(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{secrets.token_hex(4)}.partial")
        reader = HashingReader(stream)
        try:
            with open(partial, "wb") as out:
                for chunk in reader.chunks():
                    out.write(chunk)
            os.replace(partial, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                partial.unlink()
        return Stored(key, self.url(key), content_type, reader.size, reader.sha256)

    def open(self, key: str) -> IO[bytes]:
        return open(self.path_of(key), "rb")

    def url(self, key: str) -> str:
        expires = int(time.time()) + self.ttl_s
        query = urlencode({"expires": expires, "signature": self.signature(key, expires)})
        return f"{self.base_url}{PREFIX}{key}?{query}"

    def key_of(self, url: str) -> str | None:
        if not url.startswith(self.base_url + PREFIX):
            return None
        parts = urlsplit(url)
        key = parts.path.removeprefix(urlsplit(self.base_url).path.rstrip("/") + PREFIX)
        query = parse_qs(parts.query)
        expires, signature = query.get("expires", [None])[0], query.get("signature", [None])[0]
        return key if self.check(key, expires, signature) else None

    def delete_older_than(self, cutoff: datetime) -> int:
        if not self.root.is_dir():
            return 0
        limit = cutoff.timestamp()
        deleted = 0
        for path in self.root.rglob("*"):
            if path.is_file() and path.name != KEY_FILE and path.stat().st_mtime < limit:
                path.unlink(missing_ok=True)
                deleted += 1
        for folder in sorted(
            (p for p in self.root.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)
        ):
            with contextlib.suppress(OSError):
                folder.rmdir()  # only empty ones go
        return deleted
