"""Client commands: what a client asks of a step — submit it (idempotently), cancel it,
or retry it once it failed or was cancelled.

A submit without an Idempotency-Key to a route this process has recorded is one
statement in autocommit (emp_tasks.steps.transitions.insert_at_once, its position read
in the same statement by emp_tasks.steps.queue_order.counted_before); the others are a
transaction (the key claimed, the route recorded, a warm worker chosen).

Each command changes the step through emp_tasks.steps.transitions, sees only the
steps the caller may see (emp_tasks.steps.queries.visible), and a cancelled
workflow step advances its workflow (emp_tasks.steps.workflows).
"""

from __future__ import annotations

from typing import Any

from emp_tasks.auth import Principal
from emp_tasks.core.errors import InvalidState, NotFound
from emp_tasks.core.events import EventType
from emp_tasks.core.status import (
    CLIENT_RETRYABLE_STEP_STATUSES,
    UNFINISHED_STEP_STATUSES,
    StepStatus,
)
from emp_tasks.core.times import iso, now
from emp_tasks.specs import StepCreate
from emp_tasks.steps import queries, queue_order, transitions, workflows
from emp_tasks.store import db, idempotency
from emp_tasks.store.db import Tx
from emp_tasks.webhooks import endpoints as webhooks

S = StepStatus


def submit(
    spec: StepCreate,
    principal: Principal,
    *,
    correlation_id: str | None = None,
    idempotency_key: str | None = None,
) -> tuple[Any, bool]:
    """Accept a step; return its row and whether it was created (False: idempotent replay)."""
    step, created, _ = _submit(spec, principal, correlation_id, idempotency_key, placed=False)
    return step, created


def submit_placed(
    spec: StepCreate,
    principal: Principal,
    *,
    correlation_id: str | None = None,
    idempotency_key: str | None = None,
) -> tuple[Any, bool, dict[str, int | None]]:
    """As `submit`, plus the step's place in its queue (emp_tasks.steps.queue_order),
    read in the same transaction: no second transaction per submit."""
    step, created, place = _submit(spec, principal, correlation_id, idempotency_key, placed=True)
    assert place is not None
    return step, created, place


def _submit(
    spec: StepCreate,
    principal: Principal,
    correlation_id: str | None,
    idempotency_key: str | None,
    *,
    placed: bool,
) -> tuple[Any, bool, dict[str, int | None] | None]:
    customer_id = principal.customer_for(spec.customer_id)
    webhooks.check_target("webhook_url", spec.webhook_url)
    values = transitions.new_step(spec, customer_id, correlation_id)
    if idempotency_key is None and transitions.inserts_at_once(values):
        # The usual submit: one statement, the whole transaction (its position read in it).
        with db.tx(single=True) as tx:
            joined = queue_order.counted_before if placed else None
            step = transitions.insert_at_once(tx, values, joined)
        return step, True, queue_order.position_of_new(step) if placed else None

    def place(tx: Tx, step: Any) -> tuple[Any, dict[str, int | None] | None]:
        return step, queue_order.position(step, tx) if placed else None

    def create(tx: Tx) -> tuple[tuple[Any, dict[str, int | None] | None], str]:
        step = transitions.insert(tx, [values])[0]
        return place(tx, step), step.id

    (step, where), created = idempotency.create_once(
        customer_id,
        idempotency_key,
        "step",
        lambda tx, step_id: place(tx, transitions.read(tx, step_id)),
        create,
    )
    return step, created, where


def cancel(step_id: str, principal: Principal, reason: str | None = None) -> Any:
    """Cancel a step that has not finished; a running one is stopped by its worker."""
    reason = reason or "cancelled by client"
    with db.tx() as tx:
        step = queries.visible(tx, step_id, principal, for_update=True)
        if StepStatus(step.status) not in UNFINISHED_STEP_STATUSES:
            raise InvalidState(f"step {step_id} is {step.status}; only unfinished steps cancel")
        cancelled = transitions.cancel(tx, [step.id], reason)[0]
        workflows.on_step_finished(tx, cancelled)
        return cancelled


PURGE_BATCH = 500


def purge_queue(queue: str, reason: str | None = None) -> int:
    """Cancel every pending step of `queue` (an operator's purge), in batches of
    PURGE_BATCH, each step with its `step_cancelled`; a workflow step's workflow follows
    its failure policy as for any cancel. Returns how many were cancelled; NotFound for a
    queue no step was ever routed to."""
    with db.tx() as tx:
        if tx.one("SELECT queue FROM routes WHERE queue = %s", [queue]) is None:
            raise NotFound("queue", queue)
    reason = reason or f"queue {queue} purged"
    cancelled = 0
    while True:
        with db.tx() as tx:
            rows = tx.all(
                "SELECT id, workflow_id FROM steps WHERE queue = %s AND status = %s"
                " ORDER BY id LIMIT %s",
                [queue, S.PENDING.value, PURGE_BATCH],
            )
            plain = [row.id for row in rows if row.workflow_id is None]
            cancelled += len(transitions.cancel(tx, plain, reason))
        for row in rows:
            if row.workflow_id is None:
                continue
            with db.tx() as tx:
                transitions.lock_workflow(tx, row.workflow_id)
                moved = transitions.cancel(tx, [row.id], reason)
                for step in moved:
                    workflows.on_step_finished(tx, step)
                cancelled += len(moved)
        if len(rows) < PURGE_BATCH:
            return cancelled


def retry(step_id: str, principal: Principal) -> Any:
    """Queue a failed or cancelled step again as a new attempt."""
    with db.tx() as tx:
        step = queries.visible(tx, step_id, principal, for_update=True)
        if StepStatus(step.status) not in CLIENT_RETRYABLE_STEP_STATUSES:
            raise InvalidState(f"step {step_id} is {step.status}; only failed or cancelled retry")
        if step.workflow_id is not None:
            raise InvalidState(f"step {step_id} belongs to a workflow; submit the workflow again")
        return transitions.apply_one(
            tx,
            step,
            S.PENDING,
            EventType.STEP_RETRYING,
            {
                "error": step.error,
                "attempt": step.attempts,
                "retry_at": iso(now()),
                "manual": True,
            },
            sets={
                "error": None,
                "result": None,
                "progress": 0.0,
                "stage": None,
                "message": None,
                "completed_at": None,
                "cancel_reason": None,
                "expires_at": None,
                "queued_at": transitions.NOW,
                # One more attempt on request; automatic retries stay spent.
                "max_retries": max(step.max_retries, step.attempts),
            },
            queue=True,
        )
