"""Workflows: the DAG of steps, its progress, its failure policies, and `step_details`.

PostgreSQL decides progress. Every transition of a workflow's step locks the
workflow row first (see transitions.lock), so the completions of a fan-in's
dependencies are applied one after another: each decrements its dependents'
`remaining_deps`, and the one that brings a dependent to zero queues it. A step
therefore starts as soon as its own dependencies are done, never waits on one it
does not depend on, and is queued exactly once even if workers die mid-fan-in.

Ready steps are sent as Celery tasks through the outbox (emp_tasks.store.dispatch),
like any step. Celery's chord and chain would keep the same progress in Redis
(a chord's counter, a chain's next message sent by the finishing worker), which
is lost with a worker or a flushed Redis; here the database is the only counter.

`step_details` is built by `step_details()` only: REST, events, WebSocket and
webhooks all use it.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import Any

from psycopg.types.json import Jsonb
from sqlalchemy import func, select

from emp_tasks.auth import Principal
from emp_tasks.core.config import get_settings
from emp_tasks.core.errors import InvalidState, NotFound, StepError, ValidationFailed
from emp_tasks.core.events import EventType
from emp_tasks.core.ids import decode_cursor, new_id
from emp_tasks.core.status import (
    NOT_STARTED_STEP_STATUSES,
    TERMINAL_WORKFLOW_STATUSES,
    UNFINISHED_STEP_STATUSES,
    StepStatus,
    WorkflowStatus,
)
from emp_tasks.core.times import TIMEFRAMES, iso
from emp_tasks.emprops import notifications
from emp_tasks.specs import WorkflowCreate
from emp_tasks.steps import transitions
from emp_tasks.store import db, idempotency, outbox
from emp_tasks.store.db import Tx
from emp_tasks.store.models import Workflow
from emp_tasks.webhooks import endpoints as webhooks

logger = logging.getLogger(__name__)

W = WorkflowStatus

WORKFLOW_COLUMNS = (
    "id, customer_id, name, description, status, failure_policy, priority, total_steps,"
    " completed_steps, failed_steps, failed_step_index, error, cancel_reason, webhook_url,"
    " webhook_events, metadata AS meta, correlation_id, created_at, updated_at, started_at,"
    " completed_at"
)
"""Every column of a workflow, named as the ORM names them (`metadata` is `meta`)."""

_UNFINISHED = [status.value for status in UNFINISHED_STEP_STATUSES]


def _now() -> datetime:
    return datetime.now(UTC)


def aggregate(workflow_id: str) -> str:
    return f"workflow:{workflow_id}"


def _emit(tx: Tx, workflow: Any, event_type: EventType, data: dict[str, Any]) -> None:
    outbox.record(
        tx,
        event_type,
        aggregate=aggregate(workflow.id),
        data=data,
        correlation_id=workflow.correlation_id,
        workflow_id=workflow.id,
        customer_id=workflow.customer_id,
        webhook=webhooks.own_webhook_wants(
            workflow.webhook_url,
            workflow.webhook_events,
            event_type,
            webhooks.TERMINAL_WORKFLOW_EVENTS,
        ),
    )


def _update(tx: Tx, workflow_id: str, assignments: str, params: list[Any] | None = None) -> Any:
    """Change the workflow's row (`assignments`: SQL of this module); its row after."""
    return tx.one(
        f"UPDATE workflows SET updated_at = now(), {assignments} WHERE id = %s"
        f" RETURNING {WORKFLOW_COLUMNS}",
        [*(params or []), workflow_id],
    )


# --- step_details: the one per-step view of a workflow --------------------------------------


def step_details(tx: Tx, workflow_id: str) -> list[dict[str, Any]]:
    """The canonical per-step view of a workflow (API.md, "step_detail")."""
    rows = tx.all(
        "SELECT step_index, id, service, status, progress, attempts, depends_on, result,"
        " error, started_at, completed_at, worker_id FROM steps WHERE workflow_id = %s"
        " ORDER BY step_index",
        [workflow_id],
    )
    index_of = {row.id: row.step_index for row in rows}
    return [
        {
            "step_index": row.step_index,
            "step_id": row.id,
            "job_id": row.id,
            "service": row.service,
            "status": row.status,
            "progress": row.progress,
            "attempts": row.attempts,
            "depends_on": [index_of[dependency] for dependency in row.depends_on],
            "result": row.result,
            "error": row.error,
            "started_at": iso(row.started_at),
            "completed_at": iso(row.completed_at),
            "worker_id": row.worker_id,
        }
        for row in rows
    ]


# --- client side ---------------------------------------------------------------------------


def _visible(tx: Tx, workflow_id: str, principal: Principal, lock: bool = False) -> Any:
    workflow = tx.one(
        f"SELECT {WORKFLOW_COLUMNS} FROM workflows WHERE id = %s" + (" FOR UPDATE" if lock else ""),
        [workflow_id],
    )
    if workflow is None or not principal.may_see(workflow.customer_id):
        raise NotFound("workflow", workflow_id)
    return workflow


def submit(
    spec: WorkflowCreate,
    principal: Principal,
    *,
    correlation_id: str | None = None,
    idempotency_key: str | None = None,
) -> tuple[Any, list[str], bool]:
    """Accept a workflow; its steps without dependencies are queued at once."""
    limit = get_settings().max_workflow_steps
    if len(spec.steps) > limit:
        raise ValidationFailed("steps", f"at most {limit} steps (EMP_MAX_WORKFLOW_STEPS)")
    customer_id = principal.customer_for(spec.customer_id)
    webhooks.check_target("webhook_url", spec.webhook_url)
    for index, step_spec in enumerate(spec.steps):
        webhooks.check_target(f"steps.{index}.webhook_url", step_spec.webhook_url)

    def load(tx: Tx, workflow_id: str) -> tuple[Any, list[str]]:
        return _visible(tx, workflow_id, principal), _step_ids(tx, workflow_id)

    def create(tx: Tx) -> tuple[tuple[Any, list[str]], str]:
        workflow = tx.one(
            "INSERT INTO workflows (id, customer_id, name, description, status, failure_policy,"
            " priority, total_steps, completed_steps, failed_steps, webhook_url, webhook_events,"
            " metadata, correlation_id)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, 0, 0, %s, %s, %s, %s)"
            f" RETURNING {WORKFLOW_COLUMNS}",
            [
                new_id(),
                customer_id,
                spec.name,
                spec.description,
                W.PENDING.value,
                spec.failure_policy,
                spec.priority if spec.priority is not None else 50,
                len(spec.steps),
                spec.webhook_url,
                Jsonb(spec.webhook_events) if spec.webhook_events is not None else None,
                Jsonb(spec.metadata),
                correlation_id,
            ],
        )
        _emit(
            tx,
            workflow,
            EventType.WORKFLOW_SUBMITTED,
            {"name": workflow.name, "total_steps": workflow.total_steps},
        )
        if spec.emprops is not None:
            notifications.create(tx, workflow.id, spec.emprops.job_id, spec.emprops.collection_id)
        created = _create_steps(tx, workflow, spec)
        return (workflow, [step.id for step in created]), workflow.id

    (workflow, step_ids), was_created = idempotency.create_once(
        customer_id, idempotency_key, "workflow", load, create
    )
    return workflow, step_ids, was_created


def _create_steps(tx: Tx, workflow: Any, spec: WorkflowCreate) -> list[Any]:
    """Add a workflow's steps: those without dependencies pending (queued), others waiting."""
    ids = [new_id() for _ in spec.steps]
    values = []
    for index, step_spec in enumerate(spec.steps):
        step = transitions.new_step(step_spec, workflow.customer_id, workflow.correlation_id)
        step["id"] = ids[index]
        step["workflow_id"] = workflow.id
        step["step_index"] = index
        step["priority"] = spec.step_priority(index)
        step["depends_on"] = [ids[dependency] for dependency in step_spec.depends_on]
        step["remaining_deps"] = len(step["depends_on"])
        if step["depends_on"]:
            step["status"] = StepStatus.WAITING.value
            step["queued_at"] = None
        values.append(step)
    return transitions.insert(tx, values)


def _step_ids(tx: Tx, workflow_id: str) -> list[str]:
    rows = tx.all("SELECT id FROM steps WHERE workflow_id = %s ORDER BY step_index", [workflow_id])
    return [row.id for row in rows]


def status(workflow_id: str, principal: Principal) -> tuple[Any, list[dict[str, Any]]]:
    """The workflow and its step_details, read in one transaction."""
    with db.tx() as tx:
        workflow = _visible(tx, workflow_id, principal)
        return workflow, step_details(tx, workflow_id)


def emprops_state(workflow_id: str, principal: Principal) -> dict[str, Any] | None:
    """The workflow's EmProps notification as the API shows it; None for other workflows."""
    with db.tx() as tx:
        _visible(tx, workflow_id, principal)
        row = notifications.of(tx, workflow_id)
        return notifications.presented(row) if row is not None else None


def replay_emprops(workflow_id: str, principal: Principal) -> dict[str, Any]:
    """Send the workflow's EmProps notification again (a failed or delivered one)."""
    with db.tx() as tx:
        _visible(tx, workflow_id, principal)
        if notifications.of(tx, workflow_id) is None:
            raise NotFound("EmProps notification of workflow", workflow_id)
        row = notifications.replay(tx, workflow_id)
        if row is None:
            raise InvalidState(f"workflow {workflow_id} has not ended: nothing to replay yet")
        return notifications.presented(row)


def list_workflows(
    principal: Principal, *, status: str | None = None, limit: int = 50, cursor: str | None = None
) -> tuple[list[Workflow], str | None]:
    query = select(Workflow).order_by(Workflow.id.desc()).limit(limit + 1)
    if not principal.admin:
        query = query.where(Workflow.customer_id == principal.customer_id)
    if status is not None:
        query = query.where(Workflow.status == status)
    if cursor is not None:
        query = query.where(Workflow.id < decode_cursor(cursor))
    with db.transaction() as session:
        rows = list(session.scalars(query))
    page = rows[:limit]
    return page, page[-1].id if len(rows) > limit else None


def stats(principal: Principal, timeframe: str) -> dict[str, Any]:
    since = _now() - TIMEFRAMES[timeframe]
    query = (
        select(Workflow.status, func.count())
        .where(Workflow.created_at >= since)
        .group_by(Workflow.status)
    )
    if not principal.admin:
        query = query.where(Workflow.customer_id == principal.customer_id)
    counts = {"total": 0, **{s.value: 0 for s in WorkflowStatus}}
    with db.transaction() as session:
        for state, count in session.execute(query):
            counts[state] += count
            counts["total"] += count
    return counts


def cancel(workflow_id: str, principal: Principal, reason: str | None = None) -> Any:
    """Cancel a workflow: its running and not yet started steps are cancelled."""
    reason = reason or "workflow cancelled by client"
    with db.tx() as tx:
        workflow = _visible(tx, workflow_id, principal, lock=True)
        if WorkflowStatus(workflow.status) in TERMINAL_WORKFLOW_STATUSES:
            raise InvalidState(f"workflow {workflow_id} is {workflow.status}; it cannot cancel")
        transitions.cancel(tx, _unfinished(tx, workflow.id), reason)
        workflow = _update(
            tx,
            workflow.id,
            "status = %s, cancel_reason = %s, completed_at = now()",
            [W.CANCELLED.value, reason],
        )
        _emit(
            tx,
            workflow,
            EventType.WORKFLOW_CANCELLED,
            {"step_details": step_details(tx, workflow.id), "reason": reason},
        )
        return workflow


def _unfinished(tx: Tx, workflow_id: str, statuses: list[str] | None = None) -> list[str]:
    """The workflow's steps in these statuses (unfinished ones by default), in id order."""
    rows = tx.all(
        "SELECT id FROM steps WHERE workflow_id = %s AND status = ANY(%s) ORDER BY id",
        [workflow_id, statuses or _UNFINISHED],
    )
    return [row.id for row in rows]


# --- progress (step commands call these in the step's transaction, workflow row locked) ----


def on_step_started(tx: Tx, step: Any) -> None:
    """The workflow's first step to start makes it running (later ones change nothing).

    Only a pending workflow's row is touched, and only if nobody holds it: starting a
    step holds the step's lock, and waiting here for the workflow's (which every other
    path takes first) could close a circle. A start that skips it leaves the change to
    the next step start or the step's completion.
    """
    tx.execute(start_sql("%s"), [step.workflow_id])


def start_sql(workflow_id: str) -> str:
    """`on_step_started` as a statement, for the workflow whose id is the SQL expression
    `workflow_id` (a parameter, or a column of the statement that starts the step)."""
    return (
        f"UPDATE workflows SET status = '{W.RUNNING.value}', started_at = now(),"
        f" updated_at = now() WHERE id = (SELECT id FROM workflows WHERE id = {workflow_id}"
        f" AND status = '{W.PENDING.value}' FOR UPDATE SKIP LOCKED)"
    )


def on_step_finished(tx: Tx, step: Any) -> None:
    """Advance the workflow after one of its steps (its row, just changed) reached a
    terminal status (a step outside any workflow changes nothing)."""
    if step.workflow_id is None:
        return
    if step.status == StepStatus.COMPLETED:
        workflow = _update(
            tx,
            step.workflow_id,
            "completed_steps = completed_steps + 1,"
            " status = CASE WHEN status = %s THEN %s ELSE status END,"
            " started_at = COALESCE(started_at, now())",
            [W.PENDING.value, W.RUNNING.value],
        )
        if workflow is None:
            return
        _emit(
            tx,
            workflow,
            EventType.WORKFLOW_STEP_COMPLETED,
            {
                "step_index": step.step_index,
                "step_id": step.id,
                "completed_steps": workflow.completed_steps,
                "total_steps": workflow.total_steps,
            },
        )
        _, unresolvable = transitions.count_down(tx, step.workflow_id, step.id)
        for failed in unresolvable:
            on_step_finished(tx, failed)  # its failure policy decides, and finishes if done
        if not unresolvable:
            _finish_if_done(tx, workflow)
        return
    if step.status not in (StepStatus.FAILED, StepStatus.CANCELLED):
        return
    error = (
        step.error
        or StepError(
            code="STEP_CANCELLED",
            message=f"step {step.step_index} was cancelled",
            type="cancelled",
            retryable=False,
        ).to_json()
    )
    workflow = _update(
        tx,
        step.workflow_id,
        "failed_steps = failed_steps + %s,"
        " error = CASE WHEN failed_step_index IS NULL THEN %s ELSE error END,"
        " failed_step_index = COALESCE(failed_step_index, %s)",
        [1 if step.status == StepStatus.FAILED else 0, Jsonb(error), step.step_index],
    )
    if workflow is None:
        return
    _skip_dependents(tx, step)
    if workflow.failure_policy == "fail_fast" and workflow.status not in TERMINAL_WORKFLOW_STATUSES:
        reason = f"workflow failed fast: step {step.step_index} {step.status}"
        not_started = [status.value for status in NOT_STARTED_STEP_STATUSES]
        transitions.cancel(tx, _unfinished(tx, workflow.id, not_started), reason)
        _finish(tx, workflow, W.FAILED)
        return
    _finish_if_done(tx, workflow)


def _skip_dependents(tx: Tx, step: Any) -> None:
    """Every step that depends on `step`, directly or not, can no longer run."""
    reason = f"step {step.step_index} {step.status}"
    frontier = [step.id]
    while frontier:
        waiting = tx.all(
            "SELECT id FROM steps WHERE workflow_id = %s AND status = %s AND depends_on ?| %s"
            " ORDER BY id",
            [step.workflow_id, StepStatus.WAITING.value, frontier],
        )
        frontier = [row.id for row in transitions.skip(tx, [row.id for row in waiting], reason)]


def _finish_if_done(tx: Tx, workflow: Any) -> None:
    if workflow.status in TERMINAL_WORKFLOW_STATUSES:
        return
    if workflow.completed_steps == workflow.total_steps:
        _finish(tx, workflow, W.COMPLETED)
        return
    if workflow.failed_step_index is None:
        return  # nothing failed, was cancelled or skipped: what did not complete is unfinished
    unfinished = tx.one(
        "SELECT 1 FROM steps WHERE workflow_id = %s AND status = ANY(%s) LIMIT 1",
        [workflow.id, _UNFINISHED],
    )
    if unfinished is None:
        _finish(tx, workflow, W.FAILED)


def _finish(tx: Tx, workflow: Any, outcome: WorkflowStatus) -> None:
    workflow = _update(tx, workflow.id, "status = %s, completed_at = now()", [outcome.value])
    details = step_details(tx, workflow.id)
    if outcome == W.COMPLETED:
        started = workflow.started_at or workflow.created_at
        _emit(
            tx,
            workflow,
            EventType.WORKFLOW_COMPLETED,
            {
                "step_details": details,
                "success_count": workflow.completed_steps,
                "failed_count": workflow.failed_steps,
                "duration_ms": int((workflow.completed_at - started) / timedelta(milliseconds=1)),
            },
        )
        return
    _emit(
        tx,
        workflow,
        EventType.WORKFLOW_FAILED,
        {
            "step_details": details,
            "failed_step_index": workflow.failed_step_index,
            "error": workflow.error,
        },
    )
    logger.info(
        "Workflow failed",
        extra={
            "action": "workflow_failed",
            "workflow_id": workflow.id,
            "failed_step_index": workflow.failed_step_index,
        },
    )
