"""The outbox: recording an event with the change it describes, and publishing it.

An event is written in the same transaction as its change (`record`), so no
event exists without a commit and no commit without its event. Committed events
are published to the `emp:events` stream and channel in commit order per
aggregate (`publish_aggregates`). Publishing an event that queues a step also
pushes the step's Celery task, in the same Redis script as the event's XADD
(emp_tasks.store.broker.task_message), so a step's task is sent if and only if its
event is published.

Fast path: after a transaction that recorded events commits, its process's
publisher (`Publisher`, a thread of its own) is told which aggregates to publish;
it publishes whatever has accumulated since its last round in one transaction
and one Redis script, so no request or worker thread waits for Redis, and many
commits share one publish. Crash path: the relay's sweeper (emp_tasks.relay)
publishes whatever a dead or failed fast path left behind, through the same
`publish_aggregates`.

Both paths lock an aggregate's unpublished rows oldest first and publish them in
that order, so whichever path runs first, a step's events reach the stream in
the order their transactions committed. A row stays unpublished until its XADD
has happened: a crash after the script and before the rows are marked published
repeats the events (and their tasks) with the same ids; consumers de-duplicate
by event id, and a repeated task finds its step no longer pending.

Ephemeral events (`publish_now`: progress reports) skip the outbox: they go to
the stream and channel at once, from the reporting thread.

Each stream entry has the fields `type`, `event` (the envelope) and `webhook`: `1`
when the step's or workflow's own `webhook_url` wants the event, else `0`, so the
webhooks process can pass over what nobody wants without reading it.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from emp_tasks.core.config import Settings, get_settings, scoped
from emp_tasks.core.dispatch_instruction import DispatchInstruction
from emp_tasks.core.events import CHANNEL, STREAM, Envelope, EventType
from emp_tasks.store import db, dispatch, redisdb

logger = logging.getLogger(__name__)

PENDING_AGGREGATES = "emp_pending_aggregates"
URGENT = "emp_urgent_events"
RECORDED = "emp_recorded_events"
LINGERING = frozenset({EventType.STEP_ASSIGNED, EventType.STEP_STARTED})
"""Events that may wait a moment for company: a step's start, which its completion (or
first progress report) usually follows within milliseconds, so both go in one round."""
LINGER_S = 0.01
"""How long a round of only LINGERING events waits for more before it is published."""
BATCH_AGGREGATES = 500
"""Aggregates one publish round takes at most; the rest wait for the next round."""

# Per event, in one round trip: XADD it, PUBLISH it with its stream id, and LPUSH the
# task it queues. KEYS: stream, channel, then the broker lists of the tasks.
# ARGV: maxlen, Redis database index, then per event: type, envelope JSON, webhook flag
# ('0' or '1'), index of its task's list in KEYS (0: no task), the task's message.
# Pub/sub channels span a server's databases while streams do not, so each published
# event names its database: a subscriber skips other deployments' events.
_PUSH_SCRIPT = """
local ids = {}
for i = 3, #ARGV, 5 do
  local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*',
                        'type', ARGV[i], 'event', ARGV[i + 1], 'webhook', ARGV[i + 2])
  redis.call('PUBLISH', KEYS[2], '{"stream_id":"' .. id .. '","db":' .. ARGV[2] .. ','
             .. string.sub(ARGV[i + 1], 2))
  local list = tonumber(ARGV[i + 3])
  if list > 0 then
    redis.call('LPUSH', KEYS[list], ARGV[i + 4])
  end
  ids[#ids + 1] = id
end
return ids
"""

_INSERT = (
    "INSERT INTO events (id, type, aggregate, step_id, workflow_id, customer_id, envelope,"
    " dispatch, webhook)"
)
_INSERT_ROW = "(%s, %s, %s, %s, %s, %s, %s::jsonb, %s::jsonb, %s)"
_SELECT_UNPUBLISHED = (
    "SELECT seq, id, type, envelope::text AS envelope, dispatch, webhook FROM events"
    " WHERE aggregate = ANY(%s) AND published_at IS NULL"
    " ORDER BY seq FOR UPDATE"
)
# `seq = ANY(...)` reaches the rows through the primary key whatever the table's
# statistics say; a join against unnest() was planned, once the events table had been
# analyzed while small, as a hash join over a scan of the whole table.
_MARK_PUBLISHED = (
    "UPDATE events SET published_at = now(),"
    " stream_id = (%(stream_ids)s::text[])[array_position(%(seqs)s::bigint[], seq)]"
    " WHERE seq = ANY(%(seqs)s::bigint[])"
)
# Marking rows published need not wait for its WAL to reach disk: a mark lost with a
# server crash only publishes those events again, with the same ids (see above).
_NO_FLUSH_WAIT = "SET LOCAL synchronous_commit = off"


@dataclass(frozen=True)
class Recorded:
    """An event to write into the outbox: its envelope, its aggregate (the unit of
    ordering), the task it queues, and whether the resource's own webhook wants it."""

    envelope: Envelope
    aggregate: str
    dispatch: DispatchInstruction | None = None
    webhook: bool = False


def event(
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
    webhook: bool = False,
) -> Recorded:
    """A new event (a fresh id, the time now) for `record_all`."""
    envelope = Envelope.new(
        event_type,
        data=data,
        correlation_id=correlation_id,
        step_id=step_id,
        workflow_id=workflow_id,
        machine_id=machine_id,
        worker_id=worker_id,
        customer_id=customer_id,
    )
    return Recorded(envelope, aggregate, dispatch, webhook)


def record(tx: db.Tx, event_type: EventType, **fields: Any) -> Envelope:
    """Add one event (see `event` for its fields) in the caller's transaction."""
    recorded = event(event_type, **fields)
    record_all(tx, [recorded])
    return recorded.envelope


def record_all(tx: db.Tx, events: Iterable[Recorded]) -> None:
    """Add these events, in this order, in the caller's transaction.

    They are written as the transaction's last statement, all in one INSERT (at once in
    an ORM session's transaction). `dispatch` makes the publisher push the step's task
    when it publishes the event. The aggregates are remembered on the transaction, so
    that once it commits this process's publisher publishes them at once (the fast path).
    """
    events = list(events)
    if not events:
        return
    if tx.deferring:
        tx.info.setdefault(RECORDED, []).extend(events)
        info = tx.info
        tx.before_commit("record_events", lambda: _insert(tx, info.pop(RECORDED)))
    else:
        _insert(tx, events)
    pending = tx.info.setdefault(PENDING_AGGREGATES, set())
    pending.update(each.aggregate for each in events)
    if any(each.dispatch or each.envelope.type not in LINGERING for each in events):
        tx.info[URGENT] = True
    info = tx.info
    tx.after_commit("publish_events", lambda: _committed(info))


def _insert(tx: db.Tx, events: list[Recorded]) -> None:
    """One INSERT of these events; their `seq` follows their order."""
    rows = [
        (
            each.envelope.id,
            each.envelope.type,
            each.aggregate,
            each.envelope.step_id,
            each.envelope.workflow_id,
            each.envelope.customer_id,
            _json(each.envelope.to_json()),
            _json(each.dispatch.to_json()) if each.dispatch else None,
            each.webhook,
        )
        for each in events
    ]
    tx.insert(_INSERT, _INSERT_ROW, rows)


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _committed(info: dict[str, Any]) -> None:
    aggregates = info.pop(PENDING_AGGREGATES, set())
    urgent = info.pop(URGENT, False)
    settings = get_settings()
    if aggregates and settings.events_fast_path:
        publisher(settings).notify(aggregates, urgent=urgent)


def for_step(tx: db.Tx, step_id: str) -> list[dict[str, Any]]:
    """The step's events from the outbox, in commit order, with their stream ids."""
    rows = tx.all(
        "SELECT envelope, stream_id FROM events WHERE step_id = %s ORDER BY seq", [step_id]
    )
    return [{**row.envelope, "stream_id": row.stream_id} for row in rows]


# --- publishing ----------------------------------------------------------------------------


def _script_arguments(
    events: list[tuple[str, str, bool, tuple[str, str] | None]],
) -> tuple[list[str], list[str | int], list[tuple[str, str]]]:
    """KEYS and ARGV of the push script for (type, envelope JSON, webhook flag, task);
    and the tasks, when they go to a broker of their own instead."""
    together = dispatch.same_redis_as_events()
    keys: list[str] = [STREAM, CHANNEL]
    arguments: list[str | int] = [get_settings().events_maxlen, redisdb.database_index()]
    apart: list[tuple[str, str]] = []
    for event_type, envelope, webhook, task in events:
        index, body = 0, ""
        if task is not None and together:
            keys.append(task[0])
            index, body = len(keys), task[1]
        elif task is not None:
            apart.append(task)
        arguments += [event_type, envelope, "1" if webhook else "0", index, body]
    return keys, arguments, apart


def _push(events: list[tuple[str, str, bool, tuple[str, str] | None]]) -> list[str]:
    """Publish the events (and push their tasks) in order; return their stream ids.

    With the broker on another Redis, its tasks are pushed right after the events: a
    crash in between repeats both, which is harmless.
    """
    keys, arguments, apart = _script_arguments(events)
    script = redisdb.client().register_script(_PUSH_SCRIPT)
    stream_ids = script(keys=keys, args=arguments)
    dispatch.push(apart)
    return list(stream_ids)


def publish_aggregates(aggregates: Iterable[str]) -> int:
    """Publish every unpublished event of these aggregates; return how many were sent.

    The rows are locked in `seq` order, so a second publisher of the same aggregate
    waits for the first to commit and then sees only what is still unpublished.
    """
    names = sorted(set(aggregates))
    if not names:
        return 0
    with db.tx() as tx:
        rows = tx.all(_SELECT_UNPUBLISHED, [names])
        if not rows:
            return 0
        stream_ids = _push(
            [
                (
                    row.type,
                    row.envelope,
                    row.webhook,
                    dispatch.message(DispatchInstruction.from_row(row), row.id)
                    if row.dispatch
                    else None,
                )
                for row in rows
            ]
        )
        tx.execute(_NO_FLUSH_WAIT)
        tx.execute(_MARK_PUBLISHED, {"seqs": [row.seq for row in rows], "stream_ids": stream_ids})
    return len(rows)


def publish_now(envelope: Envelope, *, webhook: bool = False) -> str:
    """Publish an event that is not recorded (ephemeral: a progress report); its stream id."""
    text = json.dumps(envelope.to_json(), separators=(",", ":"), ensure_ascii=False)
    return _push([(envelope.type, text, webhook, None)])[0]


class Publisher:
    """The process's fast path: a thread that publishes committed events in batches.

    `notify` hands it the aggregates a commit touched and returns at once; the thread
    publishes everything handed over since its last round together (a round of nothing but
    LINGERING events waits up to LINGER_S for company first). A round that fails
    (Redis or the database down) is left to the relay's sweeper.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._pending: set[str] = set()
        self._urgent = False
        self._notified = 0
        self._done = 0
        self._condition = threading.Condition()
        self._thread: threading.Thread | None = None

    def notify(self, aggregates: Iterable[str], *, urgent: bool = True) -> None:
        """Publish these aggregates' events soon: at once when `urgent` (events that queue a
        task or end something), else within LINGER_S, with whatever comes meanwhile."""
        with self._condition:
            self._pending.update(aggregates)
            self._urgent = self._urgent or urgent
            self._notified += 1
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="emp-event-publisher", daemon=True
                )
                self._thread.start()
            self._condition.notify_all()

    def flush(self, timeout: float) -> bool:
        """Wait until every notification so far was published (or tried); False on timeout."""
        with self._condition:
            target = self._notified
            self._urgent = True
            self._condition.notify_all()
            return self._condition.wait_for(lambda: self._done >= target, timeout)

    def _take(self) -> tuple[list[str], int]:
        with self._condition:
            self._condition.wait_for(lambda: bool(self._pending))
            self._condition.wait_for(lambda: self._urgent, LINGER_S)
            names = sorted(self._pending)[:BATCH_AGGREGATES]
            self._pending.difference_update(names)
            self._urgent = bool(self._pending)  # a backlog goes on at once
            return names, self._notified if not self._pending else self._done

    def _run(self) -> None:
        while True:
            names, reached = self._take()
            try:
                with scoped(self.settings):
                    publish_aggregates(names)
            except Exception:
                logger.warning(
                    "Publishing events failed; the relay will sweep them",
                    exc_info=True,
                    extra={"action": "publish_failed", "aggregates": len(names)},
                )
            with self._condition:
                self._done = max(self._done, reached)
                self._condition.notify_all()


_publishers: dict[tuple[str | None, str | None], Publisher] = {}
_publishers_lock = threading.Lock()
FLUSH_AT_EXIT_S = 5.0


def publisher(settings: Settings | None = None) -> Publisher:
    """The publisher of this process for these settings' database and Redis."""
    settings = settings or get_settings()
    key = (settings.database_url, settings.redis_url)
    with _publishers_lock:
        found = _publishers.get(key)
        if found is None:
            found = _publishers[key] = Publisher(settings)
        return found


def flush(timeout: float = FLUSH_AT_EXIT_S) -> bool:
    """Wait until this process's publishers have published what they were handed."""
    with _publishers_lock:
        running = list(_publishers.values())
    return all(each.flush(timeout) for each in running)


def _forget_after_fork() -> None:
    global _publishers_lock
    _publishers.clear()
    _publishers_lock = threading.Lock()


atexit.register(flush)
os.register_at_fork(after_in_child=_forget_after_fork)
