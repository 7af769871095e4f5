"""Workflows API routes: parse, authorise, call emp_tasks.steps.workflows, serialise."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, g

from emp_tasks.auth import Principal
from emp_tasks.core.status import TERMINAL_WORKFLOW_STATUSES
from emp_tasks.specs import CancelRequest, StatsQuery, WorkflowCreate, WorkflowListQuery
from emp_tasks.steps import workflows
from web import waiting
from web.endpoints import endpoint, idempotency_key, ok
from web.presenters import workflow_object

bp = Blueprint("workflows", __name__)

TAGS = ("workflows",)


@endpoint(
    bp,
    "/api/workflows",
    aliases=("/api/workflows/create",),
    methods=("POST",),
    body=WorkflowCreate,
    status=201,
    tags=TAGS,
    headers=("Idempotency-Key", "Prefer"),
    summary="Submit a workflow (a DAG of steps); `Prefer: wait=N` answers once it ended",
)
def create_workflow(principal: Principal, body: WorkflowCreate) -> Response:
    workflow, step_ids, created = workflows.submit(
        body, principal, correlation_id=g.correlation_id, idempotency_key=idempotency_key()
    )
    extra = _waited(principal, workflow.id)
    if extra:
        workflow, _ = workflows.status(workflow.id, principal)
    return ok(
        201 if created else 200,
        extra,
        workflow_id=workflow.id,
        step_ids=step_ids,
        job_ids=step_ids,
        workflow=_with_emprops(workflow_object(workflow), principal),
    )


def _waited(principal: Principal, workflow_id: str) -> dict[str, str]:
    """Wait as `Prefer: wait=N` asks (see web.waiting); the headers to answer with."""

    def ended() -> bool:
        return workflows.status(workflow_id, principal)[0].status in TERMINAL_WORKFLOW_STATUSES

    return waiting.honour(principal, ended, workflow_id=workflow_id)


def _with_emprops(shown: dict[str, Any], principal: Principal) -> dict[str, Any]:
    state = workflows.emprops_state(shown["id"], principal)
    return {**shown, "emprops": state} if state is not None else shown


@endpoint(
    bp, "/api/workflows", query=WorkflowListQuery, tags=TAGS, summary="List workflows, newest first"
)
def list_workflows(principal: Principal, query: WorkflowListQuery) -> Response:
    page, next_cursor = workflows.list_workflows(
        principal, status=query.status, limit=query.limit, cursor=query.cursor
    )
    return ok(workflows=[workflow_object(w) for w in page], next_cursor=next_cursor)


@endpoint(bp, "/api/workflows/stats", query=StatsQuery, tags=TAGS, summary="Workflow counts")
def workflow_stats(principal: Principal, query: StatsQuery) -> Response:
    return ok(timeframe=query.timeframe, stats=workflows.stats(principal, query.timeframe))


@endpoint(
    bp,
    "/api/workflows/<workflow_id>",
    aliases=("/api/workflows/<workflow_id>/status",),
    tags=TAGS,
    headers=("Prefer",),
    summary="A workflow and the step_details of its steps; `Prefer: wait=N` waits for its end",
)
def get_workflow(principal: Principal, workflow_id: str) -> Response:
    workflow, details = workflows.status(workflow_id, principal)  # 404 before any wait
    extra = (
        _waited(principal, workflow.id) if workflow.status not in TERMINAL_WORKFLOW_STATUSES else {}
    )
    if extra:
        workflow, details = workflows.status(workflow_id, principal)
    return ok(
        200, extra, workflow=_with_emprops(workflow_object(workflow), principal), steps=details
    )


@endpoint(
    bp,
    "/api/workflows/<workflow_id>/emprops/replay",
    methods=("POST",),
    admin=True,
    tags=TAGS,
    errors=(404, 409),
    summary="Send an ended EmProps workflow's notification to EmProps again (admin)",
)
def replay_emprops(principal: Principal, workflow_id: str) -> Response:
    return ok(emprops=workflows.replay_emprops(workflow_id, principal))


@endpoint(
    bp,
    "/api/workflows/<workflow_id>/cancel",
    methods=("POST",),
    body=CancelRequest,
    tags=TAGS,
    summary="Cancel a workflow's running and pending steps",
)
def cancel_workflow(principal: Principal, workflow_id: str, body: CancelRequest) -> Response:
    workflow = workflows.cancel(workflow_id, principal, body.reason)
    return ok(message=f"workflow {workflow_id} cancelled", workflow=workflow_object(workflow))
