"""The OpenAPI 3 document, generated from the route declarations and request models."""

from __future__ import annotations

import re
from functools import cache
from typing import Any

from pydantic import BaseModel

from emp_tasks import __version__
from web.endpoints import ROUTES, Route
from web.inbound import (
    IDEMPOTENCY_KEY_PATTERN,
    MAX_IDEMPOTENCY_KEY,
    MAX_JSON_DEPTH,
    STORABLE_TEXT_PATTERN,
)

REF = "#/components/schemas/{model}"

ERROR_SCHEMA = {
    "type": "object",
    "required": ["success", "error"],
    "properties": {
        "success": {"type": "boolean", "const": False},
        "error": {
            "type": "object",
            "required": ["code", "message", "details"],
            "properties": {
                "code": {"type": "string"},
                "message": {"type": "string"},
                "details": {"type": "array", "items": {"type": "object"}},
            },
        },
    },
}

ERROR_STATUSES = {
    400: "VALIDATION_FAILED: the details name each bad field",
    401: "UNAUTHORIZED: no valid API key",
    403: "FORBIDDEN",
    404: "Not found (STEP_NOT_FOUND, JOB_NOT_FOUND, NOT_FOUND, ...)",
    409: "INVALID_STATE",
    413: "PAYLOAD_TOO_LARGE",
    415: "UNSUPPORTED_MEDIA_TYPE: send the body with Content-Type: application/json",
    429: "RATE_LIMITED, with Retry-After",
    503: "UNAVAILABLE",
}
"""The errors a route answers unless it names its own."""

OTHER_ERROR_STATUSES = {
    502: "UPSTREAM_FAILED: a service we call failed; its status is in the details",
}
"""Errors only the routes naming them answer."""

JSON_VALUE = {
    "description": (
        f"Any JSON value nested at most {MAX_JSON_DEPTH} levels deep (counted from the request"
        " body), with finite numbers and text without NUL characters or lone surrogates"
    ),
    "anyOf": [
        {"type": "string", "pattern": STORABLE_TEXT_PATTERN},
        {"type": "number"},
        {"type": "boolean"},
        {"type": "null"},
        {"type": "array", "items": {"$ref": "#/components/schemas/JsonValue"}},
        {
            "type": "object",
            "patternProperties": {
                STORABLE_TEXT_PATTERN: {"$ref": "#/components/schemas/JsonValue"}
            },
            "additionalProperties": False,
        },
    ],
}

HEADER_SCHEMAS = {
    "Idempotency-Key": {
        "type": "string",
        "minLength": 1,
        "maxLength": MAX_IDEMPOTENCY_KEY,
        "pattern": IDEMPOTENCY_KEY_PATTERN,
        "description": (
            "The same key from the same customer within 24 h returns the original resource"
            " (200) instead of creating another: 1 to 255 visible ASCII characters"
            " (inner spaces allowed)"
        ),
    },
    "Prefer": {
        "type": "string",
        "description": (
            "`wait=<seconds>` (1-60): answer once the step or workflow is terminal, or when"
            " the time is up (Preference-Applied says it was honoured); preferences not"
            " understood are ignored (RFC 7240)"
        ),
    },
    "Last-Event-ID": {
        "type": "string",
        "pattern": r"^\d{1,20}-\d{1,20}$",
        "description": "Resume after this stream id (the `id:` of the last event received)",
    },
}

CONSTRAINT_NAMES = {
    "gt": "exclusiveMinimum",
    "ge": "minimum",
    "lt": "exclusiveMaximum",
    "le": "maximum",
}


def _describe_storable(node: Any) -> None:
    """Say in the schema what web.inbound refuses of any request: text, free-form JSON.

    Every string without a tighter rule gets the storable-text pattern; every object
    names its keys the same way, and whatever it may hold besides its own fields
    (free-form `payload` and `metadata`, or ignored extra keys) is a JsonValue.
    Pydantic's `gt`/`ge`/`lt`/`le` left on a nullable number become JSON Schema's words.
    """
    if isinstance(node, list):
        for item in node:
            _describe_storable(item)
        return
    if not isinstance(node, dict):
        return
    for short, long in CONSTRAINT_NAMES.items():
        if short in node and node.get("type") in ("number", "integer"):
            node[long] = node.pop(short)
    if node.get("type") == "string" and not {"pattern", "enum", "const", "format"} & set(node):
        node["pattern"] = STORABLE_TEXT_PATTERN
    if node.get("type") == "object" and node.get("additionalProperties", True) is True:
        # Keys as text we can store, any (storable) value: said as patternProperties,
        # which schema-driven generators honour where some ignore propertyNames.
        node["patternProperties"] = {STORABLE_TEXT_PATTERN: {"$ref": REF.format(model="JsonValue")}}
        node["additionalProperties"] = False
    for key, value in node.items():
        if key == "properties":
            for field in value.values():
                _describe_storable(field)
        elif key != "patternProperties":
            _describe_storable(value)


def _path(rule: str) -> str:
    return re.sub(r"<(?:[a-z]+:)?([a-zA-Z_]+)>", r"{\1}", rule)


def _schema(model: type[BaseModel], components: dict[str, Any]) -> dict[str, Any]:
    schema = model.model_json_schema(ref_template=REF)
    for name, definition in schema.pop("$defs", {}).items():
        components[name] = definition
    components[model.__name__] = schema
    return {"$ref": REF.format(model=model.__name__)}


def _query_parameters(model: type[BaseModel]) -> list[dict[str, Any]]:
    schema = model.model_json_schema(ref_template=REF)
    definitions = schema.get("$defs", {})
    parameters = []
    for name, prop in schema.get("properties", {}).items():
        prop = dict(prop)
        options = [o for o in prop.pop("anyOf", []) if o.get("type") != "null"]
        if len(options) == 1:  # optional parameter: absent rather than null
            prop.update(options[0])
        elif options:
            prop["anyOf"] = options
        if "$ref" in prop:
            prop.update(definitions[prop.pop("$ref").rsplit("/", 1)[-1]])
        if prop.get("default", 0) is None:
            del prop["default"]
        parameters.append(
            {
                "name": name,
                "in": "query",
                "required": name in schema.get("required", []),
                "schema": prop,
            }
        )
    return parameters


def _success(route: Route) -> dict[str, Any]:
    if route.produces is None:
        return {"description": "success"}
    if route.produces != "application/json":
        return {
            "description": "success",
            "content": {route.produces: {"schema": {"type": "string"}}},
        }
    schema = {"type": "object", "required": ["success"] if route.authenticated else []}
    return {"description": "success", "content": {"application/json": {"schema": schema}}}


@cache
def document() -> dict[str, Any]:
    components: dict[str, Any] = {"Error": ERROR_SCHEMA}
    paths: dict[str, Any] = {}
    for route in ROUTES:
        path = _path(route.rule)
        parameters = [
            {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
            for name in re.findall(r"\{([a-zA-Z_]+)\}", path)
        ]
        if route.query is not None:
            parameters += _query_parameters(route.query)
        parameters += [
            {
                "name": name,
                "in": "header",
                "required": False,
                "schema": HEADER_SCHEMAS.get(name, {"type": "string"}),
            }
            for name in route.headers
        ]
        for method in route.methods:
            operation: dict[str, Any] = {
                "summary": route.summary,
                "operationId": f"{method.lower()}_{re.sub(r'[^a-zA-Z0-9]+', '_', path).strip('_')}",
                "tags": list(route.tags),
                "parameters": parameters,
                "responses": {str(route.status): _success(route)},
            }
            if "Idempotency-Key" in route.headers:
                operation["responses"]["200"] = {
                    **_success(route),
                    "description": "created before with this Idempotency-Key: the original",
                }
            if route.deprecated:
                operation["deprecated"] = True
            if route.body is not None:
                operation["requestBody"] = {
                    "required": True,
                    "content": {"application/json": {"schema": _schema(route.body, components)}},
                }
            if route.authenticated or route.errors:
                operation["security"] = [{"bearer": []}, {"apiKey": []}]
                if not route.authenticated:
                    operation["security"].append({})  # the route may be opened by a setting
                statuses = route.errors or tuple(ERROR_STATUSES)
                for status in statuses:
                    description = {**ERROR_STATUSES, **OTHER_ERROR_STATUSES}[status]
                    operation["responses"][str(status)] = {
                        "description": description,
                        "content": {
                            "application/json": {"schema": {"$ref": REF.format(model="Error")}}
                        },
                    }
            paths.setdefault(path, {})[method.lower()] = operation
    request_schemas = {name: c for name, c in components.items() if name != "Error"}
    _describe_storable(request_schemas)
    for operations in paths.values():
        for operation in operations.values():
            _describe_storable(operation["parameters"])
    components["JsonValue"] = JSON_VALUE
    return {
        "openapi": "3.1.0",
        "info": {"title": "EMP Tasks API", "version": __version__},
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
            },
        },
    }
