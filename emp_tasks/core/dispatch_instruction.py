"""The dispatch instruction: how to send one step's Celery task.

Pure: no I/O. It is written into the outbox row of the event that queues the step
and read back by whichever process publishes that event (see emp_tasks.store.publishing),
which sends the task (emp_tasks.store.dispatch).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from emp_tasks.core.priority import broker_priority


@dataclass(frozen=True)
class DispatchInstruction:
    """Send `step_id`'s task to `queue` at broker `priority` (0-9), not before `not_before`."""

    step_id: str
    queue: str
    priority: int
    """The broker's level (0 first), not the step's 0-100 priority."""
    not_before: datetime | None = None
    service: str | None = None
    customer_id: str | None = None
    """Shown beside the step id in the task's kwargs (Flower's task view); not read back."""

    @classmethod
    def for_step(
        cls,
        step_id: str,
        queue: str,
        priority: int,
        not_before: datetime | None = None,
        continuation: bool = False,
        *,
        service: str | None = None,
        customer_id: str | None = None,
    ) -> DispatchInstruction:
        """From the step's 0-100 `priority`; `continuation`: the step continues a workflow
        under way (see emp_tasks.core.priority)."""
        level = broker_priority(priority, continuation)
        return cls(step_id, queue, level, not_before, service, customer_id)

    def to_json(self) -> dict[str, Any]:
        return {
            "step_id": self.step_id,
            "queue": self.queue,
            "priority": self.priority,
            "not_before": self.not_before.isoformat() if self.not_before else None,
            "service": self.service,
            "customer_id": self.customer_id,
        }

    @classmethod
    def from_json(cls, dispatch: dict[str, Any]) -> DispatchInstruction:
        not_before = dispatch.get("not_before")
        return cls(
            step_id=dispatch["step_id"],
            queue=dispatch["queue"],
            priority=dispatch["priority"],
            not_before=datetime.fromisoformat(not_before) if not_before else None,
            service=dispatch.get("service"),
            customer_id=dispatch.get("customer_id"),
        )

    @classmethod
    def from_row(cls, row: Any) -> DispatchInstruction:
        """The instruction stored in an outbox row (anything with a `dispatch` JSON column)."""
        return cls.from_json(row.dispatch)
