"""`POST /api/queues/{queue}/purge`: an admin cancels every pending step of one queue."""

from __future__ import annotations

from sqlalchemy import func, select

from emp_tasks.steps import client as steps_client
from emp_tasks.store import db
from emp_tasks.store.models import Step
from tests.conftest import headers, stream_events, wait_for_status
from tests.test_steps_api import assert_error


def submit(client, service: str, **fields) -> dict:
    body = {"service": service, "payload": {}, **fields}
    response = client.post("/api/steps", json=body, headers=headers())
    assert response.status_code == 201, response.get_json()
    return response.get_json()["step"]


def purge(client, queue: str, who: str = "admin", **body):
    return client.post(f"/api/queues/{queue}/purge", json=body, headers=headers(who))


def test_purge_cancels_every_pending_step_of_the_queue_and_only_those(client, monkeypatch):
    monkeypatch.setattr(steps_client, "PURGE_BATCH", 3)  # several batches
    doomed = [submit(client, "purge-me") for _ in range(7)]
    other = submit(client, "purge-other")
    spared = submit(client, "purge-me", requirements={"gpu_memory_gb": 8})  # another queue
    queue = doomed[0]["queue"]
    assert {s["queue"] for s in doomed} == {queue} and spared["queue"] != queue
    workflow = client.post(
        "/api/workflows",
        json={
            "name": "w",
            "steps": [{"service": "purge-me"}, {"service": "purge-me", "depends_on": [0]}],
        },
        headers=headers(),
    ).get_json()
    answer = purge(client, queue, reason="operator cleared it")
    assert answer.status_code == 200, answer.get_json()
    # 7 steps and the workflow's first (its second waits on it, and ends with the workflow)
    assert answer.get_json() == {"success": True, "cancelled": 8}
    for step in doomed:
        got = wait_for_status(client, step["id"], {"cancelled"}, timeout_s=5)
        assert got["status"] == "cancelled"
        (event,) = [e for e in stream_events(step_id=step["id"]) if e["type"] == "step_cancelled"]
        assert event["data"]["reason"] == "operator cleared it"
    for step in (other, spared):
        assert (
            client.get(f"/api/steps/{step['id']}", headers=headers()).get_json()["step"]["status"]
            == "pending"
        )
    flow = client.get(f"/api/workflows/{workflow['workflow_id']}", headers=headers()).get_json()
    assert flow["workflow"]["status"] in ("failed", "cancelled")
    with db.transaction() as session:
        left = session.scalar(
            select(func.count()).where(Step.queue == queue, Step.status == "pending")
        )
    assert left == 0
    assert purge(client, queue).get_json()["cancelled"] == 0


def test_a_customer_key_cannot_purge_and_an_unknown_queue_is_404(client):
    queue = submit(client, "purge-guarded")["queue"]
    assert_error(purge(client, queue, who="alice"), 403, "FORBIDDEN")
    assert_error(purge(client, "emp.nothing.000000000000"), 404, "NOT_FOUND")
    assert_error(purge(client, queue, reason=7), 400, "VALIDATION_FAILED")
