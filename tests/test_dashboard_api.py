"""What the dashboard reads: queue warnings (unserved, stranded) with the oldest pending age,
steps over time (`GET /api/stats/series`), and the step list's filters."""

from __future__ import annotations

import time
from datetime import datetime
from urllib.parse import quote

import pytest

from emp_tasks import workers
from emp_tasks.routes.capabilities import Capabilities
from emp_tasks.store.broker import app
from tests.conftest import headers, wait_for, wait_for_status

UNSERVED = "dash-unserved"


def submit(client, body: dict, who: str = "alice") -> dict:
    response = client.post("/api/steps", json=body, headers=headers(who))
    assert response.status_code == 201, response.get_json()
    return response.get_json()


def assert_error(response, status: int, code: str, field: str | None = None) -> dict:
    assert response.status_code == status, response.get_json()
    error = response.get_json()["error"]
    assert error["code"] == code
    if field is not None:
        assert field in {d["field"] for d in error["details"]}, error
    return error


def queue_named(client, name: str, who: str = "admin") -> dict:
    listed = client.get("/api/queues", headers=headers(who)).get_json()["queues"]
    (entry,) = [q for q in listed if q["name"] == name]
    return entry


def codes(entry: dict) -> list[str]:
    return [w["code"] for w in entry["warnings"]]


# --- queue warnings ------------------------------------------------------------------------


def test_unserved_queue_reports_its_oldest_pending_age(client):
    step = submit(client, {"service": UNSERVED})["step"]
    time.sleep(0.2)
    entry = queue_named(client, step["queue"], who="alice")
    assert entry["depth"] >= 1 and entry["consumers"] == 0
    assert entry["oldest_pending_at"] is not None
    assert entry["oldest_pending_s"] >= 0.2
    assert codes(entry) == ["NO_CAPABLE_WORKER"]
    client.post(f"/api/steps/{step['id']}/cancel", json={}, headers=headers())


@pytest.fixture
def idle_consumer():
    """A registered worker, online with a free slot, that consumes the queues it is given
    and takes nothing from them (no process behind it); removed afterwards."""
    registered: list[str] = []

    def register(service: str, queue: str) -> str:
        worker_id = f"dash-idle-{service}"
        workers.register(worker_id, f"machine-{worker_id}", Capabilities(services=[service]))
        workers.heartbeat(worker_id, [queue])
        registered.append(worker_id)
        return worker_id

    yield register
    for worker_id in registered:
        workers.remove_machine(f"machine-{worker_id}")


def test_pending_steps_nobody_takes_make_the_queue_stranded(
    client, override_settings, idle_consumer
):
    service = "dash-stranded-api"
    step = submit(client, {"service": service})["step"]
    queue = step["queue"]
    assert codes(queue_named(client, queue)) == ["NO_CAPABLE_WORKER"]
    override_settings(stranded_after_s=0.5)
    idle_consumer(service, queue)
    young = queue_named(client, queue)
    assert young["consumers"] == 1
    if young["oldest_pending_s"] <= 0.5:
        assert codes(young) == []
    stranded = wait_for(
        lambda: (entry := queue_named(client, queue))["warnings"] and entry, timeout_s=5
    )
    (warning,) = stranded["warnings"]
    assert warning["code"] == "STRANDED"
    assert stranded["oldest_pending_s"] > 0.5
    assert "take none of its 1 tasks" in warning["message"]

    with app.connection_for_write() as connection:  # what `celery purge -Q <queue>` does
        assert connection.default_channel.queue_purge(queue) == 1
    (purged,) = queue_named(client, queue)["warnings"]
    assert purged["code"] == "STRANDED" and "broker holds no task" in purged["message"]
    # The customer sees the same warning on its own queue.
    assert codes(queue_named(client, queue, who="alice")) == ["STRANDED"]
    client.post(f"/api/steps/{step['id']}/cancel", json={}, headers=headers())


def test_a_queue_whose_steps_run_is_not_stranded(client, override_settings, system):
    override_settings(stranded_after_s=0.0)
    step = submit(client, {"service": "simulation", "payload": {"duration_s": 1.5}})
    wait_for_status(client, step["step_id"], {"running"})
    entry = queue_named(client, step["step"]["queue"])
    assert "STRANDED" not in codes(entry)
    wait_for_status(client, step["step_id"], {"completed"})


# --- steps over time -----------------------------------------------------------------------


def series(client, who: str, window: str = "hour") -> dict:
    response = client.get(f"/api/stats/series?window={window}", headers=headers(who))
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def total(body: dict, field: str) -> int:
    return sum(bucket[field] for bucket in body["buckets"])


def failures(body: dict, code: str) -> int:
    return sum(bucket["failures"].get(code, 0) for bucket in body["buckets"])


def test_series_counts_the_callers_steps_by_outcome_and_error_code(client, system):
    before = {who: series(client, who) for who in ("alice", "bob", "admin")}
    done = [submit(client, {"service": "simulation"}, who="bob")["step_id"] for _ in range(2)]
    failing = {"service": "simulation", "payload": {"fail": "fatal"}, "max_retries": 0}
    failed = submit(client, failing, who="bob")["step_id"]
    for step_id in done:
        wait_for_status(client, step_id, {"completed"}, who="bob")
    wait_for_status(client, failed, {"failed"}, who="bob")
    after = {who: series(client, who) for who in ("alice", "bob", "admin")}

    bob = after["bob"]
    assert bob["window"] == "hour" and bob["bucket_s"] == 60
    assert 60 <= len(bob["buckets"]) <= 61
    starts = [bucket["start"] for bucket in bob["buckets"]]
    assert starts == sorted(starts) and starts[0] == bob["since"]
    assert total(bob, "completed") - total(before["bob"], "completed") == 2
    assert total(bob, "failed") - total(before["bob"], "failed") == 1
    assert failures(bob, "SIMULATED_FATAL") - failures(before["bob"], "SIMULATED_FATAL") == 1
    assert "SIMULATED_FATAL" in bob["failure_codes"]
    waits = [b["queue_wait_p50_s"] for b in bob["buckets"] if b["queue_wait_p50_s"] is not None]
    assert waits and all(wait >= 0 for wait in waits)
    assert all(
        b["queue_wait_p50_s"] <= b["queue_wait_p95_s"]
        for b in bob["buckets"]
        if b["queue_wait_p50_s"] is not None
    )
    # Another customer's key sees none of it; an admin's sees all of it.
    for field in ("completed", "failed"):
        assert total(after["alice"], field) == total(before["alice"], field)
    assert total(after["admin"], "completed") - total(before["admin"], "completed") >= 2
    fatal = "SIMULATED_FATAL"
    assert failures(after["admin"], fatal) > failures(before["admin"], fatal)


def test_series_counts_pending_steps_at_each_bucket_end(client):
    def pending_now(who: str) -> int:
        return series(client, who)["buckets"][-1]["pending"]

    before, of_alice = pending_now("bob"), pending_now("alice")
    step_id = submit(client, {"service": UNSERVED}, who="bob")["step_id"]
    assert pending_now("bob") == before + 1
    assert pending_now("alice") == of_alice
    client.post(f"/api/steps/{step_id}/cancel", json={}, headers=headers("bob"))
    assert pending_now("bob") == before


def test_series_of_the_last_day_has_quarter_hour_buckets(client):
    day = series(client, "admin", window="day")
    assert day["bucket_s"] == 900 and 96 <= len(day["buckets"]) <= 97


def test_series_refuses_an_unknown_window_and_a_missing_key(client):
    assert_error(
        client.get("/api/stats/series?window=week", headers=headers()),
        400,
        "VALIDATION_FAILED",
        "window",
    )
    assert_error(client.get("/api/stats/series"), 401, "UNAUTHORIZED")


# --- the step list's filters ---------------------------------------------------------------


def listed(client, params: str, who: str = "admin") -> list[dict]:
    response = client.get(f"/api/steps?limit=200&{params}", headers=headers(who))
    assert response.status_code == 200, response.get_json()
    return response.get_json()["steps"]


def test_list_filters_by_customer_worker_error_code_and_time(client, system):
    first = submit(client, {"service": "simulation"}, who="bob")
    ok, start = first["step_id"], datetime.fromisoformat(first["step"]["created_at"])
    failing = {"service": "simulation", "payload": {"fail": "fatal"}, "max_retries": 0}
    bad = submit(client, failing, who="alice")["step_id"]
    wait_for_status(client, ok, {"completed"}, who="bob")
    wait_for_status(client, bad, {"failed"})
    after = quote(start.isoformat())

    of_bob = listed(client, f"customer_id=bob&created_after={after}")
    assert ok in {s["id"] for s in of_bob} and bad not in {s["id"] for s in of_bob}
    assert {s["customer_id"] for s in of_bob} == {"bob"}

    on_worker = listed(client, f"worker_id=test-worker-1&created_after={after}")
    assert {ok, bad} <= {s["id"] for s in on_worker}
    assert {s["worker_id"] for s in on_worker} == {"test-worker-1"}
    assert listed(client, f"worker_id=no-such-worker&created_after={after}") == []

    fatal = listed(client, f"error_code=SIMULATED_FATAL&created_after={after}")
    assert [s["id"] for s in fatal] == [bad]
    assert fatal[0]["queued_at"] and fatal[0]["started_at"] >= fatal[0]["queued_at"]

    assert listed(client, f"created_after={after}&created_before={after}") == []
    before = quote(start.isoformat())
    assert {ok, bad}.isdisjoint({s["id"] for s in listed(client, f"created_before={before}")})


def test_id_prefix_finds_the_matching_steps(client):
    step_id = submit(client, {"service": UNSERVED})["step_id"]
    for prefix in (step_id[:8], step_id[:13], step_id.upper()[:20], step_id):
        found = listed(client, f"id_prefix={prefix}", who="alice")
        assert step_id in {s["id"] for s in found}, prefix
        assert all(s["id"].startswith(prefix.lower()) for s in found)
    other = "f" * 8 if not step_id.startswith("f") else "0" * 8
    assert listed(client, f"id_prefix={other}", who="alice") == []
    client.post(f"/api/steps/{step_id}/cancel", json={}, headers=headers())


def test_a_customer_key_sees_only_its_own_steps_whatever_it_filters(client):
    theirs = submit(client, {"service": UNSERVED}, who="bob")["step_id"]
    assert_error(
        client.get("/api/steps?customer_id=bob", headers=headers("alice")), 403, "FORBIDDEN"
    )
    mine = listed(client, "customer_id=alice", who="alice")
    assert mine and {s["customer_id"] for s in mine} == {"alice"}
    assert listed(client, f"id_prefix={theirs}", who="alice") == []
    assert theirs in {s["id"] for s in listed(client, f"id_prefix={theirs}", who="bob")}
    client.post(f"/api/steps/{theirs}/cancel", json={}, headers=headers("bob"))


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ("id_prefix=abc", "id_prefix"),
        ("id_prefix=zzzzzzzz", "id_prefix"),
        ("id_prefix=0190%25", "id_prefix"),
        ("created_after=yesterday", "created_after"),
        ("created_after=2026-01-01T00:00:00", "created_after"),
        ("created_before=2026-01-01", "created_before"),
        ("error_code=", "error_code"),
        ("customer_id=" + "c" * 201, "customer_id"),
        ("worker_id=", "worker_id"),
    ],
)
def test_bad_filter_values_are_400_naming_the_field(client, params, field):
    assert_error(
        client.get(f"/api/steps?{params}", headers=headers()), 400, "VALIDATION_FAILED", field
    )
