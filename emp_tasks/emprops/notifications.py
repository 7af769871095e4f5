"""What EmProps must hear about each of its workflows, kept in PostgreSQL until it has.

A row is written with the workflow (`create`, same transaction) as `waiting`. The
workflow's terminal event fills in the body and makes it `pending` (`queue`, at most
once: the first terminal event wins, a repeated stream entry changes nothing). The
sender claims due rows (`claim`: the row's next attempt is pushed past the call's
timeout, so a second sender cannot take it meanwhile), and records the answer:
`delivered` on a 2xx, another try later with backoff and jitter, or `failed` when
EmProps refused it for good. An admin may `replay` a delivered or failed one.
"""

from __future__ import annotations

import random
from datetime import datetime
from typing import Any

from psycopg.types.json import Jsonb

from emp_tasks.core.config import get_settings
from emp_tasks.core.events import EventType
from emp_tasks.store.db import Tx

COLUMNS = (
    "workflow_id, job_id, collection_id, status, event_id, path, body, attempts, last_error,"
    " last_status, next_attempt_at, notified_at, created_at"
)
TERMINAL = {
    EventType.WORKFLOW_COMPLETED.value: "complete",
    EventType.WORKFLOW_FAILED.value: "fail",
    EventType.WORKFLOW_CANCELLED.value: "fail",
}
"""The terminal workflow events and the EmProps path each is reported to."""


def create(tx: Tx, workflow_id: str, job_id: str, collection_id: str | None) -> None:
    tx.execute(
        "INSERT INTO emprops_notifications (workflow_id, job_id, collection_id, status)"
        " VALUES (%s, %s, %s, 'waiting')",
        [workflow_id, job_id, collection_id],
    )


def of(tx: Tx, workflow_id: str) -> Any:
    return tx.one(
        f"SELECT {COLUMNS} FROM emprops_notifications WHERE workflow_id = %s", [workflow_id]
    )


def presented(row: Any) -> dict[str, Any]:
    """The workflow object's `emprops`."""
    return {
        "job_id": row.job_id,
        "collection_id": row.collection_id,
        "status": row.status,
        "notified_at": row.notified_at.isoformat() if row.notified_at else None,
        "attempts": row.attempts,
        "last_error": row.last_error,
    }


def body_of(envelope: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The EmProps path and body for a workflow's terminal event."""
    data = envelope["data"]
    details = data.get("step_details") or []
    if envelope["type"] == EventType.WORKFLOW_COMPLETED.value:
        outputs = [
            output
            for step in sorted(details, key=lambda s: s.get("step_index") or 0)
            for output in ((step.get("result") or {}).get("outputs") or [])
            if isinstance(step.get("result"), dict)
        ]
        last = max(details, key=lambda s: s.get("step_index") or 0) if details else None
        last_outputs = ((last or {}).get("result") or {}).get("outputs") or []
        first = last_outputs[0] if last_outputs and isinstance(last_outputs[0], dict) else {}
        return "complete", {
            "workflow_id": envelope["workflow_id"],
            "status": "completed",
            "outputs": outputs,
            "workflow_output": first.get("url"),
            "step_details": details,
            "completed_at": envelope["timestamp"],
        }
    cancelled = envelope["type"] == EventType.WORKFLOW_CANCELLED.value
    error = data.get("error") or (
        {"code": "WORKFLOW_CANCELLED", "message": data.get("reason") or "workflow cancelled"}
        if cancelled
        else None
    )
    return "fail", {
        "workflow_id": envelope["workflow_id"],
        "status": "cancelled" if cancelled else "failed",
        "error": error,
        "step_details": details,
    }


def queue(tx: Tx, envelope: dict[str, Any]) -> bool:
    """Make a workflow's notification due from its terminal event (once); whether it did."""
    path, body = body_of(envelope)
    moved = tx.one(
        "UPDATE emprops_notifications SET status = 'pending', event_id = %s, path = %s,"
        " body = %s, next_attempt_at = now() WHERE workflow_id = %s AND event_id IS NULL"
        " RETURNING workflow_id",
        [envelope["id"], path, Jsonb(body), envelope["workflow_id"]],
    )
    return moved is not None


def claim(tx: Tx, limit: int, hold_s: float) -> list[Any]:
    """Due notifications, each held for `hold_s` (no other sender takes it meanwhile)."""
    return tx.all(
        "UPDATE emprops_notifications SET next_attempt_at = now() + make_interval(secs => %s)"
        " WHERE workflow_id IN (SELECT workflow_id FROM emprops_notifications"
        "  WHERE status = 'pending' AND next_attempt_at <= now()"
        "  ORDER BY next_attempt_at LIMIT %s FOR UPDATE SKIP LOCKED)"
        f" RETURNING {COLUMNS}",
        [hold_s, limit],
    )


def next_delay_s(attempts: int) -> float:
    """Exponential backoff after `attempts` failed tries: base × 2^(attempts−1), capped, then
    a random 50–100 % of it (jitter, as for step retries)."""
    settings = get_settings()
    ceiling = min(
        settings.emprops_retry_max_s, settings.emprops_retry_base_s * 2 ** max(0, attempts - 1)
    )
    return ceiling / 2 + random.uniform(0, ceiling / 2)


def record(
    tx: Tx,
    row: Any,
    *,
    delivered: bool,
    error: str | None = None,
    status: int | None = None,
    retryable: bool = True,
) -> Any:
    """The answer to one try of `row` (as claimed): only the holder of that claim writes."""
    if delivered:
        outcome, due = "delivered", None
    elif retryable:
        outcome, due = "pending", next_delay_s(row.attempts + 1)
    else:
        outcome, due = "failed", None
    return tx.one(
        "UPDATE emprops_notifications SET status = %s, attempts = attempts + 1,"
        " last_error = %s, last_status = %s,"
        " notified_at = CASE WHEN %s THEN now() ELSE notified_at END,"
        " next_attempt_at = CASE WHEN %s::float IS NULL THEN NULL"
        "  ELSE now() + make_interval(secs => %s::float) END"
        " WHERE workflow_id = %s AND status = 'pending' AND event_id = %s"
        " AND next_attempt_at = %s"
        f" RETURNING {COLUMNS}",
        [
            outcome,
            error,
            status,
            delivered,
            due,
            due,
            row.workflow_id,
            row.event_id,
            row.next_attempt_at,
        ],
    )


def replay(tx: Tx, workflow_id: str) -> Any:
    """Send a delivered or failed notification again now; None if it has no body yet."""
    return tx.one(
        "UPDATE emprops_notifications SET status = 'pending', next_attempt_at = now()"
        f" WHERE workflow_id = %s AND event_id IS NOT NULL RETURNING {COLUMNS}",
        [workflow_id],
    )


def unqueued_terminal(tx: Tx, older_than: datetime, limit: int = 100) -> list[Any]:
    """Terminal events of waiting notifications' workflows that the stream did not bring
    (the emprops process was away longer than the stream is kept): their envelopes' rows."""
    return tx.all(
        "SELECT e.envelope FROM emprops_notifications n"
        " JOIN events e ON e.aggregate = 'workflow:' || n.workflow_id AND e.type = ANY(%s)"
        " WHERE n.status = 'waiting' AND e.created_at < %s ORDER BY e.seq LIMIT %s",
        [list(TERMINAL), older_than, limit],
    )
