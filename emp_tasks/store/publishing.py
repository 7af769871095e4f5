"""Publishing the outbox: committed events to the `emp:events` stream and channel.

Events recorded with their change (emp_tasks.store.outbox) are published in commit
order per aggregate. Publishing an event that queues a step also
pushes the step's Celery task, in the same Redis script as the event's XADD
(emp_tasks.store.broker.task_message), so a step's task is sent if and only if its
event is published.

Fast path: after a transaction that recorded events commits, its process's
publisher (`Publisher`, a thread of its own) is handed the events themselves; it
publishes whatever has accumulated since its last round in one Redis script,
without a database round trip, so no request or worker thread waits for Redis,
and many commits share one publish. The rows are marked published afterwards, in
batches (at most MARK_LINGER_S later, one statement for many rows). Crash path:
the relay's sweeper (emp_tasks.relay) publishes whatever a dead or failed fast
path left unmarked, through `publish_aggregates`, which locks an aggregate's
unpublished rows oldest first, publishes them in that order and marks them in
the same transaction.

Commit order per aggregate is kept by a gate in Redis: each aggregate's last
published `seq` (`emp:published:<aggregate>`, set by the same script as the XADD).
The fast path knows each event's predecessor (the aggregate's previous `seq`, read
by the INSERT that records it: every transition holds its aggregate's lock, so the
predecessor has committed) and publishes an event only right after its predecessor;
an event whose predecessor is not published yet (another process's publisher is
behind) or unknown to the gate (expired, Redis restarted) is left to
`publish_aggregates` at once, which publishes both in order. An event the gate has
already passed is not published again by the fast path. A row stays unpublished
until its XADD has happened: a crash after the script and before the rows are
marked published repeats the events (and their tasks) with the same ids; consumers
de-duplicate by event id, and a repeated task finds its step no longer pending.

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
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from emp_tasks.core.config import Settings, get_settings, scoped
from emp_tasks.core.dispatch_instruction import DispatchInstruction
from emp_tasks.core.events import CHANNEL, STREAM, Envelope, EventType
from emp_tasks.store import db, dispatch, redisdb

logger = logging.getLogger(__name__)

GATE_PREFIX = "emp:published:"
"""The gate of an aggregate: the `seq` of its last published event."""
GATE_TTL_S = 86400
"""A gate unused this long is forgotten (an aggregate's terminal event forgets it at once)."""
CLOSING = frozenset(
    {
        EventType.STEP_COMPLETED,
        EventType.STEP_FAILED,
        EventType.STEP_CANCELLED,
        EventType.STEP_SKIPPED,
        EventType.WORKFLOW_COMPLETED,
        EventType.WORKFLOW_FAILED,
        EventType.WORKFLOW_CANCELLED,
    }
)
"""Events after which an aggregate usually has no more: their gate is deleted. A later
event (a retried step) finds no gate and goes through `publish_aggregates`."""
LINGERING = frozenset({EventType.STEP_ASSIGNED, EventType.STEP_STARTED})
"""Events that may wait a moment for company: a step's start, which its completion (or
first progress report) usually follows within milliseconds, so both go in one round."""
LINGER_S = 0.01
"""How long a round of only LINGERING events waits for more before it is published."""
BATCH_EVENTS = 1000
"""Events one publish round takes at most; the rest wait for the next round."""
MARK_LINGER_S = 0.05
"""How long published rows wait to be marked, so that many share one statement."""
MARK_BATCH = 500
"""Rows marked at once as soon as this many wait."""

FORCED = -1
"""The predecessor given for an event `publish_aggregates` publishes: whatever the gate says."""
UNGATED = 0
"""The gate index of an event that has none (ephemeral)."""

# Per event, in one round trip: pass its aggregate's gate, XADD it, PUBLISH it with its
# stream id, and LPUSH the task it queues. KEYS: stream, channel, then the broker lists
# of the tasks and the gates. ARGV: maxlen, Redis database index, gate TTL, then per
# event: type, envelope JSON, webhook flag ('0' or '1'), index of its task's list in KEYS
# (0: no task), the task's message, index of its gate in KEYS (0: none), its seq, its
# predecessor's seq (0: none; -1: publish whatever the gate says), '1' when it closes
# its aggregate (the gate is deleted). Per event the answer is its stream id, or `dup`
# (the gate passed it), `gap` (its predecessor is not published yet) or `unknown` (no
# gate) when it was not published.
# Pub/sub channels span a server's databases while streams do not, so each published
# event names its database: a subscriber skips other deployments' events.
_PUSH_SCRIPT = """
local answers = {}
for i = 4, #ARGV, 9 do
  local gate = tonumber(ARGV[i + 5])
  local seq = tonumber(ARGV[i + 6])
  local prev = tonumber(ARGV[i + 7])
  local answer = nil
  local last = false
  if gate > 0 then
    last = redis.call('GET', KEYS[gate])
    if last then last = tonumber(last) end
    if prev >= 0 then
      if not last then
        if prev ~= 0 then answer = 'unknown' end
      elseif seq <= last then answer = 'dup'
      elseif prev ~= last then answer = 'gap'
      end
    end
  end
  if not answer then
    answer = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*',
                        'type', ARGV[i], 'event', ARGV[i + 1], 'webhook', ARGV[i + 2])
    redis.call('PUBLISH', KEYS[2], '{"stream_id":"' .. answer .. '","db":' .. ARGV[2] .. ','
               .. string.sub(ARGV[i + 1], 2))
    local list = tonumber(ARGV[i + 3])
    if list > 0 then
      redis.call('LPUSH', KEYS[list], ARGV[i + 4])
    end
    if gate > 0 then
      if ARGV[i + 8] == '1' then
        redis.call('DEL', KEYS[gate])
      elseif (not last) or seq > last then
        redis.call('SET', KEYS[gate], seq, 'EX', ARGV[3])
      end
    end
  end
  answers[#answers + 1] = answer
end
return answers
"""
BEHIND = frozenset({"gap", "unknown"})
"""Answers of an event held back for `publish_aggregates` (its predecessor first)."""
NOT_PUBLISHED = BEHIND | {"dup"}

_SELECT_UNPUBLISHED = (
    "SELECT seq, id, type, aggregate, envelope::text AS envelope, dispatch, webhook FROM events"
    " WHERE aggregate = ANY(%s::text[]) AND published_at IS NULL"
    " ORDER BY seq FOR UPDATE"
)
# `seq = ANY(...)` reaches the rows through the primary key whatever the table's
# statistics say; a join against unnest() was planned, once the events table had been
# analyzed while small, as a hash join over a scan of the whole table. A row marked
# already (published twice) keeps its first time and takes the later stream id.
_MARK_PUBLISHED = (
    "UPDATE events SET published_at = coalesce(published_at, now()),"
    " stream_id = (%(stream_ids)s::text[])[array_position(%(seqs)s::bigint[], seq)]"
    " WHERE seq = ANY(%(seqs)s::bigint[])"
)
# Marking rows published need not wait for its WAL to reach disk: a mark lost with a
# server crash only publishes those events again, with the same ids (see above).
_NO_FLUSH_WAIT = "SET LOCAL synchronous_commit = off"


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A recorded event as its publisher sends it: with its `seq` and its predecessor's
    (`prev`, 0 for the first event of its aggregate, FORCED: whatever the gate says)."""

    aggregate: str | None
    seq: int
    prev: int
    id: str
    type: str
    envelope: str
    webhook: bool
    dispatch: DispatchInstruction | None


def compact_json(value: Any) -> str:
    """JSON as the outbox stores and the stream carries it: no spaces, UTF-8 as is."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _push(events: list[Outgoing]) -> list[str]:
    """Publish the events (and push their tasks) in order, each through its aggregate's
    gate; per event its stream id, or why it was not published (NOT_PUBLISHED).

    With the broker on another Redis, the published events' tasks are pushed right after
    them: a crash in between repeats both, which is harmless.
    """
    together = dispatch.same_redis_as_events()
    keys: list[str] = [STREAM, CHANNEL]
    gates: dict[str, int] = {}
    settings = get_settings()
    arguments: list[str | int] = [settings.events_maxlen, redisdb.database_index(), GATE_TTL_S]
    tasks: list[tuple[str, str] | None] = []
    for each in events:
        task = dispatch.message(each.dispatch, each.id) if each.dispatch else None
        tasks.append(task)
        index, body = 0, ""
        if task is not None and together:
            keys.append(task[0])
            index, body = len(keys), task[1]
        gate = UNGATED
        if each.aggregate is not None:
            gate = gates.get(each.aggregate, UNGATED)
            if gate == UNGATED:
                keys.append(GATE_PREFIX + each.aggregate)
                gate = gates[each.aggregate] = len(keys)
        arguments += [
            each.type,
            each.envelope,
            "1" if each.webhook else "0",
            index,
            body,
            gate,
            each.seq,
            each.prev,
            "1" if each.type in CLOSING else "0",
        ]
    script = redisdb.client().register_script(_PUSH_SCRIPT)
    answers = [str(answer) for answer in script(keys=keys, args=arguments)]
    if not together:
        dispatch.push(
            [
                task
                for task, answer in zip(tasks, answers, strict=True)
                if task is not None and answer not in NOT_PUBLISHED
            ]
        )
    return answers


def publish_aggregates(aggregates: Iterable[str]) -> int:
    """Publish every unpublished event of these aggregates; return how many were sent.

    The rows are locked in `seq` order, so a second publisher of the same aggregate
    waits for the first to commit and then sees only what is still unpublished; they
    are published whatever the gate says (a row the fast path published and has not
    marked yet is published again, with its id) and marked in the same transaction.
    """
    names = sorted(set(aggregates))
    if not names:
        return 0
    with db.tx() as tx:
        rows = tx.all(_SELECT_UNPUBLISHED, [db.text_array(names)])
        if not rows:
            return 0
        stream_ids = _push(
            [
                Outgoing(
                    row.aggregate,
                    row.seq,
                    FORCED,
                    row.id,
                    row.type,
                    row.envelope,
                    row.webhook,
                    DispatchInstruction.from_row(row) if row.dispatch else None,
                )
                for row in rows
            ]
        )
        _mark(tx, [(row.seq, stream_id) for row, stream_id in zip(rows, stream_ids, strict=True)])
    return len(rows)


def _mark(tx: db.Tx, marks: list[tuple[int, str]]) -> None:
    """Mark these (seq, stream id) rows published, not waiting for the WAL to reach disk:
    a mark lost with a server crash only publishes those events again, with their ids."""
    tx.execute(_NO_FLUSH_WAIT)
    tx.execute(
        _MARK_PUBLISHED,
        {
            "seqs": db.text_array(seq for seq, _ in marks),
            "stream_ids": db.text_array(sid for _, sid in marks),
        },
    )


def publish_now(envelope: Envelope, *, webhook: bool = False) -> str:
    """Publish an event that is not recorded (ephemeral: a progress report); its stream id."""
    text = compact_json(envelope.to_json())
    return _push([Outgoing(None, 0, 0, envelope.id, envelope.type, text, webhook, None)])[0]


class Publisher:
    """The process's fast path: a thread that publishes committed events in batches.

    `notify` hands it a transaction's events and returns at once; the thread publishes
    everything handed over since its last round in one script (a round of nothing but
    LINGERING events waits up to LINGER_S for company first), hands the events its gate
    held back to `publish_aggregates`, and marks the published rows within MARK_LINGER_S.
    A round that fails (Redis or the database down) is left to the relay's sweeper.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._pending: list[Outgoing] = []
        self._urgent = False
        self._notified = 0
        self._done = 0
        self._marks: list[tuple[int, str]] = []
        self._marks_since = 0.0
        self._mark_now = False
        self._condition = threading.Condition()
        self._thread: threading.Thread | None = None

    def notify(self, events: Iterable[Outgoing], *, urgent: bool = True) -> None:
        """Publish these events soon: at once when `urgent` (events that queue a task or
        end something), else within LINGER_S, with whatever comes meanwhile."""
        with self._condition:
            self._pending.extend(events)
            self._urgent = self._urgent or urgent
            self._notified += 1
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="emp-event-publisher", daemon=True
                )
                self._thread.start()
            self._condition.notify_all()

    def flush(self, timeout: float, *, marked: bool = True) -> bool:
        """Wait until every notification so far was published (or tried) and, when
        `marked`, its rows marked too; False on timeout."""
        with self._condition:
            target = self._notified
            self._urgent = True
            self._mark_now = self._mark_now or marked
            self._condition.notify_all()
            return self._condition.wait_for(
                lambda: self._done >= target and not (marked and self._marks), timeout
            )

    def _marks_due(self) -> bool:
        return bool(self._marks) and (
            self._mark_now
            or len(self._marks) >= MARK_BATCH
            or time.monotonic() >= self._marks_since + MARK_LINGER_S
        )

    def _take(self) -> tuple[list[Outgoing], int]:
        with self._condition:
            while not self._pending and not self._marks_due():
                wait = self._marks_since + MARK_LINGER_S - time.monotonic() if self._marks else None
                self._condition.wait(wait)
            if not self._pending:
                return [], self._done
            self._condition.wait_for(lambda: self._urgent, LINGER_S)
            batch = self._pending[:BATCH_EVENTS]
            del self._pending[:BATCH_EVENTS]
            self._urgent = bool(self._pending)  # a backlog goes on at once
            return batch, self._notified if not self._pending else self._done

    def _take_marks(self) -> list[tuple[int, str]]:
        with self._condition:
            if not self._marks_due():
                if not self._marks:
                    self._mark_now = False  # a flush that found nothing to mark: no later batch
                return []
            marks, self._marks, self._mark_now = self._marks, [], False
            return marks

    def _run(self) -> None:
        while True:
            batch, reached = self._take()
            try:
                with scoped(self.settings):
                    if batch:
                        self._publish(batch)
                    marks = self._take_marks()
                    if marks:
                        with db.tx() as tx:
                            _mark(tx, marks)
            except Exception:
                logger.warning(
                    "Publishing events failed; the relay will sweep them",
                    exc_info=True,
                    extra={"action": "publish_failed", "events": len(batch)},
                )
            with self._condition:
                self._done = max(self._done, reached)
                self._condition.notify_all()

    def _publish(self, batch: list[Outgoing]) -> None:
        batch.sort(key=lambda each: each.seq)
        answers = _push(batch)
        published = [
            (each.seq, answer)
            for each, answer in zip(batch, answers, strict=True)
            if answer not in NOT_PUBLISHED
        ]
        with self._condition:
            if published and not self._marks:
                self._marks_since = time.monotonic()
            self._marks.extend(published)
        behind = {
            each.aggregate
            for each, answer in zip(batch, answers, strict=True)
            if answer in BEHIND and each.aggregate is not None
        }
        if behind:
            publish_aggregates(behind)


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


def flush(timeout: float = FLUSH_AT_EXIT_S, *, marked: bool = True) -> bool:
    """Wait until this process's publishers have published what they were handed (and,
    when `marked`, marked its rows: not needed to order a later event after them)."""
    with _publishers_lock:
        running = list(_publishers.values())
    return all(each.flush(timeout, marked=marked) for each in running)


def _forget_after_fork() -> None:
    global _publishers_lock
    _publishers.clear()
    _publishers_lock = threading.Lock()


atexit.register(flush)
os.register_at_fork(after_in_child=_forget_after_fork)
