"""Warm placement with real workers: a step naming a model goes where it is loaded.

The simulation loads `payload.model` in EMP_SIM_MODEL_LOAD_S when it is not the model it
holds; each attempt records `cold_start` and `model_load_ms`. Every test runs workers on
a service of its own, so no other worker shares its routes.
"""

from __future__ import annotations

import json

from sqlalchemy import select

from emp_tasks import metrics
from emp_tasks.store import db, redisdb
from emp_tasks.store.models import Attempt, Worker
from tests.conftest import headers, kill_9, stream_events, wait_for, wait_for_status
from tests.test_fleet import gpu_env

MODELS = ["model-a", "model-b"]


def warm_worker(start_worker, service: str, worker_id: str, **env: str):
    return start_worker(
        service,
        worker_id,
        concurrency=1,
        EMP_SIM_MODEL_LOAD_S="0.3",
        **gpu_env(24, {service: MODELS}),
        **env,
    )


def submit(client, service: str, model: str, duration_s: float = 0.02, who: str = "alice"):
    body = {
        "service": service,
        "payload": {"model": model, "duration_s": duration_s},
        "requirements": {"models": [model]},
    }
    response = client.post("/api/steps", json=body, headers=headers(who))
    assert response.status_code == 201, response.get_json()
    return response.get_json()["step_id"]


def attempts_of(step_ids: list[str]) -> list[Attempt]:
    with db.transaction() as session:
        return list(
            session.scalars(
                select(Attempt).where(Attempt.step_id.in_(step_ids)).order_by(Attempt.id)
            )
        )


def cold_starts(step_ids: list[str]) -> int:
    return sum(1 for a in attempts_of(step_ids) if a.cold_start)


def run_bursts(client, service: str, bursts: int = 8, size: int = 5) -> list[str]:
    ids: list[str] = []
    for burst in range(bursts):
        model = MODELS[burst % 2]
        batch = [submit(client, service, model) for _ in range(size)]
        for step_id in batch:
            wait_for_status(client, step_id, {"completed"}, timeout_s=60)
        ids += batch
    return ids


def test_alternating_bursts_stay_warm_with_affinity_and_go_cold_without(
    client, start_worker, override_settings
):
    service = "warm-bursts"
    warm_worker(start_worker, service, "warm-1")
    warm_worker(start_worker, service, "warm-2")
    # A generous wait bound: on this shared machine a 5-step burst can outlast 500 ms.
    override_settings(affinity_wait_ms=3000)
    with_affinity = run_bursts(client, service)
    warm_cold = cold_starts(with_affinity)
    override_settings(affinity=False)
    without = run_bursts(client, service)
    off_cold = cold_starts(without)
    print(f"\ncold starts in 40 alternating steps: affinity on {warm_cold}, off {off_cold}")
    assert warm_cold <= 8

    def counted() -> int:
        fields = redisdb.client().hgetall(metrics.MODEL_LOADS.key)
        return sum(int(v) for k, v in fields.items() if json.loads(k)[0] == service)

    wait_for(lambda: counted() == warm_cold + off_cold, timeout_s=10)
    attempts = attempts_of(with_affinity)
    assert all(a.cold_start is not None for a in attempts)
    assert all(a.model_load_ms >= 250 for a in attempts if a.cold_start)
    assert all(a.model_load_ms is None for a in attempts if not a.cold_start)
    shown = client.get(f"/api/steps/{with_affinity[0]}/attempts", headers=headers()).get_json()
    assert shown["attempts"][0]["cold_start"] is True
    with db.transaction() as session:
        loaded = {w.id: w.loaded_models for w in session.scalars(select(Worker))}
    assert {tuple(loaded[w].get(service, [])) for w in ("warm-1", "warm-2")} <= {
        ("model-a",),
        ("model-b",),
    }


def test_a_burst_uses_the_idle_cold_worker_beside_the_busy_warm_one(client, start_worker):
    service = "warm-burst-both"
    warm_worker(start_worker, service, "burst-warm")
    first = submit(client, service, "model-a")
    assert wait_for_status(client, first, {"completed"})["worker_id"] == "burst-warm"
    warm_worker(start_worker, service, "burst-cold")
    burst = [submit(client, service, "model-a", duration_s=1.5) for _ in range(4)]
    ran = {wait_for_status(client, s, {"completed"}, timeout_s=60)["worker_id"] for s in burst}
    assert ran == {"burst-warm", "burst-cold"}
    released = [
        e["step_id"]
        for s in burst
        for e in stream_events(step_id=s)
        if e["type"] == "step_queued" and e["data"].get("reason") == "affinity_wait"
    ]
    assert released  # the wait bound sent some to the shared queue, where the cold one took them


def test_a_warm_worker_killed_mid_step_loses_nothing(client, start_worker):
    service = "warm-killed"
    doomed = warm_worker(start_worker, service, "killed-warm")
    first = submit(client, service, "model-a")
    wait_for_status(client, first, {"completed"})
    warm_worker(start_worker, service, "killed-other")
    long = submit(client, service, "model-a", duration_s=4)  # run again from the start
    assert wait_for_status(client, long, {"running"})["worker_id"] == "killed-warm"
    queued = [submit(client, service, "model-a") for _ in range(2)]  # to the warm queue
    kill_9(doomed)
    for step_id in [long, *queued]:
        step = wait_for_status(client, step_id, {"completed"}, timeout_s=90)
        assert step["worker_id"] == "killed-other"


def test_a_strict_isolation_worker_with_the_model_never_gets_another_customers_step(
    client, start_worker
):
    service = "warm-isolated"
    warm_worker(
        start_worker,
        service,
        "iso-warm",
        EMP_WORKER_ISOLATION="strict",
        EMP_WORKER_ALLOWED_CUSTOMERS="alice",
    )
    mine = submit(client, service, "model-a", who="alice")
    assert wait_for_status(client, mine, {"completed"})["worker_id"] == "iso-warm"
    wait_for(lambda: _loaded("iso-warm").get(service) == ["model-a"], timeout_s=10, interval_s=0.1)
    warm_worker(start_worker, service, "iso-shared-warm")
    theirs = [submit(client, service, "model-a", who="bob") for _ in range(4)]
    for step_id in theirs:
        step = wait_for_status(client, step_id, {"completed"}, who="bob", timeout_s=60)
        assert step["worker_id"] == "iso-shared-warm"
    assert all(a.worker_id == "iso-shared-warm" for a in attempts_of(theirs))


def _loaded(worker_id: str) -> dict:
    with db.transaction() as session:
        value = session.scalar(select(Worker.loaded_models).where(Worker.id == worker_id))
    return value if isinstance(value, dict) else json.loads(value or "{}")
