"""The Steps API (API.md, "Steps"): behaviour, errors, scoping, idempotency, pagination."""

from __future__ import annotations

from dataclasses import replace

import pytest

from tests.conftest import headers, wait_for_status

UNSERVED = "unserved-service"  # no test worker consumes its queue: steps stay pending


def submit(client, body: dict, who: str = "alice", **extra_headers: str):
    return client.post("/api/steps", json=body, headers=headers(who, **extra_headers))


def test_submitted_step_completes_with_its_result(client, system):
    response = submit(client, {"service": "simulation", "payload": {"result": {"image": "x.png"}}})
    assert response.status_code == 201
    body = response.get_json()
    assert body["success"] is True
    assert body["status"] == "pending"
    assert body["step"]["id"] == body["step_id"]
    step = wait_for_status(client, body["step_id"], {"completed", "failed"})
    assert step["status"] == "completed"
    assert step["result"] == {"image": "x.png"}
    assert step["attempts"] == 1
    assert step["progress"] == 100.0
    assert step["worker_id"] == "test-worker-1"
    assert step["machine_id"] == "test-machine-1"
    assert step["started_at"] and step["completed_at"]


def test_default_simulation_result_echoes_payload(client, system):
    step_id = submit(client, {"service": "simulation", "payload": {"n": 1}}).get_json()["step_id"]
    step = wait_for_status(client, step_id, {"completed"})
    assert step["result"] == {"ok": True, "echo": {"n": 1}, "inputs": {}}


def test_step_object_has_every_documented_field(client):
    step = submit(client, {"service": UNSERVED}).get_json()["step"]
    documented = [
        "id",
        "service",
        "status",
        "priority",
        "payload",
        "requirements",
        "result",
        "error",
        "progress",
        "stage",
        "message",
        "attempts",
        "max_retries",
        "timeout_s",
        "workflow_id",
        "step_index",
        "depends_on",
        "customer_id",
        "worker_id",
        "machine_id",
        "webhook_url",
        "correlation_id",
        "metadata",
        "created_at",
        "started_at",
        "completed_at",
        "updated_at",
    ]
    assert set(documented) <= set(step)
    assert step["priority"] == 50 and step["max_retries"] == 3 and step["timeout_s"] == 1800
    assert step["customer_id"] == "alice"


def test_service_aliases_and_seed_prompt_fields_are_accepted(client):
    for alias in ("type", "job_type", "service_required"):
        step = submit(client, {alias: UNSERVED}).get_json()["step"]
        assert step["service"] == UNSERVED
    step = submit(
        client,
        {"service": UNSERVED, "payload": {"a": 1}, "prompt": "a cat", "parameters": {"steps": 20}},
    ).get_json()["step"]
    assert step["payload"] == {"a": 1, "prompt": "a cat", "parameters": {"steps": 20}}


def test_correlation_id_is_stored_and_echoed(client):
    response = submit(client, {"service": UNSERVED}, **{"X-Correlation-ID": "corr-123"})
    assert response.headers["X-Correlation-ID"] == "corr-123"
    assert response.get_json()["step"]["correlation_id"] == "corr-123"
    generated = submit(client, {"service": UNSERVED})
    assert generated.headers["X-Correlation-ID"]
    assert generated.get_json()["step"]["correlation_id"] == generated.headers["X-Correlation-ID"]


# --- errors --------------------------------------------------------------------------------


def assert_error(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.is_json
    body = response.get_json()
    assert body["success"] is False
    assert body["error"]["code"] == code
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert isinstance(body["error"]["details"], list)
    return body["error"]


@pytest.mark.parametrize(
    ("body", "fields"),
    [
        ({}, {"service"}),
        ({"service": "simulation", "priority": 101}, {"priority"}),
        ({"service": "simulation", "priority": "high"}, {"priority"}),
        ({"service": "simulation", "max_retries": 11}, {"max_retries"}),
        ({"service": "simulation", "timeout_s": 0}, {"timeout_s"}),
        ({"service": "simulation", "payload": []}, {"payload"}),
        (
            {"service": "simulation", "requirements": {"gpu_memory_gb": "lots"}},
            {"requirements.gpu_memory_gb"},
        ),
        (
            {"service": "simulation", "requirements": {"customer_isolation": "x"}},
            {"requirements.customer_isolation"},
        ),
        ({"service": "simulation", "webhook_url": "ftp://x"}, {"webhook_url"}),
        ({"service": "simulation", "webhook_events": ["nope"]}, {"webhook_events.0"}),
        ({"service": "bad service!"}, {"service"}),
        ({"service": "simulation", "priority": -1, "max_retries": -1}, {"priority", "max_retries"}),
    ],
)
def test_invalid_step_is_rejected_naming_each_field(client, body, fields):
    error = assert_error(submit(client, body), 400, "VALIDATION_FAILED")
    assert {detail["field"] for detail in error["details"]} == fields


def test_malformed_json_and_non_object_bodies_are_400(client):
    bad = client.post(
        "/api/steps", data="{not json", headers=headers(), content_type="application/json"
    )
    assert_error(bad, 400, "VALIDATION_FAILED")
    listed = client.post("/api/steps", json=[1, 2], headers=headers())
    assert_error(listed, 400, "VALIDATION_FAILED")


def test_rejected_request_changes_nothing(client):
    before = client.get("/api/steps/stats", headers=headers("bob")).get_json()["stats"]["total"]
    submit(client, {"service": "simulation", "priority": 500}, who="bob")
    after = client.get("/api/steps/stats", headers=headers("bob")).get_json()["stats"]["total"]
    assert after == before


def test_missing_or_unknown_key_is_401(client):
    assert_error(client.get("/api/steps"), 401, "UNAUTHORIZED")
    wrong = client.get("/api/steps", headers={"Authorization": "Bearer nope"})
    assert_error(wrong, 401, "UNAUTHORIZED")
    assert client.get("/api/steps", headers={"X-API-Key": "test-key-alice"}).status_code == 200


def test_acting_for_another_customer_needs_admin(client):
    assert_error(submit(client, {"service": UNSERVED, "customer_id": "bob"}), 403, "FORBIDDEN")
    own = submit(client, {"service": UNSERVED, "customer_id": "alice"})
    assert own.status_code == 201
    as_admin = submit(client, {"service": UNSERVED, "customer_id": "carol"}, who="admin")
    assert as_admin.get_json()["step"]["customer_id"] == "carol"


def test_unknown_step_is_404(client):
    missing = client.get("/api/steps/00000000-0000-7000-8000-000000000000", headers=headers())
    assert_error(missing, 404, "STEP_NOT_FOUND")
    assert_error(client.get("/api/steps/not-a-uuid", headers=headers()), 404, "STEP_NOT_FOUND")
    cancel = client.post("/api/steps/nope/cancel", headers=headers())
    assert_error(cancel, 404, "STEP_NOT_FOUND")


def test_unknown_route_is_a_json_404(client):
    assert_error(client.get("/api/nothing-here", headers=headers()), 404, "NOT_FOUND")


def test_cancel_of_a_finished_step_is_409(client, system):
    step_id = submit(client, {"service": "simulation"}).get_json()["step_id"]
    wait_for_status(client, step_id, {"completed"})
    assert_error(
        client.post(f"/api/steps/{step_id}/cancel", headers=headers()), 409, "INVALID_STATE"
    )


def test_retry_of_a_step_that_has_not_failed_is_409(client):
    step_id = submit(client, {"service": UNSERVED}).get_json()["step_id"]
    assert_error(
        client.post(f"/api/steps/{step_id}/retry", headers=headers()), 409, "INVALID_STATE"
    )


def test_oversized_body_is_413(settings):
    from web import create_app

    small_app = create_app(replace(settings, max_body_bytes=2048)).test_client()
    response = small_app.post(
        "/api/steps",
        json={"service": "simulation", "payload": {"blob": "x" * 4096}},
        headers=headers(),
    )
    assert_error(response, 413, "PAYLOAD_TOO_LARGE")


def test_rate_limited_key_gets_429_with_retry_after(client, override_settings):
    override_settings(rate_limit_per_minute=3)
    codes = [client.get("/api/steps/stats", headers=headers("bob")).status_code for _ in range(5)]
    assert codes[:3] == [200, 200, 200]
    assert codes[3] == 429
    limited = client.get("/api/steps/stats", headers=headers("bob"))
    assert_error(limited, 429, "RATE_LIMITED")
    assert int(limited.headers["Retry-After"]) >= 1


def test_database_outage_is_503_unavailable(settings):
    from web import create_app

    down = replace(settings, database_url="postgresql://postgres@127.0.0.1:1/nothing")
    response = create_app(down).test_client().get("/api/steps", headers=headers())
    assert_error(response, 503, "UNAVAILABLE")


# --- scoping -------------------------------------------------------------------------------


def test_a_key_cannot_read_or_change_another_customers_step(client):
    step_id = submit(client, {"service": UNSERVED}, who="alice").get_json()["step_id"]
    assert_error(client.get(f"/api/steps/{step_id}", headers=headers("bob")), 404, "STEP_NOT_FOUND")
    assert_error(
        client.post(f"/api/steps/{step_id}/cancel", headers=headers("bob")), 404, "STEP_NOT_FOUND"
    )
    listed = client.get("/api/steps?limit=200", headers=headers("bob")).get_json()["steps"]
    assert step_id not in {s["id"] for s in listed}
    assert client.get(f"/api/steps/{step_id}", headers=headers("admin")).status_code == 200
    assert client.get(f"/api/steps/{step_id}", headers=headers("alice")).status_code == 200


def test_stats_count_only_the_callers_steps(client):
    def stats(who):
        return client.get("/api/steps/stats?timeframe=hour", headers=headers(who)).get_json()

    before_bob = stats("bob")["stats"]
    submit(client, {"service": UNSERVED}, who="alice")
    assert stats("bob")["stats"] == before_bob
    body = stats("alice")
    assert body["timeframe"] == "hour"
    assert body["stats"]["by_service"][UNSERVED]["pending"] >= 1
    assert set(body["stats"]) >= {
        "total",
        "pending",
        "running",
        "completed",
        "failed",
        "cancelled",
        "by_service",
    }
    assert_error(
        client.get("/api/steps/stats?timeframe=year", headers=headers()), 400, "VALIDATION_FAILED"
    )


# --- idempotency ---------------------------------------------------------------------------


def test_same_idempotency_key_returns_the_original_step(client):
    body = {"service": UNSERVED, "payload": {"n": 1}}
    first = submit(client, body, **{"Idempotency-Key": "idem-1"})
    second = submit(client, body, **{"Idempotency-Key": "idem-1"})
    assert first.status_code == 201
    assert second.status_code == 200
    assert second.get_json()["step_id"] == first.get_json()["step_id"]
    other = submit(client, body, who="bob", **{"Idempotency-Key": "idem-1"})
    assert other.status_code == 201
    assert other.get_json()["step_id"] != first.get_json()["step_id"]


def test_concurrent_requests_with_one_idempotency_key_create_one_step(app):
    from concurrent.futures import ThreadPoolExecutor

    def post(_):
        return (
            app.test_client()
            .post(
                "/api/steps",
                json={"service": UNSERVED},
                headers=headers(**{"Idempotency-Key": "idem-race"}),
            )
            .get_json()["step_id"]
        )

    with ThreadPoolExecutor(8) as pool:
        ids = set(pool.map(post, range(8)))
    assert len(ids) == 1


def test_blank_or_overlong_idempotency_key_is_400(client):
    long_key = submit(client, {"service": UNSERVED}, **{"Idempotency-Key": "k" * 256})
    assert_error(long_key, 400, "VALIDATION_FAILED")


# --- listing -------------------------------------------------------------------------------


def test_pagination_walks_every_step_once_newest_first(client):
    created = [
        submit(client, {"service": "paged"}, who="admin").get_json()["step_id"] for _ in range(7)
    ]
    seen, cursor = [], None
    while True:
        url = "/api/steps?service=paged&limit=3" + (f"&cursor={cursor}" if cursor else "")
        body = client.get(url, headers=headers("admin")).get_json()
        seen += [s["id"] for s in body["steps"]]
        assert len(body["steps"]) <= 3
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert seen == list(reversed(created))


def test_list_filters_by_status_and_rejects_bad_parameters(client):
    step_id = submit(client, {"service": UNSERVED}).get_json()["step_id"]
    client.post(f"/api/steps/{step_id}/cancel", json={"reason": "test"}, headers=headers())
    cancelled = client.get("/api/steps?status=cancelled&limit=200", headers=headers()).get_json()
    assert step_id in {s["id"] for s in cancelled["steps"]}
    assert all(s["status"] == "cancelled" for s in cancelled["steps"])
    for bad in ("status=sleeping", "limit=0", "limit=1000", "cursor=zzz"):
        assert_error(client.get(f"/api/steps?{bad}", headers=headers()), 400, "VALIDATION_FAILED")


# --- cancel and retry ----------------------------------------------------------------------


def test_cancelled_pending_step_records_the_reason(client):
    step_id = submit(client, {"service": UNSERVED}).get_json()["step_id"]
    response = client.post(
        f"/api/steps/{step_id}/cancel", json={"reason": "changed my mind"}, headers=headers()
    )
    assert response.status_code == 200
    assert response.get_json()["step"]["status"] == "cancelled"


def test_running_step_is_stopped_by_cancel(client, system):
    step_id = submit(client, {"service": "simulation", "payload": {"duration_s": 30}}).get_json()[
        "step_id"
    ]
    wait_for_status(client, step_id, {"running"})
    assert client.post(f"/api/steps/{step_id}/cancel", headers=headers()).status_code == 200
    follow_up = submit(client, {"service": "simulation"}).get_json()["step_id"]
    assert wait_for_status(client, follow_up, {"completed"})["status"] == "completed"
    assert wait_for_status(client, step_id, {"cancelled"})["status"] == "cancelled"


def test_failed_step_is_retried_on_request_as_a_new_attempt(client, system):
    step_id = submit(
        client,
        {
            "service": "simulation",
            "max_retries": 0,
            "payload": {"fail": "fatal", "fail_attempts": 1},
        },
    ).get_json()["step_id"]
    failed = wait_for_status(client, step_id, {"failed"})
    assert failed["error"]["code"] == "SIMULATED_FATAL"
    assert failed["error"]["retryable"] is False
    assert client.post(f"/api/steps/{step_id}/retry", headers=headers()).status_code == 200
    done = wait_for_status(client, step_id, {"completed"})
    assert done["attempts"] == 2
    assert done["error"] is None
