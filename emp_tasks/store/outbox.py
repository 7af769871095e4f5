"""The outbox: recording an event with the change it describes.

An event is written in the same transaction as its change (`record`), or by the
change's own statement (`inline`), so no event exists without a commit and no
commit without its event. Each row is kept
on its transaction with its `seq` and its aggregate's previous `seq` (read by the
same INSERT), and once the transaction commits this process's publisher
(emp_tasks.store.publishing) is handed them: the fast path publishes them without
reading them back. An event that queues a step carries the step's task
(`dispatch`), sent if and only if the event is published. `for_step` reads a step's
events back (the audit trail).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from emp_tasks.core.config import get_settings
from emp_tasks.core.dispatch_instruction import DispatchInstruction
from emp_tasks.core.events import Envelope, EventType
from emp_tasks.store import db
from emp_tasks.store.publishing import LINGERING, Outgoing, compact_json, publisher

COMMITTED = "emp_committed_events"
RECORDED = "emp_recorded_events"

_INSERT = (
    "INSERT INTO events (id, type, aggregate, step_id, workflow_id, customer_id, envelope,"
    " dispatch, webhook)"
)
_INSERT_PARAMS = ("", "", "", "", "", "", "::jsonb", "::jsonb", "::boolean")
"""Each column's cast after its parameter, in `_INSERT`'s order."""
_INSERT_ROW = "(" + ", ".join(f"%s{cast}" for cast in _INSERT_PARAMS) + ")"
# Each event's predecessor: the aggregate's last event before this statement (rows the
# statement itself inserts are not visible to it; `_insert` chains those).
_RETURNING = (
    "RETURNING id, seq, (SELECT max(p.seq) FROM events p"
    " WHERE p.aggregate = events.aggregate AND p.seq < events.seq) AS prior"
)


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
    when it publishes the event. The events are remembered on the transaction, so that
    once it commits this process's publisher publishes them at once (the fast path).
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
    _publish_after_commit(tx)


def _publish_after_commit(tx: db.Tx) -> None:
    """Hand what the transaction recorded to this process's publisher once it commits."""
    info = tx.info
    tx.after_commit("publish_events", lambda: _committed(info))


def _row(each: Recorded, text: str) -> tuple[Any, ...]:
    """The columns of one event's row, in `_INSERT`'s order."""
    return (
        each.envelope.id,
        each.envelope.type,
        each.aggregate,
        each.envelope.step_id,
        each.envelope.workflow_id,
        each.envelope.customer_id,
        text,
        compact_json(each.dispatch.to_json()) if each.dispatch else None,
        each.webhook,
    )


def _insert(tx: db.Tx, events: list[Recorded]) -> None:
    """One INSERT of these events (their `seq` follows their order); each is kept on the
    transaction with its seq and predecessor for the fast path."""
    texts = [compact_json(each.envelope.to_json()) for each in events]
    rows = [_row(each, text) for each, text in zip(events, texts, strict=True)]
    returned = {row.id: row for row in tx.insert(_INSERT, _INSERT_ROW, rows, _RETURNING)}
    _keep(
        tx,
        [
            (returned[each.envelope.id].seq, returned[each.envelope.id].prior, each, text)
            for each, text in zip(events, texts, strict=True)
        ],
    )


def _keep(tx: db.Tx, made: list[tuple[int, int | None, Recorded, str]]) -> None:
    """Keep recorded events (seq, predecessor read by their INSERT, event, envelope text)
    on the transaction, for its publisher once it commits."""
    made.sort(key=lambda item: item[0])
    last: dict[str, int] = {}
    outgoing = tx.info.setdefault(COMMITTED, [])
    for seq, prior, each, text in made:
        # The statement cannot see its own rows: an aggregate's second event in it follows
        # the first, not the last one before the statement.
        prev = max(prior or 0, last.get(each.aggregate, 0))
        last[each.aggregate] = seq
        outgoing.append(
            Outgoing(
                each.aggregate,
                seq,
                prev,
                each.envelope.id,
                each.envelope.type,
                text,
                each.webhook,
                each.dispatch,
            )
        )


@dataclass(frozen=True)
class Inline:
    """One event written by the statement of the change it describes (`inline`)."""

    event: Recorded
    text: str
    sql: str
    params: dict[str, Any]


def inline(event: Recorded, source: str) -> Inline:
    """A data-modifying CTE's body that records `event` if and only if the CTE `source` of
    the same statement returns a row: a one-statement transition writes its event with
    it, and the statement is the whole transaction. Its result has `seq` and `prior`;
    `inline_recorded` keeps them for the publisher."""
    text = compact_json(event.envelope.to_json())
    names = [f"event_{index}" for index in range(len(_INSERT_PARAMS))]
    values = ", ".join(
        f"%({name})s{cast}" for name, cast in zip(names, _INSERT_PARAMS, strict=True)
    )
    sql = f"{_INSERT} SELECT {values} WHERE EXISTS (SELECT 1 FROM {source}) {_RETURNING}"
    return Inline(event, text, sql, dict(zip(names, _row(event, text), strict=True)))


def completed_from_row(source: str) -> str:
    """The SQL of a template's envelope (`e.envelope`, an `event` made with what the caller
    knows) completed from the step row `source`: the subjects the caller could not know,
    and the attempt the statement began (`data.attempt`)."""
    return (
        f"e.envelope || jsonb_build_object('correlation_id', {source}.correlation_id,"
        f" 'workflow_id', {source}.workflow_id, 'customer_id', {source}.customer_id, 'data',"
        f" (e.envelope -> 'data') || jsonb_build_object('attempt', {source}.attempts))"
    )


def templates_sql(
    templates: list[Recorded], source: str, webhook_sql: str
) -> tuple[str, dict[str, Any]]:
    """A data-modifying CTE's body recording these templates, in order, for each row of
    `source` (a step row of the same statement; none: nothing), their envelopes completed
    from it (`completed_from_row`), `webhook_sql` (on `{source}` and `e.type`) their flag.
    Its result has `id`, `seq`, `prior`, `webhook` and the stored envelope as `text`."""
    params: dict[str, Any] = {}
    values = []
    for index, each in enumerate(templates):
        params[f"template_{index}_id"] = each.envelope.id
        params[f"template_{index}_type"] = each.envelope.type
        params[f"template_{index}_aggregate"] = each.aggregate
        params[f"template_{index}_envelope"] = compact_json(each.envelope.to_json())
        values.append(
            f"(%(template_{index}_id)s, %(template_{index}_type)s, %(template_{index}_aggregate)s,"
            f" %(template_{index}_envelope)s::jsonb, {index})"
        )
    sql = (
        f"{_INSERT} SELECT e.id, e.type, e.aggregate, {source}.id, {source}.workflow_id,"
        f" {source}.customer_id, {completed_from_row(source)}, NULL, {webhook_sql}"
        f" FROM {source}, (VALUES {', '.join(values)}) AS e(id, type, aggregate, envelope, n)"
        f" ORDER BY e.n {_RETURNING}, webhook, envelope::text AS text"
    )
    return sql, params


def templates_recorded(tx: db.Tx, templates: list[Recorded], rows: list[dict[str, Any]]) -> None:
    """The statement recorded these templates (`rows`: its result for each, as JSON objects):
    published once the transaction commits, as stored (the envelope text the row holds)."""
    by_id = {row["id"]: row for row in rows}
    made = []
    for each in templates:
        row = by_id[each.envelope.id]
        kept = Recorded(each.envelope, each.aggregate, None, bool(row["webhook"]))
        made.append((row["seq"], row["prior"], kept, row["text"]))
    _keep(tx, made)
    _publish_after_commit(tx)


def inline_recorded(tx: db.Tx, recorded: Inline, seq: int, prior: int | None) -> None:
    """The statement wrote the event (`seq`, `prior` from its RETURNING): published once
    the transaction commits, as `record_all`'s are."""
    _keep(tx, [(seq, prior, recorded.event, recorded.text)])
    _publish_after_commit(tx)


def _committed(info: dict[str, Any]) -> None:
    outgoing: list[Outgoing] = info.pop(COMMITTED, [])
    settings = get_settings()
    if outgoing and settings.events_fast_path:
        urgent = any(each.dispatch or each.type not in LINGERING for each in outgoing)
        publisher(settings).notify(outgoing, urgent=urgent)


def for_step(tx: db.Tx, step_id: str) -> list[dict[str, Any]]:
    """The step's events from the outbox, in commit order, with their stream ids (None
    until the row is marked published)."""
    rows = tx.all(
        "SELECT envelope, stream_id FROM events WHERE step_id = %s ORDER BY seq", [step_id]
    )
    return [{**row.envelope, "stream_id": row.stream_id} for row in rows]
