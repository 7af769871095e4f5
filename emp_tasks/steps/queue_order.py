"""Where a pending step stands in its queue: how many of its queue's steps start first.

Workers take a queue's tasks by broker level (emp_tasks.core.priority: the step's
priority, one level up for a workflow step continuing a workflow under way), oldest
first within a level. `ix_steps_queue_order` indexes pending steps in exactly that order
(queue, level, queued_at, id), and `queue_counts` (emp_tasks.store.models.QueueCount,
kept by triggers in the transactions that change steps) holds each level's exact
pending count. So a step's position is, in one snapshot, the pending steps of the levels
before its own and of its own level, less those queued after it: for a step just
submitted, a few counter rows and a count of almost nothing, however deep the queue.
Where more than LATER_CAP steps were queued after it (a step near the head of a long
queue), the steps ahead are counted instead, one index range that stops where they end.
The depth is the sum of the queue's counters. Between queues (customers, routes) a
worker takes round robin; a position counts only the step's own queue, as API.md says.
"""

from __future__ import annotations

from typing import Any

from emp_tasks.core.priority import broker_priority_sql
from emp_tasks.core.status import StepStatus
from emp_tasks.steps import transitions
from emp_tasks.store import db

LATER_CAP = 1000
"""Steps queued after a step counted at most; beyond, the steps ahead are counted."""
_LEVEL = broker_priority_sql()
_PENDING = StepStatus.PENDING.value
_IN_LEVEL = (
    f"FROM steps WHERE status = '{_PENDING}' AND queue = %(queue)s AND ({_LEVEL}) = %(level)s"
)
_IN_QUEUE = f"FROM steps WHERE status = '{_PENDING}' AND queue = %(queue)s"


def _counts(prefix: str = "") -> str:
    """The counters of the step's level and those before it, the queue's depth, and the
    steps queued after it (one index range that starts at it, in index order, and stops
    at LATER_CAP + 1), as columns named with `prefix`."""
    return (
        f"coalesce(sum(pending) FILTER (WHERE level < %(level)s), 0) AS {prefix}before,"
        f" coalesce(sum(pending) FILTER (WHERE level = %(level)s), 0) AS {prefix}level,"
        f" coalesce(sum(pending), 0) AS {prefix}depth,"
        f" (SELECT count(*) FROM (SELECT 1 {_IN_LEVEL}"
        "   AND (queued_at, id) > (%(queued_at)s, %(id)s)"
        f"   ORDER BY queued_at, id LIMIT %(cap)s) AS later) AS {prefix}later"
        " FROM queue_counts WHERE queue = %(queue)s"
    )


# One statement, so one snapshot: the counts, and whether the step itself is still
# pending (counted in its level's counter).
_COUNTED = (
    f"SELECT EXISTS (SELECT 1 FROM steps WHERE id = %(id)s AND status = '{_PENDING}')"
    f" AS pending, {_counts()}"
)
_AHEAD = (
    # Three counts, each one index range that stops where the steps ahead end (a row
    # comparison `(level, queued_at, id) < (...)` would read the whole queue).
    f"SELECT (SELECT count(*) {_IN_QUEUE} AND ({_LEVEL}) < %(level)s)"
    f" + (SELECT count(*) {_IN_LEVEL} AND queued_at < %(queued_at)s)"
    f" + (SELECT count(*) {_IN_LEVEL} AND queued_at = %(queued_at)s AND id < %(id)s) AS n"
)
_DEPTH = "SELECT coalesce(sum(pending), 0) AS n FROM queue_counts WHERE queue = %s"
_DEPTHS = "SELECT queue, sum(pending) AS n FROM queue_counts GROUP BY queue HAVING sum(pending) > 0"
# The rows of backends that have ended, folded into backend 0 (their sum unchanged). A
# backend that starts meanwhile with an ended one's pid waits for this to commit, then
# finds no row of its own and starts one.
_COMPACT = (
    "WITH ended AS (DELETE FROM queue_counts WHERE backend <> 0"
    " AND backend NOT IN (SELECT pid FROM pg_stat_activity WHERE pid IS NOT NULL)"
    " RETURNING queue, level, pending),"
    " folded AS (INSERT INTO queue_counts AS c (queue, level, backend, pending)"
    " SELECT queue, level, 0, sum(pending) FROM ended GROUP BY queue, level"
    " ON CONFLICT (queue, level, backend) DO UPDATE SET pending = c.pending + excluded.pending)"
    " SELECT count(*) AS n FROM ended"
)
_FORGET_EMPTY = "DELETE FROM queue_counts WHERE backend = 0 AND pending = 0"


def level_of(step: Any) -> int:
    """The broker level a pending step's task waits at (the one it is sent with)."""
    return transitions.task_spec(step).priority


def depth(queue: str, tx: db.Tx | None = None) -> int:
    """The queue's pending steps (in `tx` when given)."""
    if tx is None:
        with db.tx() as own:
            return depth(queue, own)
    return int(tx.one(_DEPTH, [queue]).n)


def depths() -> dict[str, int]:
    """Every queue that has pending steps, with how many."""
    with db.tx() as tx:
        return {row.queue: int(row.n) for row in tx.all(_DEPTHS)}


def _params(step: Any) -> dict[str, Any]:
    return {
        "queue": step.queue,
        "level": level_of(step),
        "queued_at": step.queued_at,
        "id": step.id,
        "cap": LATER_CAP + 1,
    }


def counted_before(step: Any) -> tuple[str, dict[str, Any]]:
    """A SELECT (SQL, parameters) of the counts a new step's position is made of, for the
    statement that inserts the step (so read before it exists); `position_of_new` reads
    them from the statement's row (columns `place_before`, `place_level`, …)."""
    return f"SELECT {_counts('place_')}", _params(step)


def position_of_new(row: Any) -> dict[str, int | None]:
    """`position` of a step whose inserting statement read `counted_before`: the steps
    ahead are those counted, less the ones queued after it (the step was not yet there)."""
    if row.place_later > LATER_CAP:
        return position(row)
    ahead = max(int(row.place_before + row.place_level - row.place_later), 0)
    return {"queue_position": ahead, "queue_depth": max(int(row.place_depth) + 1, ahead + 1)}


def position(step: Any, tx: db.Tx | None = None) -> dict[str, int | None]:
    """`queue_position` and `queue_depth` of a step (a row); None for a step not pending.

    Read in `tx` when given (as its last statements: a planner setting may stay for the
    rest of that transaction), else in a transaction of its own.
    """
    if step.status != StepStatus.PENDING:
        return {"queue_position": None, "queue_depth": None}
    if tx is None:
        with db.tx() as own:
            return position(step, own)
    params = _params(step)
    counted = tx.one(_COUNTED, params)
    if counted.later <= LATER_CAP:
        ahead = counted.before + counted.level - counted.later - int(counted.pending)
    else:
        # The planner cannot tell how few steps are ahead and would read the whole queue.
        tx.execute("SET LOCAL enable_seqscan = off")
        ahead = tx.one(_AHEAD, params).n
    ahead = max(int(ahead), 0)
    return {"queue_position": ahead, "queue_depth": max(int(counted.depth), ahead + 1)}


def compact_counts() -> int:
    """Fold the counter rows of ended backends into backend 0; how many rows were folded."""
    with db.tx() as tx:
        folded = tx.one(_COMPACT).n
        tx.execute(_FORGET_EMPTY)
    return int(folded)
