"""The API's one error format, and the handlers that turn every failure into it."""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask, Response, g, jsonify
from pydantic import ValidationError
from sqlalchemy.exc import DBAPIError, OperationalError
from werkzeug.exceptions import HTTPException

from emp_tasks.core.errors import Forbidden, InvalidCursor, InvalidState, NotFound, ValidationFailed

logger = logging.getLogger(__name__)

NOT_FOUND_CODES = {
    "step": "STEP_NOT_FOUND",
    "workflow": "WORKFLOW_NOT_FOUND",
    "webhook": "WEBHOOK_NOT_FOUND",
    "machine": "MACHINE_NOT_FOUND",
    "worker": "WORKER_NOT_FOUND",
}


HTTP_ERROR_CODES = {
    400: "VALIDATION_FAILED",
    404: "NOT_FOUND",
    405: "METHOD_NOT_ALLOWED",
    413: "PAYLOAD_TOO_LARGE",
    414: "URI_TOO_LONG",
    415: "UNSUPPORTED_MEDIA_TYPE",
    431: "HEADERS_TOO_LARGE",
}
"""Error codes for failures that the HTTP layer (Werkzeug, gunicorn) detects itself."""


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        details: list[dict[str, Any]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details or []
        self.headers = headers or {}


def invalid(field: str, message: str, kind: str) -> ApiError:
    """A 400 VALIDATION_FAILED naming one bad field."""
    return ApiError(
        400, "VALIDATION_FAILED", message, [{"field": field, "message": message, "type": kind}]
    )


def error_response(error: ApiError) -> Response:
    body = {
        "success": False,
        "error": {"code": error.code, "message": error.message, "details": error.details},
    }
    response = jsonify(body)
    response.status_code = error.status
    for name, value in error.headers.items():
        response.headers[name] = value
    return response


def validation_details(exc: ValidationError, prefix: str = "") -> list[dict[str, Any]]:
    details = []
    for item in exc.errors(include_url=False, include_context=False, include_input=False):
        field = ".".join(str(part) for part in item["loc"] if part != "__root__")
        details.append(
            {
                "field": f"{prefix}{field}" if field else prefix.rstrip(".") or "body",
                "message": item["msg"],
                "type": item["type"],
            }
        )
    return details


def _not_found_code(kind: str) -> str:
    overrides = getattr(g, "not_found_codes", None) or {}
    return overrides.get(kind) or NOT_FOUND_CODES.get(kind, "NOT_FOUND")


def register(app: Flask) -> None:
    @app.errorhandler(ApiError)
    def _api_error(exc: ApiError) -> Response:
        return error_response(exc)

    @app.errorhandler(ValidationError)
    def _validation(exc: ValidationError) -> Response:
        return error_response(
            ApiError(400, "VALIDATION_FAILED", "request is invalid", validation_details(exc))
        )

    @app.errorhandler(NotFound)
    def _not_found(exc: NotFound) -> Response:
        return error_response(ApiError(404, _not_found_code(exc.kind), exc.message))

    @app.errorhandler(InvalidState)
    def _invalid_state(exc: InvalidState) -> Response:
        return error_response(ApiError(409, "INVALID_STATE", exc.message))

    @app.errorhandler(Forbidden)
    def _forbidden(exc: Forbidden) -> Response:
        return error_response(ApiError(403, "FORBIDDEN", exc.message))

    @app.errorhandler(InvalidCursor)
    def _cursor(exc: InvalidCursor) -> Response:
        return error_response(
            ApiError(
                400,
                "VALIDATION_FAILED",
                exc.message,
                [{"field": "cursor", "message": exc.message, "type": "cursor"}],
            )
        )

    @app.errorhandler(ValidationFailed)
    def _failed_rule(exc: ValidationFailed) -> Response:
        return error_response(
            ApiError(
                400,
                "VALIDATION_FAILED",
                exc.message,
                [{"field": exc.field, "message": exc.message, "type": "rule"}],
            )
        )

    @app.errorhandler(OperationalError)
    def _database_down(exc: DBAPIError) -> Response:
        logger.error("Database unavailable", extra={"action": "database_unavailable"})
        return error_response(
            ApiError(
                503,
                "UNAVAILABLE",
                "the database is unavailable; try again shortly",
                headers={"Retry-After": "5"},
            )
        )

    @app.errorhandler(HTTPException)
    def _http(exc: HTTPException) -> Response:
        status = exc.code or 500
        code = HTTP_ERROR_CODES.get(status, "HTTP_ERROR")
        # Keep what the exception says the client needs, e.g. `Allow` on a 405.
        kept = {name: value for name, value in exc.get_headers() if name.lower() == "allow"}
        return error_response(ApiError(status, code, exc.description or exc.name, headers=kept))

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:
        logger.exception("Unhandled error", extra={"action": "request_failed"})
        return error_response(ApiError(500, "INTERNAL", "internal error"))
