"""Per-attempt step logs: the lines connectors report, kept bounded, read by clients.

A worker writes an attempt's lines in batches (emp_tasks.worker.attempt_log), each line
at most MAX_LINE_CHARS; at most EMP_STEP_LOG_LINES lines are kept per attempt (the
worker counts and says how many it left out in the last kept line). `GET
/api/steps/{id}/logs[?attempt=N]` reads them, oldest first, for whoever may see the step.
"""

from __future__ import annotations

from typing import Any

from emp_tasks.auth import Principal
from emp_tasks.steps import queries
from emp_tasks.store import db

LEVELS = ("debug", "info", "warning", "error")
MAX_LINE_CHARS = 4000


def write(step_id: str, attempt: int, lines: list[tuple[str, str, Any]]) -> None:
    """Store (level, message, logged_at) lines of one attempt, in one statement."""
    if not lines:
        return
    with db.tx() as tx:
        tx.execute(
            "INSERT INTO step_logs (step_id, attempt, level, message, logged_at)"
            " SELECT %s, %s, level, message, at"
            " FROM unnest(%s::varchar[], %s::text[], %s::timestamptz[]) AS l(level, message, at)",
            [
                step_id,
                attempt,
                [level for level, _, _ in lines],
                [message for _, message, _ in lines],
                [at for _, _, at in lines],
            ],
        )


def read(step_id: str, principal: Principal, attempt: int | None = None) -> list[dict[str, Any]]:
    """The step's log lines (of one attempt, or all), oldest first."""
    with db.tx() as tx:
        queries.visible(tx, step_id, principal)
        rows = tx.all(
            "SELECT attempt, level, message, logged_at FROM step_logs WHERE step_id = %s"
            " AND (%s::int IS NULL OR attempt = %s) ORDER BY attempt, id",
            [step_id, attempt, attempt],
        )
    return [
        {
            "attempt": row.attempt,
            "timestamp": row.logged_at.isoformat().replace("+00:00", "Z"),
            "level": row.level,
            "message": row.message,
        }
        for row in rows
    ]
