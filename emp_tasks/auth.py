"""API keys and the principal a request acts as.

Keys come from EMP_API_KEYS and from the `api_keys` table (created with
`emp keys create`, stored as SHA-256 only). A non-admin principal sees and
changes only its own customer's resources.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass

from sqlalchemy import select

from emp_tasks import db
from emp_tasks.config import get_settings
from emp_tasks.errors import Forbidden
from emp_tasks.ids import new_id
from emp_tasks.models import ApiKey

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


_cache: dict[str, tuple[float, Principal | None]] = {}


def authenticate(raw: str | None) -> Principal | None:
    """The principal for a presented key, or None when the key is unknown or revoked."""
    if not raw:
        return None
    digest = hash_key(raw)
    for spec in get_settings().api_keys:
        if secrets.compare_digest(hash_key(spec.key), digest):
            return Principal(customer_id=spec.customer_id, admin=spec.admin, key_id=digest[:12])
    cached = _cache.get(digest)
    if cached and cached[0] > time.monotonic():
        return cached[1]
    with db.transaction() as session:
        row = session.scalar(
            select(ApiKey).where(ApiKey.key_hash == digest, ApiKey.revoked_at.is_(None))
        )
    principal = (
        Principal(customer_id=row.customer_id, admin=row.admin, key_id=row.id) if row else None
    )
    _cache[digest] = (time.monotonic() + CACHE_TTL_S, principal)
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
