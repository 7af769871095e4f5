"""Domain events: names, the envelope, and writing an event into the outbox.

An event is recorded in the same transaction as the change it describes
(`record`); `relay` publishes committed events to the `emp:events` stream and
channel. Nothing else builds an envelope.
"""

from __future__ import annotations

import time
from enum import StrEnum
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from emp_tasks import db
from emp_tasks.ids import new_id
from emp_tasks.models import Event

STREAM = "emp:events"
CHANNEL = "emp:events"
ENVELOPE_VERSION = 1
PENDING_AGGREGATES = "emp_pending_aggregates"


class EventType(StrEnum):
    STEP_SUBMITTED = "step_submitted"
    STEP_QUEUED = "step_queued"
    STEP_ASSIGNED = "step_assigned"
    STEP_STARTED = "step_started"
    STEP_PROGRESS = "step_progress"
    STEP_RETRYING = "step_retrying"
    STEP_COMPLETED = "step_completed"
    STEP_FAILED = "step_failed"
    STEP_CANCELLED = "step_cancelled"
    STEP_SKIPPED = "step_skipped"
    WORKFLOW_SUBMITTED = "workflow_submitted"
    WORKFLOW_STEP_COMPLETED = "workflow_step_completed"
    WORKFLOW_COMPLETED = "workflow_completed"
    WORKFLOW_FAILED = "workflow_failed"
    WORKFLOW_CANCELLED = "workflow_cancelled"
    WORKER_ONLINE = "worker_online"
    WORKER_OFFLINE = "worker_offline"
    WORKER_STATUS_CHANGED = "worker_status_changed"


def legacy_name(event_type: str) -> str | None:
    """`step_completed` -> `job_completed`: the old names some consumers ask for."""
    if event_type.startswith("step_"):
        return "job_" + event_type[len("step_") :]
    return None


def step_aggregate(step_id: str) -> str:
    return f"step:{step_id}"


def record(
    session: Session,
    event_type: EventType,
    *,
    aggregate: str,
    data: dict[str, Any],
    correlation_id: str | None = None,
    step_id: str | None = None,
    workflow_id: str | None = None,
    machine_id: str | None = None,
    worker_id: str | None = None,
    customer_id: str | None = None,
    dispatch: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Add the event to the outbox in the caller's transaction and return its envelope.

    `dispatch` (see emp_tasks.dispatch.spec) makes the relay send the step's task
    when it publishes this event.

    The aggregate is remembered on the session so that the transaction's
    after-commit hook can publish it at once (the fast path).
    """
    envelope: dict[str, Any] = {
        "id": new_id(),
        "type": str(event_type),
        "version": ENVELOPE_VERSION,
        "timestamp": time.time_ns() // 1_000_000,
        "correlation_id": correlation_id,
        "step_id": step_id,
        "workflow_id": workflow_id,
        "machine_id": machine_id,
        "worker_id": worker_id,
        "customer_id": customer_id,
        "data": data,
    }
    session.add(
        Event(
            id=envelope["id"],
            type=envelope["type"],
            aggregate=aggregate,
            step_id=step_id,
            workflow_id=workflow_id,
            customer_id=customer_id,
            envelope=envelope,
            dispatch=dispatch,
        )
    )
    session.info.setdefault(PENDING_AGGREGATES, set()).add(aggregate)
    db.after_commit(session, "publish_events", _publish_after_commit)
    return envelope


def for_step(session: Session, step_id: str) -> list[dict[str, Any]]:
    """The step's events from the outbox, in commit order, with their stream ids."""
    rows = session.execute(
        select(Event.envelope, Event.stream_id).where(Event.step_id == step_id).order_by(Event.seq)
    )
    return [{**envelope, "stream_id": stream_id} for envelope, stream_id in rows]


def _publish_after_commit(session: Session) -> None:
    from emp_tasks import relay

    relay.publish_after_commit(session)
