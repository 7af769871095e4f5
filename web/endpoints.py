"""Declaring an API route: authentication, rate limit, request validation, OpenAPI facts.

Each route is declared once with `endpoint(...)`; the same declaration parses
and validates the request and describes it in `/openapi.json`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from flask import Blueprint, Response, g, jsonify, request
from pydantic import BaseModel, ValidationError

from emp_tasks import auth
from emp_tasks.core.config import get_settings
from emp_tasks.store import ratelimit
from web import inbound
from web.errors import ApiError, invalid, validation_details


@dataclass(frozen=True)
class Route:
    rule: str
    methods: tuple[str, ...]
    summary: str
    tags: tuple[str, ...]
    body: type[BaseModel] | None
    query: type[BaseModel] | None
    status: int
    authenticated: bool
    admin: bool
    deprecated: bool
    headers: tuple[str, ...] = field(default_factory=tuple)
    produces: str | None = "application/json"
    """The success response's media type (None: no body, e.g. a protocol upgrade)."""
    errors: tuple[int, ...] = ()
    """Error statuses of a route that checks credentials itself (authenticated=False)."""


ROUTES: list[Route] = []


def ok(http_status: int = 200, headers: dict[str, str] | None = None, /, **fields: Any) -> Response:
    response = jsonify({"success": True, **fields})
    response.status_code = http_status
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def presented_key() -> str | None:
    """The API key a request presents: a bearer token, or the X-API-Key header."""
    header = request.headers.get("Authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip() or None
    return request.headers.get("X-API-Key") or None


def rate_limited(what: str, wait_s: int) -> ApiError:
    return ApiError(
        429, "RATE_LIMITED", f"{what}; retry in {wait_s} s", headers={"Retry-After": str(wait_s)}
    )


def client_address() -> str:
    """The address failed authentication is counted against.

    The connection's peer; X-Forwarded-For is believed only as far as
    EMP_TRUSTED_PROXY_HOPS says reverse proxies in front of us append to it.
    """
    hops = get_settings().trusted_proxy_hops
    if hops:
        forwarded = request.headers.get("X-Forwarded-For", "").split(",")
        chain = [part.strip() for part in forwarded if part.strip()]
        if len(chain) >= hops:
            return chain[-hops]
    return request.remote_addr or "unknown"


def throttled_authenticate(
    raw: str | None, token: Callable[[str], auth.Principal | None] | None = None
) -> auth.Principal | None:
    """The principal a presented credential stands for, throttled per client address.

    `token` may accept a credential that is not an API key (the metrics token). An
    address that failed too often this minute gets 429 whatever it presents; each
    credential refused counts as a failure (a request presenting none does not).
    """
    if not raw:
        return None
    limit = get_settings().auth_failures_per_minute
    address = client_address()
    wait = ratelimit.seconds_until_auth_allowed(address, limit)
    if wait:
        raise rate_limited("too many failed authentications", wait)
    principal = (token(raw) if token else None) or auth.authenticate(raw)
    if principal is None:
        ratelimit.authentication_failed(address, limit)
    return principal


def current_principal(admin: bool = False) -> auth.Principal:
    principal = throttled_authenticate(presented_key())
    if principal is None:
        raise ApiError(
            401,
            "UNAUTHORIZED",
            "a valid API key is required (Authorization: Bearer <key>)",
            headers={"WWW-Authenticate": "Bearer"},
        )
    if admin and not principal.admin:
        raise ApiError(403, "FORBIDDEN", "an admin key is required")
    wait = ratelimit.seconds_until_allowed(principal.key_id, get_settings().rate_limit_per_minute)
    if wait:
        raise rate_limited("too many requests", wait)
    return principal


def _json_body() -> dict[str, Any]:
    raw = request.get_data(cache=True)
    if len(raw) > get_settings().max_body_bytes:
        raise ApiError(
            413,
            "PAYLOAD_TOO_LARGE",
            f"the request body is larger than {get_settings().max_body_bytes} bytes",
        )
    if not raw.strip():
        return {}
    if not inbound.is_json_media_type(request.mimetype):
        raise ApiError(
            415,
            "UNSUPPORTED_MEDIA_TYPE",
            "send the body as JSON with Content-Type: application/json",
            [{"field": "Content-Type", "message": "must be application/json", "type": "header"}],
        )
    try:
        data = inbound.decode_json(raw)
    except inbound.InboundRefused as exc:
        raise invalid(exc.field, exc.message, exc.kind) from exc
    if not isinstance(data, dict):
        raise ApiError(
            400,
            "VALIDATION_FAILED",
            "request body must be a JSON object",
            [{"field": "body", "message": "expected an object", "type": "object_type"}],
        )
    return data


def _parse(model: type[BaseModel], data: dict[str, Any], prefix: str) -> BaseModel:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ApiError(
            400, "VALIDATION_FAILED", "request is invalid", validation_details(exc, prefix)
        ) from exc


def idempotency_key() -> str | None:
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return None
    if not inbound.valid_idempotency_key(key):
        raise invalid(
            "Idempotency-Key",
            "Idempotency-Key must be 1 to 255 visible ASCII characters (spaces inside only)",
            "header",
        )
    return key


def endpoint(
    blueprint: Blueprint,
    rule: str,
    *,
    methods: tuple[str, ...] = ("GET",),
    summary: str,
    tags: tuple[str, ...] = (),
    body: type[BaseModel] | None = None,
    query: type[BaseModel] | None = None,
    status: int = 200,
    authenticated: bool = True,
    admin: bool = False,
    deprecated: bool = False,
    headers: tuple[str, ...] = (),
    not_found_codes: dict[str, str] | None = None,
    aliases: tuple[str, ...] = (),
    produces: str = "application/json",
    errors: tuple[int, ...] = (),
) -> Callable[[Callable[..., Response]], Callable[..., Response]]:
    """Register `rule` (and any `aliases`, same behaviour) on `blueprint`.

    The view receives `principal`, `body` and `query` as declared.
    """

    def decorate(view: Callable[..., Response]) -> Callable[..., Response]:
        ROUTES.extend(
            Route(
                rule=each,
                methods=methods,
                summary=summary,
                tags=tags,
                body=body,
                query=query,
                status=status,
                authenticated=authenticated,
                admin=admin,
                deprecated=deprecated,
                headers=headers,
                produces=produces,
                errors=errors,
            )
            for each in (rule, *aliases)
        )

        @functools.wraps(view)
        def handle(**path: Any) -> Response:
            g.not_found_codes = not_found_codes
            kwargs: dict[str, Any] = dict(path)
            if authenticated:
                kwargs["principal"] = current_principal(admin=admin)
            if body is not None:
                kwargs["body"] = _parse(body, _json_body(), "")
            if query is not None:
                kwargs["query"] = _parse(query, request.args.to_dict(), "")
            response = view(**kwargs)
            if deprecated:
                response.headers["Deprecation"] = "true"
            return response

        for number, each in enumerate((rule, *aliases)):
            name = view.__name__ if number == 0 else f"{view.__name__}_alias{number}"
            blueprint.add_url_rule(each, endpoint=name, view_func=handle, methods=list(methods))
        return handle

    return decorate
