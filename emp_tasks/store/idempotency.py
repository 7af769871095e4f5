"""Idempotency keys: the same key from the same customer within 24 hours names one resource."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from emp_tasks.core.errors import InvalidState
from emp_tasks.store import db

T = TypeVar("T")

WINDOW_HOURS = 24
_FRESH = f"now() - interval '{WINDOW_HOURS} hours'"


class KeyTaken(Exception):
    """A concurrent request claimed the key first; the caller retries its lookup."""


def find(tx: db.Tx, customer_id: str, key: str, resource_type: str) -> str | None:
    """The id of the resource this key created within the window, if any."""
    row = tx.one(
        "SELECT resource_id FROM idempotency_keys WHERE customer_id = %s AND key = %s"
        f" AND resource_type = %s AND created_at > {_FRESH}",
        [customer_id, key, resource_type],
    )
    return row.resource_id if row is not None else None


def claim(tx: db.Tx, customer_id: str, key: str, resource_type: str, resource_id: str) -> None:
    """Bind the key to the new resource in the caller's transaction, or raise KeyTaken.

    An expired binding is replaced. A concurrent claim of the same key waits on
    the unique index until the first transaction ends, then sees it taken.
    """
    row = tx.one(
        "INSERT INTO idempotency_keys (customer_id, key, resource_type, resource_id)"
        " VALUES (%s, %s, %s, %s)"
        " ON CONFLICT (customer_id, key) DO UPDATE SET resource_type = excluded.resource_type,"
        " resource_id = excluded.resource_id, created_at = now()"
        f" WHERE idempotency_keys.created_at <= {_FRESH}"
        " RETURNING key",
        [customer_id, key, resource_type, resource_id],
    )
    if row is None:
        raise KeyTaken(key)


def create_once(
    customer_id: str,
    key: str | None,
    resource_type: str,
    load: Callable[[db.Tx, str], T],
    create: Callable[[db.Tx], tuple[T, str]],
) -> tuple[T, bool]:
    """Run `create` in a transaction unless `key` already names a resource (then `load` it).

    `create` returns the result and the new resource's id; the key is bound to it in
    the same transaction. Returns the result and whether it was created.
    """
    for _ in range(2):
        try:
            with db.tx() as tx:
                if key:
                    existing = find(tx, customer_id, key, resource_type)
                    if existing:
                        return load(tx, existing), False
                result, resource_id = create(tx)
                if key:
                    claim(tx, customer_id, key, resource_type, resource_id)
                return result, True
        except KeyTaken:
            continue
    raise InvalidState("Idempotency-Key was already used for a different kind of request")
