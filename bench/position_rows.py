"""The queue position rows (EMP Tasks only): `queue_position` of a step deep in a long queue.

Run on the stranded rows' queue (bench.stranded_rows: 100,000 pending steps in one
queue). Times, in this process, `emp_tasks.steps.queue_order.position` for the step
workers would take first (more than LATER_CAP queued after it: the steps ahead counted
on ix_steps_queue_order) and for the one they would take last (the queue's counters
and the steps queued after it), and the queue's depth (the sum of its counters);
median wall ms of POSITIONS.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from bench.stats import median_text, only_ours
from emp_tasks.steps import queue_order, transitions
from emp_tasks.store import db

POSITIONS = 5


@dataclass
class PositionResult:
    pending: int
    first_ms: list[float] = field(default_factory=list)
    last_ms: list[float] = field(default_factory=list)
    depth_ms: list[float] = field(default_factory=list)
    last_position: int | None = None
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors and self.last_position == self.pending - 1


def _ends(queue: str) -> tuple[object, object]:
    order = "queued_at {0}, id {0}"
    with db.tx() as tx:
        first, last = (
            tx.one(
                f"SELECT {transitions.STEP_COLUMNS} FROM steps WHERE queue = %s AND status ="
                f" 'pending' ORDER BY {order.format(direction)} LIMIT 1",
                [queue],
            )
            for direction in ("ASC", "DESC")
        )
    return first, last


def _timed(call) -> tuple[float, object]:
    started = time.perf_counter()
    value = call()
    return (time.perf_counter() - started) * 1000, value


def run(queue: str, pending: int) -> PositionResult:
    outcome = PositionResult(pending=pending)
    try:
        first, last = _ends(queue)
        for _ in range(POSITIONS):
            ms, _ = _timed(lambda: queue_order.position(first))
            outcome.first_ms.append(ms)
            ms, shown = _timed(lambda: queue_order.position(last))
            outcome.last_ms.append(ms)
            outcome.last_position = shown["queue_position"]
            ms, _ = _timed(lambda: queue_order.depth(queue))
            outcome.depth_ms.append(ms)
    except Exception as exc:  # the row reports it; the other rows still print
        outcome.errors.append(f"{type(exc).__name__}: {exc}")
    return outcome


def rows(result: PositionResult | None, baselines: int) -> list[list[str]]:
    if result is None:
        return []

    label = f"queue position, {result.pending:,} pending in one queue"
    return [
        only_ours(f"{label}: {what}", median_text(values, result.ok), baselines)
        for what, values in (
            ("first step, wall (ms)", result.first_ms),
            ("last step, wall (ms)", result.last_ms),
            ("depth, wall (ms)", result.depth_ms),
        )
    ]


def summary(result: PositionResult) -> str:
    text = (
        f"EMP Tasks, queue position: last of {result.pending} pending steps at position "
        f"{result.last_position} (expected {result.pending - 1})"
    )
    for error in result.errors[:3]:
        text += f"\n  error: {error}"
    return text


NOTE = (
    "Queue position rows (EMP Tasks only): on the stranded rows' queue, "
    "queue_order.position for the first and the last step workers would take (the first "
    "counts the steps ahead on ix_steps_queue_order, the last reads the queue's counters "
    "and counts the steps queued after it), and the depth (the sum of the queue's "
    f"counters), median wall ms of {POSITIONS}."
)
