"""Client commands: what a client asks of a step — submit it (idempotently), cancel it,
or retry it once it failed or was cancelled.

Each command changes the step through emp_tasks.steps.transitions, sees only the
steps the caller may see (emp_tasks.steps.queries.visible), and a cancelled
workflow step advances its workflow (emp_tasks.steps.workflows).
"""

from __future__ import annotations

from sqlalchemy.orm import Session

from emp_tasks.auth import Principal
from emp_tasks.core.errors import InvalidState
from emp_tasks.core.events import EventType
from emp_tasks.core.status import (
    CLIENT_RETRYABLE_STEP_STATUSES,
    UNFINISHED_STEP_STATUSES,
    StepStatus,
)
from emp_tasks.core.times import iso, now
from emp_tasks.specs import StepCreate
from emp_tasks.steps import queries, transitions, workflows
from emp_tasks.store import db, idempotency
from emp_tasks.store.models import Step
from emp_tasks.webhooks import endpoints as webhooks

S = StepStatus


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


def cancel(step_id: str, principal: Principal, reason: str | None = None) -> Step:
    """Cancel a step that has not finished; a running one is stopped by its worker."""
    reason = reason or "cancelled by client"
    with db.transaction() as session:
        step = queries.visible(session, step_id, principal, for_update=True)
        if StepStatus(step.status) not in UNFINISHED_STEP_STATUSES:
            raise InvalidState(f"step {step_id} is {step.status}; only unfinished steps cancel")
        transitions.cancel(session, step, reason)
        workflows.on_step_finished(session, step)
        return step


def retry(step_id: str, principal: Principal) -> Step:
    """Queue a failed or cancelled step again as a new attempt."""
    with db.transaction() as session:
        step = queries.visible(session, step_id, principal, for_update=True)
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
        step.queued_at = now()
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
                "retry_at": iso(now()),
                "manual": True,
            },
            queue=True,
        )
        return step
