"""Open routes: health, readiness, version, and the OpenAPI document."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import redis
from flask import Blueprint, Response, jsonify
from sqlalchemy import text

from emp_tasks import API_VERSION, __version__, workers
from emp_tasks.core.config import get_settings
from emp_tasks.store import db, redisdb
from web import openapi
from web.endpoints import endpoint, ok

bp = Blueprint("health", __name__)

TAGS = ("operations",)


def _timed(check: Callable[[], Any]) -> dict[str, Any]:
    started = time.perf_counter()
    try:
        check()
    except Exception as exc:
        return {"status": "error", "error": f"{type(exc).__name__}: {exc}"[:300]}
    return {"status": "ok", "latency_ms": round((time.perf_counter() - started) * 1000, 2)}


def _database() -> None:
    with db.engine().connect() as connection:
        connection.execute(text("SELECT 1"))


def _redis() -> None:
    redisdb.client().ping()


def _broker() -> None:
    settings = get_settings()
    if settings.broker_url == settings.redis_url:
        _redis()
        return
    redis.Redis.from_url(settings.broker_url, socket_connect_timeout=2).ping()


def _report(checks: dict[str, dict[str, Any]], required: tuple[str, ...]) -> Response:
    healthy = all(checks[name]["status"] == "ok" for name in required)
    response = jsonify(
        {
            "status": "healthy" if healthy else "unhealthy",
            "checks": checks,
            "timestamp": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
        }
    )
    response.status_code = 200 if healthy else 503
    return response


@endpoint(
    bp,
    "/health",
    authenticated=False,
    tags=TAGS,
    summary="Health of the service and each dependency (503 when one is down)",
)
def health() -> Response:
    checks = {"database": _timed(_database), "redis": _timed(_redis), "broker": _timed(_broker)}
    try:
        online = workers.online_count()
        checks["workers"] = {"status": "ok" if online else "none", "online": online}
    except Exception as exc:
        checks["workers"] = {"status": "unknown", "error": str(exc)[:300]}
    return _report(checks, ("database", "redis", "broker"))


@endpoint(
    bp,
    "/health/ready",
    authenticated=False,
    tags=TAGS,
    summary="Readiness: 200 when the database and Redis answer, else 503",
)
def ready() -> Response:
    return _report({"database": _timed(_database), "redis": _timed(_redis)}, ("database", "redis"))


@endpoint(bp, "/version", authenticated=False, tags=TAGS, summary="Service version")
def version() -> Response:
    return ok(name="emp-tasks", version=__version__, api_version=API_VERSION)


@endpoint(
    bp, "/openapi.json", authenticated=False, tags=TAGS, summary="This API's OpenAPI 3 document"
)
def openapi_document() -> Response:
    return jsonify(openapi.document())
