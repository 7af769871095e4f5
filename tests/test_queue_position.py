"""`queue_position` / `queue_depth` of pending steps: the order workers really take them."""

from __future__ import annotations

from sqlalchemy import text

from emp_tasks.core.priority import broker_priority, broker_priority_sql
from emp_tasks.store import db
from tests.conftest import headers, wait_for, wait_for_status


def test_the_sql_broker_level_is_the_python_one():
    sql = broker_priority_sql("p", "c")
    with db.transaction() as session:
        rows = session.execute(
            text(
                f"SELECT p, c, {sql} AS level FROM generate_series(-5, 105) AS p,"
                " (VALUES (true), (false)) AS v(c)"
            )
        ).all()
    assert len(rows) == 222
    assert all(row.level == broker_priority(row.p, row.c) for row in rows)


def submit(client, service: str, **fields) -> dict:
    body = {"service": service, "payload": {"duration_s": 0.05}, **fields}
    response = client.post("/api/steps", json=body, headers=headers())
    assert response.status_code == 201, response.get_json()
    return response.get_json()["step"]


def get(client, step_id: str) -> dict:
    return client.get(f"/api/steps/{step_id}", headers=headers()).get_json()["step"]


def test_positions_follow_the_order_workers_take_steps(client, start_worker):
    service = "position-busy"
    start_worker(service, "position-worker", concurrency=1)
    busy = submit(client, service, payload={"duration_s": 30})
    wait_for_status(client, busy["id"], {"running"})
    assert get(client, busy["id"])["queue_position"] is None

    waiting = [submit(client, service, priority=50) for _ in range(3)]
    assert [get(client, s["id"])["queue_position"] for s in waiting] == [0, 1, 2]
    # The depth is counted at most once a second per queue and process.
    wait_for(lambda: {get(client, s["id"])["queue_depth"] for s in waiting} == {3}, timeout_s=3)
    assert [s["queue_position"] for s in waiting] == [0, 1, 2]  # the POSTs' answers too
    again = client.post(
        "/api/steps",
        json={"service": service, "payload": {"duration_s": 0.05}},
        headers=headers(**{"Idempotency-Key": "position-replay"}),
    ).get_json()["step"]
    replayed = client.post(
        "/api/steps",
        json={"service": service, "payload": {"duration_s": 0.05}},
        headers=headers(**{"Idempotency-Key": "position-replay"}),
    )
    assert replayed.status_code == 200 and replayed.get_json()["step"]["id"] == again["id"]
    assert again["queue_position"] == replayed.get_json()["step"]["queue_position"] == 3
    client.post(f"/api/steps/{again['id']}/cancel", json={}, headers=headers())

    urgent = submit(client, service, priority=95)
    assert urgent["queue_position"] == 0
    assert [get(client, s["id"])["queue_position"] for s in waiting] == [1, 2, 3]
    wait_for(lambda: get(client, waiting[0]["id"])["queue_depth"] == 4, timeout_s=3)

    client.post(f"/api/steps/{busy['id']}/cancel", json={}, headers=headers())
    order = [urgent, *waiting]
    for step in order:
        wait_for_status(client, step["id"], {"completed"})
    started = sorted(order, key=lambda s: get(client, s["id"])["started_at"])
    assert [s["id"] for s in started] == [s["id"] for s in order]
    assert get(client, urgent["id"])["queue_position"] is None
