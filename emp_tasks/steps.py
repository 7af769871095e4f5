"""The step lifecycle: the only code that changes a step's state.

Every change goes through `_transition` (or `_emit` for progress, which keeps
the status): it checks the transition table, updates the row and records the
event in the same transaction. Worker-side changes are fenced by the attempt
number: a call for an attempt that is no longer the step's current one changes
nothing, so a superseded worker's late result or progress is ignored.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import func, select, tuple_, update
from sqlalchemy.orm import Session

from emp_tasks import db, dispatch, events, idempotency, queues, routing, webhooks
from emp_tasks.auth import Principal
from emp_tasks.capabilities import Capabilities
from emp_tasks.config import get_settings
from emp_tasks.connectors.base import StepRun
from emp_tasks.errors import InvalidCursor, InvalidState, NotFound
from emp_tasks.events import EventType
from emp_tasks.ids import new_id
from emp_tasks.models import Attempt, Step, StepStatus, Workflow
from emp_tasks.specs import StepCreate, WorkflowCreate
from emp_tasks.times import iso

logger = logging.getLogger(__name__)

S = StepStatus

TRANSITIONS: dict[StepStatus, frozenset[StepStatus]] = {
    S.WAITING: frozenset({S.PENDING, S.CANCELLED, S.SKIPPED}),
    S.PENDING: frozenset({S.ASSIGNED, S.CANCELLED, S.FAILED, S.SKIPPED}),
    S.ASSIGNED: frozenset({S.RUNNING, S.PENDING, S.COMPLETED, S.FAILED, S.CANCELLED}),
    S.RUNNING: frozenset({S.COMPLETED, S.PENDING, S.FAILED, S.CANCELLED}),
    S.FAILED: frozenset({S.PENDING}),
    S.CANCELLED: frozenset({S.PENDING}),
    S.COMPLETED: frozenset(),
    S.SKIPPED: frozenset(),
}
"""Allowed status changes. PENDING again from ASSIGNED/RUNNING is a retry; from
FAILED/CANCELLED it is a manual retry."""

CANCELLABLE = frozenset({S.WAITING, S.PENDING, S.ASSIGNED, S.RUNNING})
RETRYABLE_BY_CLIENT = frozenset({S.FAILED, S.CANCELLED})
ACTIVE = frozenset({S.ASSIGNED, S.RUNNING})


def _now() -> datetime:
    return datetime.now(UTC)


def step_object(step: Step) -> dict[str, Any]:
    """The public shape of a step (API.md, "Step object fields")."""
    return {
        "id": step.id,
        "service": step.service,
        "status": step.status,
        "priority": step.priority,
        "payload": step.payload,
        "requirements": step.requirements,
        "queue": step.queue,
        "result": step.result,
        "error": step.error,
        "progress": step.progress,
        "stage": step.stage,
        "message": step.message,
        "attempts": step.attempts,
        "max_retries": step.max_retries,
        "timeout_s": step.timeout_s,
        "workflow_id": step.workflow_id,
        "step_index": step.step_index,
        "depends_on": step.depends_on,
        "customer_id": step.customer_id,
        "worker_id": step.worker_id,
        "machine_id": step.machine_id,
        "webhook_url": step.webhook_url,
        "webhook_events": step.webhook_events,
        "correlation_id": step.correlation_id,
        "metadata": step.meta,
        "created_at": iso(step.created_at),
        "started_at": iso(step.started_at),
        "completed_at": iso(step.completed_at),
        "updated_at": iso(step.updated_at),
    }


# --- transitions ---------------------------------------------------------------------------


def _emit(
    session: Session,
    step: Step,
    event_type: EventType,
    data: dict[str, Any],
    *,
    queue: bool = False,
) -> None:
    """Record the step's event; `queue=True` also sends its task when the event is published."""
    events.record(
        session,
        event_type,
        aggregate=events.step_aggregate(step.id),
        data=data,
        correlation_id=step.correlation_id,
        step_id=step.id,
        workflow_id=step.workflow_id,
        machine_id=step.machine_id,
        worker_id=step.worker_id,
        customer_id=step.customer_id,
        dispatch=_queue_spec(session, step) if queue else None,
    )


def _queue_spec(session: Session, step: Step) -> dict[str, Any]:
    """Record the step's route (if new) and say how to send its task."""
    queues.ensure(session, queues.route_of(step))
    return _task_spec(step, step.queued_at)


def _task_spec(step: Any, not_before: datetime | None = None) -> dict[str, Any]:
    """How to send the task of a step (or a row with its columns); the continuation rule
    (see routing) applies to a workflow step that had dependencies."""
    return dispatch.spec(
        step.id,
        step.queue,
        step.priority,
        not_before,
        continuation=bool(step.workflow_id and step.depends_on),
    )


def _transition(
    session: Session,
    step: Step,
    to: StepStatus,
    event_type: EventType,
    data: dict[str, Any],
    *,
    queue: bool = False,
) -> None:
    current = StepStatus(step.status)
    if to not in TRANSITIONS[current]:
        raise InvalidState(f"step {step.id} is {current}; it cannot become {to}")
    step.status = to
    step.updated_at = _now()
    if to != S.ASSIGNED and to != S.RUNNING:
        step.lease_expires_at = None
    _emit(session, step, event_type, data, queue=queue)


def lock(session: Session, step_id: str, *, workflow: bool = True) -> Step | None:
    """The step, row-locked. A workflow's step locks its workflow first: every path
    that changes a workflow and its steps takes the locks in that order."""
    if workflow:
        workflow_id = session.scalar(select(Step.workflow_id).where(Step.id == step_id))
        if workflow_id is not None:
            session.execute(select(Workflow.id).where(Workflow.id == workflow_id).with_for_update())
    return session.get(Step, step_id, with_for_update=True, populate_existing=True)


def _after_finish(session: Session, step: Step) -> None:
    if step.workflow_id is not None:
        from emp_tasks import workflows

        workflows.on_step_finished(session, step)


def _visible(
    session: Session, step_id: str, principal: Principal, *, for_update: bool = False
) -> Step:
    step = lock(session, step_id) if for_update else session.get(Step, step_id)
    if step is None or not principal.may_see(step.customer_id):
        raise NotFound("step", step_id)
    return step


# --- client side ---------------------------------------------------------------------------


def submit(
    spec: StepCreate,
    principal: Principal,
    *,
    correlation_id: str | None = None,
    idempotency_key: str | None = None,
) -> tuple[Step, bool]:
    """Accept a step; return it and whether it was created (False: idempotent replay)."""
    customer_id = principal.customer_for(spec.customer_id)
    webhooks.check_target("webhook_url", spec.webhook_url)

    def create(session: Session) -> tuple[Step, str]:
        step = _new_step(spec, customer_id, correlation_id)
        session.add(step)
        session.flush()
        _emit(
            session,
            step,
            EventType.STEP_SUBMITTED,
            {"service": step.service, "priority": step.priority, "status": step.status},
            queue=True,
        )
        return step, step.id

    return idempotency.create_once(
        customer_id, idempotency_key, "step", lambda session, i: session.get(Step, i), create
    )


def _new_step(spec: StepCreate, customer_id: str, correlation_id: str | None) -> Step:
    now = _now()
    requirements = spec.requirements.model_dump(exclude_none=True)
    return Step(
        id=new_id(),
        customer_id=customer_id,
        service=spec.service,
        queue=routing.route_for(spec.service, requirements, customer_id).queue,
        status=S.PENDING,
        priority=spec.priority,
        payload=spec.payload,
        requirements=requirements,
        max_retries=spec.max_retries,
        timeout_s=float(spec.timeout_s),
        depends_on=[],
        webhook_url=spec.webhook_url,
        webhook_events=spec.webhook_events,
        correlation_id=correlation_id,
        meta=spec.metadata,
        attempts=0,
        progress=0.0,
        created_at=now,
        updated_at=now,
        queued_at=now,
        expires_at=now + timedelta(seconds=spec.expires_in_s) if spec.expires_in_s else None,
    )


def create_for_workflow(session: Session, workflow: Workflow, spec: WorkflowCreate) -> list[Step]:
    """Add a workflow's steps: those without dependencies pending (queued), others waiting."""
    ids = [new_id() for _ in spec.steps]
    created = []
    for index, step_spec in enumerate(spec.steps):
        step = _new_step(step_spec, workflow.customer_id, workflow.correlation_id)
        step.id = ids[index]
        step.workflow_id = workflow.id
        step.step_index = index
        step.priority = spec.step_priority(index)
        step.depends_on = [ids[dependency] for dependency in step_spec.depends_on]
        step.remaining_deps = len(step.depends_on)
        if step.depends_on:
            step.status = S.WAITING
            step.queued_at = None
        created.append(step)
    session.add_all(created)
    session.flush()
    for step in created:
        _emit(
            session,
            step,
            EventType.STEP_SUBMITTED,
            {
                "service": step.service,
                "priority": step.priority,
                "status": step.status,
                "step_index": step.step_index,
            },
            queue=step.status == S.PENDING,
        )
    return created


def release(session: Session, step: Step) -> None:
    """A waiting step's dependencies are all done: queue it (caller holds the locks)."""
    step.queued_at = _now()
    _transition(
        session,
        step,
        S.PENDING,
        EventType.STEP_QUEUED,
        {"status": S.PENDING.value, "reason": "dependencies completed"},
        queue=True,
    )


def skip(session: Session, step: Step, reason: str) -> None:
    """A waiting step will never run: a step it depends on did not complete."""
    step.completed_at = _now()
    step.cancel_reason = reason
    _transition(session, step, S.SKIPPED, EventType.STEP_SKIPPED, {"reason": reason})


def get(step_id: str, principal: Principal) -> Step:
    with db.transaction() as session:
        return _visible(session, step_id, principal)


def history(step_id: str, principal: Principal) -> list[dict[str, Any]]:
    """The step's events, oldest first (the audit trail of its transitions)."""
    with db.transaction() as session:
        _visible(session, step_id, principal)
        return events.for_step(session, step_id)


def attempts(step_id: str, principal: Principal) -> list[dict[str, Any]]:
    """The step's attempts, oldest first: where each ran, how long, and how it ended."""
    with db.transaction() as session:
        _visible(session, step_id, principal)
        rows = session.scalars(
            select(Attempt).where(Attempt.step_id == step_id).order_by(Attempt.attempt)
        )
        return [
            {
                "attempt": row.attempt,
                "worker_id": row.worker_id,
                "machine_id": row.machine_id,
                "outcome": row.outcome,
                "error": row.error,
                "started_at": iso(row.started_at),
                "finished_at": iso(row.finished_at),
            }
            for row in rows
        ]


def _filtered(query, principal: Principal, status, service, workflow_id):
    if not principal.admin:
        query = query.where(Step.customer_id == principal.customer_id)
    if status is not None:
        query = query.where(Step.status == status)
    if service is not None:
        query = query.where(Step.service == service)
    if workflow_id is not None:
        query = query.where(Step.workflow_id == workflow_id)
    return query


def list_steps(
    principal: Principal,
    *,
    status: StepStatus | None = None,
    service: str | None = None,
    workflow_id: str | None = None,
    limit: int = 50,
    cursor: str | None = None,
) -> tuple[list[Step], str | None]:
    """Newest first; `cursor` is the last id of the previous page."""
    query = _filtered(
        select(Step).order_by(Step.id.desc()).limit(limit + 1),
        principal,
        status,
        service,
        workflow_id,
    )
    if cursor is not None:
        query = query.where(Step.id < decode_cursor(cursor))
    with db.transaction() as session:
        rows = list(session.scalars(query))
    page = rows[:limit]
    next_cursor = page[-1].id if len(rows) > limit else None
    return page, next_cursor


def count_steps(
    principal: Principal,
    *,
    status: StepStatus | None = None,
    service: str | None = None,
    workflow_id: str | None = None,
) -> int:
    query = _filtered(
        select(func.count()).select_from(Step), principal, status, service, workflow_id
    )
    with db.transaction() as session:
        return int(session.scalar(query) or 0)


def decode_cursor(cursor: str) -> str:
    import uuid

    try:
        return str(uuid.UUID(cursor))
    except ValueError as exc:
        raise InvalidCursor("cursor is not one this API returned") from exc


TIMEFRAMES = {"hour": timedelta(hours=1), "day": timedelta(days=1), "week": timedelta(weeks=1)}
STAT_BUCKETS = {
    S.WAITING: "pending",
    S.PENDING: "pending",
    S.ASSIGNED: "running",
    S.RUNNING: "running",
    S.COMPLETED: "completed",
    S.FAILED: "failed",
    S.CANCELLED: "cancelled",
    S.SKIPPED: "skipped",
}


def _empty_counts() -> dict[str, int]:
    return {
        "total": 0,
        "pending": 0,
        "running": 0,
        "completed": 0,
        "failed": 0,
        "cancelled": 0,
        "skipped": 0,
    }


def stats(principal: Principal, timeframe: str) -> dict[str, Any]:
    """Counts of steps created within the timeframe, overall and per service."""
    since = _now() - TIMEFRAMES[timeframe]
    query = (
        select(Step.service, Step.status, func.count())
        .where(Step.created_at >= since)
        .group_by(Step.service, Step.status)
    )
    if not principal.admin:
        query = query.where(Step.customer_id == principal.customer_id)
    totals = _empty_counts()
    by_service: dict[str, dict[str, int]] = {}
    with db.transaction() as session:
        for service, status, count in session.execute(query):
            bucket = STAT_BUCKETS[StepStatus(status)]
            service_counts = by_service.setdefault(service, _empty_counts())
            for counts in (totals, service_counts):
                counts["total"] += count
                counts[bucket] += count
    return {**totals, "by_service": by_service}


def cancel(step_id: str, principal: Principal, reason: str | None = None) -> Step:
    """Cancel a step that has not finished; a running one is stopped by its worker."""
    reason = reason or "cancelled by client"
    with db.transaction() as session:
        step = _visible(session, step_id, principal, for_update=True)
        if StepStatus(step.status) not in CANCELLABLE:
            raise InvalidState(f"step {step_id} is {step.status}; only unfinished steps cancel")
        cancel_in_workflow(session, step, reason)
        _after_finish(session, step)
        return step


def cancel_in_workflow(session: Session, step: Step, reason: str) -> None:
    """Cancel an unfinished step (locked by the caller) without advancing its workflow."""
    _finish_attempt(session, step, "cancelled", None)
    step.cancel_reason = reason
    step.completed_at = _now()
    _transition(session, step, S.CANCELLED, EventType.STEP_CANCELLED, {"reason": reason})


def retry(step_id: str, principal: Principal) -> Step:
    """Queue a failed or cancelled step again as a new attempt."""
    with db.transaction() as session:
        step = _visible(session, step_id, principal, for_update=True)
        if StepStatus(step.status) not in RETRYABLE_BY_CLIENT:
            raise InvalidState(f"step {step_id} is {step.status}; only failed or cancelled retry")
        if step.workflow_id is not None:
            raise InvalidState(f"step {step_id} belongs to a workflow; submit the workflow again")
        previous_error = step.error
        step.error = None
        step.result = None
        step.progress = 0.0
        step.stage = step.message = None
        step.completed_at = None
        step.cancel_reason = None
        step.expires_at = None
        step.queued_at = _now()
        # One more attempt on request; automatic retries stay spent.
        step.max_retries = max(step.max_retries, step.attempts)
        _transition(
            session,
            step,
            S.PENDING,
            EventType.STEP_RETRYING,
            {
                "error": previous_error,
                "attempt": step.attempts,
                "retry_at": iso(_now()),
                "manual": True,
            },
            queue=True,
        )
        return step


# --- worker side ---------------------------------------------------------------------------


@dataclass(frozen=True)
class FailureOutcome:
    status: StepStatus | None


class NotServable(Exception):
    """The worker lacks what the step requires; the step's task goes back to its queue."""

    def __init__(self, unmet: list[str], dispatch_spec: dict[str, Any]) -> None:
        super().__init__("; ".join(unmet))
        self.unmet = unmet
        self.dispatch_spec = dispatch_spec


def begin(
    step_id: str, worker_id: str, machine_id: str, caps: Capabilities | None = None
) -> StepRun | None:
    """Take a pending step for this worker as a new attempt and mark it running.

    Returns None if the step is not pending. This database check is what makes a
    cancelled step or a redelivered task harmless: Celery's own revokes and acks
    live in memory and in Redis, which may be lost. Assignment and start are one
    transaction (two events): a worker calls this right before the connector runs.

    With the worker's capabilities, the step's requirements are checked again here
    (routing sends a step only to capable workers; this makes it a guarantee):
    raises NotServable, leaving the step pending, when the worker lacks any.
    """
    with db.transaction() as session:
        # No workflow lock: starting a step changes no workflow counter, and parallel
        # steps of one workflow must not queue behind each other here.
        step = lock(session, step_id, workflow=False)
        if step is None or step.status != S.PENDING:
            logger.info(
                "Step not pending; task dropped",
                extra={
                    "action": "step_assign_skipped",
                    "step_id": step_id,
                    "status": None if step is None else step.status,
                },
            )
            return None
        now = _now()
        if step.expires_at is not None and step.expires_at <= now:
            _expire(session, step)
            return None
        if caps is not None:
            unmet = routing.unmet(caps, queues.route_of(step))
            if unmet:
                raise NotServable(unmet, _task_spec(step))
        step.attempts += 1
        step.worker_id = worker_id
        step.machine_id = machine_id
        step.lease_expires_at = now + timedelta(seconds=get_settings().lease_timeout_s)
        session.add(
            Attempt(
                step_id=step.id,
                attempt=step.attempts,
                worker_id=worker_id,
                machine_id=machine_id,
                outcome="running",
                started_at=now,
            )
        )
        _transition(
            session,
            step,
            S.ASSIGNED,
            EventType.STEP_ASSIGNED,
            {"worker_id": worker_id, "machine_id": machine_id, "attempt": step.attempts},
        )
        step.started_at = now
        _transition(session, step, S.RUNNING, EventType.STEP_STARTED, {"attempt": step.attempts})
        if step.workflow_id is not None:
            from emp_tasks import workflows

            workflows.on_step_started(session, step)
        return StepRun(
            step_id=step.id,
            service=step.service,
            attempt=step.attempts,
            payload=step.payload,
            requirements=step.requirements,
            timeout_s=step.timeout_s,
            customer_id=step.customer_id,
            inputs=_dependency_results(session, step),
            queue_wait_s=(now - step.queued_at).total_seconds() if step.queued_at else None,
        )


def _dependency_results(session: Session, step: Step) -> dict[str, Any]:
    if not step.depends_on:
        return {}
    rows = session.execute(select(Step.step_index, Step.result).where(Step.id.in_(step.depends_on)))
    return {str(index): result for index, result in rows}


def _current(
    session: Session,
    step_id: str,
    attempt: int,
    allowed: frozenset[StepStatus],
    *,
    workflow: bool = True,
) -> Step | None:
    """The step, locked, if `attempt` is still its current attempt in an allowed status."""
    step = lock(session, step_id, workflow=workflow)
    if step is None or step.attempts != attempt or StepStatus(step.status) not in allowed:
        logger.info(
            "Superseded attempt ignored",
            extra={
                "action": "step_attempt_fenced",
                "step_id": step_id,
                "attempt": attempt,
                "status": None if step is None else step.status,
            },
        )
        return None
    return step


def _finish_attempt(
    session: Session, step: Step, outcome: str, error: dict[str, Any] | None
) -> None:
    session.execute(
        update(Attempt)
        .where(
            Attempt.step_id == step.id,
            Attempt.attempt == step.attempts,
            Attempt.finished_at.is_(None),
        )
        .values(outcome=outcome, error=error, finished_at=_now())
    )


def report_progress(
    step_id: str,
    attempt: int,
    progress: float,
    stage: str | None = None,
    message: str | None = None,
) -> bool:
    with db.transaction() as session:
        step = _current(session, step_id, attempt, frozenset({S.RUNNING}), workflow=False)
        if step is None:
            return False
        step.progress = max(0.0, min(100.0, float(progress)))
        step.stage = stage
        step.message = message
        step.updated_at = _now()
        _emit(
            session,
            step,
            EventType.STEP_PROGRESS,
            {"progress": step.progress, "stage": stage, "message": message, "attempt": attempt},
        )
        return True


def complete(step_id: str, attempt: int, result: Any, duration_ms: int) -> bool:
    with db.transaction() as session:
        step = _current(session, step_id, attempt, ACTIVE)
        if step is None:
            return False
        _finish_attempt(session, step, "completed", None)
        step.result = result
        step.error = None
        step.progress = 100.0
        step.completed_at = _now()
        _transition(
            session,
            step,
            S.COMPLETED,
            EventType.STEP_COMPLETED,
            {"result": result, "duration_ms": duration_ms, "attempt": attempt},
        )
        _after_finish(session, step)
        return True


def retry_delay_s(attempt: int) -> float:
    """Exponential backoff with jitter: base * 2^(attempt-1), capped, times 0.5-1.0."""
    settings = get_settings()
    ceiling = min(settings.retry_max_s, settings.retry_base_s * 2 ** max(0, attempt - 1))
    return ceiling * random.uniform(0.5, 1.0)


def fail(step_id: str, attempt: int, error: dict[str, Any]) -> FailureOutcome:
    """Record a failed attempt: back to pending for a retry, or failed for good."""
    with db.transaction() as session:
        step = _current(session, step_id, attempt, ACTIVE)
        if step is None:
            return FailureOutcome(status=None)
        return _fail_attempt(session, step, error)


def _fail_attempt(session: Session, step: Step, error: dict[str, Any]) -> FailureOutcome:
    outcome = "lost" if error.get("code") == WORKER_LOST else "failed"
    _finish_attempt(session, step, outcome, error)
    step.error = error
    if error.get("retryable") and step.attempts <= step.max_retries:
        _queue_retry(session, step, error, _now() + timedelta(seconds=retry_delay_s(step.attempts)))
        return FailureOutcome(status=S.PENDING)
    step.completed_at = _now()
    _transition(
        session,
        step,
        S.FAILED,
        EventType.STEP_FAILED,
        {"error": error, "attempts": step.attempts},
    )
    _after_finish(session, step)
    return FailureOutcome(status=S.FAILED)


def _queue_retry(session: Session, step: Step, error: dict[str, Any], at: datetime) -> None:
    """Back to pending for another attempt, sent to the broker to run from `at`."""
    step.queued_at = at
    _transition(
        session,
        step,
        S.PENDING,
        EventType.STEP_RETRYING,
        {"error": error, "attempt": step.attempts, "retry_at": iso(at)},
        queue=True,
    )


# --- recovery (run by the relay's reconcile loop) ------------------------------------------

WORKER_LOST = "WORKER_LOST"
EXPIRED = "EXPIRED"


def renew_leases(attempts: dict[str, int]) -> int:
    """Extend the leases of these running attempts (step id -> attempt); return how many.

    Rows are locked in id order, as every other multi-step locker does, so renewing
    several leases never deadlocks with, say, a workflow cancel.
    """
    if not attempts:
        return 0
    lease = timedelta(seconds=get_settings().lease_timeout_s)
    with db.transaction() as session:
        held = list(
            session.scalars(
                select(Step.id)
                .where(
                    tuple_(Step.id, Step.attempts).in_(list(attempts.items())),
                    Step.status.in_([S.ASSIGNED, S.RUNNING]),
                )
                .order_by(Step.id)
                .with_for_update()
            )
        )
        if held:
            session.execute(
                update(Step).where(Step.id.in_(held)).values(lease_expires_at=func.now() + lease)
            )
    return len(held)


def expired_leases(limit: int = 100) -> list[tuple[str, int]]:
    """Running attempts whose worker stopped renewing their lease."""
    with db.transaction() as session:
        rows = session.execute(
            select(Step.id, Step.attempts)
            .where(Step.status.in_([S.ASSIGNED, S.RUNNING]), Step.lease_expires_at < func.now())
            .limit(limit)
        ).all()
    return [(row.id, row.attempts) for row in rows]


def lose(step_id: str, attempt: int) -> FailureOutcome:
    """The attempt's lease ran out: fail the attempt as lost, and retry the step."""
    with db.transaction() as session:
        step = _current(session, step_id, attempt, ACTIVE)
        if step is None or (step.lease_expires_at and step.lease_expires_at > _now()):
            return FailureOutcome(status=None)
        return lose_with_worker(session, step, "stopped renewing its lease")


def lose_with_worker(session: Session, step: Step, why: str = "went offline") -> FailureOutcome:
    """The step's worker is gone (the caller holds the step's locks): lost, retried."""
    logger.warning(
        "Attempt lost with its worker; step re-queued",
        extra={
            "action": "step_attempt_lost",
            "step_id": step.id,
            "attempt": step.attempts,
            "worker_id": step.worker_id,
        },
    )
    error = {
        "code": WORKER_LOST,
        "message": f"worker {step.worker_id} {why}",
        "type": "system",
        "retryable": True,
    }
    return _fail_attempt(session, step, error)


def requeue(session: Session, step: Step, code: str, message: str) -> None:
    """Give a running step back to its queue at once (caller holds the locks).

    For operator actions and restarts, not failures: the ended attempt is
    recorded as `requeued` and does not spend one of the step's retries.
    """
    error = {"code": code, "message": message, "type": "system", "retryable": True}
    _finish_attempt(session, step, "requeued", error)
    step.max_retries += 1
    _queue_retry(session, step, error, _now())


def overdue(limit: int = 100) -> list[str]:
    """Pending steps whose queue deadline (`expires_in_s`) has passed."""
    with db.transaction() as session:
        return list(
            session.scalars(
                select(Step.id)
                .where(Step.status == S.PENDING, Step.expires_at <= func.now())
                .limit(limit)
            )
        )


def expire(step_id: str) -> bool:
    """Fail a pending step whose queue deadline passed; it never starts."""
    with db.transaction() as session:
        step = lock(session, step_id)
        if step is None or step.status != S.PENDING or step.expires_at is None:
            return False
        if step.expires_at > _now():
            return False
        _expire(session, step)
        return True


def _expire(session: Session, step: Step) -> None:
    step.error = {
        "code": EXPIRED,
        "message": "the step did not start before its queue deadline (expires_in_s)",
        "type": "timeout",
        "retryable": False,
    }
    step.completed_at = _now()
    _transition(
        session,
        step,
        S.FAILED,
        EventType.STEP_FAILED,
        {"error": step.error, "attempts": step.attempts},
    )
    _after_finish(session, step)


def redispatch_pending() -> int:
    """Send the task of every pending step again (after the broker lost its queues).

    A step whose task survived runs once anyway: `begin` drops the duplicate.
    """
    sent = 0
    with db.transaction() as session:
        rows = session.execute(
            select(
                Step.id,
                Step.queue,
                Step.priority,
                Step.queued_at,
                Step.workflow_id,
                Step.depends_on,
            )
            .where(Step.status == S.PENDING)
            .order_by(Step.id)
        ).all()
    for row in rows:
        dispatch.send(_task_spec(row, row.queued_at))
        sent += 1
    return sent


def send_again(step_id: str) -> bool:
    """Send a pending step's task once more (a worker handed it back); False if not pending."""
    with db.transaction() as session:
        step = session.get(Step, step_id)
        if step is None or step.status != S.PENDING:
            return False
        spec = _task_spec(step)
    dispatch.send(spec)
    return True


def should_stop(step_id: str, attempt: int) -> bool:
    """True once `attempt` is no longer the step's running attempt (cancelled or superseded)."""
    with db.transaction() as session:
        row = session.execute(
            select(Step.status, Step.attempts).where(Step.id == step_id)
        ).one_or_none()
    return row is None or row.attempts != attempt or StepStatus(row.status) not in ACTIVE
