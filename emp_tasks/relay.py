"""The outbox relay: publishes committed events to Redis, in commit order per aggregate.

Fast path: right after a transaction commits, its process publishes the events
of the aggregates it touched (`publish_after_commit`). Crash path: the sweeper
(`sweep`, run by the `relay` process) publishes whatever a dead or failed fast
path left behind.

Both paths take a transaction-scoped advisory lock per aggregate and publish
that aggregate's unpublished events oldest first, so whichever path runs first,
a step's events reach the stream in the order their transactions committed.
A crash after XADD and before the outbox row is marked published repeats the
event on the stream; consumers de-duplicate by event id.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable
from typing import Any

from sqlalchemy import func, select, text, update
from sqlalchemy.orm import Session

from emp_tasks import db, redisdb
from emp_tasks.config import get_settings
from emp_tasks.events import CHANNEL, PENDING_AGGREGATES, STREAM
from emp_tasks.models import Event

logger = logging.getLogger(__name__)


def _push(rows: list[Event], maxlen: int) -> list[str]:
    """XADD each event to the stream, then PUBLISH it with its stream id."""
    redis = redisdb.client()
    pipe = redis.pipeline(transaction=False)
    for row in rows:
        pipe.xadd(
            STREAM,
            {"type": row.type, "event": json.dumps(row.envelope, separators=(",", ":"))},
            maxlen=maxlen,
            approximate=True,
        )
    stream_ids = pipe.execute()
    pipe = redis.pipeline(transaction=False)
    for row, stream_id in zip(rows, stream_ids, strict=True):
        message: dict[str, Any] = dict(row.envelope)
        message["stream_id"] = stream_id
        pipe.publish(CHANNEL, json.dumps(message, separators=(",", ":")))
    pipe.execute()
    return stream_ids


def publish_aggregates(aggregates: Iterable[str]) -> int:
    """Publish every unpublished event of these aggregates; return how many were sent."""
    names = sorted(set(aggregates))
    if not names:
        return 0
    with db.transaction() as session:
        for name in names:  # sorted: two publishers never wait on each other in a cycle
            session.execute(
                text("SELECT pg_advisory_xact_lock(hashtextextended(:name, 0))"), {"name": name}
            )
        rows = list(
            session.scalars(
                select(Event)
                .where(Event.aggregate.in_(names), Event.published_at.is_(None))
                .order_by(Event.seq)
            )
        )
        if not rows:
            return 0
        stream_ids = _push(rows, get_settings().events_maxlen)
        now = func.now()
        for row, stream_id in zip(rows, stream_ids, strict=True):
            session.execute(
                update(Event)
                .where(Event.seq == row.seq)
                .values(published_at=now, stream_id=stream_id)
            )
    return len(rows)


def publish_after_commit(session: Session) -> None:
    """The fast path, run by `db.transaction` after a commit that recorded events."""
    aggregates = session.info.pop(PENDING_AGGREGATES, set())
    if aggregates and get_settings().events_fast_path:
        publish_aggregates(aggregates)


def sweep(min_age_s: float = 0.5, batch: int = 200) -> int:
    """Publish events the fast path left behind (older than `min_age_s`); return the count."""
    published = 0
    while True:
        with db.transaction() as session:
            aggregates = list(
                session.scalars(
                    select(Event.aggregate)
                    .where(
                        Event.published_at.is_(None),
                        Event.created_at
                        < func.now() - func.make_interval(0, 0, 0, 0, 0, 0, min_age_s),
                    )
                    .order_by(Event.seq)
                    .limit(batch)
                )
            )
        if not aggregates:
            return published
        published += publish_aggregates(aggregates)
        if len(aggregates) < batch:
            return published


def run_forever(interval_s: float | None = None) -> None:
    """The relay process's loop: sweep, sleep, repeat; survives Redis or database outages."""
    interval = get_settings().relay_interval_s if interval_s is None else interval_s
    logger.info("Relay started", extra={"action": "relay_start", "interval_s": interval})
    while True:
        try:
            count = sweep()
            if count:
                logger.info("Swept events", extra={"action": "relay_sweep", "count": count})
        except Exception:
            logger.exception("Relay sweep failed", extra={"action": "relay_sweep_failed"})
        time.sleep(interval)
