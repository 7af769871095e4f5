"""Step transitions: the one place a step's status changes, with its event, in one transaction.

`apply` moves steps to a status the transition table (emp_tasks.core.status) allows
from where they are, in one UPDATE whose WHERE clause holds the rule (and the
attempt, when the caller fences on it), and records each moved step's event in
the same transaction; `emit` records an event of a step whose status stays. The
transitions a workflow drives (`release`, `skip`, `cancel`) are here too, shared by
the step commands (`client`, `attempts`, `recovery` in emp_tasks.steps) and the
workflow DAG (emp_tasks.steps.workflows).

Rows are read back as named tuples with the ORM's attribute names (`STEP_COLUMNS`),
so what the API presents looks the same whichever way a step was read.

This layer knows nothing of workflows: a transition never advances one. The
commands call `workflows` after a step finishes, and `workflows` calls these
transitions, so the two only ever call downwards.

Lock order. Every path that changes a workflow and its steps locks the workflow
row first, then its steps in id order (`lock_workflow`, `lock_workflow_of`, and the
`ORDER BY id FOR UPDATE` of every multi-step change), so two of them never wait
on each other in a circle.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta
from types import SimpleNamespace
from typing import Any

from psycopg.types.json import Jsonb

from emp_tasks import metrics
from emp_tasks.core import events, references
from emp_tasks.core.dispatch_instruction import DispatchInstruction
from emp_tasks.core.errors import InvalidState, StepError
from emp_tasks.core.events import EventType
from emp_tasks.core.ids import new_id
from emp_tasks.core.status import (
    ACTIVE_STEP_STATUSES,
    TERMINAL_STEP_STATUSES,
    StepStatus,
    step_may_become,
)
from emp_tasks.core.times import iso, now
from emp_tasks.routes import placement, queues, routing
from emp_tasks.specs import StepCreate
from emp_tasks.store import outbox
from emp_tasks.store.db import Tx
from emp_tasks.webhooks import endpoints as webhooks

S = StepStatus

EXPIRED = "EXPIRED"

STEP_COLUMNS = (
    "id, customer_id, service, queue, status, priority, payload, requirements, result, error,"
    " progress, stage, message, attempts, max_retries, timeout_s, workflow_id, step_index,"
    " depends_on, remaining_deps, worker_id, machine_id, webhook_url, webhook_events,"
    " correlation_id, metadata AS meta, cancel_reason, created_at, updated_at, queued_at,"
    " started_at, completed_at, expires_at, lease_expires_at"
)
"""Every column of a step, named as the ORM names them (`metadata` is `meta`)."""

RETURNED_FOR_COUNTS = "id, attempts, service, step_index, error"
"""The fewest columns `apply` returns: what its attempt close, order and metrics read."""

JSON_COLUMNS = frozenset(
    {"payload", "requirements", "result", "error", "depends_on", "webhook_events", "metadata"}
)


class Now:
    """A SET value: the transaction's time (`now()`)."""


NOW = Now()

Data = dict[str, Any] | Callable[[Any], dict[str, Any]]
"""An event's data, or how to make it from the step's row after the change."""


def statuses_into(to: StepStatus) -> frozenset[StepStatus]:
    """Every status the transition table lets become `to`."""
    return frozenset(status for status in StepStatus if step_may_become(status, to))


def _assignments(sets: dict[str, Any], params: dict[str, Any]) -> str:
    parts = []
    for column, value in sets.items():
        if isinstance(value, Now):
            parts.append(f"{column} = now()")
            continue
        parts.append(f"{column} = %(set_{column})s")
        params[f"set_{column}"] = Jsonb(value) if column in JSON_COLUMNS else value
    return "".join(f", {part}" for part in parts)


# --- events --------------------------------------------------------------------------------


def event_of(
    step: Any, event_type: EventType, data: dict[str, Any], dispatch: DispatchInstruction | None
) -> outbox.Recorded:
    """The step's event (`step` is its row), flagged when the step's own webhook wants it."""
    return outbox.event(
        event_type,
        aggregate=events.step_aggregate(step.id),
        data=data,
        correlation_id=step.correlation_id,
        step_id=step.id,
        workflow_id=step.workflow_id,
        machine_id=step.machine_id,
        worker_id=step.worker_id,
        customer_id=step.customer_id,
        dispatch=dispatch,
        webhook=webhooks.own_webhook_wants(
            step.webhook_url, step.webhook_events, event_type, webhooks.TERMINAL_STEP_EVENTS
        ),
    )


def emit(
    tx: Tx,
    steps: Iterable[Any],
    event_type: EventType,
    data: Data,
    *,
    queue: bool = False,
    place: bool = True,
) -> None:
    """Record each step's event; `queue=True` also sends its task when the event is published
    (to a warm worker's own queue when placement finds one, unless `place=False`)."""
    recorded = []
    for step in steps:
        dispatch = _queue_spec(tx, step, place) if queue else None
        values = data(step) if callable(data) else data
        recorded.append(event_of(step, event_type, values, dispatch))
    outbox.record_all(tx, recorded)


def _queue_spec(tx: Tx, step: Any, place: bool = True) -> DispatchInstruction:
    """Record the step's route (if new) and say how to send its task: to its route's queue,
    or to a warm worker's own queue (emp_tasks.routes.placement)."""
    queues.ensure(tx, step)
    spec = task_spec(step, step.queued_at)
    target = placement.choose(tx, step) if place else None
    return dataclasses.replace(spec, queue=target) if target is not None else spec


def task_spec(step: Any, not_before: datetime | None = None) -> DispatchInstruction:
    """How to send the task of a step (or a row with its columns); the continuation rule
    (see emp_tasks.core.priority) applies to a workflow step that had dependencies."""
    return DispatchInstruction.for_step(
        step.id,
        step.queue,
        step.priority,
        not_before,
        continuation=bool(step.workflow_id and step.depends_on),
        service=getattr(step, "service", None),
        customer_id=getattr(step, "customer_id", None),
    )


def queue_again(tx: Tx, step_ids: list[str], reason: str, *, place: bool = True) -> list[Any]:
    """Send the tasks of these steps again where they are still pending (each locked, the
    ones another transaction holds skipped), each with a `step_queued` saying why; their
    rows. `place=False`: to their route's shared queue, never a warm worker's."""
    rows = tx.all(
        f"SELECT {STEP_COLUMNS} FROM steps"
        " WHERE id = ANY(%s) AND status = %s ORDER BY id FOR UPDATE SKIP LOCKED",
        [step_ids, S.PENDING.value],
    )
    data = {"status": S.PENDING.value, "reason": reason}
    emit(tx, rows, EventType.STEP_QUEUED, data, queue=True, place=place)
    return rows


# --- applying a transition -----------------------------------------------------------------


def apply(
    tx: Tx,
    step_ids: Iterable[str],
    to: StepStatus,
    event_type: EventType,
    data: Data,
    *,
    sets: dict[str, Any] | None = None,
    within: frozenset[StepStatus] | None = None,
    attempt: int | None = None,
    condition: str | None = None,
    queue: bool = False,
    closing: str | None = None,
    recorded: outbox.Recorded | None = None,
    columns: str = STEP_COLUMNS,
) -> list[Any]:
    """Move these steps to `to` and record each one's event; return the moved rows.

    A step moves only from a status the transition table allows (narrowed to `within`),
    with `attempt` only while that is its current attempt, and with `condition` (SQL of
    this package's own) only where it holds; the others are left as they are and left
    out of the answer. Several steps are locked in id order. `closing`: the outcome the
    moved steps' current attempts end with in the audit trail, in the same statement
    (as `finish_attempts`, with no error). `recorded`: the event of the one step, made
    beforehand (from what the caller knows of it); the UPDATE writes it, so that the
    transition is one statement (`data` is then unused). `columns`: those of the moved
    rows to return (with a `recorded` event, when the caller needs less than the row;
    `RETURNED_FOR_COUNTS` at least).
    """
    ids = list(step_ids)
    assert recorded is None or (len(ids) == 1 and not queue)
    assert columns == STEP_COLUMNS or recorded is not None
    if not ids:
        return []
    sources = statuses_into(to) & within if within is not None else statuses_into(to)
    params: dict[str, Any] = {"to": to.value, "ids": ids, "attempt": attempt}
    assigned = _assignments(dict(sets or {}), params)
    if to not in ACTIVE_STEP_STATUSES:
        assigned += ", lease_expires_at = NULL"
    fence = " AND attempts = %(attempt)s" if attempt is not None else ""
    if condition is not None:
        fence += f" AND {condition}"
    # The statuses are the table's own values, written into the statement: a list
    # parameter would be dumped element by element on every transition.
    quoted = sorted(f"'{status.value}'" for status in sources)
    allowed = f"status IN ({', '.join(quoted)})"
    if len(ids) == 1:
        target = f"id = %(id)s AND {allowed}{fence}"
        params["id"] = ids[0]
    else:
        target = (
            f"id IN (SELECT id FROM steps WHERE id = ANY(%(ids)s) AND {allowed}{fence}"
            " ORDER BY id FOR UPDATE)"
        )
    update = (
        f"UPDATE steps SET status = %(to)s, updated_at = now(){assigned}"
        f" WHERE {target} RETURNING {columns}"
    )
    also = []  # data-modifying CTEs that act on the moved rows, in the same statement
    answer = "SELECT * FROM moved"
    if closing is not None:
        params["closing"] = closing
        also.append(
            "closed AS ("
            "UPDATE step_attempts SET outcome = %(closing)s, error = NULL, finished_at = now()"
            " FROM moved WHERE step_attempts.step_id = moved.id"
            " AND step_attempts.attempt = moved.attempts AND step_attempts.finished_at IS NULL)"
        )
    inline = None
    if recorded is not None:
        inline = outbox.inline(recorded, "moved")
        params |= inline.params
        also.append(f"recorded AS ({inline.sql})")
        answer = (
            "SELECT moved.*, recorded.seq AS event_seq, recorded.prior AS event_prior"
            " FROM moved LEFT JOIN recorded ON true"
        )
    if also:
        update = f"WITH moved AS ({update}), {', '.join(also)} {answer}"
    rows = tx.all(update, params)
    rows.sort(key=lambda row: (row.step_index or 0, row.id))
    if inline is None:
        emit(tx, rows, event_type, data, queue=queue)
    elif rows:
        outbox.inline_recorded(tx, inline, rows[0].event_seq, rows[0].event_prior)
    if to in TERMINAL_STEP_STATUSES:
        for row in rows:
            metrics.count_after_commit(tx, metrics.STEPS_FINISHED, row.service, to.value)
            if to == S.FAILED:
                count_failure(tx, row.service, row.error)
    return rows


def count_failure(tx: Tx, service: str, error: dict[str, Any] | None) -> None:
    """One failure of `service` (a failed attempt, or a step failed without one)."""
    error = error or {}
    kind, code = str(error.get("type") or "system"), str(error.get("code") or "FAILED")
    metrics.count_after_commit(tx, metrics.STEP_FAILURES, service, kind, code)


def apply_one(tx: Tx, step: Any, to: StepStatus, event_type: EventType, data: Data, **kw) -> Any:
    """`apply` to one step the caller holds locked; InvalidState if the table refuses it."""
    if not step_may_become(step.status, to):
        raise InvalidState(f"step {step.id} is {step.status}; it cannot become {to}")
    rows = apply(tx, [step.id], to, event_type, data, **kw)
    if not rows:
        raise InvalidState(f"step {step.id} is no longer {step.status}")
    return rows[0]


# --- locks ---------------------------------------------------------------------------------


def lock_workflow(tx: Tx, workflow_id: str | None) -> None:
    """Lock a workflow's row (the first lock of every change to it and its steps)."""
    if workflow_id is not None:
        tx.execute("SELECT 1 FROM workflows WHERE id = %s FOR UPDATE", [workflow_id])


def lock_workflow_of(tx: Tx, step_id: str) -> str | None:
    """Lock the workflow of a step (one statement) and return its id; None outside one."""
    row = tx.one(
        "SELECT w.id FROM steps s JOIN workflows w ON w.id = s.workflow_id"
        " WHERE s.id = %s FOR UPDATE OF w",
        [step_id],
    )
    return row.id if row is not None else None


def lock(tx: Tx, step_id: str, *, workflow: bool = True) -> Any:
    """The step's row, locked (its workflow's first, see the lock order); None if unknown."""
    if workflow:
        lock_workflow_of(tx, step_id)
    return tx.one(f"SELECT {STEP_COLUMNS} FROM steps WHERE id = %s FOR UPDATE", [step_id])


def read(tx: Tx, step_id: str) -> Any:
    """The step's row, not locked; None if unknown."""
    return tx.one(f"SELECT {STEP_COLUMNS} FROM steps WHERE id = %s", [step_id])


# --- entering the lifecycle ----------------------------------------------------------------

_INSERT_COLUMNS = (
    ("id", "varchar"),
    ("customer_id", "varchar"),
    ("service", "varchar"),
    ("queue", "varchar"),
    ("status", "varchar"),
    ("priority", "int"),
    ("payload", "jsonb"),
    ("requirements", "jsonb"),
    ("max_retries", "int"),
    ("timeout_s", "float8"),
    ("workflow_id", "varchar"),
    ("step_index", "int"),
    ("depends_on", "jsonb"),
    ("remaining_deps", "int"),
    ("webhook_url", "text"),
    ("webhook_events", "jsonb"),
    ("correlation_id", "varchar"),
    ("metadata", "jsonb"),
    ("created_at", "timestamptz"),
    ("updated_at", "timestamptz"),
    ("queued_at", "timestamptz"),
    ("expires_at", "timestamptz"),
)
_INSERT = (
    f"INSERT INTO steps ({', '.join(name for name, _ in _INSERT_COLUMNS)}, attempts, progress)"
)
_INSERT_ROW = "(" + ", ".join(f"%s::{kind}" for _, kind in _INSERT_COLUMNS) + ", 0, 0)"


def new_step(spec: StepCreate, customer_id: str, correlation_id: str | None) -> dict[str, Any]:
    """A new pending step's column values (for `insert`)."""
    created = now()
    requirements = spec.requirements.model_dump(exclude_none=True)
    return {
        "id": new_id(),
        "customer_id": customer_id,
        "service": spec.service,
        "queue": routing.route_for(spec.service, requirements, customer_id).queue,
        "status": S.PENDING.value,
        "priority": spec.priority,
        "payload": spec.payload,
        "requirements": requirements,
        "max_retries": spec.max_retries,
        "timeout_s": float(spec.timeout_s),
        "workflow_id": None,
        "step_index": None,
        "depends_on": [],
        "remaining_deps": 0,
        "webhook_url": spec.webhook_url,
        "webhook_events": spec.webhook_events,
        "correlation_id": correlation_id,
        "metadata": spec.metadata,
        "created_at": created,
        "updated_at": created,
        "queued_at": created,
        "expires_at": created + timedelta(seconds=spec.expires_in_s) if spec.expires_in_s else None,
    }


def insert(tx: Tx, steps: list[dict[str, Any]]) -> list[Any]:
    """Insert new steps (values from `new_step`), one statement; their rows, in order,
    each with its `step_submitted` (a pending one's task is sent with it)."""
    values = [
        [Jsonb(step[name]) if kind == "jsonb" else step[name] for name, kind in _INSERT_COLUMNS]
        for step in steps
    ]
    rows = tx.insert(_INSERT, _INSERT_ROW, values, f"RETURNING {STEP_COLUMNS}")
    order = {step["id"]: index for index, step in enumerate(steps)}
    rows.sort(key=lambda row: order[row.id])
    recorded = [
        event_of(
            row,
            EventType.STEP_SUBMITTED,
            _submitted_data(row),
            _queue_spec(tx, row) if row.status == S.PENDING else None,
        )
        for row in rows
    ]
    outbox.record_all(tx, recorded)
    for row in rows:
        metrics.count_after_commit(tx, metrics.STEPS_SUBMITTED, row.service)
    return rows


_INSERT_NAMED = (
    "(" + ", ".join(f"%(step_{name})s::{kind}" for name, kind in _INSERT_COLUMNS) + ", 0, 0)"
)


def _row_of(step: dict[str, Any]) -> Any:
    """A new step's values (from `new_step`) as its row will read, before it is inserted."""
    unset = dict.fromkeys(
        [
            "result",
            "error",
            "stage",
            "message",
            "worker_id",
            "machine_id",
            "cancel_reason",
            "started_at",
            "completed_at",
            "lease_expires_at",
        ]
    )
    values = {name: value for name, value in step.items() if name != "metadata"}
    return SimpleNamespace(**unset, **values, meta=step["metadata"], attempts=0, progress=0.0)


def inserts_at_once(step: dict[str, Any]) -> bool:
    """Whether `insert_at_once` can take this new step: queueing it needs no statement of its
    own (its route is recorded already, and no warm worker is to be chosen for it)."""
    row = _row_of(step)
    return queues.is_known(row.queue) and not placement.may_choose(row)


def insert_at_once(
    tx: Tx,
    step: dict[str, Any],
    joined: Callable[[Any], tuple[str, dict[str, Any]]] | None = None,
) -> Any:
    """`insert` of one pending step (`inserts_at_once`) as one statement: the row and its
    `step_submitted`, made beforehand from the values; the transaction can be just that
    statement (`db.tx(single=True)`). `joined`: for the step (as its row will read), a
    SELECT (SQL, named parameters) read in the same statement, before the step exists,
    whose columns are added to the row."""
    row = _row_of(step)
    assert row.status == S.PENDING
    event = event_of(row, EventType.STEP_SUBMITTED, _submitted_data(row), _queue_spec(tx, row))
    inline = outbox.inline(event, "inserted")
    params: dict[str, Any] = {
        f"step_{name}": Jsonb(step[name]) if kind == "jsonb" else step[name]
        for name, kind in _INSERT_COLUMNS
    }
    params |= inline.params
    ctes = [
        f"inserted AS ({_INSERT} VALUES {_INSERT_NAMED} RETURNING {STEP_COLUMNS})",
        f"recorded AS ({inline.sql})",
    ]
    join = ""
    if joined is not None:
        joined_sql, joined_params = joined(row)
        ctes.append(f"joined AS ({joined_sql})")
        params |= joined_params
        join = ", joined.*"
    inserted = tx.one(
        f"WITH {', '.join(ctes)} SELECT inserted.*, recorded.seq AS event_seq,"
        f" recorded.prior AS event_prior{join} FROM inserted LEFT JOIN recorded ON true"
        + (" CROSS JOIN joined" if joined is not None else ""),
        params,
    )
    outbox.inline_recorded(tx, inline, inserted.event_seq, inserted.event_prior)
    metrics.count_after_commit(tx, metrics.STEPS_SUBMITTED, inserted.service)
    return inserted


def _submitted_data(step: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "service": step.service,
        "priority": step.priority,
        "status": step.status,
    }
    if step.workflow_id is not None:
        data["step_index"] = step.step_index
    return data


# --- transitions ---------------------------------------------------------------------------


def finish_attempts(
    tx: Tx, attempts: Iterable[tuple[str, int]], outcome: str, error: StepError | None
) -> None:
    """Close these (step id, attempt) attempts in the audit trail (already closed: no-op)."""
    pairs = list(attempts)
    if not pairs:
        return
    tx.execute(
        "UPDATE step_attempts SET outcome = %(outcome)s, error = %(error)s, finished_at = now()"
        " FROM unnest(%(ids)s::varchar[], %(attempts)s::int[]) AS f(step_id, attempt)"
        " WHERE step_attempts.step_id = f.step_id AND step_attempts.attempt = f.attempt"
        # Through the (step_id, attempt) index, whatever the statistics say.
        " AND step_attempts.step_id = ANY(%(ids)s) AND step_attempts.finished_at IS NULL",
        {
            "outcome": outcome,
            "error": Jsonb(error.to_json()) if error else None,
            "ids": [step_id for step_id, _ in pairs],
            "attempts": [attempt for _, attempt in pairs],
        },
    )


assert S.WAITING in statuses_into(S.PENDING)
_COUNT_DOWN = f"""
UPDATE steps SET remaining_deps = remaining_deps - 1, updated_at = now(),
  status = CASE WHEN remaining_deps <= 1 THEN '{S.PENDING.value}' ELSE status END,
  queued_at = CASE WHEN remaining_deps <= 1 THEN now() ELSE queued_at END
WHERE id IN (
  SELECT id FROM steps WHERE workflow_id = %s AND status = '{S.WAITING.value}' AND depends_on @> %s
  ORDER BY id FOR UPDATE
)
RETURNING {STEP_COLUMNS}
"""


def count_down(tx: Tx, workflow_id: str, dependency_id: str) -> tuple[list[Any], list[Any]]:
    """A dependency completed: one fewer to wait for, for each step waiting on it; those
    left with none are queued (waiting to pending, their tasks sent with the event), in
    the same statement. A released step's references to its dependencies' results are
    resolved into its payload first; one whose reference finds nothing fails instead
    (`REFERENCE_NOT_FOUND`). Returns (queued rows, failed rows)."""
    counted = tx.all(_COUNT_DOWN, [workflow_id, Jsonb([dependency_id])])
    released = sorted(
        (row for row in counted if row.status == S.PENDING),
        key=lambda row: (row.step_index or 0, row.id),
    )
    referring = [row for row in released if references.has_any(row.payload)]
    failed: list[Any] = []
    if referring:
        resolved, failed = _resolve_references(tx, referring)
        released = [resolved.get(row.id, row) for row in released if row.id not in failed]
        failed = list(failed.values())
    emit(
        tx,
        released,
        EventType.STEP_QUEUED,
        {"status": S.PENDING.value, "reason": "dependencies completed"},
        queue=True,
    )
    return released, failed


def _resolve_references(tx: Tx, steps: list[Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Resolve released steps' payloads against the results of their dependencies: the
    steps with their payloads written ({id: row}), and those failed ({id: row})."""
    dependencies = sorted({dependency for row in steps for dependency in row.depends_on or []})
    results = {
        row.step_index: row.result
        for row in tx.all(
            "SELECT step_index, result FROM steps WHERE id = ANY(%s) AND status = %s",
            [dependencies, S.COMPLETED.value],
        )
    }
    resolved: dict[str, Any] = {}
    failed: dict[str, Any] = {}
    for row in steps:
        try:
            payload = references.resolve(row.payload, results)
        except references.ReferenceNotFound as missing:
            error = StepError(
                code=REFERENCE_NOT_FOUND, message=str(missing), type="validation", retryable=False
            ).to_json()
            failed.update(
                (moved.id, moved)
                for moved in apply(
                    tx,
                    [row.id],
                    S.FAILED,
                    EventType.STEP_FAILED,
                    {"error": error, "attempts": row.attempts},
                    sets={"error": error, "completed_at": NOW},
                    within=frozenset({S.PENDING}),
                )
            )
            continue
        resolved[row.id] = tx.one(
            f"UPDATE steps SET payload = %s WHERE id = %s RETURNING {STEP_COLUMNS}",
            [Jsonb(payload), row.id],
        )
    return resolved, failed


def skip(tx: Tx, step_ids: Iterable[str], reason: str) -> list[Any]:
    """Waiting steps that will never run: a step they depend on did not complete."""
    return apply(
        tx,
        step_ids,
        S.SKIPPED,
        EventType.STEP_SKIPPED,
        {"reason": reason},
        sets={"completed_at": NOW, "cancel_reason": reason},
        within=frozenset({S.WAITING}),
    )


def cancel(tx: Tx, step_ids: Iterable[str], reason: str) -> list[Any]:
    """Cancel unfinished steps (a running one's attempt ends `cancelled`). Their workflow is
    not advanced here (see steps.client.cancel)."""
    rows = apply(
        tx,
        step_ids,
        S.CANCELLED,
        EventType.STEP_CANCELLED,
        {"reason": reason},
        sets={"completed_at": NOW, "cancel_reason": reason},
        closing="cancelled",
    )
    return rows


REFERENCE_NOT_FOUND = "REFERENCE_NOT_FOUND"
"""The code of a step whose payload refers to something its dependency's result lacks."""

EXPIRED_ERROR = StepError(
    code=EXPIRED,
    message="the step did not start before its queue deadline (expires_in_s)",
    type="timeout",
    retryable=False,
)


def expire(tx: Tx, step_id: str) -> Any:
    """Fail a pending step whose queue deadline passed (it never starts); its row, or None
    when it is not pending and overdue. Its workflow is not advanced here (see
    steps.attempts.expire)."""
    error = EXPIRED_ERROR.to_json()
    moved = apply(
        tx,
        [step_id],
        S.FAILED,
        EventType.STEP_FAILED,
        lambda step: {"error": error, "attempts": step.attempts},
        sets={"error": error, "completed_at": NOW},
        within=frozenset({S.PENDING}),
        condition="expires_at <= now()",
    )
    return moved[0] if moved else None


def queue_retry(tx: Tx, step: Any, error: StepError, at: datetime, **sets: Any) -> Any:
    """Back to pending for another attempt (the caller holds the step), sent to the broker
    to run from `at`; `sets`: other columns to change with it."""
    return apply_one(
        tx,
        step,
        S.PENDING,
        EventType.STEP_RETRYING,
        {"error": error.to_json(), "attempt": step.attempts, "retry_at": iso(at)},
        sets={"queued_at": at, "error": error.to_json(), **sets},
        queue=True,
    )
