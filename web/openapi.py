"""The OpenAPI 3 document, generated from the route declarations and request models."""

from __future__ import annotations

import re
from functools import cache
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from emp_tasks import __version__

if TYPE_CHECKING:
    from web.endpoints import Route

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
    429: "RATE_LIMITED, with Retry-After",
    503: "UNAVAILABLE",
}


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
    from web.endpoints import ROUTES

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
            {"name": name, "in": "header", "required": False, "schema": {"type": "string"}}
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
            if route.deprecated:
                operation["deprecated"] = True
            if route.body is not None:
                operation["requestBody"] = {
                    "required": True,
                    "content": {"application/json": {"schema": _schema(route.body, components)}},
                }
            if route.authenticated:
                operation["security"] = [{"bearer": []}, {"apiKey": []}]
                for status, description in ERROR_STATUSES.items():
                    operation["responses"][str(status)] = {
                        "description": description,
                        "content": {
                            "application/json": {"schema": {"$ref": REF.format(model="Error")}}
                        },
                    }
            paths.setdefault(path, {})[method.lower()] = operation
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
