"""The outbox: recording an event with the change it describes, and publishing it.

An event is written in the same transaction as its change (`record`), so no
event exists without a commit and no commit without its event. Committed events
are published to the `emp:events` stream and channel in commit order per
aggregate (`publish_aggregates`). Publishing an event that queues a step also
sends the step's Celery task, so the task is as durable as the event (see
emp_tasks.store.dispatch).

Fast path: right after a transaction commits, its process publishes the events
of the aggregates it touched (`publish_after_commit`). Crash path: the relay's
sweeper (emp_tasks.relay) publishes whatever a dead or failed fast path left
behind, through the same `publish_aggregates`.

Both paths lock an aggregate's unpublished rows oldest first and publish them in
that order, so whichever path runs first, a step's events reach the stream in
the order their transactions committed.
A crash after XADD and before the outbox row is marked published repeats the
event on the stream; consumers de-duplicate by event id.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.orm import Session

from emp_tasks.core.config import get_settings
from emp_tasks.core.dispatch_instruction import DispatchInstruction
from emp_tasks.core.events import CHANNEL, STREAM, Envelope, EventType
from emp_tasks.store import db, dispatch, redisdb
from emp_tasks.store.models import Event

PENDING_AGGREGATES = "emp_pending_aggregates"

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


def record(
    session: Session,
    event_type: EventType,
    *,
    aggregate: str,
    data: dict[str, Any],
    correlation_id: str | None = None,
    step_id: str | None = None,
    workflow_id: str | None = None,
    machine_id: str | None = None,
    worker_id: str | None = None,
    customer_id: str | None = None,
    dispatch: DispatchInstruction | None = None,
) -> Envelope:
    """Add the event to the outbox in the caller's transaction and return its envelope.

    `dispatch` (emp_tasks.core.dispatch_instruction) makes the publisher send the
    step's task when it publishes this event.

    The aggregate is remembered on the session so that the transaction's
    after-commit hook can publish it at once (the fast path).
    """
    event = Envelope.new(
        event_type,
        data=data,
        correlation_id=correlation_id,
        step_id=step_id,
        workflow_id=workflow_id,
        machine_id=machine_id,
        worker_id=worker_id,
        customer_id=customer_id,
    )
    session.add(
        Event(
            id=event.id,
            type=event.type,
            aggregate=aggregate,
            step_id=step_id,
            workflow_id=workflow_id,
            customer_id=customer_id,
            envelope=event.to_json(),
            dispatch=dispatch.to_json() if dispatch else None,
        )
    )
    session.info.setdefault(PENDING_AGGREGATES, set()).add(aggregate)
    db.after_commit(session, "publish_events", publish_after_commit)
    return event


def for_step(session: Session, step_id: str) -> list[dict[str, Any]]:
    """The step's events from the outbox, in commit order, with their stream ids."""
    rows = session.execute(
        select(Event.envelope, Event.stream_id).where(Event.step_id == step_id).order_by(Event.seq)
    )
    return [{**envelope, "stream_id": stream_id} for envelope, stream_id in rows]


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
        dispatch.send_many([DispatchInstruction.from_row(row) for row in rows if row.dispatch])
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
