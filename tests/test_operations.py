"""Open operational routes: health, readiness, version, and the generated OpenAPI document."""

from __future__ import annotations

import re
from dataclasses import replace

from emp_tasks.store import redisdb
from tests.conftest import headers, wait_for


def test_health_reports_each_dependency(client, system):
    # A worker re-announces itself within its heartbeat interval (after a Redis flush, say).
    wait_for(lambda: client.get("/health").get_json()["checks"]["workers"]["online"] >= 1)
    response = client.get("/health")
    assert response.status_code == 200
    body = response.get_json()
    assert body["status"] == "healthy"
    assert {"database", "redis", "broker", "workers"} <= set(body["checks"])
    assert body["checks"]["database"]["status"] == "ok"
    assert body["checks"]["workers"]["online"] >= 1
    assert body["timestamp"].endswith("Z")
    assert client.get("/health/ready").status_code == 200


def test_health_is_503_when_redis_is_down(settings):
    from web import create_app

    down = "redis://127.0.0.1:1/0"
    try:
        app = create_app(replace(settings, redis_url=down, broker_url=down)).test_client()
        for route in ("/health", "/health/ready"):
            response = app.get(route)
            assert response.status_code == 503
            body = response.get_json()
            assert body["status"] == "unhealthy"
            assert body["checks"]["redis"]["status"] == "error"
            assert body["checks"]["database"]["status"] == "ok"
    finally:
        redisdb._clients.pop("redis://127.0.0.1:1/0", None)


def test_health_is_503_when_the_database_is_down(settings):
    from web import create_app

    down = replace(settings, database_url="postgresql://postgres@127.0.0.1:1/nothing")
    response = create_app(down).test_client().get("/health/ready")
    assert response.status_code == 503
    assert response.get_json()["checks"]["database"]["status"] == "error"


def test_version_is_open(client):
    body = client.get("/version").get_json()
    assert body["success"] is True and body["version"]


def test_openapi_document_is_valid_and_lists_every_route(app):
    from openapi_spec_validator import validate

    spec = app.test_client().get("/openapi.json").get_json()
    validate(spec)
    documented = {(path, method) for path, ops in spec["paths"].items() for method in ops}
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        path = re.sub(r"<(?:[a-z]+:)?([a-zA-Z_]+)>", r"{\1}", rule.rule)
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            assert (path, method.lower()) in documented, (path, method)
    assert len(documented) == sum(
        len(r.methods - {"HEAD", "OPTIONS"})
        for r in app.url_map.iter_rules()
        if r.endpoint != "static"
    )


def test_openapi_request_schema_is_the_validating_model(app):
    spec = app.test_client().get("/openapi.json").get_json()
    schema = spec["components"]["schemas"]["StepCreate"]
    assert schema["properties"]["priority"]["maximum"] == 100
    assert "service" in schema["required"]
    body = spec["paths"]["/api/steps"]["post"]["requestBody"]
    assert body["content"]["application/json"]["schema"]["$ref"].endswith("/StepCreate")
    query = {p["name"] for p in spec["paths"]["/api/steps"]["get"]["parameters"]}
    assert {"status", "service", "workflow_id", "limit", "cursor"} <= query


def test_open_routes_need_no_key_and_api_routes_do(client):
    for route in ("/health", "/health/ready", "/version", "/openapi.json"):
        assert client.get(route).status_code in (200, 503)
    assert client.get("/api/steps").status_code == 401
    assert client.get("/api/steps", headers=headers()).status_code == 200
