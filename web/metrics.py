"""Prometheus metrics at `/metrics` (see emp_tasks.metrics for what they say).

They name every tenant's services and counts, so a scrape needs the
EMP_METRICS_TOKEN or an admin API key, unless EMP_METRICS_PUBLIC=true opens them.
"""

from __future__ import annotations

from flask import Blueprint, Response, request

from emp_tasks import metrics
from emp_tasks.core.config import get_settings
from web.endpoints import endpoint, presented_key, throttled_authenticate
from web.errors import ApiError

bp = Blueprint("metrics", __name__)


@endpoint(
    bp,
    "/metrics",
    authenticated=False,
    tags=("operations",),
    produces="text/plain",
    errors=(401, 403, 429),
    summary=(
        "Prometheus metrics (text format); needs the EMP_METRICS_TOKEN bearer or an admin key "
        "unless EMP_METRICS_PUBLIC=true"
    ),
)
def scrape() -> Response:
    if not get_settings().metrics_public:
        principal = throttled_authenticate(presented_key(), token=metrics.token_principal)
        if principal is None:
            raise ApiError(
                401,
                "UNAUTHORIZED",
                "the metrics token or an admin API key is required (Authorization: Bearer <…>)",
                headers={"WWW-Authenticate": "Bearer"},
            )
        if not principal.admin:
            raise ApiError(403, "FORBIDDEN", "an admin key is required to read metrics")
    body, content_type = metrics.exposition(request.headers.get("Accept"))
    return Response(body, content_type=content_type)
