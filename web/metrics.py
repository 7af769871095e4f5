"""Prometheus metrics at `/metrics` (see emp_tasks.metrics for what they say)."""

from __future__ import annotations

from flask import Blueprint, Response, request

from emp_tasks import metrics
from web.endpoints import endpoint, presented_key
from web.errors import ApiError

bp = Blueprint("metrics", __name__)


@endpoint(
    bp,
    "/metrics",
    authenticated=False,
    tags=("operations",),
    produces="text/plain",
    summary="Prometheus metrics (text format); needs the EMP_METRICS_TOKEN bearer when set",
)
def scrape() -> Response:
    if not metrics.token_accepted(presented_key()):
        raise ApiError(
            401,
            "UNAUTHORIZED",
            "the metrics token is required (Authorization: Bearer <EMP_METRICS_TOKEN>)",
            headers={"WWW-Authenticate": "Bearer"},
        )
    body, content_type = metrics.exposition(request.headers.get("Accept"))
    return Response(body, content_type=content_type)
