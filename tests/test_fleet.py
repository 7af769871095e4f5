"""The GPU fleet: capability routing, customer isolation, steps nobody can serve,
offline detection, drain/resume, machine removal, with real worker processes.

Each test runs its own workers on a service of its own, so no other test's worker
(and no other test's step) shares its queues.
"""

from __future__ import annotations

import json
from collections import Counter

from sqlalchemy import select

from emp_tasks.store import db
from emp_tasks.store.models import Attempt
from tests.conftest import (
    headers,
    kill_9,
    stream_events,
    wait_for,
    wait_for_status,
    worker_status,
)


def submit(client, service: str, payload=None, who: str = "alice", **fields) -> dict:
    body = {"service": service, "payload": payload or {}, **fields}
    response = client.post("/api/steps", json=body, headers=headers(who))
    assert response.status_code == 201, response.get_json()
    return response.get_json()


def attempts_of(step_id: str) -> list[tuple[int, str, str]]:
    with db.transaction() as session:
        rows = session.execute(
            select(Attempt.attempt, Attempt.worker_id, Attempt.outcome)
            .where(Attempt.step_id == step_id)
            .order_by(Attempt.attempt)
        )
        return [tuple(row) for row in rows]


def gpu_env(memory_gb: int, models: dict[str, list[str]] | None = None, **more: str) -> dict:
    env = {"EMP_WORKER_GPU_MEMORY_GB": str(memory_gb), "EMP_WORKER_GPU_MODEL": "test-gpu"}
    if models is not None:
        env["EMP_WORKER_MODELS"] = json.dumps(models)
    env.update(more)
    return env


def queue_named(client, name: str, who: str = "admin") -> dict | None:
    listed = client.get("/api/queues", headers=headers(who)).get_json()["queues"]
    return next((q for q in listed if q["name"] == name), None)


# --- routing -------------------------------------------------------------------------------


def test_vram_and_model_requirements_land_on_the_worker_that_has_them(client, start_worker):
    service = "route-mix"
    start_worker(service, "route-8gb", **gpu_env(8, {service: ["sd15"]}))
    start_worker(service, "route-24gb", **gpu_env(24, {service: ["sdxl"]}))
    kinds = ["16gb", "sd15", "sdxl", "any", "8gb"]
    submitted = []
    for number in range(50):
        kind = kinds[number % len(kinds)]
        requirements = {
            "16gb": {"gpu_memory_gb": 16},
            "sd15": {"models": ["sd15"]},
            "sdxl": {"models": ["sdxl"], "gpu_memory_gb": 12},
            "any": {},
            "8gb": {"gpu_memory_gb": 8},
        }[kind]
        answer = submit(client, service, {"duration_s": 0.02}, requirements=requirements)
        assert answer["warnings"] == []
        submitted.append((kind, answer["step_id"]))

    ran_on = Counter()
    for kind, step_id in submitted:
        step = wait_for_status(client, step_id, {"completed", "failed"}, timeout_s=60)
        assert step["status"] == "completed", step
        ran_on[(kind, step["worker_id"])] += 1
        # One attempt, on the worker that ran it: never tried elsewhere first.
        assert [(a[1], a[2]) for a in attempts_of(step_id)] == [(step["worker_id"], "completed")]
    assert ran_on[("16gb", "route-24gb")] == 10
    assert ran_on[("sdxl", "route-24gb")] == 10
    assert ran_on[("sd15", "route-8gb")] == 10
    assert sum(n for (kind, _), n in ran_on.items() if kind in ("any", "8gb")) == 20

    queues = client.get("/api/queues?all=true", headers=headers("admin")).get_json()["queues"]
    mine = {
        json.dumps(q["requirements"], sort_keys=True): q for q in queues if q["service"] == service
    }
    assert mine['{"gpu_memory_gb": 16}']["consumer_ids"] == ["route-24gb"]
    assert mine['{"models": ["sd15"]}']["consumer_ids"] == ["route-8gb"]
    assert mine["{}"]["consumer_ids"] == ["route-24gb", "route-8gb"]


def test_strict_isolation_worker_never_runs_another_customers_step(client, start_worker):
    service = "route-iso"
    start_worker(
        service,
        "iso-alice",
        concurrency=2,
        EMP_WORKER_ISOLATION="strict",
        EMP_WORKER_ALLOWED_CUSTOMERS="alice",
    )
    start_worker(service, "iso-shared", concurrency=2)
    steps = []
    for number in range(24):
        who = "alice" if number % 2 else "bob"
        steps.append((who, submit(client, service, {"duration_s": 0.05}, who=who)["step_id"]))
    dedicated = submit(
        client, service, {"duration_s": 0.01}, requirements={"customer_isolation": "strict"}
    )
    for who, step_id in steps:
        step = wait_for_status(client, step_id, {"completed"}, who=who, timeout_s=60)
        if who == "bob":
            assert step["worker_id"] == "iso-shared"
            assert all(a[1] == "iso-shared" for a in attempts_of(step_id))
    assert wait_for_status(client, dedicated["step_id"], {"completed"})["worker_id"] == "iso-alice"
    # A customer no strict worker serves: accepted, and told why it waits.
    unserved = submit(client, service, who="bob", requirements={"customer_isolation": "strict"})
    assert unserved["status"] == "pending"
    assert [w["code"] for w in unserved["warnings"]] == ["NO_CAPABLE_WORKER"]
    assert "customer_isolation strict" in unserved["warnings"][0]["message"]


def test_a_step_nobody_can_serve_warns_then_runs_when_a_capable_worker_joins(client, start_worker):
    service = "route-late"
    start_worker(service, "late-24gb", **gpu_env(24))
    answer = submit(client, service, {"duration_s": 0.05}, requirements={"gpu_memory_gb": 48})
    step_id = answer["step_id"]
    assert answer["status"] == "pending"
    assert answer["warnings"][0]["code"] == "NO_CAPABLE_WORKER"
    assert answer["warnings"][0]["unmet"] == ["gpu_memory_gb >= 48"]
    got = client.get(f"/api/steps/{step_id}", headers=headers()).get_json()
    assert got["warnings"][0]["unmet"] == ["gpu_memory_gb >= 48"]
    assert "gpu_memory_gb >= 48" in got["warnings"][0]["message"]
    queue = queue_named(client, got["step"]["queue"])
    assert queue["depth"] == 1 and queue["consumers"] == 0
    assert queue["warnings"][0]["unmet"] == ["gpu_memory_gb >= 48"]
    # The customer sees its own queue, without worker ids; another customer does not.
    assert "consumer_ids" not in queue_named(client, got["step"]["queue"], who="alice")
    assert queue_named(client, got["step"]["queue"], who="bob") is None

    start_worker(service, "late-48gb", **gpu_env(48))
    step = wait_for_status(client, step_id, {"completed"}, timeout_s=30)
    assert step["worker_id"] == "late-48gb"
    after = client.get(f"/api/steps/{step_id}", headers=headers()).get_json()
    assert after["warnings"] == []


# --- fleet changes -------------------------------------------------------------------------


def test_killing_a_worker_marks_it_offline_and_requeues_its_step(client, start_worker):
    service = "fleet-kill"
    doomed = start_worker(service, "kill-victim")
    step_id = submit(client, service, {"duration_s": 30})["step_id"]
    wait_for_status(client, step_id, {"running"})
    start_worker(service, "kill-survivor")
    kill_9(doomed)
    wait_for(lambda: worker_status("kill-victim") == "offline", timeout_s=20)

    def offline_events() -> list[dict]:
        return [
            e
            for e in stream_events()
            if e["type"] == "worker_offline" and e["worker_id"] == "kill-victim"
        ]

    # The row changes at commit; the relay publishes the event just after it.
    offline = wait_for(offline_events, timeout_s=10)
    assert len(offline) == 1 and "no heartbeat" in offline[0]["data"]["reason"]
    step = wait_for_status(client, step_id, {"running", "completed"}, timeout_s=20)
    assert step["worker_id"] == "kill-survivor"
    assert attempts_of(step_id)[0] == (1, "kill-victim", "lost")
    client.post(f"/api/steps/{step_id}/cancel", headers=headers())

    listed = client.get("/api/workers", headers=headers("admin")).get_json()["workers"]
    victim = next(w for w in listed if w["id"] == "kill-victim")
    assert victim["status"] == "offline" and victim["queues"] == []
    survivor = next(w for w in listed if w["id"] == "kill-survivor")
    assert survivor["status"] == "online" and survivor["capabilities"]["services"] == [service]


def test_drain_stops_new_work_while_the_current_step_finishes(client, start_worker):
    service = "fleet-drain"
    start_worker(service, "drain-me")
    first = submit(client, service, {"duration_s": 1.5})["step_id"]
    wait_for_status(client, first, {"running"})
    admin = headers("admin")

    assert client.post("/api/workers/drain-me/drain", headers=headers()).status_code == 403
    drained = client.post(
        "/api/workers/drain-me/drain", json={"reason": "maintenance"}, headers=admin
    )
    assert drained.status_code == 200, drained.get_json()
    worker = drained.get_json()["worker"]
    assert worker["status"] == "draining" and worker["current_step_id"] == first
    second = submit(client, service, {"duration_s": 0.01})

    def warned() -> bool:
        got = client.get(f"/api/steps/{second['step_id']}", headers=headers()).get_json()
        messages = [w["message"] for w in got["warnings"]]
        return len(messages) == 1 and messages[0].startswith("every worker that can run this step")

    wait_for(warned, timeout_s=5)  # the fleet view a web process keeps may be 1 s old

    assert wait_for_status(client, first, {"completed", "failed"})["status"] == "completed"
    wait_for(
        lambda: (
            client.get("/api/workers/drain-me", headers=admin).get_json()["worker"]["queues"] == []
        )
    )
    wait_for(lambda: stream_events(first)[-1]["type"] == "step_completed")
    # The drained worker is idle and the second step still waits for it.
    still = client.get(f"/api/steps/{second['step_id']}", headers=headers()).get_json()["step"]
    assert still["status"] == "pending" and still["attempts"] == 0

    resumed = client.post("/api/workers/drain-me/resume", headers=admin)
    assert resumed.get_json()["worker"]["status"] == "online"
    done = wait_for_status(client, second["step_id"], {"completed"}, timeout_s=20)
    assert done["worker_id"] == "drain-me"
    changes = [
        e["data"]["status"]
        for e in stream_events()
        if e["type"] == "worker_status_changed" and e["worker_id"] == "drain-me"
    ]
    assert changes == ["draining", "online"]

    assert client.post("/api/workers/nobody/drain", headers=admin).get_json()["error"]["code"] == (
        "WORKER_NOT_FOUND"
    )


def test_deleting_a_machine_requeues_its_running_steps(client, start_worker):
    service = "fleet-remove"
    start_worker(service, "remove-me")
    step_id = submit(client, service, {"duration_s": 30})["step_id"]
    wait_for_status(client, step_id, {"running"})
    start_worker(service, "remove-keeper")
    admin = headers("admin")
    machine = client.get("/api/machines/machine-remove-me", headers=admin).get_json()["machine"]
    assert machine["status"] == "online"
    assert machine["workers"][0]["current_step_id"] == step_id

    deleted = client.delete("/api/machines/machine-remove-me", headers=admin)
    assert deleted.status_code == 200, deleted.get_json()
    assert deleted.get_json()["requeued_step_ids"] == [step_id]
    step = wait_for_status(client, step_id, {"running"}, timeout_s=20)
    assert step["worker_id"] == "remove-keeper"
    assert step["attempts"] == 2 and step["max_retries"] == 4  # the re-queue spent no retry
    assert attempts_of(step_id)[0] == (1, "remove-me", "requeued")
    assert worker_status("remove-me") == "removed"
    machines = client.get("/api/machines", headers=admin).get_json()["machines"]
    assert "machine-remove-me" not in [m["id"] for m in machines]
    gone = client.get("/api/machines/machine-remove-me", headers=admin)
    assert gone.status_code == 404 and gone.get_json()["error"]["code"] == "MACHINE_NOT_FOUND"
    client.post(f"/api/steps/{step_id}/cancel", headers=headers())
    assert client.get("/api/machines", headers=headers()).status_code == 403


def test_priority_orders_work_across_customers_queues(client, start_worker):
    """One queue per customer, yet a worker still takes higher priority first from any."""
    service = "route-priority"
    start_worker(service, "priority-1")
    blocker = submit(client, service, {"duration_s": 1.0})["step_id"]
    wait_for_status(client, blocker, {"running"})
    low = [submit(client, service, {}, who="alice", priority=10)["step_id"] for _ in range(3)]
    high = [
        submit(client, service, {}, who=who, priority=90)["step_id"] for who in ("bob", "alice")
    ]
    started = {}
    for step_id, who in [*((s, "alice") for s in low), (high[0], "bob"), (high[1], "alice")]:
        started[step_id] = wait_for_status(client, step_id, {"completed"}, who=who)["started_at"]
    assert max(started[s] for s in high) < min(started[s] for s in low)
