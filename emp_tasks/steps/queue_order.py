"""Where a pending step stands in its queue: how many of its queue's steps start first.

Workers take a queue's tasks by broker level (emp_tasks.core.priority: the step's
priority, one level up for a workflow step continuing a workflow under way), oldest
first within a level. `ix_steps_queue_order` indexes pending steps in exactly that order
(queue, level, queued_at, id), so a step's position is one range count over the steps
ahead of it, never a read of the whole queue; the queue's depth (its pending steps) is
counted at most once a second per queue in each process. Between queues (customers, routes) a
worker takes round robin; a position counts only the step's own queue, as API.md says.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from emp_tasks.core.priority import broker_priority_sql
from emp_tasks.core.status import StepStatus
from emp_tasks.steps import transitions
from emp_tasks.store import db

DEPTH_FOR_S = 1.0
_LEVEL = broker_priority_sql()
_IN_QUEUE = f"FROM steps WHERE status = '{StepStatus.PENDING.value}' AND queue = %(queue)s"
_AHEAD = (
    # Three counts, each one index range that stops where the steps ahead end (a row
    # comparison `(level, queued_at, id) < (...)` would read the whole queue).
    f"SELECT (SELECT count(*) {_IN_QUEUE} AND ({_LEVEL}) < %(level)s)"
    f" + (SELECT count(*) {_IN_QUEUE} AND ({_LEVEL}) = %(level)s AND queued_at < %(queued_at)s)"
    f" + (SELECT count(*) {_IN_QUEUE} AND ({_LEVEL}) = %(level)s AND queued_at = %(queued_at)s"
    "   AND id < %(id)s) AS n"
)
_DEPTH = (
    f"SELECT count(*) AS n FROM steps WHERE status = '{StepStatus.PENDING.value}' AND queue = %s"
)

_depths: dict[str, tuple[float, int]] = {}
_lock = threading.Lock()


def level_of(step: Any) -> int:
    """The broker level a pending step's task waits at (the one it is sent with)."""
    return transitions.task_spec(step).priority


def depth(queue: str, tx: db.Tx | None = None) -> int:
    """The queue's pending steps, counted at most once a DEPTH_FOR_S (in `tx` when given)."""
    moment = time.monotonic()
    with _lock:
        known = _depths.get(queue)
    if known is not None and known[0] > moment:
        return known[1]
    if tx is None:
        with db.tx() as own:
            return depth(queue, own)
    count = tx.one(_DEPTH, [queue]).n
    with _lock:
        if len(_depths) > 10_000:
            _depths.clear()
        _depths[queue] = (moment + DEPTH_FOR_S, count)
    return count


def position(step: Any, tx: db.Tx | None = None) -> dict[str, int | None]:
    """`queue_position` and `queue_depth` of a step (a row); None for a step not pending.

    Read in `tx` when given (as its last statements: the planner setting stays for the
    rest of that transaction), else in a transaction of its own.
    """
    if step.status != StepStatus.PENDING:
        return {"queue_position": None, "queue_depth": None}
    if tx is None:
        with db.tx() as own:
            return position(step, own)
    # The planner cannot tell how few steps are ahead and would read the whole queue.
    tx.execute("SET LOCAL enable_seqscan = off")
    params = {
        "queue": step.queue,
        "level": level_of(step),
        "queued_at": step.queued_at,
        "id": step.id,
    }
    ahead = tx.one(_AHEAD, params).n
    return {"queue_position": ahead, "queue_depth": max(depth(step.queue, tx), ahead + 1)}
