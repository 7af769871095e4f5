"""The warm-placement wait bound: a step that emp_tasks.routes.placement sent to a worker's
own queue and that has not started within its deadline (EMP_AFFINITY_WAIT_MS, plus the
models' load time when that worker still had to load them) is also put on its route's
shared queue, for any capable worker. The relay calls `release_due` 10 times a second.
"""

from __future__ import annotations

import logging

from emp_tasks.routes import placement
from emp_tasks.steps import transitions
from emp_tasks.store import db

logger = logging.getLogger(__name__)


def release_due() -> int:
    """Send each step whose warm wait is over, still pending, to its shared queue too."""
    due = placement.due()
    if not due:
        return 0
    with db.tx() as tx:
        rows = transitions.queue_again(tx, due, "affinity_wait", place=False)
    if rows:
        logger.info(
            "Warm worker busy: steps also queued for any capable worker",
            extra={"action": "affinity_released", "count": len(rows)},
        )
    return len(rows)
