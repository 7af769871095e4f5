"""Steps API routes: parse, authorise, call emp_tasks.steps (client, queries), serialise."""

from __future__ import annotations

from flask import Blueprint, Response, g

from emp_tasks.auth import Principal
from emp_tasks.core.status import TERMINAL_STEP_STATUSES
from emp_tasks.core.times import iso
from emp_tasks.routes import queues
from emp_tasks.specs import CancelRequest, StatsQuery, StepCreate, StepListQuery
from emp_tasks.steps import client, queries, queue_order
from web import waiting
from web.endpoints import endpoint, idempotency_key, ok
from web.presenters import attempt_object, step_object

bp = Blueprint("steps", __name__)

TAGS = ("steps",)


def submit(body: StepCreate, principal: Principal):
    """Shared by every submit route: returns (step, created)."""
    return client.submit(body, principal, **_request_origin())


def _request_origin() -> dict[str, str | None]:
    """What a submit takes from the request: its correlation id and Idempotency-Key."""
    return {"correlation_id": g.correlation_id, "idempotency_key": idempotency_key()}


@endpoint(
    bp,
    "/api/steps",
    aliases=("/submit-step",),
    methods=("POST",),
    body=StepCreate,
    status=201,
    tags=TAGS,
    headers=("Idempotency-Key", "Prefer"),
    summary="Submit a step; `Prefer: wait=N` answers once it ended (or N seconds passed)",
)
def create_step(principal: Principal, body: StepCreate) -> Response:
    step, created, place = client.submit_placed(body, principal, **_request_origin())
    extra = _waited(principal, step)
    if extra:
        step, place = queries.get(step.id, principal), None
    return ok(
        201 if created else 200,
        extra,
        step_id=step.id,
        status=step.status,
        step=shown(step, place),
        warnings=queues.step_warnings(step),
    )


def shown(step, place: dict | None = None) -> dict:
    """A step object with its place in its queue (queue_position, queue_depth: null unless
    pending); `place` when it was read already."""
    return {**step_object(step), **(place or queue_order.position(step))}


def _waited(principal: Principal, step) -> dict[str, str]:
    """Wait as `Prefer: wait=N` asks (see web.waiting); the headers to answer with."""

    def ended() -> bool:
        return queries.get(step.id, principal).status in TERMINAL_STEP_STATUSES

    ended_now = step.status in TERMINAL_STEP_STATUSES
    return waiting.honour(principal, ended, step_id=step.id, ended_now=ended_now)


@endpoint(bp, "/api/steps", query=StepListQuery, tags=TAGS, summary="List steps, newest first")
def list_steps(principal: Principal, query: StepListQuery) -> Response:
    filters = queries.StepFilters(
        customer_id=query.customer_id,
        worker_id=query.worker_id,
        error_code=query.error_code,
        created_after=query.created_after,
        created_before=query.created_before,
        id_prefix=query.id_prefix,
    )
    page, next_cursor = queries.list_steps(
        principal,
        status=query.status,
        service=query.service,
        workflow_id=query.workflow_id,
        filters=filters,
        limit=query.limit,
        cursor=query.cursor,
    )
    # `queued_at` beside the step object: when its current wait for a worker began (the
    # list's queue-wait column).
    listed = [{**step_object(s), "queued_at": iso(s.queued_at)} for s in page]
    return ok(steps=listed, next_cursor=next_cursor)


@endpoint(bp, "/api/steps/stats", query=StatsQuery, tags=TAGS, summary="Step counts")
def step_stats(principal: Principal, query: StatsQuery) -> Response:
    return ok(timeframe=query.timeframe, stats=queries.stats(principal, query.timeframe))


@endpoint(
    bp,
    "/api/steps/<step_id>",
    aliases=("/step/<step_id>",),
    tags=TAGS,
    headers=("Prefer",),
    summary="Get a step; `Prefer: wait=N` waits for its end",
)
def get_step(principal: Principal, step_id: str) -> Response:
    step = queries.get(step_id, principal)
    extra = _waited(principal, step)
    if extra:
        step = queries.get(step_id, principal)
    return ok(200, extra, step=shown(step), warnings=queues.step_warnings(step))


@endpoint(bp, "/api/steps/<step_id>/attempts", tags=TAGS, summary="A step's attempts")
def step_attempts(principal: Principal, step_id: str) -> Response:
    return ok(attempts=[attempt_object(a) for a in queries.attempts(step_id, principal)])


@endpoint(bp, "/api/steps/<step_id>/events", tags=TAGS, summary="A step's events, oldest first")
def step_events(principal: Principal, step_id: str) -> Response:
    return ok(events=queries.history(step_id, principal))


@endpoint(
    bp,
    "/api/steps/<step_id>/cancel",
    methods=("POST",),
    body=CancelRequest,
    tags=TAGS,
    summary="Cancel a step; a running one is stopped on its worker",
)
def cancel_step(principal: Principal, step_id: str, body: CancelRequest) -> Response:
    return ok(step=step_object(client.cancel(step_id, principal, body.reason)))


@endpoint(
    bp,
    "/api/steps/<step_id>/retry",
    methods=("POST",),
    tags=TAGS,
    summary="Queue a failed or cancelled step again as a new attempt",
)
def retry_step(principal: Principal, step_id: str) -> Response:
    return ok(step=step_object(client.retry(step_id, principal)))
