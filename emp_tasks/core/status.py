"""Statuses: one enum per kind of row, the step's transition table, and every named set.

Pure rules, no I/O. This is the only place a status is spelled: code compares a
row's status with these enums and sets, never with a string of its own. Applying
a step transition (and recording its event) is `emp_tasks.transitions`.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum

# --- steps ---------------------------------------------------------------------------------


class StepStatus(StrEnum):
    WAITING = "waiting"
    """Dependencies not done yet (workflow steps only)."""
    PENDING = "pending"
    """Queued for a worker (again, after a retry)."""
    ASSIGNED = "assigned"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    SKIPPED = "skipped"
    """A step it depends on did not complete; it never runs."""


S = StepStatus

STEP_TRANSITIONS: Mapping[StepStatus, frozenset[StepStatus]] = {
    S.WAITING: frozenset({S.PENDING, S.CANCELLED, S.SKIPPED}),
    S.PENDING: frozenset({S.ASSIGNED, S.CANCELLED, S.FAILED, S.SKIPPED}),
    S.ASSIGNED: frozenset({S.RUNNING, S.PENDING, S.COMPLETED, S.FAILED, S.CANCELLED}),
    S.RUNNING: frozenset({S.COMPLETED, S.PENDING, S.FAILED, S.CANCELLED}),
    S.FAILED: frozenset({S.PENDING}),
    S.CANCELLED: frozenset({S.PENDING}),
    S.COMPLETED: frozenset(),
    S.SKIPPED: frozenset(),
}
"""Allowed status changes. PENDING again from ASSIGNED/RUNNING is a retry; from
FAILED/CANCELLED it is a manual retry."""


def step_may_become(current: StepStatus | str, to: StepStatus | str) -> bool:
    """Whether the transition table allows a step in `current` to become `to`."""
    return StepStatus(to) in STEP_TRANSITIONS[StepStatus(current)]


TERMINAL_STEP_STATUSES = frozenset({S.COMPLETED, S.FAILED, S.CANCELLED, S.SKIPPED})
"""Finished: the workflow advances past it. (FAILED and CANCELLED may still be
retried by hand, which starts a new lifecycle.)"""

UNFINISHED_STEP_STATUSES = frozenset(s for s in StepStatus if s not in TERMINAL_STEP_STATUSES)
"""Not finished yet: what a client's or a workflow's cancel stops."""

NOT_STARTED_STEP_STATUSES = frozenset({S.WAITING, S.PENDING})
"""No worker has it yet: it waits for a worker (or for its dependencies)."""

ACTIVE_STEP_STATUSES = frozenset({S.ASSIGNED, S.RUNNING})
"""An attempt holds a worker: the attempt's lease runs, its result counts."""

CLIENT_RETRYABLE_STEP_STATUSES = frozenset({S.FAILED, S.CANCELLED})
"""What `POST /api/steps/{id}/retry` queues again."""

# --- workflows -----------------------------------------------------------------------------


class WorkflowStatus(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL_WORKFLOW_STATUSES = frozenset(
    {WorkflowStatus.COMPLETED, WorkflowStatus.FAILED, WorkflowStatus.CANCELLED}
)

# --- workers -------------------------------------------------------------------------------


class WorkerStatus(StrEnum):
    ONLINE = "online"
    """Takes work."""
    DRAINING = "draining"
    """Finishes what it runs, takes nothing new."""
    OFFLINE = "offline"
    """Stopped, or silent for its lease timeout."""
    REMOVED = "removed"
    """Its machine was deleted; it takes nothing until it registers again."""


LIVE_WORKER_STATUSES = frozenset({WorkerStatus.ONLINE, WorkerStatus.DRAINING})
"""The worker process is there (it heartbeats), whether or not it takes work."""

# --- webhook deliveries --------------------------------------------------------------------


class DeliveryStatus(StrEnum):
    PENDING = "pending"
    DELIVERING = "delivering"
    """Claimed by a `webhooks` process, the request in flight."""
    RETRYING = "retrying"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    """Refused for good (410 Gone, a refused target): not retried."""
    DEAD = "dead"
    """Every attempt of the retry schedule failed."""


FINISHED_DELIVERY_STATUSES = frozenset(
    {DeliveryStatus.SUCCEEDED, DeliveryStatus.FAILED, DeliveryStatus.DEAD}
)
"""Nothing more will be sent unless an operator replays it."""

SCHEDULED_DELIVERY_STATUSES = frozenset({DeliveryStatus.PENDING, DeliveryStatus.RETRYING})
"""Waiting for its next attempt at `next_attempt_at`."""

UNFINISHED_DELIVERY_STATUSES = frozenset(
    s for s in DeliveryStatus if s not in FINISHED_DELIVERY_STATUSES
)
"""Scheduled or in flight: what the `webhooks` process looks at."""
