"""EmProps: its generations go through us, and it hears exactly once how each ended.

Against a fake EmProps HTTP server on 127.0.0.1, the real `emprops` process from the
Procfile (started per test, killed with SIGKILL where the test says so), real workers.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator

import pytest

from emp_tasks.emprops import client as emprops_client
from tests import test_webhooks
from tests.conftest import (
    ARTIFACTS,
    RunningSystem,
    free_port,
    headers,
    process_env,
    stop_all,
    stream_events,
    wait_for,
)
from tests.fake_emprops import FakeEmprops
from tests.receiver import Receiver
from tests.test_workflows import create, status, wait_finished

start_webhooks = test_webhooks.start_webhooks
API_KEY = "emprops-secret-key"


@pytest.fixture
def emprops() -> Iterator[FakeEmprops]:
    fake = FakeEmprops().start()
    yield fake
    fake.stop()


@pytest.fixture
def configured(emprops, override_settings):
    """This process (the API under test) configured for the fake EmProps."""
    return override_settings(
        emprops_api_url=emprops.url,
        emprops_api_key=API_KEY,
        emprops_timeout_s=3.0,
        emprops_retry_base_s=0.1,
        emprops_retry_max_s=0.4,
    )


@pytest.fixture
def start_notifier(services, emprops) -> Iterator[Callable[..., RunningSystem]]:
    started: list[RunningSystem] = []

    def start(**env: str) -> RunningSystem:
        log = ARTIFACTS / f"emprops-{len(started)}.log"
        running = RunningSystem(
            ["emprops"],
            process_env(
                services,
                EMPROPS_API_URL=emprops.url,
                EMPROPS_API_KEY=API_KEY,
                EMPROPS_TIMEOUT_S="3",
                EMPROPS_RETRY_BASE_S="0.1",
                EMPROPS_RETRY_MAX_S="0.4",
                **env,
            ),
            log,
        )
        started.append(running)
        wait_for(lambda: "EmProps notifier started" in log.read_text(), timeout_s=60)
        return running

    yield start
    stop_all(started)


def kill_9(running: RunningSystem) -> None:
    process = running.group.processes["emprops"]
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(10)


def job_id() -> str:
    return f"job-{os.urandom(4).hex()}"


def emprops_of(client, workflow_id: str) -> dict:
    response = client.get(f"/api/workflows/{workflow_id}", headers=headers())
    return response.get_json()["workflow"]["emprops"]


def notified(emprops: FakeEmprops, job: str, count: int = 1, timeout_s: float = 30) -> list:
    calls = wait_for(
        lambda: len(emprops.successes(job)) >= count and emprops.successes(job), timeout_s=timeout_s
    )
    time.sleep(1.0)  # anything sent twice would arrive meanwhile
    return calls


# --- at the door ----------------------------------------------------------------------------


def test_without_emprops_configured_an_emprops_workflow_is_refused(client):
    body = {
        "name": "w",
        "steps": [{"service": "simulation", "payload": {}}],
        "emprops": {"job_id": "j-1"},
    }
    response = client.post("/api/workflows", json=body, headers=headers())
    assert response.status_code == 400
    error = response.get_json()["error"]
    assert error["code"] == "VALIDATION_FAILED"
    assert [d["field"] for d in error["details"]] == ["emprops"]


def test_collections_pass_through_and_upstream_failure_is_502(client, configured, emprops):
    response = client.post(
        "/api/emprops/collections", json={"name": "foxes", "public": True}, headers=headers()
    )
    assert response.status_code == 201, response.get_json()
    collection = response.get_json()["collection"]
    assert collection["name"] == "foxes" and collection["id"] in emprops.collections
    (call,) = emprops.calls
    assert call.headers["authorization"] == f"Bearer {API_KEY}"
    emprops.answer(503)
    failed = client.post("/api/emprops/collections", json={"name": "x"}, headers=headers())
    assert failed.status_code == 502
    error = failed.get_json()["error"]
    assert error["code"] == "UPSTREAM_FAILED"
    assert error["details"][0]["status"] == 503


def test_collections_answer_502_when_emprops_is_down(client, override_settings):
    override_settings(emprops_api_url=f"http://127.0.0.1:{free_port()}", emprops_timeout_s=2.0)
    response = client.post("/api/emprops/collections", json={"name": "x"}, headers=headers())
    assert response.status_code == 502
    assert response.get_json()["error"]["code"] == "UPSTREAM_FAILED"


def test_the_client_retries_5xx_408_429_and_not_other_4xx(configured, emprops):
    for code, retryable in (
        (500, True),
        (503, True),
        (408, True),
        (429, True),
        (400, False),
        (404, False),
        (422, False),
    ):
        emprops.answer(code)
        with pytest.raises(emprops_client.EmpropsError) as raised:
            emprops_client.call("/jobs/x/complete", {})
        assert (raised.value.status, raised.value.retryable) == (code, retryable)


# --- end to end -----------------------------------------------------------------------------


def test_emprops_is_notified_once_with_the_canonical_step_details(
    client, configured, emprops, system, start_notifier, start_webhooks
):
    start_webhooks()
    start_notifier()
    receiver = Receiver(free_port()).start()
    try:
        collection = client.post(
            "/api/emprops/collections", json={"name": "foxes"}, headers=headers()
        ).get_json()["collection"]
        job = job_id()
        body = create(
            client,
            [
                {"service": "simulation", "payload": {"images": 1, "seed": 1}},
                {
                    "service": "simulation",
                    "depends_on": [0],
                    "payload": {"image": "{{ steps.0.outputs.0.url }}", "images": 1, "seed": 2},
                },
            ],
            emprops={"job_id": job, "collection_id": collection["id"]},
            webhook_url=receiver.url,
        )
        assert body["workflow"]["emprops"]["job_id"] == job
        assert body["workflow"]["emprops"]["notified_at"] is None
        done = wait_finished(client, body["workflow_id"])
        assert done["workflow"]["status"] == "completed"
        (call,) = notified(emprops, job)
        wait_for(lambda: receiver.of_type("workflow_completed"), timeout_s=30)
    finally:
        receiver.stop()
    assert call.path == f"/jobs/{job}/complete"
    assert call.headers["authorization"] == f"Bearer {API_KEY}"
    (completed,) = [
        e
        for e in stream_events(workflow_id=body["workflow_id"])
        if e["type"] == "workflow_completed"
    ]
    assert call.headers["idempotency-key"] == completed["id"]
    steps = status(client, body["workflow_id"])["steps"]
    assert call.body["step_details"] == steps
    assert call.body["status"] == "completed" and call.body["workflow_id"] == body["workflow_id"]
    outputs = [o for step in steps for o in step["result"]["outputs"]]
    assert call.body["outputs"] == outputs and len(outputs) == 2
    assert call.body["workflow_output"] == steps[1]["result"]["outputs"][0]["url"]
    state = wait_for(lambda: (s := emprops_of(client, body["workflow_id"]))["notified_at"] and s)
    assert state["attempts"] == 1 and state["last_error"] is None
    assert state["collection_id"] == collection["id"]


def test_emprops_failing_three_times_is_still_notified_once(
    client, configured, emprops, system, start_notifier
):
    start_notifier()
    emprops.answer(503, 503, 503)
    job = job_id()
    body = create(client, [{"service": "simulation", "payload": {}}], emprops={"job_id": job})
    notified(emprops, job)
    assert [c.status for c in emprops.of_job(job)] == [503, 503, 503, 200]
    assert len({c.headers["idempotency-key"] for c in emprops.of_job(job)}) == 1
    state = wait_for(lambda: (s := emprops_of(client, body["workflow_id"]))["notified_at"] and s)
    assert state["attempts"] == 4


def test_the_notifier_killed_while_emprops_fails_notifies_once_after_restart(
    client, configured, emprops, system, start_notifier
):
    doomed = start_notifier()
    emprops.default_status = 503
    job = job_id()
    body = create(client, [{"service": "simulation", "payload": {}}], emprops={"job_id": job})
    wait_for(lambda: len(emprops.of_job(job)) >= 2, timeout_s=30)
    kill_9(doomed)
    state = emprops_of(client, body["workflow_id"])
    assert state["notified_at"] is None and "503" in state["last_error"]
    emprops.default_status = 200
    start_notifier()
    notified(emprops, job)
    assert len(emprops.successes(job)) == 1


def test_two_notifiers_never_both_succeed_for_one_workflow(
    client, configured, emprops, system, start_notifier
):
    emprops.delay_s = 0.3
    start_notifier()
    start_notifier()
    jobs = [job_id() for _ in range(6)]
    for job in jobs:
        create(client, [{"service": "simulation", "payload": {}}], emprops={"job_id": job})
    for job in jobs:
        notified(emprops, job, timeout_s=60)
    assert [len(emprops.successes(job)) for job in jobs] == [1] * len(jobs)
    assert [len(emprops.of_job(job)) for job in jobs] == [1] * len(jobs)


def test_a_failed_workflow_is_reported_to_fail_with_its_error(
    client, configured, emprops, system, start_notifier
):
    start_notifier()
    job = job_id()
    body = create(
        client,
        [{"service": "simulation", "payload": {"fail": "fatal"}}],
        emprops={"job_id": job},
    )
    (call,) = notified(emprops, job)
    assert call.path == f"/jobs/{job}/fail"
    assert call.body["status"] == "failed"
    assert call.body["error"]["code"] == "SIMULATED_FATAL"
    assert call.body["step_details"] == status(client, body["workflow_id"])["steps"]


def test_a_workflow_without_emprops_never_calls_emprops_and_replay_is_for_admins(
    client, configured, emprops, system, start_notifier
):
    start_notifier()
    plain = create(client, [{"service": "simulation", "payload": {}}])
    job = job_id()
    ours = create(client, [{"service": "simulation", "payload": {}}], emprops={"job_id": job})
    wait_finished(client, plain["workflow_id"])
    notified(emprops, job)
    assert [c.path for c in emprops.calls] == [f"/jobs/{job}/complete"]
    assert "emprops" not in status(client, plain["workflow_id"])["workflow"]
    replay = f"/api/workflows/{ours['workflow_id']}/emprops/replay"
    assert client.post(replay, headers=headers()).status_code == 403
    missing = client.post(
        f"/api/workflows/{plain['workflow_id']}/emprops/replay", headers=headers("admin")
    )
    assert missing.status_code == 404
    assert client.post(replay, headers=headers("admin")).status_code == 200
    notified(emprops, job, count=2)
    assert len({c.headers["idempotency-key"] for c in emprops.of_job(job)}) == 1
