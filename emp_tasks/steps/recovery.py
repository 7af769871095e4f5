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
from typing import Any

from emp_tasks import metrics
from emp_tasks.core.errors import StepError
from emp_tasks.core.status import ACTIVE_STEP_STATUSES, StepStatus
from emp_tasks.core.times import now
from emp_tasks.steps import attempts, transitions
from emp_tasks.store import db, dispatch
from emp_tasks.store.db import Tx

logger = logging.getLogger(__name__)

S = StepStatus
_ACTIVE = [status.value for status in ACTIVE_STEP_STATUSES]


def expired_leases(limit: int = 100) -> list[tuple[str, int]]:
    """Running attempts whose worker stopped renewing their lease."""
    with db.tx() as tx:
        rows = tx.all(
            "SELECT id, attempts FROM steps WHERE status = ANY(%s) AND lease_expires_at < now()"
            " LIMIT %s",
            [_ACTIVE, limit],
        )
    return [(row.id, row.attempts) for row in rows]


def lose(step_id: str, attempt: int) -> attempts.FailureOutcome:
    """The attempt's lease ran out: fail the attempt as lost, and retry the step."""
    with db.tx() as tx:
        step = attempts.lock_current(tx, step_id, attempt, ACTIVE_STEP_STATUSES)
        if step is None or (step.lease_expires_at and step.lease_expires_at > now()):
            return attempts.FailureOutcome(status=None)
        return lose_with_worker(tx, step, "stopped renewing its lease")


def lose_with_worker(tx: Tx, step: Any, why: str = "went offline") -> attempts.FailureOutcome:
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
    metrics.recovered(lost=1)
    error = StepError(
        code=attempts.WORKER_LOST,
        message=f"worker {step.worker_id} {why}",
        type="system",
        retryable=True,
    )
    return attempts.fail_current(tx, step, error)


def requeue(tx: Tx, step: Any, code: str, message: str) -> None:
    """Give a running step back to its queue at once (caller holds the locks).

    For operator actions and restarts, not failures: the ended attempt is
    recorded as `requeued` and does not spend one of the step's retries.
    """
    error = StepError(code=code, message=message, type="system", retryable=True)
    metrics.recovered(requeued=1)
    transitions.finish_attempts(tx, [(step.id, step.attempts)], "requeued", error)
    transitions.queue_retry(tx, step, error, now(), max_retries=step.max_retries + 1)


def active_of_workers(tx: Tx, worker_ids: list[str]) -> list[Any]:
    """The steps these workers run, each locked (its workflow's first), in id order."""
    if not worker_ids:
        return []
    rows = tx.all(
        "SELECT id FROM steps WHERE worker_id = ANY(%s) AND status = ANY(%s) ORDER BY id",
        [worker_ids, _ACTIVE],
    )
    locked = (transitions.lock(tx, row.id) for row in rows)
    return [step for step in locked if step is not None and step.status in ACTIVE_STEP_STATUSES]


def overdue(limit: int = 100) -> list[str]:
    """Pending steps whose queue deadline (`expires_in_s`) has passed."""
    with db.tx() as tx:
        rows = tx.all(
            "SELECT id FROM steps WHERE status = %s AND expires_at <= now() LIMIT %s",
            [S.PENDING.value, limit],
        )
    return [row.id for row in rows]


def expire(step_id: str) -> bool:
    """Fail a pending step whose queue deadline passed; it never starts."""
    return attempts.expire(step_id)


def redispatch_pending() -> int:
    """Send the task of every pending step again (after the broker lost its queues).

    A step whose task survived runs once anyway: `attempts.begin` drops the duplicate.
    """
    with db.tx() as tx:
        rows = tx.all(
            "SELECT id, queue, priority, queued_at, workflow_id, depends_on, service, customer_id"
            " FROM steps"
            " WHERE status = %s ORDER BY id",
            [S.PENDING.value],
        )
    for start in range(0, len(rows), 500):
        dispatch.send_many(
            [transitions.task_spec(row, row.queued_at) for row in rows[start : start + 500]]
        )
    return len(rows)
