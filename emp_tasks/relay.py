"""The outbox relay: publishes committed events to Redis, in commit order per aggregate.

Publishing an event that queues a step also sends the step's Celery task, so
the task is as durable as the event (see emp_tasks.dispatch).

Fast path: right after a transaction commits, its process publishes the events
of the aggregates it touched (`publish_after_commit`). Crash path: the sweeper
(`sweep`, run by the `relay` process) publishes whatever a dead or failed fast
path left behind.

Both paths lock an aggregate's unpublished rows oldest first and publish them in
that order, so whichever path runs first, a step's events reach the stream in
the order their transactions committed.
A crash after XADD and before the outbox row is marked published repeats the
event on the stream; consumers de-duplicate by event id.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from emp_tasks import db, dispatch, redisdb
from emp_tasks.config import get_settings
from emp_tasks.events import CHANNEL, PENDING_AGGREGATES, STREAM
from emp_tasks.models import Event

logger = logging.getLogger(__name__)


# XADD each event, then PUBLISH it with its stream id, in one round trip.
# KEYS: stream, channel. ARGV: maxlen, Redis database index, then (type, envelope JSON)
# pairs. Pub/sub channels span a server's databases while streams do not, so each
# published event names its database: a subscriber skips other deployments' events.
_PUSH_SCRIPT = """
local ids = {}
for i = 3, #ARGV, 2 do
  local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*',
                        'type', ARGV[i], 'event', ARGV[i + 1])
  redis.call('PUBLISH', KEYS[2], '{"stream_id":"' .. id .. '","db":' .. ARGV[2] .. ','
             .. string.sub(ARGV[i + 1], 2))
  ids[#ids + 1] = id
end
return ids
"""

_SELECT_UNPUBLISHED = text(
    "SELECT seq, type, envelope::text, dispatch FROM events"
    " WHERE aggregate = ANY(:names) AND published_at IS NULL"
    " ORDER BY seq FOR UPDATE"
)
_MARK_PUBLISHED = text(
    "UPDATE events SET published_at = now(), stream_id = d.stream_id"
    " FROM unnest(CAST(:seqs AS bigint[]), CAST(:stream_ids AS text[])) AS d(seq, stream_id)"
    " WHERE events.seq = d.seq"
)


def publish_aggregates(aggregates: Iterable[str]) -> int:
    """Publish every unpublished event of these aggregates; return how many were sent.

    The rows are locked in `seq` order, so a second publisher of the same aggregate
    waits for the first to commit and then sees only what is still unpublished.
    """
    names = sorted(set(aggregates))
    if not names:
        return 0
    with db.engine().begin() as connection:
        rows = connection.execute(_SELECT_UNPUBLISHED, {"names": names}).all()
        if not rows:
            return 0
        arguments: list[str | int] = [get_settings().events_maxlen, redisdb.database_index()]
        for row in rows:
            arguments += [row.type, row.envelope]
        push = redisdb.client().register_script(_PUSH_SCRIPT)
        stream_ids = push(keys=[STREAM, CHANNEL], args=arguments)
        dispatch.send_many([row.dispatch for row in rows if row.dispatch])
        connection.execute(
            _MARK_PUBLISHED,
            {"seqs": [row.seq for row in rows], "stream_ids": list(stream_ids)},
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
    """The relay process: sweep the outbox every interval and reconcile less often.

    Survives Redis or database outages: each pass logs its failure and the next
    pass tries again.
    """
    from emp_tasks import dispatch, reconcile

    settings = get_settings()
    interval = settings.relay_interval_s if interval_s is None else interval_s
    logger.info("Relay started", extra={"action": "relay_start", "interval_s": interval})
    try:
        dispatch.mark_epoch()
    except Exception:
        logger.exception("Broker epoch not recorded", extra={"action": "relay_epoch_failed"})
    next_reconcile = 0.0
    while True:
        try:
            count = sweep()
            if count:
                logger.info("Swept events", extra={"action": "relay_sweep", "count": count})
        except Exception:
            logger.exception("Relay sweep failed", extra={"action": "relay_sweep_failed"})
        if time.monotonic() >= next_reconcile:
            next_reconcile = time.monotonic() + settings.reconcile_interval_s
            try:
                report = reconcile.run_once()
                if report:
                    logger.info("Reconciled", extra={"action": "reconcile", **vars(report)})
            except Exception:
                logger.exception("Reconcile failed", extra={"action": "reconcile_failed"})
        time.sleep(interval)
