"""Recovery commands: what the relay's reconcile loop and the fleet registry do to steps
no worker will report on — fail attempts whose lease ran out or whose worker went
offline, give running steps back to their queue (worker restarted, machine removed),
expire steps past their queue deadline, and send every pending step's task again
after the broker lost its data.

A lost attempt fails as a worker's failure would (emp_tasks.steps.attempts), with
the code WORKER_LOST, so it is retried while retries remain.
"""

from __future__ import annotations

import logging

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from emp_tasks.core.errors import StepError
from emp_tasks.core.status import ACTIVE_STEP_STATUSES, StepStatus
from emp_tasks.core.times import now
from emp_tasks.steps import attempts, transitions, workflows
from emp_tasks.store import db, dispatch
from emp_tasks.store.models import Step

logger = logging.getLogger(__name__)

S = StepStatus


def expired_leases(limit: int = 100) -> list[tuple[str, int]]:
    """Running attempts whose worker stopped renewing their lease."""
    with db.transaction() as session:
        rows = session.execute(
            select(Step.id, Step.attempts)
            .where(Step.status.in_(ACTIVE_STEP_STATUSES), Step.lease_expires_at < func.now())
            .limit(limit)
        ).all()
    return [(row.id, row.attempts) for row in rows]


def lose(step_id: str, attempt: int) -> attempts.FailureOutcome:
    """The attempt's lease ran out: fail the attempt as lost, and retry the step."""
    with db.transaction() as session:
        step = attempts.lock_current(session, step_id, attempt, ACTIVE_STEP_STATUSES)
        if step is None or (step.lease_expires_at and step.lease_expires_at > now()):
            return attempts.FailureOutcome(status=None)
        return lose_with_worker(session, step, "stopped renewing its lease")


def lose_with_worker(
    session: Session, step: Step, why: str = "went offline"
) -> attempts.FailureOutcome:
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
        code=attempts.WORKER_LOST,
        message=f"worker {step.worker_id} {why}",
        type="system",
        retryable=True,
    )
    return attempts.fail_current(session, step, error)


def requeue(session: Session, step: Step, code: str, message: str) -> None:
    """Give a running step back to its queue at once (caller holds the locks).

    For operator actions and restarts, not failures: the ended attempt is
    recorded as `requeued` and does not spend one of the step's retries.
    """
    error = StepError(code=code, message=message, type="system", retryable=True)
    transitions.finish_attempt(session, step, "requeued", error)
    step.max_retries += 1
    transitions.queue_retry(session, step, error, now())


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
        if step.expires_at > now():
            return False
        transitions.expire(session, step)
        workflows.on_step_finished(session, step)
        return True


def redispatch_pending() -> int:
    """Send the task of every pending step again (after the broker lost its queues).

    A step whose task survived runs once anyway: `attempts.begin` drops the duplicate.
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
