"""Seed-compatible "job" routes: the steps API under the old names and body shapes."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from flask import Blueprint, Response

from emp_tasks.auth import Principal
from emp_tasks.core.status import StepStatus
from emp_tasks.specs import CancelRequest, JobListQuery, StatsQuery, StepCreate
from emp_tasks.steps import client, queries
from emp_tasks.store.models import Step
from web.endpoints import endpoint, ok
from web.presenters import step_object
from web.steps import submit

bp = Blueprint("jobs", __name__)

TAGS = ("seed",)
JOB_CODES = {"step": "JOB_NOT_FOUND"}


def job_object(step: Step) -> dict[str, Any]:
    """A step object with `job_id` beside `id`."""
    return {"job_id": step.id, **step_object(step)}


def _submitted(body: StepCreate, principal: Principal) -> Response:
    step, _ = submit(body, principal)
    status = "waiting" if step.status == StepStatus.WAITING else "submitted"
    return ok(job_id=step.id, status=status)


@endpoint(
    bp,
    "/api/jobs/submit",
    methods=("POST",),
    body=StepCreate,
    tags=TAGS,
    headers=("Idempotency-Key",),
    summary="Submit a job",
)
def submit_job(principal: Principal, body: StepCreate) -> Response:
    return _submitted(body, principal)


@endpoint(
    bp,
    "/submit-job",
    methods=("POST",),
    body=StepCreate,
    tags=TAGS,
    deprecated=True,
    headers=("Idempotency-Key",),
    summary="Submit a job (deprecated)",
)
def submit_job_legacy(principal: Principal, body: StepCreate) -> Response:
    return _submitted(body, principal)


@endpoint(
    bp,
    "/api/jobs",
    methods=("POST",),
    body=StepCreate,
    status=201,
    tags=TAGS,
    headers=("Idempotency-Key",),
    summary="Create a job",
)
def create_job(principal: Principal, body: StepCreate) -> Response:
    step, created = submit(body, principal)
    return ok(
        201 if created else 200,
        job_id=step.id,
        message="job created" if created else "job already exists for this Idempotency-Key",
        timestamp=datetime.now(UTC).isoformat().replace("+00:00", "Z"),
    )


@endpoint(bp, "/api/jobs", query=JobListQuery, tags=TAGS, summary="List jobs, newest first")
def list_jobs(principal: Principal, query: JobListQuery) -> Response:
    filters = {"status": query.status, "service": query.service, "workflow_id": query.workflow_id}
    page, next_cursor = queries.list_steps(
        principal, limit=query.limit, cursor=query.cursor, **filters
    )
    return ok(
        jobs=[job_object(s) for s in page],
        total=queries.count_steps(principal, **filters),
        next_cursor=next_cursor,
    )


@endpoint(bp, "/api/jobs/stats", query=StatsQuery, tags=TAGS, summary="Job counts")
def job_stats(principal: Principal, query: StatsQuery) -> Response:
    return ok(timeframe=query.timeframe, stats=queries.stats(principal, query.timeframe))


@endpoint(
    bp,
    "/api/jobs/<job_id>",
    aliases=("/api/jobs/<job_id>/status",),
    tags=TAGS,
    not_found_codes=JOB_CODES,
    summary="Get a job",
)
def get_job(principal: Principal, job_id: str) -> Response:
    return ok(job=job_object(queries.get(job_id, principal)))


@endpoint(
    bp,
    "/job/<job_id>",
    tags=TAGS,
    not_found_codes=JOB_CODES,
    deprecated=True,
    summary="Get a job (deprecated)",
)
def get_job_legacy(principal: Principal, job_id: str) -> Response:
    return ok(job=job_object(queries.get(job_id, principal)))


@endpoint(
    bp,
    "/api/jobs/<job_id>/cancel",
    methods=("POST",),
    body=CancelRequest,
    tags=TAGS,
    not_found_codes=JOB_CODES,
    summary="Cancel a job",
)
def cancel_job(principal: Principal, job_id: str, body: CancelRequest) -> Response:
    client.cancel(job_id, principal, body.reason)
    return ok(message=f"job {job_id} cancelled")
