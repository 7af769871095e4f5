"""Step queries: what a client may read of its steps — one step, its events and its
attempts, a page of steps (newest first, with a cursor), counts and stats.

`visible` is the one rule for which steps a caller sees: a customer its own, an admin
every one; a step the caller may not see is reported as not found. The client
commands (emp_tasks.steps.client) use it too.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select

from emp_tasks.auth import Principal
from emp_tasks.core.errors import Forbidden, NotFound
from emp_tasks.core.ids import decode_cursor
from emp_tasks.core.status import StepStatus
from emp_tasks.core.times import TIMEFRAMES, now
from emp_tasks.steps import transitions
from emp_tasks.store import db, outbox
from emp_tasks.store.db import Tx
from emp_tasks.store.models import Step

S = StepStatus


def visible(tx: Tx, step_id: str, principal: Principal, *, for_update: bool = False) -> Any:
    """The step's row if the caller may see it (locked with `for_update`), else NotFound."""
    step = transitions.lock(tx, step_id) if for_update else transitions.read(tx, step_id)
    if step is None or not principal.may_see(step.customer_id):
        raise NotFound("step", step_id)
    return step


def get(step_id: str, principal: Principal) -> Any:
    with db.tx() as tx:
        return visible(tx, step_id, principal)


def history(step_id: str, principal: Principal) -> list[dict[str, Any]]:
    """The step's events, oldest first (the audit trail of its transitions)."""
    with db.tx() as tx:
        visible(tx, step_id, principal)
        return outbox.for_step(tx, step_id)


def attempts(step_id: str, principal: Principal) -> list[Any]:
    """The step's attempts, oldest first: where each ran, how long, and how it ended."""
    with db.tx() as tx:
        visible(tx, step_id, principal)
        return tx.all(
            "SELECT attempt, worker_id, machine_id, outcome, error, started_at, finished_at,"
            " cold_start, model_load_ms FROM step_attempts WHERE step_id = %s ORDER BY attempt",
            [step_id],
        )


@dataclass(frozen=True)
class StepFilters:
    """What a step list may be narrowed by besides status, service and workflow."""

    customer_id: str | None = None
    worker_id: str | None = None
    error_code: str | None = None
    created_after: datetime | None = None
    created_before: datetime | None = None
    id_prefix: str | None = None


def _filtered(query, principal: Principal, status, service, workflow_id, more=StepFilters()):
    """`query` narrowed to what the caller may see and asks for; a customer key naming
    another customer's steps is refused (Forbidden), not answered with an empty page."""
    if not principal.admin:
        if more.customer_id is not None and more.customer_id != principal.customer_id:
            raise Forbidden("a customer key lists only its own customer's steps")
        query = query.where(Step.customer_id == principal.customer_id)
    elif more.customer_id is not None:
        query = query.where(Step.customer_id == more.customer_id)
    if status is not None:
        query = query.where(Step.status == status)
    if service is not None:
        query = query.where(Step.service == service)
    if workflow_id is not None:
        query = query.where(Step.workflow_id == workflow_id)
    if more.worker_id is not None:
        query = query.where(Step.worker_id == more.worker_id)
    if more.error_code is not None:
        query = query.where(Step.error["code"].astext == more.error_code)
    if more.created_after is not None:
        query = query.where(Step.created_at >= more.created_after)
    if more.created_before is not None:
        query = query.where(Step.created_at < more.created_before)
    if more.id_prefix is not None:
        query = query.where(Step.id.startswith(more.id_prefix.lower(), autoescape=True))
    return query


def list_steps(
    principal: Principal,
    *,
    status: StepStatus | None = None,
    service: str | None = None,
    workflow_id: str | None = None,
    filters: StepFilters = StepFilters(),
    limit: int = 50,
    cursor: str | None = None,
) -> tuple[list[Step], str | None]:
    """Newest first; `cursor` is the last id of the previous page."""
    query = _filtered(
        select(Step).order_by(Step.id.desc()).limit(limit + 1),
        principal,
        status,
        service,
        workflow_id,
        filters,
    )
    if cursor is not None:
        query = query.where(Step.id < decode_cursor(cursor))
    with db.transaction() as session:
        rows = list(session.scalars(query))
    page = rows[:limit]
    next_cursor = page[-1].id if len(rows) > limit else None
    return page, next_cursor


def count_steps(
    principal: Principal,
    *,
    status: StepStatus | None = None,
    service: str | None = None,
    workflow_id: str | None = None,
) -> int:
    query = _filtered(
        select(func.count()).select_from(Step), principal, status, service, workflow_id
    )
    with db.transaction() as session:
        return int(session.scalar(query) or 0)


STAT_BUCKETS = {
    S.WAITING: "pending",
    S.PENDING: "pending",
    S.ASSIGNED: "running",
    S.RUNNING: "running",
    S.COMPLETED: "completed",
    S.FAILED: "failed",
    S.CANCELLED: "cancelled",
    S.SKIPPED: "skipped",
}


def _empty_counts() -> dict[str, int]:
    return {
        "total": 0,
        "pending": 0,
        "running": 0,
        "completed": 0,
        "failed": 0,
        "cancelled": 0,
        "skipped": 0,
    }


def stats(principal: Principal, timeframe: str) -> dict[str, Any]:
    """Counts of steps created within the timeframe, overall and per service."""
    since = now() - TIMEFRAMES[timeframe]
    query = (
        select(Step.service, Step.status, func.count())
        .where(Step.created_at >= since)
        .group_by(Step.service, Step.status)
    )
    if not principal.admin:
        query = query.where(Step.customer_id == principal.customer_id)
    totals = _empty_counts()
    by_service: dict[str, dict[str, int]] = {}
    with db.transaction() as session:
        for service, status, count in session.execute(query):
            bucket = STAT_BUCKETS[StepStatus(status)]
            service_counts = by_service.setdefault(service, _empty_counts())
            for counts in (totals, service_counts):
                counts["total"] += count
                counts[bucket] += count
    return {**totals, "by_service": by_service}
