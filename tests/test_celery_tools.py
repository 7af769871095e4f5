"""Operators' Celery tools cannot strand a step: purge, revoke, add/cancel_consumer.

Real worker processes from the Procfile; the Celery actions are the ones `celery purge`,
`celery control revoke` and Flower's buttons send (kombu's queue_purge, the app's
control broadcasts), against the same Redis.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from emp_tasks.core.priority import BROKER_PRIORITY_LEVELS
from emp_tasks.metrics import ATTEMPTS_RECOVERED
from emp_tasks.store import dispatch, redisdb
from emp_tasks.store.broker import app, queue_list
from tests.conftest import (
    ARTIFACTS,
    RunningSystem,
    free_port,
    headers,
    process_env,
    stream_events,
    wait_for,
    wait_for_status,
)
from tests.test_fleet import submit

SYSTEM_NODE = "test-worker-1@test-machine-1"


@pytest.fixture
def quick_relay(services, system) -> Iterator[RunningSystem]:
    """A relay that calls a step stranded after 1 s, reconciling twice a second."""
    env = process_env(services, EMP_STRANDED_AFTER_S="1", EMP_RECONCILE_INTERVAL_S="0.5")
    running = RunningSystem(["relay"], env, ARTIFACTS / "relay-stranded.log")
    yield running
    running.stop()


def messages(queue: str) -> list[dict]:
    """The task messages waiting in a queue's lists."""
    client = dispatch.broker_client()
    found = []
    for level in range(BROKER_PRIORITY_LEVELS):
        found += [json.loads(m) for m in client.lrange(queue_list(queue, level), 0, -1)]
    return found


def purge(queue: str) -> int:
    """What `celery purge -Q <queue>` does."""
    with app.connection_for_write() as connection:
        return connection.default_channel.queue_purge(queue)


def recovered(reason: str) -> int:
    fields = redisdb.client().hgetall(ATTEMPTS_RECOVERED.key)
    return int(fields.get(json.dumps([reason], separators=(",", ":")), 0))


def cancel_reason(step_id: str) -> str:
    """The reason of the step's `step_cancelled`, once published (after its commit)."""
    (event,) = wait_for(
        lambda: [e for e in stream_events(step_id=step_id) if e["type"] == "step_cancelled"],
        timeout_s=10,
    )
    return event["data"]["reason"]


def handed_back_in(log_text: str, step_id: str) -> int:
    return sum(1 for line in log_text.splitlines() if "handed back" in line and step_id in line)


def test_steps_of_a_purged_queue_still_run(client, quick_relay, start_worker):
    service = "tools-purged"
    before = recovered("stranded")
    ids = [submit(client, service, {"duration_s": 0.05})["step_id"] for _ in range(3)]
    queue = client.get(f"/api/steps/{ids[0]}", headers=headers()).get_json()["step"]["queue"]
    wait_for(lambda: len(messages(queue)) == 3, timeout_s=10)
    assert purge(queue) == 3
    assert messages(queue) == []
    start_worker(service, "tools-purge-worker")
    for step_id in ids:
        assert wait_for_status(client, step_id, {"completed"}, timeout_s=30)["status"] == (
            "completed"
        )
    for step_id in ids:
        reasons = [
            e["data"].get("reason")
            for e in stream_events(step_id=step_id)
            if e["type"] == "step_queued"
        ]
        assert "stranded" in reasons
    wait_for(lambda: recovered("stranded") - before >= 3, timeout_s=10)


def test_a_step_whose_task_is_in_the_queue_is_never_sent_twice(client, quick_relay):
    service = "tools-waiting"
    step_id = submit(client, service)["step_id"]
    queue = client.get(f"/api/steps/{step_id}", headers=headers()).get_json()["step"]["queue"]
    time.sleep(4)  # several scans, each past EMP_STRANDED_AFTER_S
    assert len(messages(queue)) == 1
    reasons = [e["data"].get("reason") for e in stream_events(step_id=step_id)]
    assert "stranded" not in reasons


def test_revoking_a_queued_task_cancels_its_step(client, system):
    service = "tools-revoked"
    step_id = submit(client, service)["step_id"]
    queue = client.get(f"/api/steps/{step_id}", headers=headers()).get_json()["step"]["queue"]
    (message,) = wait_for(lambda: messages(queue), timeout_s=10)
    app.control.revoke(message["headers"]["id"])
    wait_for_status(client, step_id, {"cancelled"}, timeout_s=15)
    assert "revoked through Celery" in cancel_reason(step_id)


def test_revoke_with_terminate_stops_a_running_step(client, system):
    step_id = submit(client, "simulation", {"duration_s": 30})["step_id"]
    wait_for_status(client, step_id, {"running"}, timeout_s=15)
    (task_id,) = [
        e["id"]
        for e in stream_events(step_id=step_id)
        if e["type"] in ("step_submitted", "step_queued")
    ][-1:]
    (reply,) = app.control.revoke(task_id, terminate=True, reply=True, timeout=3)
    assert reply[SYSTEM_NODE]["ok"] == f"terminate: {task_id}"
    started = time.monotonic()
    wait_for_status(client, step_id, {"cancelled"}, timeout_s=10)
    assert "revoked through Celery" in cancel_reason(step_id)
    assert time.monotonic() - started < 10
    attempts = client.get(f"/api/steps/{step_id}/attempts", headers=headers()).get_json()
    assert attempts["attempts"][-1]["outcome"] in ("cancelled", "stopped")


def active_queues(node: str) -> set[str]:
    replies = app.control.inspect(destination=[node], timeout=2.0).active_queues() or {}
    return {queue["name"] for queue in replies.get(node, [])}


def api_queues(client, worker_id: str) -> set[str]:
    workers = client.get("/api/workers", headers=headers("admin")).get_json()["workers"]
    (worker,) = [w for w in workers if w["id"] == worker_id]
    return set(worker["queues"])


def test_add_consumer_of_a_queue_the_worker_cannot_serve_is_undone_without_a_loop(client, system):
    service = "tools-unservable"
    step_id = submit(client, service)["step_id"]
    queue = client.get(f"/api/steps/{step_id}", headers=headers()).get_json()["step"]["queue"]
    app.control.add_consumer(queue, destination=[SYSTEM_NODE], reply=True, timeout=3)
    wait_for(lambda: queue not in active_queues(SYSTEM_NODE), timeout_s=10)
    time.sleep(3)
    assert queue not in active_queues(SYSTEM_NODE)
    assert queue not in api_queues(client, "test-worker-1")
    assert handed_back_in(system.log_path.read_text(), step_id) <= 3
    got = client.get(f"/api/steps/{step_id}", headers=headers()).get_json()["step"]
    assert got["status"] == "pending" and len(messages(queue)) == 1


def test_cancel_consumer_is_undone_and_the_api_reports_what_celery_consumes(client, system):
    step_id = submit(client, "simulation", {"duration_s": 0.01})["step_id"]
    queue = client.get(f"/api/steps/{step_id}", headers=headers()).get_json()["step"]["queue"]
    wait_for_status(client, step_id, {"completed"}, timeout_s=15)
    assert queue in active_queues(SYSTEM_NODE)
    app.control.cancel_consumer(queue, destination=[SYSTEM_NODE], reply=True, timeout=3)
    wait_for(lambda: queue in active_queues(SYSTEM_NODE), timeout_s=5, interval_s=0.2)
    own = "emp.worker.test-worker-1"
    wait_for(
        lambda: api_queues(client, "test-worker-1") == active_queues(SYSTEM_NODE) - {own},
        timeout_s=15,
    )
    later = submit(client, "simulation", {"duration_s": 0.01})["step_id"]
    assert wait_for_status(client, later, {"completed"}, timeout_s=15)["status"] == "completed"
    assert "Consumed queues changed from outside; reverting" in system.log_path.read_text()


# --- Flower --------------------------------------------------------------------------------


@pytest.fixture
def flower(services, system) -> Iterator[str]:
    """`emp flower` on a free port (its HTTP API open, as on a trusted network); its URL."""
    port = free_port()
    env = process_env(services, FLOWER_UNAUTHENTICATED_API="true")
    log = open(ARTIFACTS / "flower.log", "w")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "emp"),
            "flower",
            "--port",
            str(port),
            "--db",
            str(ARTIFACTS / "flower.db"),
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"

    def up() -> bool:
        with contextlib.suppress(requests.RequestException):
            return requests.get(base + "/healthcheck", timeout=1).status_code == 200
        return False

    try:
        wait_for(up, timeout_s=60, interval_s=0.2)
        yield base
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(15)
        log.close()


def flower_task(base: str, task_id: str) -> dict | None:
    tasks = requests.get(base + "/api/tasks", timeout=5).json()
    return tasks.get(task_id)


def task_ids(step_id: str) -> list[str]:
    return [
        e["id"]
        for e in stream_events(step_id=step_id)
        if e["type"] in ("step_submitted", "step_queued", "step_retrying")
    ]


def test_flower_shows_the_truth_of_each_attempt(client, system, flower):
    wait_for(
        lambda: "enabled by remote" in system.log_path.read_text(), timeout_s=30, interval_s=0.2
    )
    done = submit(client, "simulation", {"duration_s": 0.01})["step_id"]
    failed = submit(client, "simulation", {"fail": "fatal"})["step_id"]
    wait_for_status(client, done, {"completed"})
    wait_for_status(client, failed, {"failed"})

    def state(step_id: str, wanted: str) -> dict | None:
        for task_id in task_ids(step_id):
            task = flower_task(flower, task_id)
            if task is not None and task["state"] == wanted:
                return task
        return None

    succeeded = wait_for(lambda: state(done, "SUCCESS"), timeout_s=20, interval_s=0.3)
    failure = wait_for(lambda: state(failed, "FAILURE"), timeout_s=20, interval_s=0.3)
    assert "SIMULATED_FATAL" in failure["exception"]
    assert "'service': 'simulation'" in succeeded["kwargs"]
    assert "'customer_id': 'alice'" in succeeded["kwargs"]
    assert done in succeeded["args"]
