"""Idempotency keys: the same key from the same customer within 24 hours names one resource."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from sqlalchemy import func, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from emp_tasks.core.errors import InvalidState
from emp_tasks.store import db
from emp_tasks.store.models import IdempotencyKey

T = TypeVar("T")

WINDOW_HOURS = 24


class KeyTaken(Exception):
    """A concurrent request claimed the key first; the caller retries its lookup."""


def _fresh():
    return func.now() - func.make_interval(0, 0, 0, 0, WINDOW_HOURS)


def find(session: Session, customer_id: str, key: str, resource_type: str) -> str | None:
    """The id of the resource this key created within the window, if any."""
    return session.scalar(
        select(IdempotencyKey.resource_id).where(
            IdempotencyKey.customer_id == customer_id,
            IdempotencyKey.key == key,
            IdempotencyKey.resource_type == resource_type,
            IdempotencyKey.created_at > _fresh(),
        )
    )


def claim(
    session: Session, customer_id: str, key: str, resource_type: str, resource_id: str
) -> None:
    """Bind the key to the new resource in the caller's transaction, or raise KeyTaken.

    An expired binding is replaced. A concurrent claim of the same key waits on
    the unique index until the first transaction ends, then sees it taken.
    """
    statement = insert(IdempotencyKey).values(
        customer_id=customer_id, key=key, resource_type=resource_type, resource_id=resource_id
    )
    statement = statement.on_conflict_do_update(
        index_elements=[IdempotencyKey.customer_id, IdempotencyKey.key],
        set_={
            "resource_type": statement.excluded.resource_type,
            "resource_id": statement.excluded.resource_id,
            "created_at": func.now(),
        },
        where=IdempotencyKey.created_at <= _fresh(),
    ).returning(IdempotencyKey.key)
    if session.scalar(statement) is None:
        raise KeyTaken(key)


def create_once(
    customer_id: str,
    key: str | None,
    resource_type: str,
    load: Callable[[Session, str], T],
    create: Callable[[Session], tuple[T, str]],
) -> tuple[T, bool]:
    """Run `create` in a transaction unless `key` already names a resource (then `load` it).

    `create` returns the result and the new resource's id; the key is bound to it in
    the same transaction. Returns the result and whether it was created.
    """
    for _ in range(2):
        try:
            with db.transaction() as session:
                if key:
                    existing = find(session, customer_id, key, resource_type)
                    if existing:
                        return load(session, existing), False
                result, resource_id = create(session)
                if key:
                    claim(session, customer_id, key, resource_type, resource_id)
                return result, True
        except KeyTaken:
            continue
    raise InvalidState("Idempotency-Key was already used for a different kind of request")
