"""Domain events: their names, the envelope, and where they are published.

Pure: no I/O. Recording an event in the outbox and publishing it to the
`emp:events` stream and channel is `emp_tasks.outbox`. Nothing else builds an
envelope.
"""

from __future__ import annotations

import time
from enum import StrEnum
from typing import Any

from emp_tasks.core.ids import new_id

STREAM = "emp:events"
CHANNEL = "emp:events"
ENVELOPE_VERSION = 1


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


def envelope(
    event_type: EventType,
    *,
    data: dict[str, Any],
    correlation_id: str | None = None,
    step_id: str | None = None,
    workflow_id: str | None = None,
    machine_id: str | None = None,
    worker_id: str | None = None,
    customer_id: str | None = None,
) -> dict[str, Any]:
    """A new event's envelope: a fresh id and the current time in milliseconds."""
    return {
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
