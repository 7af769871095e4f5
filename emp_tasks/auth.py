"""API keys and the principal a request acts as.

Keys come from EMP_API_KEYS and from the `api_keys` table (created with
`emp keys create`, stored as SHA-256 only). A non-admin principal sees and
changes only its own customer's resources.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from sqlalchemy import select

from emp_tasks.core.config import get_settings
from emp_tasks.core.errors import Forbidden
from emp_tasks.core.ids import new_id
from emp_tasks.store import db
from emp_tasks.store.models import ApiKey

KEY_PREFIX = "emp_"
CACHE_TTL_S = 30.0


@dataclass(frozen=True)
class Principal:
    customer_id: str
    admin: bool
    key_id: str

    def may_see(self, customer_id: str) -> bool:
        return self.admin or customer_id == self.customer_id

    def customer_for(self, requested: str | None) -> str:
        """The customer a created resource belongs to: the key's, or any one for admins."""
        if requested is None or requested == self.customer_id:
            return self.customer_id
        if not self.admin:
            raise Forbidden("only admin keys may set customer_id")
        return requested


def hash_key(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


class LookupCache:
    """Recent database lookups of keys: at most `max_entries`, each kept for `ttl_s`.

    Bounded because presented keys are chosen by whoever sends a request: a stream of
    distinct unknown keys must not grow a process's memory. The least recently used
    entry is dropped first; expired entries are dropped when met.
    """

    def __init__(self, max_entries: int, ttl_s: float) -> None:
        self.max_entries = max_entries
        self.ttl_s = ttl_s
        self._entries: OrderedDict[str, tuple[float, Principal | None]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, digest: str) -> tuple[bool, Principal | None]:
        """(True, principal or None) for a recent lookup of `digest`, else (False, None)."""
        with self._lock:
            entry = self._entries.get(digest)
            if entry is None:
                return False, None
            if entry[0] <= time.monotonic():
                del self._entries[digest]
                return False, None
            self._entries.move_to_end(digest)
            return True, entry[1]

    def put(self, digest: str, principal: Principal | None) -> None:
        with self._lock:
            self._entries[digest] = (time.monotonic() + self.ttl_s, principal)
            self._entries.move_to_end(digest)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


# Unknown keys have a cache of their own, smaller and shorter-lived, so a flood of
# guesses cannot push the real keys out (and a key created a moment ago works soon).
known_keys = LookupCache(max_entries=4096, ttl_s=CACHE_TTL_S)
unknown_keys = LookupCache(max_entries=1024, ttl_s=5.0)


def _lookup(digest: str) -> Principal | None:
    with db.transaction() as session:
        row = session.scalar(
            select(ApiKey).where(ApiKey.key_hash == digest, ApiKey.revoked_at.is_(None))
        )
    return Principal(customer_id=row.customer_id, admin=row.admin, key_id=row.id) if row else None


def authenticate(raw: str | None) -> Principal | None:
    """The principal for a presented key, or None when the key is unknown or revoked."""
    if not raw:
        return None
    digest = hash_key(raw)
    for spec in get_settings().api_keys:
        if secrets.compare_digest(hash_key(spec.key), digest):
            return Principal(customer_id=spec.customer_id, admin=spec.admin, key_id=digest[:12])
    for cache in (known_keys, unknown_keys):
        hit, principal = cache.get(digest)
        if hit:
            return principal
    principal = _lookup(digest)
    (known_keys if principal else unknown_keys).put(digest, principal)
    return principal


def create_key(
    customer_id: str, *, admin: bool = False, name: str | None = None
) -> tuple[str, ApiKey]:
    """Store a new key; the raw key is returned here and never again."""
    raw = KEY_PREFIX + secrets.token_urlsafe(32)
    row = ApiKey(
        id=new_id(),
        key_hash=hash_key(raw),
        prefix=raw[:10],
        customer_id=customer_id,
        admin=admin,
        name=name,
    )
    with db.transaction() as session:
        session.add(row)
    return raw, row
