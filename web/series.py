"""Steps over time for the dashboard's charts: `GET /api/stats/series` (read only).

A customer key sees its own customer's steps; an admin key every step.
"""

from __future__ import annotations

from flask import Blueprint, Response

from emp_tasks.auth import Principal
from emp_tasks.specs import SeriesQuery
from emp_tasks.steps import series
from web.endpoints import endpoint, ok

bp = Blueprint("series", __name__)


@endpoint(
    bp,
    "/api/stats/series",
    query=SeriesQuery,
    tags=("steps",),
    summary="Steps over time in buckets: finished by outcome, pending at each bucket's end,"
    " queue wait p50/p95, permanent failures by error code",
)
def step_series(principal: Principal, query: SeriesQuery) -> Response:
    return ok(**series.series(principal, query.window))
