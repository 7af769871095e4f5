"""The stranded-step rule: a pending step whose task the broker no longer holds is sent again.

Operators' Celery tools remove tasks without telling PostgreSQL: `celery purge`, a
queue deleted by hand, a worker killed after it took a task and before it began the
step (its message stays in kombu's unacked hash, which restores it only after the
visibility timeout, an hour). Such a step would stay pending for ever. PostgreSQL knows
every pending step; the broker census (emp_tasks.store.census) knows every task.

`Watch.scan` runs on the relay's reconcile loop. For each queue with pending steps it
compares counts first: the pending steps in PostgreSQL (the queue's counters, see
emp_tasks.steps.queue_order) against the messages in the queue's lists plus the tasks
workers hold for it (taken less than EMP_STRANDED_AFTER_S ago, or held for a retry's
ETA). Only a queue with more pending steps than tasks is read whole, and its pending
steps queued more than EMP_STRANDED_AFTER_S ago with no task anywhere are suspects. A
suspect still without a task at the next scan is sent again with a `step_queued` event
(`reason: stranded`), through the outbox like any dispatch.
A task that was only in flight between two places meanwhile becomes a duplicate, which
`attempts.begin` drops (the step is no longer pending when it arrives).

A duplicate task elsewhere in the same queue (left by an earlier redelivery) can hide a
stranded step from the count until that duplicate is consumed; then the counts disagree
and the scan finds it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from emp_tasks.core.config import get_settings
from emp_tasks.core.status import StepStatus
from emp_tasks.steps import queue_order, transitions
from emp_tasks.store import census, db

logger = logging.getLogger(__name__)

RESEND_BATCH = 500


@dataclass
class Scan:
    """What one scan saw: queues compared, queues read whole, steps sent again."""

    queues: int = 0
    read: int = 0
    suspects: int = 0
    resent: list[str] = field(default_factory=list)


def _live_taken(after_s: float) -> dict[str, set[str]]:
    """Per queue, the steps whose task a worker took recently or holds for its ETA."""
    cutoff = time.time() - after_s
    live: dict[str, set[str]] = {}
    for task in census.taken():
        if task.taken_at >= cutoff or task.held_for_later():
            live.setdefault(task.queue, set()).add(task.step_id)
    return live


def _old_pending(queue: str, after_s: float) -> list[str]:
    with db.tx() as tx:
        rows = tx.all(
            "SELECT id FROM steps WHERE status = %s AND queue = %s"
            " AND queued_at < now() - make_interval(secs => %s)",
            [StepStatus.PENDING.value, queue, after_s],
        )
    return [row.id for row in rows]


def resend(step_ids: list[str]) -> list[str]:
    """Send these steps' tasks again, each with a `step_queued` event; those still pending."""
    sent: list[str] = []
    for start in range(0, len(step_ids), RESEND_BATCH):
        with db.tx() as tx:
            rows = transitions.queue_again(tx, step_ids[start : start + RESEND_BATCH], "stranded")
        sent += [row.id for row in rows]
    return sent


class Watch:
    """The rule across scans: a step is sent again when two scans in a row found no task."""

    def __init__(self) -> None:
        self.suspects: set[str] = set()

    def scan(self, after_s: float | None = None) -> Scan:
        after = get_settings().stranded_after_s if after_s is None else after_s
        seen = Scan()
        pending = queue_order.depths()
        seen.queues = len(pending)
        if not pending:
            self.suspects = set()
            return seen
        depth = census.depths(sorted(pending))
        live = _live_taken(after)
        suspects: set[str] = set()
        for queue, count in sorted(pending.items()):
            held = live.get(queue, set())
            if count <= depth.get(queue, 0) + len(held):
                continue
            seen.read += 1
            present = census.queued_steps(queue) | held
            suspects.update(s for s in _old_pending(queue, after) if s not in present)
        seen.suspects = len(suspects)
        again = sorted(suspects & self.suspects)
        self.suspects = suspects - set(again)
        if again:
            seen.resent = resend(again)
            logger.warning(
                "Pending steps had no task in the broker; sent again",
                extra={
                    "action": "steps_stranded",
                    "count": len(seen.resent),
                    "first": seen.resent[:5],
                },
            )
        return seen
