"""Domain events: their names, the envelope, and where they are published.

Pure: no I/O. Recording an event in the outbox is `emp_tasks.store.outbox`, publishing
it to the `emp:events` stream and channel `emp_tasks.store.publishing`. Nothing else
builds an envelope.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Envelope:
    """One event as it is stored in the outbox, published on `emp:events` and read back.

    `to_json()` is the wire shape: every key below, `None` where the event has no
    such subject. `stream_id` (and the publisher's `db`) are added beside it in
    transit and are not part of the envelope.
    """

    id: str
    type: str
    timestamp: int
    """Milliseconds since the epoch."""
    data: dict[str, Any]
    version: int = ENVELOPE_VERSION
    correlation_id: str | None = None
    step_id: str | None = None
    workflow_id: str | None = None
    machine_id: str | None = None
    worker_id: str | None = None
    customer_id: str | None = None

    @classmethod
    def new(
        cls,
        event_type: EventType,
        *,
        data: dict[str, Any],
        correlation_id: str | None = None,
        step_id: str | None = None,
        workflow_id: str | None = None,
        machine_id: str | None = None,
        worker_id: str | None = None,
        customer_id: str | None = None,
    ) -> Envelope:
        """A new event's envelope: a fresh id and the current time in milliseconds."""
        return cls(
            id=new_id(),
            type=str(event_type),
            timestamp=time.time_ns() // 1_000_000,
            data=data,
            correlation_id=correlation_id,
            step_id=step_id,
            workflow_id=workflow_id,
            machine_id=machine_id,
            worker_id=worker_id,
            customer_id=customer_id,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": self.type,
            "version": self.version,
            "timestamp": self.timestamp,
            "correlation_id": self.correlation_id,
            "step_id": self.step_id,
            "workflow_id": self.workflow_id,
            "machine_id": self.machine_id,
            "worker_id": self.worker_id,
            "customer_id": self.customer_id,
            "data": self.data,
        }

    @classmethod
    def from_json(cls, event: dict[str, Any]) -> Envelope:
        """An envelope read back from the outbox or the stream; keys added in transit
        (`stream_id`, `db`) are ignored."""
        return cls(
            id=event["id"],
            type=event["type"],
            timestamp=event["timestamp"],
            data=event["data"],
            version=event.get("version", ENVELOPE_VERSION),
            correlation_id=event.get("correlation_id"),
            step_id=event.get("step_id"),
            workflow_id=event.get("workflow_id"),
            machine_id=event.get("machine_id"),
            worker_id=event.get("worker_id"),
            customer_id=event.get("customer_id"),
        )

    @classmethod
    def from_row(cls, row: Any) -> Envelope:
        """The envelope of an outbox row (anything with an `envelope` JSON column)."""
        return cls.from_json(row.envelope)


STEP_END_EVENTS = frozenset(
    {
        EventType.STEP_COMPLETED,
        EventType.STEP_FAILED,
        EventType.STEP_CANCELLED,
        EventType.STEP_SKIPPED,
    }
)
"""The events after which a step is terminal (until a client retries it)."""
WORKFLOW_END_EVENTS = frozenset(
    {EventType.WORKFLOW_COMPLETED, EventType.WORKFLOW_FAILED, EventType.WORKFLOW_CANCELLED}
)
"""The events after which a workflow is terminal."""

_ATTEMPT_STARTS = frozenset({EventType.STEP_ASSIGNED, EventType.STEP_STARTED})
_ATTEMPT_ENDS = STEP_END_EVENTS | {EventType.STEP_RETRYING}


class ProgressFence:
    """The ordering rule of progress events, for a reader of the stream in stream order.

    `step_progress` is not recorded in the outbox: a worker publishes it while its
    attempt runs, after the attempt's `step_started` and before the event that ends it
    (`step_retrying` or a terminal event). A report of an attempt that is no longer the
    step's running one (a superseded worker, late) is stale: `admits` says False for it
    once this reader has seen the step's later attempt start or the attempt end. A
    reader that saw nothing of the step admits its reports. It remembers `capacity`
    steps, the most recently seen.
    """

    def __init__(self, capacity: int = 50_000) -> None:
        self.capacity = capacity
        self._running: OrderedDict[str, int | None] = OrderedDict()

    def admits(self, event: dict[str, Any]) -> bool:
        """Observe the event (in stream order); False when it is a stale progress report."""
        step_id = event.get("step_id")
        event_type = event.get("type")
        if not step_id:
            return True
        data = event.get("data") or {}
        if event_type == EventType.STEP_PROGRESS:
            if step_id not in self._running:
                return True
            return self._running[step_id] == data.get("attempt")
        if event_type in _ATTEMPT_STARTS:
            self._remember(step_id, data.get("attempt"))
        elif event_type in _ATTEMPT_ENDS:
            self._remember(step_id, None)
        return True

    def _remember(self, step_id: str, attempt: int | None) -> None:
        self._running[step_id] = attempt
        self._running.move_to_end(step_id)
        while len(self._running) > self.capacity:
            self._running.popitem(last=False)
