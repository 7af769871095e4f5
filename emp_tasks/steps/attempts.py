"""Worker commands: what a worker reports about the attempt it runs — begin it (assigned
and started), report progress, complete or fail it, hand its task back, keep its
lease, and ask whether it should stop.

Every report is fenced by the attempt number: a call for an attempt that is no
longer the step's current one changes nothing, so a superseded worker's late
result or progress is ignored. A step that finishes advances its workflow
(emp_tasks.steps.workflows); the state changes go through
emp_tasks.steps.transitions.

Named `attempts`, not `worker`: `emp_tasks.worker` is the process package that
calls these commands, and `steps.worker` beside it would read as part of it.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import func, select, tuple_, update
from sqlalchemy.orm import Session

from emp_tasks.connectors.base import StepRun
from emp_tasks.core.config import get_settings
from emp_tasks.core.dispatch_instruction import DispatchInstruction
from emp_tasks.core.errors import StepError
from emp_tasks.core.events import EventType
from emp_tasks.core.status import ACTIVE_STEP_STATUSES, StepStatus
from emp_tasks.core.times import now
from emp_tasks.routes import queues, routing
from emp_tasks.routes.capabilities import Capabilities
from emp_tasks.steps import transitions, workflows
from emp_tasks.store import db, dispatch
from emp_tasks.store.models import Attempt, Step

logger = logging.getLogger(__name__)

S = StepStatus

# The code of an attempt lost with its worker (emp_tasks.steps.recovery); its attempt
# is recorded as `lost` rather than `failed`.
WORKER_LOST = "WORKER_LOST"


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
        started = now()
        if step.expires_at is not None and step.expires_at <= started:
            transitions.expire(session, step)
            workflows.on_step_finished(session, step)
            return None
        if caps is not None:
            unmet = routing.unmet(caps, queues.route_of(step))
            if unmet:
                raise NotServable(unmet, transitions.task_spec(step))
        step.attempts += 1
        step.worker_id = worker_id
        step.machine_id = machine_id
        step.lease_expires_at = started + timedelta(seconds=get_settings().lease_timeout_s)
        session.add(
            Attempt(
                step_id=step.id,
                attempt=step.attempts,
                worker_id=worker_id,
                machine_id=machine_id,
                outcome="running",
                started_at=started,
            )
        )
        transitions.apply(
            session,
            step,
            S.ASSIGNED,
            EventType.STEP_ASSIGNED,
            {"worker_id": worker_id, "machine_id": machine_id, "attempt": step.attempts},
        )
        step.started_at = started
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
            queue_wait_s=(started - step.queued_at).total_seconds() if step.queued_at else None,
        )


def _dependency_results(session: Session, step: Step) -> dict[str, Any]:
    if not step.depends_on:
        return {}
    rows = session.execute(select(Step.step_index, Step.result).where(Step.id.in_(step.depends_on)))
    return {str(index): result for index, result in rows}


def lock_current(
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
        step = lock_current(session, step_id, attempt, frozenset({S.RUNNING}), workflow=False)
        if step is None:
            return False
        step.progress = max(0.0, min(100.0, float(progress)))
        step.stage = stage
        step.message = message
        step.updated_at = now()
        transitions.emit(
            session,
            step,
            EventType.STEP_PROGRESS,
            {"progress": step.progress, "stage": stage, "message": message, "attempt": attempt},
        )
        return True


def complete(step_id: str, attempt: int, result: Any, duration_ms: int) -> bool:
    with db.transaction() as session:
        step = lock_current(session, step_id, attempt, ACTIVE_STEP_STATUSES)
        if step is None:
            return False
        transitions.finish_attempt(session, step, "completed", None)
        step.result = result
        step.error = None
        step.progress = 100.0
        step.completed_at = now()
        transitions.apply(
            session,
            step,
            S.COMPLETED,
            EventType.STEP_COMPLETED,
            {"result": result, "duration_ms": duration_ms, "attempt": attempt},
        )
        workflows.on_step_finished(session, step)
        return True


def retry_delay_s(attempt: int) -> float:
    """Exponential backoff with jitter: base * 2^(attempt-1), capped, times 0.5-1.0."""
    settings = get_settings()
    ceiling = min(settings.retry_max_s, settings.retry_base_s * 2 ** max(0, attempt - 1))
    return ceiling * random.uniform(0.5, 1.0)


def fail(step_id: str, attempt: int, error: StepError) -> FailureOutcome:
    """Record a failed attempt: back to pending for a retry, or failed for good."""
    with db.transaction() as session:
        step = lock_current(session, step_id, attempt, ACTIVE_STEP_STATUSES)
        if step is None:
            return FailureOutcome(status=None)
        return fail_current(session, step, error)


def fail_current(session: Session, step: Step, error: StepError) -> FailureOutcome:
    """Fail the step's current attempt (the caller holds the step's locks): retried
    after a backoff while retries remain and the error is retryable, else failed."""
    outcome = "lost" if error.code == WORKER_LOST else "failed"
    transitions.finish_attempt(session, step, outcome, error)
    step.error = error.to_json()
    if error.retryable and step.attempts <= step.max_retries:
        transitions.queue_retry(
            session, step, error, now() + timedelta(seconds=retry_delay_s(step.attempts))
        )
        return FailureOutcome(status=S.PENDING)
    step.completed_at = now()
    transitions.apply(
        session,
        step,
        S.FAILED,
        EventType.STEP_FAILED,
        {"error": error.to_json(), "attempts": step.attempts},
    )
    workflows.on_step_finished(session, step)
    return FailureOutcome(status=S.FAILED)


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
