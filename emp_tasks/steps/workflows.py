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

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

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
from emp_tasks.specs import WorkflowCreate
from emp_tasks.steps import transitions
from emp_tasks.store import db, idempotency, outbox
from emp_tasks.store.models import Step, Workflow
from emp_tasks.webhooks import endpoints as webhooks

logger = logging.getLogger(__name__)

W = WorkflowStatus


def _now() -> datetime:
    return datetime.now(UTC)


def aggregate(workflow_id: str) -> str:
    return f"workflow:{workflow_id}"


def _emit(
    session: Session, workflow: Workflow, event_type: EventType, data: dict[str, Any]
) -> None:
    outbox.record(
        session,
        event_type,
        aggregate=aggregate(workflow.id),
        data=data,
        correlation_id=workflow.correlation_id,
        workflow_id=workflow.id,
        customer_id=workflow.customer_id,
    )


# --- step_details: the one per-step view of a workflow --------------------------------------


def step_details(session: Session, workflow_id: str) -> list[dict[str, Any]]:
    """The canonical per-step view of a workflow (API.md, "step_detail")."""
    rows = list(
        session.scalars(
            select(Step).where(Step.workflow_id == workflow_id).order_by(Step.step_index)
        )
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


def _visible(session: Session, workflow_id: str, principal: Principal, lock: bool = False):
    workflow = session.get(Workflow, workflow_id, with_for_update=lock, populate_existing=lock)
    if workflow is None or not principal.may_see(workflow.customer_id):
        raise NotFound("workflow", workflow_id)
    return workflow


def submit(
    spec: WorkflowCreate,
    principal: Principal,
    *,
    correlation_id: str | None = None,
    idempotency_key: str | None = None,
) -> tuple[Workflow, list[str], bool]:
    """Accept a workflow; its steps without dependencies are queued at once."""
    limit = get_settings().max_workflow_steps
    if len(spec.steps) > limit:
        raise ValidationFailed("steps", f"at most {limit} steps (EMP_MAX_WORKFLOW_STEPS)")
    customer_id = principal.customer_for(spec.customer_id)
    webhooks.check_target("webhook_url", spec.webhook_url)
    for index, step_spec in enumerate(spec.steps):
        webhooks.check_target(f"steps.{index}.webhook_url", step_spec.webhook_url)

    def load(session: Session, workflow_id: str) -> tuple[Workflow, list[str]]:
        return session.get(Workflow, workflow_id), _step_ids(session, workflow_id)

    def create(session: Session) -> tuple[tuple[Workflow, list[str]], str]:
        now = _now()
        workflow = Workflow(
            id=new_id(),
            customer_id=customer_id,
            name=spec.name,
            description=spec.description,
            status=W.PENDING,
            failure_policy=spec.failure_policy,
            priority=spec.priority if spec.priority is not None else 50,
            total_steps=len(spec.steps),
            completed_steps=0,
            failed_steps=0,
            webhook_url=spec.webhook_url,
            webhook_events=spec.webhook_events,
            meta=spec.metadata,
            correlation_id=correlation_id,
            created_at=now,
            updated_at=now,
        )
        session.add(workflow)
        session.flush()
        _emit(
            session,
            workflow,
            EventType.WORKFLOW_SUBMITTED,
            {"name": workflow.name, "total_steps": workflow.total_steps},
        )
        created = _create_steps(session, workflow, spec)
        return (workflow, [step.id for step in created]), workflow.id

    (workflow, step_ids), was_created = idempotency.create_once(
        customer_id, idempotency_key, "workflow", load, create
    )
    return workflow, step_ids, was_created


def _create_steps(session: Session, workflow: Workflow, spec: WorkflowCreate) -> list[Step]:
    """Add a workflow's steps: those without dependencies pending (queued), others waiting."""
    ids = [new_id() for _ in spec.steps]
    created = []
    for index, step_spec in enumerate(spec.steps):
        step = transitions.new_step(step_spec, workflow.customer_id, workflow.correlation_id)
        step.id = ids[index]
        step.workflow_id = workflow.id
        step.step_index = index
        step.priority = spec.step_priority(index)
        step.depends_on = [ids[dependency] for dependency in step_spec.depends_on]
        step.remaining_deps = len(step.depends_on)
        if step.depends_on:
            step.status = StepStatus.WAITING
            step.queued_at = None
        created.append(step)
    session.add_all(created)
    session.flush()
    for step in created:
        transitions.submitted(session, step)
    return created


def _step_ids(session: Session, workflow_id: str) -> list[str]:
    return list(
        session.scalars(
            select(Step.id).where(Step.workflow_id == workflow_id).order_by(Step.step_index)
        )
    )


def status(workflow_id: str, principal: Principal) -> tuple[Workflow, list[dict[str, Any]]]:
    """The workflow and its step_details, read in one transaction."""
    with db.transaction() as session:
        workflow = _visible(session, workflow_id, principal)
        return workflow, step_details(session, workflow_id)


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


def cancel(workflow_id: str, principal: Principal, reason: str | None = None) -> Workflow:
    """Cancel a workflow: its running and not yet started steps are cancelled."""
    reason = reason or "workflow cancelled by client"
    with db.transaction() as session:
        workflow = _visible(session, workflow_id, principal, lock=True)
        if WorkflowStatus(workflow.status) in TERMINAL_WORKFLOW_STATUSES:
            raise InvalidState(f"workflow {workflow_id} is {workflow.status}; it cannot cancel")
        for step in _unfinished(session, workflow.id):
            transitions.cancel(session, step, reason)
        workflow.status = W.CANCELLED
        workflow.cancel_reason = reason
        workflow.completed_at = workflow.updated_at = _now()
        _emit(
            session,
            workflow,
            EventType.WORKFLOW_CANCELLED,
            {"step_details": step_details(session, workflow.id), "reason": reason},
        )
        return workflow


def _unfinished(session: Session, workflow_id: str) -> list[Step]:
    return list(
        session.scalars(
            select(Step)
            .where(Step.workflow_id == workflow_id, Step.status.in_(UNFINISHED_STEP_STATUSES))
            .order_by(Step.id)  # the lock order every multi-step locker uses
            .with_for_update()
        )
    )


# --- progress (step commands call these in the step's transaction, workflow row locked) ----


def on_step_started(session: Session, step: Step) -> None:
    """The workflow's first step to start makes it running (later ones change nothing).

    A conditional UPDATE rather than a lock: once the workflow runs, the row does not
    match and no step start waits for it.
    """
    now = _now()
    session.execute(
        update(Workflow)
        .where(Workflow.id == step.workflow_id, Workflow.status == W.PENDING)
        .values(status=W.RUNNING, started_at=now, updated_at=now)
    )


def on_step_finished(session: Session, step: Step) -> None:
    """Advance the workflow after one of its steps reached a terminal status (a step
    outside any workflow changes nothing)."""
    if step.workflow_id is None:
        return
    workflow = session.get(Workflow, step.workflow_id)
    if workflow is None:
        return
    workflow.updated_at = _now()
    if step.status == StepStatus.COMPLETED:
        workflow.completed_steps += 1
        _emit(
            session,
            workflow,
            EventType.WORKFLOW_STEP_COMPLETED,
            {
                "step_index": step.step_index,
                "step_id": step.id,
                "completed_steps": workflow.completed_steps,
                "total_steps": workflow.total_steps,
            },
        )
        _release_dependents(session, step)
    elif step.status in (StepStatus.FAILED, StepStatus.CANCELLED):
        if step.status == StepStatus.FAILED:
            workflow.failed_steps += 1
        if workflow.failed_step_index is None:
            workflow.failed_step_index = step.step_index
            workflow.error = (
                step.error
                or StepError(
                    code="STEP_CANCELLED",
                    message=f"step {step.step_index} was cancelled",
                    type="cancelled",
                    retryable=False,
                ).to_json()
            )
        _skip_dependents(session, step)
        if (
            workflow.failure_policy == "fail_fast"
            and workflow.status not in TERMINAL_WORKFLOW_STATUSES
        ):
            reason = f"workflow failed fast: step {step.step_index} {step.status}"
            for other in _unfinished(session, workflow.id):
                if other.status in NOT_STARTED_STEP_STATUSES:
                    transitions.cancel(session, other, reason)
            _finish(session, workflow, W.FAILED)
            return
    _finish_if_done(session, workflow)


def _release_dependents(session: Session, step: Step) -> None:
    dependents = session.scalars(
        select(Step)
        .where(
            Step.workflow_id == step.workflow_id,
            Step.status == StepStatus.WAITING,
            Step.depends_on.contains([step.id]),
        )
        .order_by(Step.step_index)
        .with_for_update()
    )
    for dependent in dependents:
        dependent.remaining_deps -= 1
        if dependent.remaining_deps <= 0:
            transitions.release(session, dependent)


def _skip_dependents(session: Session, step: Step) -> None:
    """Every step that depends on `step`, directly or not, can no longer run."""
    frontier = [step]
    while frontier:
        current = frontier.pop()
        dependents = list(
            session.scalars(
                select(Step)
                .where(
                    Step.workflow_id == current.workflow_id,
                    Step.status == StepStatus.WAITING,
                    Step.depends_on.contains([current.id]),
                )
                .with_for_update()
            )
        )
        for dependent in dependents:
            transitions.skip(session, dependent, f"step {step.step_index} {step.status}")
            frontier.append(dependent)


def _finish_if_done(session: Session, workflow: Workflow) -> None:
    if workflow.status in TERMINAL_WORKFLOW_STATUSES:
        return
    unfinished = session.scalar(
        select(Step.id)
        .where(Step.workflow_id == workflow.id, Step.status.in_(UNFINISHED_STEP_STATUSES))
        .limit(1)
    )
    if unfinished is not None:
        return
    done = workflow.completed_steps == workflow.total_steps
    _finish(session, workflow, W.COMPLETED if done else W.FAILED)


def _finish(session: Session, workflow: Workflow, outcome: WorkflowStatus) -> None:
    workflow.status = outcome
    workflow.completed_at = workflow.updated_at = _now()
    details = step_details(session, workflow.id)
    if outcome == W.COMPLETED:
        started = workflow.started_at or workflow.created_at
        _emit(
            session,
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
        session,
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
