"""How urgently a step's task is taken: our priority onto the broker's levels.

Priority is 0-100, higher first. Celery's Redis transport keeps one list per
priority step and serves the lowest number first (across all of a worker's
queues), so our priority is mapped onto ten broker levels with the order
inverted: 91-100 -> 0, ..., 0-10 -> 9.

Continuation rule: a step that continues a workflow already under way (it has
dependencies, all done) is queued one broker level higher than its priority
alone would give (never above level 0). Within a level the queue is FIFO, so
without the boost a workflow's later steps would wait behind every step of the
same priority submitted after the workflow began; with it, a started workflow
finishes before equal-priority work that arrived later begins.
"""

from __future__ import annotations

BROKER_PRIORITY_LEVELS = 10


def broker_priority(priority: int, continuation: bool = False) -> int:
    """Map 0-100 (higher first) onto the broker's 0-9 (lower first)."""
    level = min(BROKER_PRIORITY_LEVELS - 1, max(0, priority) * BROKER_PRIORITY_LEVELS // 101)
    broker_level = BROKER_PRIORITY_LEVELS - 1 - level
    return max(0, broker_level - 1) if continuation else broker_level


def broker_priority_sql(priority: str = "priority", continuation: str | None = None) -> str:
    """`broker_priority` as a SQL expression over a step row's columns (an index and the
    queue position count use it); `continuation` is a SQL boolean, by default a workflow
    step that has dependencies."""
    if continuation is None:
        continuation = "(workflow_id IS NOT NULL AND jsonb_array_length(depends_on) > 0)"
    top = BROKER_PRIORITY_LEVELS - 1
    level = f"({top} - least({top}, greatest(0, {priority}) * {BROKER_PRIORITY_LEVELS} / 101))"
    return f"greatest(0, {level} - CASE WHEN {continuation} THEN 1 ELSE 0 END)"
