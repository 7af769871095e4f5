"""`GET /api/steps/{id}/logs`: what the step's connector reported while each attempt ran."""

from __future__ import annotations

from flask import Blueprint, Response
from pydantic import BaseModel, ConfigDict, Field

from emp_tasks.auth import Principal
from emp_tasks.steps import attempt_logs
from web.endpoints import endpoint, ok

bp = Blueprint("step_logs", __name__)


class StepLogsQuery(BaseModel):
    model_config = ConfigDict(extra="ignore")

    attempt: int | None = Field(default=None, ge=1, le=100_000, description="one attempt only")


@endpoint(
    bp,
    "/api/steps/<step_id>/logs",
    query=StepLogsQuery,
    tags=("steps",),
    summary="A step's log lines per attempt, oldest first (at most EMP_STEP_LOG_LINES each)",
)
def step_logs(principal: Principal, step_id: str, query: StepLogsQuery) -> Response:
    return ok(logs=attempt_logs.read(step_id, principal, query.attempt))
