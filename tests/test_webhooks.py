"""Webhooks: signed, filtered, retried, never lost; a real receiver on 127.0.0.1."""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Callable, Iterator

import pytest
from standardwebhooks.webhooks import Webhook

from emp_tasks.core.events import STREAM
from emp_tasks.store import redisdb
from emp_tasks.webhooks import delivery
from tests.conftest import (
    ARTIFACTS,
    WEBHOOK_SECRET,
    RunningSystem,
    free_port,
    headers,
    process_env,
    stop_all,
    stream_events,
    wait_for,
    wait_for_status,
)
from tests.receiver import Receiver
from tests.test_steps_api import assert_error


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    running = Receiver(free_port()).start()
    yield running
    running.stop()


@pytest.fixture
def start_webhooks(services) -> Iterator[Callable[..., RunningSystem]]:
    """Start `webhooks` processes from the Procfile; all are stopped after the test.

    The consumer group is moved to the stream's end first: events of earlier tests
    are no concern of this one, and catching up on all of them only adds time.
    """
    client = redisdb.client()
    delivery.ensure_group(client)
    client.xgroup_setid(STREAM, delivery.GROUP, "$")
    started: list[RunningSystem] = []

    def start(**env: str) -> RunningSystem:
        log = ARTIFACTS / f"webhooks-{len(started)}.log"
        running = RunningSystem(["webhooks"], process_env(services, **env), log)
        started.append(running)
        wait_for(lambda: "Webhooks started" in log.read_text(), timeout_s=60, interval_s=0.1)
        return running

    yield start
    stop_all(started)


def register(client, url: str, who: str = "alice", **fields) -> dict:
    response = client.post("/api/webhooks", json={"url": url, **fields}, headers=headers(who))
    assert response.status_code == 201, response.get_json()
    return response.get_json()["webhook"]


def deliveries(client, webhook_id: str) -> list[dict]:
    response = client.get(f"/api/webhooks/{webhook_id}/deliveries", headers=headers())
    return response.get_json()["deliveries"]


def submit(client, payload: dict | None = None, **fields) -> str:
    body = {"service": "simulation", "payload": payload or {}, **fields}
    return client.post("/api/steps", json=body, headers=headers()).get_json()["step_id"]


# --- the API -------------------------------------------------------------------------------


def test_secret_is_shown_on_creation_only(client, receiver):
    created = register(client, receiver.url, events=["step_completed"], description="d")
    assert created["secret"].startswith("whsec_")
    shown = client.get(f"/api/webhooks/{created['id']}", headers=headers()).get_json()["webhook"]
    assert "secret" not in shown
    listed = client.get("/api/webhooks", headers=headers()).get_json()["webhooks"]
    assert created["id"] in {w["id"] for w in listed}
    assert all("secret" not in w for w in listed)


def test_update_and_delete_an_endpoint(client, receiver):
    created = register(client, receiver.url)
    changed = client.patch(
        f"/api/webhooks/{created['id']}",
        json={"events": ["step_failed"], "active": False, "filters": {"services": ["x"]}},
        headers=headers(),
    ).get_json()["webhook"]
    assert changed["events"] == ["step_failed"] and changed["active"] is False
    assert changed["filters"] == {"services": ["x"]}
    assert changed["url"] == receiver.url
    deleted = client.delete(f"/api/webhooks/{created['id']}", headers=headers())
    assert deleted.status_code == 200
    assert_error(
        client.get(f"/api/webhooks/{created['id']}", headers=headers()), 404, "WEBHOOK_NOT_FOUND"
    )


def test_endpoints_are_scoped_to_their_customer(client, receiver):
    created = register(client, receiver.url)
    for call in (client.get, client.delete):
        assert_error(
            call(f"/api/webhooks/{created['id']}", headers=headers("bob")), 404, "WEBHOOK_NOT_FOUND"
        )
    listed = client.get("/api/webhooks", headers=headers("bob")).get_json()["webhooks"]
    assert created["id"] not in {w["id"] for w in listed}


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"url": "ftp://example"}, "url"),
        ({"url": "http://127.0.0.1/x", "events": ["nope"]}, "events.0"),
        ({"url": "http://127.0.0.1/x", "events": []}, "events"),
        ({"url": "http://127.0.0.1/x", "secret": "plain"}, "secret"),
        ({"url": "http://127.0.0.1/x", "headers": {"webhook-id": "x"}}, "headers"),
        ({"url": "http://127.0.0.1/x", "filters": {"colour": ["red"]}}, "filters.colour"),
    ],
)
def test_invalid_endpoint_is_rejected(client, body, field):
    error = assert_error(
        client.post("/api/webhooks", json=body, headers=headers()), 400, "VALIDATION_FAILED"
    )
    assert field in {detail["field"] for detail in error["details"]}


def test_private_targets_are_refused_unless_allowed(client, override_settings):
    metadata = client.post(
        "/api/webhooks", json={"url": "http://169.254.169.254/latest"}, headers=headers()
    )
    assert assert_error(metadata, 400, "VALIDATION_FAILED")["details"][0]["field"] == "url"
    override_settings(webhook_allow_private=False)
    for url in ("http://127.0.0.1:9/hook", "http://10.1.2.3/hook", "http://[::1]/hook"):
        refused = client.post("/api/webhooks", json={"url": url}, headers=headers())
        assert assert_error(refused, 400, "VALIDATION_FAILED")["details"][0]["field"] == "url"
    per_step = client.post(
        "/api/steps",
        json={"service": "simulation", "webhook_url": "http://127.0.0.1:9/x"},
        headers=headers(),
    )
    assert_error(per_step, 400, "VALIDATION_FAILED")


# --- delivery ------------------------------------------------------------------------------


def test_completed_step_webhook_verifies_with_the_standard_webhooks_library(
    client, system, receiver, start_webhooks
):
    start_webhooks()
    endpoint = register(client, receiver.url, events=["step_completed"])
    step_id = submit(client, {"result": {"image": "cat.png"}})
    wait_for(lambda: receiver.of_type("step_completed"))
    request = receiver.of_type("step_completed")[0]
    payload = Webhook(endpoint["secret"]).verify(request.body, request.headers)
    assert payload["type"] == "step_completed"
    assert payload["data"]["result"] == {"image": "cat.png"}
    assert payload["data"]["step_id"] == step_id
    assert set(payload) == {"id", "type", "timestamp", "data"}
    event = [e for e in stream_events(step_id) if e["type"] == "step_completed"][0]
    assert request.headers["webhook-id"] == payload["id"] == event["id"]
    with pytest.raises(Exception):  # noqa: B017 - any verification error
        Webhook("whsec_" + "QUFBQUFBQUFBQUFBQUFBQUFBQUE=").verify(request.body, request.headers)
    assert len(receiver.received) == 1  # only the subscribed type


def test_failing_receiver_gets_the_same_webhook_id_on_every_retry(
    client, system, receiver, start_webhooks
):
    start_webhooks()
    endpoint = register(client, receiver.url, events=["step_completed"])
    receiver.answer(500, 500, 500, 200)
    submit(client)
    wait_for(lambda: len(receiver.received) == 4, timeout_s=60)
    assert len({r.headers["webhook-id"] for r in receiver.received}) == 1
    log = wait_for(
        lambda: (d := deliveries(client, endpoint["id"])) and d[0]["status"] == "succeeded" and d
    )
    assert [a["status_code"] for a in log[0]["log"]] == [500, 500, 500, 200]
    assert log[0]["attempts"] == 4


def test_event_survives_receiver_and_webhooks_process_both_down(
    client, system, receiver, start_webhooks
):
    endpoint = register(client, receiver.url, events=["step_completed"])
    receiver.stop()
    first = start_webhooks()
    first.stop()
    step_id = submit(client)
    wait_for_status(client, step_id, {"completed"})
    receiver.start()
    start_webhooks()
    wait_for(lambda: receiver.of_type("step_completed"), timeout_s=60)
    body = json.loads(receiver.of_type("step_completed")[0].body)
    assert body["data"]["step_id"] == step_id
    wait_for(lambda: deliveries(client, endpoint["id"])[0]["status"] == "succeeded")


def test_two_webhooks_processes_never_both_deliver_one_event(
    client, system, receiver, start_webhooks
):
    start_webhooks()
    start_webhooks()
    register(client, receiver.url, events=["step_completed"])
    step_ids = [submit(client) for _ in range(20)]
    for step_id in step_ids:
        wait_for_status(client, step_id, {"completed"})
    wait_for(lambda: len(receiver.received) >= 20, timeout_s=60)
    counts = Counter(r.headers["webhook-id"] for r in receiver.received)
    assert len(counts) == 20
    assert set(counts.values()) == {1}


def test_workflow_failed_webhook_carries_the_status_step_details(
    client, system, receiver, start_webhooks
):
    start_webhooks()
    body = {
        "name": "webhooked",
        "webhook_url": receiver.url,
        "steps": [
            {"service": "simulation"},
            {"service": "simulation", "payload": {"fail": "fatal"}, "depends_on": [0]},
            {"service": "simulation", "depends_on": [1]},
        ],
    }
    workflow_id = client.post("/api/workflows", json=body, headers=headers()).get_json()[
        "workflow_id"
    ]
    wait_for(lambda: receiver.of_type("workflow_failed"), timeout_s=60)
    request = receiver.of_type("workflow_failed")[0]
    payload = Webhook(WEBHOOK_SECRET).verify(request.body, request.headers)
    status = client.get(f"/api/workflows/{workflow_id}/status", headers=headers()).get_json()
    assert payload["data"]["step_details"] == status["steps"]
    assert payload["data"]["step_details"][1]["error"]["code"] == "SIMULATED_FATAL"
    assert payload["data"]["failed_step_index"] == 1
    assert payload["data"]["error"]["code"] == "SIMULATED_FATAL"
    assert [json.loads(r.body)["type"] for r in receiver.received] == ["workflow_failed"]


def test_gone_receiver_disables_the_endpoint(client, system, receiver, start_webhooks):
    start_webhooks()
    endpoint = register(client, receiver.url, events=["step_completed"])
    receiver.answer(410)
    submit(client)

    def disabled():
        shown = client.get(f"/api/webhooks/{endpoint['id']}", headers=headers()).get_json()
        return not shown["webhook"]["active"] and shown["webhook"]

    assert "410" in wait_for(disabled, timeout_s=60)["disabled_reason"]
    wait_for(lambda: deliveries(client, endpoint["id"])[0]["status"] == "failed")
    submit(client)
    wait_for_status(client, submit(client), {"completed"})
    assert len(receiver.received) == 1


def test_dead_delivery_can_be_replayed(client, system, receiver, start_webhooks, services):
    start_webhooks(EMP_WEBHOOK_RETRY_SCHEDULE="0.1,0.1,0.1,0.1,0.1,0.1,0.1,0.1")
    endpoint = register(client, receiver.url, events=["webhook_test"])
    receiver.default = (500, {})
    test = client.post(f"/api/webhooks/{endpoint['id']}/test", headers=headers()).get_json()
    delivery_id = test["delivery"]["id"]
    dead = wait_for(
        lambda: (d := deliveries(client, endpoint["id"])) and d[0]["status"] == "dead" and d[0],
        timeout_s=40,
    )
    assert dead["attempts"] == 9  # the first try and the eight retries of the schedule
    receiver.default = (200, {})
    replayed = client.post(
        f"/api/webhooks/{endpoint['id']}/deliveries/{delivery_id}/replay", headers=headers()
    )
    assert replayed.status_code == 200
    done = wait_for(
        lambda: (d := deliveries(client, endpoint["id"])) and d[0]["status"] == "succeeded" and d[0]
    )
    assert done["attempts"] == 10
    assert len({r.headers["webhook-id"] for r in receiver.received}) == 1
    again = client.post(
        f"/api/webhooks/{endpoint['id']}/deliveries/{delivery_id}/replay", headers=headers()
    )
    assert again.status_code == 200  # a succeeded delivery may be sent again on request


def test_retry_after_is_honoured(client, system, receiver, start_webhooks):
    start_webhooks()
    register(client, receiver.url, events=["step_completed"])
    receiver.answer((429, {"Retry-After": "2"}), 200)
    submit(client)
    wait_for(lambda: len(receiver.received) == 2, timeout_s=60)
    first, second = receiver.received
    assert second.at - first.at >= 2


def test_legacy_endpoint_receives_job_names_with_job_id(client, system, receiver, start_webhooks):
    start_webhooks()
    register(client, receiver.url, events=["job_completed"], legacy_event_names=True)
    step_id = submit(client)
    wait_for(lambda: receiver.received)
    body = json.loads(receiver.received[0].body)
    assert body["type"] == "job_completed"
    assert body["data"]["job_id"] == step_id


def test_filters_and_per_step_webhook_urls(client, system, receiver, start_webhooks):
    start_webhooks()
    other = Receiver(free_port()).start()
    try:
        register(client, receiver.url, events=["*"], filters={"services": ["not-simulation"]})
        step_id = submit(client, webhook_url=other.url)
        wait_for(lambda: other.received)
        wait_for_status(client, step_id, {"completed"})
        assert [json.loads(r.body)["type"] for r in other.received] == ["step_completed"]
        Webhook(WEBHOOK_SECRET).verify(other.received[0].body, other.received[0].headers)
        assert receiver.received == []
    finally:
        other.stop()


def test_a_hanging_endpoint_does_not_hold_up_healthy_ones(client, system, receiver, start_webhooks):
    start_webhooks(EMP_WEBHOOK_TIMEOUT_S="30")
    stuck = Receiver(free_port())
    stuck.hang = threading.Event()
    stuck.start()
    try:
        hanging = register(client, stuck.url, events=["step_completed"])
        register(client, receiver.url, events=["step_completed"])
        step_ids = [submit(client) for _ in range(30)]
        wait_for(lambda: len(receiver.received) == 30, timeout_s=60)
        assert {json.loads(r.body)["data"]["step_id"] for r in receiver.received} == set(step_ids)
        # All 30 arrived while every request to the hanging endpoint is still waiting:
        # it holds at most EMP_WEBHOOK_PER_TARGET of the sender's threads.
        assert all(d["attempts"] == 0 for d in deliveries(client, hanging["id"]))
    finally:
        stuck.hang.set()
        stuck.stop()


def test_redirects_are_not_followed(client, system, receiver, start_webhooks):
    start_webhooks()
    elsewhere = Receiver(free_port()).start()
    try:
        endpoint = register(client, receiver.url, events=["step_completed"])
        receiver.answer((302, {"Location": elsewhere.url}), 200)
        submit(client)
        wait_for(lambda: len(receiver.received) == 2, timeout_s=60)
        done = wait_for(
            lambda: (
                (d := deliveries(client, endpoint["id"])) and d[0]["status"] == "succeeded" and d
            )
        )
        assert [a["status_code"] for a in done[0]["log"]] == [302, 200]
        assert elsewhere.received == []
    finally:
        elsewhere.stop()
