"""The step lifecycle's commands: what clients, workers and the recovery loop ask of a step.

Each command changes the step through emp_tasks.steps.transitions (the transition
table is emp_tasks.core.status), and a command that finishes a workflow's step then
advances its workflow (emp_tasks.steps.workflows). Worker-side changes are fenced by
the attempt number: a call for an attempt that is no longer the step's current
one changes nothing, so a superseded worker's late result or progress is ignored.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import func, select, tuple_, update
from sqlalchemy.orm import Session

from emp_tasks.auth import Principal
from emp_tasks.connectors.base import StepRun
from emp_tasks.core.config import get_settings
from emp_tasks.core.dispatch_instruction import DispatchInstruction
from emp_tasks.core.errors import InvalidState, NotFound, StepError
from emp_tasks.core.events import EventType
from emp_tasks.core.ids import decode_cursor
from emp_tasks.core.status import (
    ACTIVE_STEP_STATUSES,
    CLIENT_RETRYABLE_STEP_STATUSES,
    UNFINISHED_STEP_STATUSES,
    StepStatus,
)
from emp_tasks.core.times import TIMEFRAMES, iso
from emp_tasks.routes import queues, routing
from emp_tasks.routes.capabilities import Capabilities
from emp_tasks.specs import StepCreate
from emp_tasks.steps import transitions, workflows
from emp_tasks.store import db, dispatch, idempotency, outbox
from emp_tasks.store.models import Attempt, Step
from emp_tasks.webhooks import endpoints as webhooks

logger = logging.getLogger(__name__)

S = StepStatus


def _now() -> datetime:
    return datetime.now(UTC)


def _after_finish(session: Session, step: Step) -> None:
    if step.workflow_id is not None:
        workflows.on_step_finished(session, step)


def _visible(
    session: Session, step_id: str, principal: Principal, *, for_update: bool = False
) -> Step:
    step = transitions.lock(session, step_id) if for_update else session.get(Step, step_id)
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
        step = transitions.new_step(spec, customer_id, correlation_id)
        session.add(step)
        session.flush()
        transitions.submitted(session, step)
        return step, step.id

    return idempotency.create_once(
        customer_id, idempotency_key, "step", lambda session, i: session.get(Step, i), create
    )


def get(step_id: str, principal: Principal) -> Step:
    with db.transaction() as session:
        return _visible(session, step_id, principal)


def history(step_id: str, principal: Principal) -> list[dict[str, Any]]:
    """The step's events, oldest first (the audit trail of its transitions)."""
    with db.transaction() as session:
        _visible(session, step_id, principal)
        return outbox.for_step(session, step_id)


def attempts(step_id: str, principal: Principal) -> list[Attempt]:
    """The step's attempts, oldest first: where each ran, how long, and how it ended."""
    with db.transaction() as session:
        _visible(session, step_id, principal)
        return list(
            session.scalars(
                select(Attempt).where(Attempt.step_id == step_id).order_by(Attempt.attempt)
            )
        )


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
        if StepStatus(step.status) not in UNFINISHED_STEP_STATUSES:
            raise InvalidState(f"step {step_id} is {step.status}; only unfinished steps cancel")
        transitions.cancel(session, step, reason)
        _after_finish(session, step)
        return step


def retry(step_id: str, principal: Principal) -> Step:
    """Queue a failed or cancelled step again as a new attempt."""
    with db.transaction() as session:
        step = _visible(session, step_id, principal, for_update=True)
        if StepStatus(step.status) not in CLIENT_RETRYABLE_STEP_STATUSES:
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
        transitions.apply(
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

    def __init__(self, unmet: list[str], dispatch_spec: DispatchInstruction) -> None:
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
        step = transitions.lock(session, step_id, workflow=False)
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
                raise NotServable(unmet, transitions.task_spec(step))
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
        transitions.apply(
            session,
            step,
            S.ASSIGNED,
            EventType.STEP_ASSIGNED,
            {"worker_id": worker_id, "machine_id": machine_id, "attempt": step.attempts},
        )
        step.started_at = now
        transitions.apply(
            session, step, S.RUNNING, EventType.STEP_STARTED, {"attempt": step.attempts}
        )
        if step.workflow_id is not None:
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
    step = transitions.lock(session, step_id, workflow=workflow)
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
        transitions.emit(
            session,
            step,
            EventType.STEP_PROGRESS,
            {"progress": step.progress, "stage": stage, "message": message, "attempt": attempt},
        )
        return True


def complete(step_id: str, attempt: int, result: Any, duration_ms: int) -> bool:
    with db.transaction() as session:
        step = _current(session, step_id, attempt, ACTIVE_STEP_STATUSES)
        if step is None:
            return False
        transitions.finish_attempt(session, step, "completed", None)
        step.result = result
        step.error = None
        step.progress = 100.0
        step.completed_at = _now()
        transitions.apply(
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


def fail(step_id: str, attempt: int, error: StepError) -> FailureOutcome:
    """Record a failed attempt: back to pending for a retry, or failed for good."""
    with db.transaction() as session:
        step = _current(session, step_id, attempt, ACTIVE_STEP_STATUSES)
        if step is None:
            return FailureOutcome(status=None)
        return _fail_attempt(session, step, error)


def _fail_attempt(session: Session, step: Step, error: StepError) -> FailureOutcome:
    outcome = "lost" if error.code == WORKER_LOST else "failed"
    transitions.finish_attempt(session, step, outcome, error)
    step.error = error.to_json()
    if error.retryable and step.attempts <= step.max_retries:
        transitions.queue_retry(
            session, step, error, _now() + timedelta(seconds=retry_delay_s(step.attempts))
        )
        return FailureOutcome(status=S.PENDING)
    step.completed_at = _now()
    transitions.apply(
        session,
        step,
        S.FAILED,
        EventType.STEP_FAILED,
        {"error": error.to_json(), "attempts": step.attempts},
    )
    _after_finish(session, step)
    return FailureOutcome(status=S.FAILED)


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
                    Step.status.in_(ACTIVE_STEP_STATUSES),
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
            .where(Step.status.in_(ACTIVE_STEP_STATUSES), Step.lease_expires_at < func.now())
            .limit(limit)
        ).all()
    return [(row.id, row.attempts) for row in rows]


def lose(step_id: str, attempt: int) -> FailureOutcome:
    """The attempt's lease ran out: fail the attempt as lost, and retry the step."""
    with db.transaction() as session:
        step = _current(session, step_id, attempt, ACTIVE_STEP_STATUSES)
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
    error = StepError(
        code=WORKER_LOST,
        message=f"worker {step.worker_id} {why}",
        type="system",
        retryable=True,
    )
    return _fail_attempt(session, step, error)


def requeue(session: Session, step: Step, code: str, message: str) -> None:
    """Give a running step back to its queue at once (caller holds the locks).

    For operator actions and restarts, not failures: the ended attempt is
    recorded as `requeued` and does not spend one of the step's retries.
    """
    error = StepError(code=code, message=message, type="system", retryable=True)
    transitions.finish_attempt(session, step, "requeued", error)
    step.max_retries += 1
    transitions.queue_retry(session, step, error, _now())


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
        step = transitions.lock(session, step_id)
        if step is None or step.status != S.PENDING or step.expires_at is None:
            return False
        if step.expires_at > _now():
            return False
        _expire(session, step)
        return True


def _expire(session: Session, step: Step) -> None:
    step.error = StepError(
        code=EXPIRED,
        message="the step did not start before its queue deadline (expires_in_s)",
        type="timeout",
        retryable=False,
    ).to_json()
    step.completed_at = _now()
    transitions.apply(
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
        dispatch.send(transitions.task_spec(row, row.queued_at))
        sent += 1
    return sent


def send_again(step_id: str) -> bool:
    """Send a pending step's task once more (a worker handed it back); False if not pending."""
    with db.transaction() as session:
        step = session.get(Step, step_id)
        if step is None or step.status != S.PENDING:
            return False
        spec = transitions.task_spec(step)
    dispatch.send(spec)
    return True


def should_stop(step_id: str, attempt: int) -> bool:
    """True once `attempt` is no longer the step's running attempt (cancelled or superseded)."""
    with db.transaction() as session:
        row = session.execute(
            select(Step.status, Step.attempts).where(Step.id == step_id)
        ).one_or_none()
    return (
        row is None or row.attempts != attempt or StepStatus(row.status) not in ACTIVE_STEP_STATUSES
    )
