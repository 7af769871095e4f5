"""Step transitions: the one place a step's status changes, with its event, in one transaction.

`apply` checks the transition table (emp_tasks.core.status), updates the row and
records the event in the caller's transaction; `emit` records an event that
keeps the status (progress). The transitions a workflow drives (`release`,
`skip`, `cancel`) are here too, shared by the step commands (`client`, `attempts`,
`recovery` in emp_tasks.steps) and the workflow DAG (emp_tasks.steps.workflows).

This layer knows nothing of workflows: a transition never advances one. The
commands call `workflows` after a step finishes, and `workflows` calls these
transitions, so the two only ever call downwards.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from emp_tasks.core import events
from emp_tasks.core.dispatch_instruction import DispatchInstruction
from emp_tasks.core.errors import InvalidState, StepError
from emp_tasks.core.events import EventType
from emp_tasks.core.ids import new_id
from emp_tasks.core.status import ACTIVE_STEP_STATUSES, StepStatus, step_may_become
from emp_tasks.core.times import iso, now
from emp_tasks.routes import queues, routing
from emp_tasks.specs import StepCreate
from emp_tasks.store import outbox
from emp_tasks.store.models import Attempt, Step, Workflow

S = StepStatus

EXPIRED = "EXPIRED"


def emit(
    session: Session,
    step: Step,
    event_type: EventType,
    data: dict[str, Any],
    *,
    queue: bool = False,
) -> None:
    """Record the step's event; `queue=True` also sends its task when the event is published."""
    outbox.record(
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


def _queue_spec(session: Session, step: Step) -> DispatchInstruction:
    """Record the step's route (if new) and say how to send its task."""
    queues.ensure(session, queues.route_of(step))
    return task_spec(step, step.queued_at)


def task_spec(step: Any, not_before: datetime | None = None) -> DispatchInstruction:
    """How to send the task of a step (or a row with its columns); the continuation rule
    (see emp_tasks.core.priority) applies to a workflow step that had dependencies."""
    return DispatchInstruction.for_step(
        step.id,
        step.queue,
        step.priority,
        not_before,
        continuation=bool(step.workflow_id and step.depends_on),
    )


def apply(
    session: Session,
    step: Step,
    to: StepStatus,
    event_type: EventType,
    data: dict[str, Any],
    *,
    queue: bool = False,
) -> None:
    """Move the step (locked by the caller) to `to` and record the event, or raise
    InvalidState if the transition table does not allow it."""
    current = StepStatus(step.status)
    if not step_may_become(current, to):
        raise InvalidState(f"step {step.id} is {current}; it cannot become {to}")
    step.status = to
    step.updated_at = now()
    if to not in ACTIVE_STEP_STATUSES:
        step.lease_expires_at = None
    emit(session, step, event_type, data, queue=queue)


def lock(session: Session, step_id: str, *, workflow: bool = True) -> Step | None:
    """The step, row-locked. A workflow's step locks its workflow first: every path
    that changes a workflow and its steps takes the locks in that order."""
    if workflow:
        workflow_id = session.scalar(select(Step.workflow_id).where(Step.id == step_id))
        if workflow_id is not None:
            session.execute(select(Workflow.id).where(Workflow.id == workflow_id).with_for_update())
    return session.get(Step, step_id, with_for_update=True, populate_existing=True)


# --- entering the lifecycle ----------------------------------------------------------------


def new_step(spec: StepCreate, customer_id: str, correlation_id: str | None) -> Step:
    """A new pending step's row (not yet added to a session)."""
    created = now()
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
        created_at=created,
        updated_at=created,
        queued_at=created,
        expires_at=created + timedelta(seconds=spec.expires_in_s) if spec.expires_in_s else None,
    )


def submitted(session: Session, step: Step) -> None:
    """Record a new (flushed) step's `step_submitted`; a pending one's task is sent with it."""
    data: dict[str, Any] = {
        "service": step.service,
        "priority": step.priority,
        "status": step.status,
    }
    if step.workflow_id is not None:
        data["step_index"] = step.step_index
    emit(session, step, EventType.STEP_SUBMITTED, data, queue=step.status == S.PENDING)


# --- transitions (the caller holds the step's locks) --------------------------------------


def finish_attempt(session: Session, step: Step, outcome: str, error: StepError | None) -> None:
    """Close the step's current attempt in the audit trail."""
    session.execute(
        update(Attempt)
        .where(
            Attempt.step_id == step.id,
            Attempt.attempt == step.attempts,
            Attempt.finished_at.is_(None),
        )
        .values(outcome=outcome, error=error.to_json() if error else None, finished_at=now())
    )


def release(session: Session, step: Step) -> None:
    """A waiting step's dependencies are all done: queue it."""
    step.queued_at = now()
    apply(
        session,
        step,
        S.PENDING,
        EventType.STEP_QUEUED,
        {"status": S.PENDING.value, "reason": "dependencies completed"},
        queue=True,
    )


def skip(session: Session, step: Step, reason: str) -> None:
    """A waiting step will never run: a step it depends on did not complete."""
    step.completed_at = now()
    step.cancel_reason = reason
    apply(session, step, S.SKIPPED, EventType.STEP_SKIPPED, {"reason": reason})


def cancel(session: Session, step: Step, reason: str) -> None:
    """Cancel an unfinished step. Its workflow is not advanced here (see steps.client.cancel)."""
    finish_attempt(session, step, "cancelled", None)
    step.cancel_reason = reason
    step.completed_at = now()
    apply(session, step, S.CANCELLED, EventType.STEP_CANCELLED, {"reason": reason})


def expire(session: Session, step: Step) -> None:
    """Fail a pending step whose queue deadline passed; it never starts. Its workflow
    is not advanced here (see steps.recovery.expire and steps.attempts.begin)."""
    step.error = StepError(
        code=EXPIRED,
        message="the step did not start before its queue deadline (expires_in_s)",
        type="timeout",
        retryable=False,
    ).to_json()
    step.completed_at = now()
    apply(
        session,
        step,
        S.FAILED,
        EventType.STEP_FAILED,
        {"error": step.error, "attempts": step.attempts},
    )


def queue_retry(session: Session, step: Step, error: StepError, at: datetime) -> None:
    """Back to pending for another attempt, sent to the broker to run from `at`."""
    step.queued_at = at
    apply(
        session,
        step,
        S.PENDING,
        EventType.STEP_RETRYING,
        {"error": error.to_json(), "attempt": step.attempts, "retry_at": iso(at)},
        queue=True,
    )
