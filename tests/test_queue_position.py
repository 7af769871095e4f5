"""`queue_position` / `queue_depth` of pending steps: the order workers really take them."""

from __future__ import annotations

import os
from urllib.parse import urlsplit, urlunsplit

import psycopg
from sqlalchemy import text

from emp_tasks.core.priority import broker_priority, broker_priority_sql
from emp_tasks.steps import queue_order
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


# Per queue and level: the triggers' counters and the pending steps, in one snapshot.
_COUNTERS_VS_STEPS = (
    "WITH counted AS (SELECT queue, level, sum(pending) AS n FROM queue_counts"
    "  GROUP BY queue, level HAVING sum(pending) <> 0),"
    f" actual AS (SELECT queue, {broker_priority_sql()} AS level, count(*) AS n FROM steps"
    "  WHERE status = 'pending' GROUP BY 1, 2)"
    " SELECT coalesce(c.queue, a.queue) AS queue, coalesce(c.level, a.level) AS level,"
    "  c.n AS counted, a.n AS actual"
    " FROM counted c FULL JOIN actual a ON a.queue = c.queue AND a.level = c.level"
    " WHERE c.n IS DISTINCT FROM a.n"
)


def counter_mismatches(url: str | None = None) -> list:
    with db.tx(url) as tx:
        return tx.all(_COUNTERS_VS_STEPS)


def test_the_counters_follow_every_change_of_pending_steps(client, start_worker):
    service = "position-counters"
    plain = [submit(client, service, priority=priority) for priority in (5, 50, 50, 95)]
    workflow = client.post(
        "/api/workflows",
        json={
            "name": "position-counters",
            "steps": [
                {"service": service, "payload": {"duration_s": 0.05}},
                {"service": service, "payload": {"duration_s": 0.05}, "depends_on": [0]},
            ],
        },
        headers=headers(),
    )
    assert workflow.status_code == 201, workflow.get_json()
    assert counter_mismatches() == []
    queue = plain[0]["queue"]
    assert get(client, plain[0]["id"])["queue_depth"] == 5  # four plain steps, one root

    client.post(f"/api/steps/{plain[1]['id']}/cancel", json={}, headers=headers())
    assert counter_mismatches() == []
    assert client.post(f"/api/steps/{plain[1]['id']}/retry", headers=headers()).status_code == 200
    assert counter_mismatches() == []

    start_worker(service, "position-counters-worker", concurrency=1)
    for step in plain:
        wait_for_status(client, step["id"], {"completed"})
    wait_for(lambda: queue_order.depth(queue) == 0, timeout_s=20)  # the workflow's too
    assert counter_mismatches() == []

    waiting = [submit(client, "position-counters-purged") for _ in range(3)]
    client.post(f"/api/queues/{waiting[0]['queue']}/purge", json={}, headers=headers("admin"))
    assert counter_mismatches() == []
    assert get(client, waiting[0]["id"])["status"] == "cancelled"


def test_a_position_counts_the_steps_ahead_when_many_were_queued_after_it(client, monkeypatch):
    monkeypatch.setattr(queue_order, "LATER_CAP", 2)
    service = "position-many-after"
    steps = [submit(client, service) for _ in range(4)]
    steps.insert(1, submit(client, service, priority=90))
    assert [s["queue_position"] for s in steps] == [0, 0, 1, 2, 3]  # as each was submitted
    # Now: the urgent one first, then the others oldest first; the first two have more
    # than LATER_CAP queued after them, so theirs is the count of the steps ahead.
    assert [get(client, s["id"])["queue_position"] for s in steps] == [1, 0, 2, 3, 4]
    assert {get(client, s["id"])["queue_depth"] for s in steps} == {5}


def test_the_counters_of_ended_backends_fold_into_one_row(services, client):
    step = submit(client, "position-folded")
    url = services["database_url"]
    with psycopg.connect(url) as own:  # a backend of its own, which then ends
        backend = own.execute("SELECT pg_backend_pid()").fetchone()[0]
        own.execute("UPDATE steps SET status = 'cancelled' WHERE id = %s", [step["id"]])
    with db.tx() as tx:
        mine = tx.all("SELECT pending FROM queue_counts WHERE backend = %s", [backend])
    assert [row.pending for row in mine] == [-1]
    wait_for(lambda: queue_order.compact_counts() >= 0 and not _rows_of(backend), timeout_s=10)
    assert counter_mismatches() == []
    assert queue_order.depth(step["queue"]) == 0
    with db.tx() as tx:
        assert tx.all(
            "SELECT 1 FROM queue_counts WHERE backend = 0 AND queue = %s", [step["queue"]]
        ), "the folded counts are kept"


def _rows_of(backend: int) -> list:
    with db.tx() as tx:
        return tx.all("SELECT 1 FROM queue_counts WHERE backend = %s", [backend])


def test_the_migration_counts_the_steps_already_pending(services):
    name = f"emp_test_counts_{os.getpid()}"
    parts = urlsplit(services["database_url"])
    admin_url = urlunsplit(parts._replace(path="/postgres"))
    url = urlunsplit(parts._replace(path=f"/{name}"))
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}"')
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        db.upgrade(url, "0010")
        with psycopg.connect(url) as before:
            before.execute(
                "INSERT INTO steps (id, customer_id, service, queue, status, priority, payload,"
                " requirements, progress, attempts, max_retries, timeout_s, depends_on,"
                " metadata, remaining_deps, queued_at)"
                " SELECT 'migrated-' || g, 'alice', 'svc', 'q.' || (g % 2),"
                " CASE WHEN g % 3 = 0 THEN 'completed' ELSE 'pending' END, g * 7 % 101,"
                " '{}', '{}', 0, 0, 0, 60, '[]', '{}', 0, now() FROM generate_series(1, 60) g"
            )
        db.upgrade(url)
        assert counter_mismatches(url) == []
        with db.tx(url) as tx:
            assert tx.one("SELECT sum(pending) AS n FROM queue_counts").n == 40
    finally:
        db.forget(url)
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_steps_queued_at_the_same_moment_stand_in_id_order(client, monkeypatch):
    monkeypatch.setattr(queue_order, "LATER_CAP", 2)
    steps = [submit(client, "position-tied") for _ in range(4)]
    ids = sorted(step["id"] for step in steps)
    with db.tx() as tx:  # as for steps one statement queued (all of one now())
        tx.execute("UPDATE steps SET queued_at = now() WHERE id = ANY(%s)", [ids])
    assert [get(client, step_id)["queue_position"] for step_id in ids] == [0, 1, 2, 3]


def test_a_submit_to_a_known_route_is_one_statement_with_its_event_and_position(client):
    """Once a route is recorded, a submit without an Idempotency-Key is one autocommitted
    statement: the row, its `step_submitted` with the task it queues, and its position read
    before the step existed; answered as the transaction would have answered."""
    from emp_tasks.routes import queues
    from emp_tasks.specs import StepCreate
    from emp_tasks.steps import transitions
    from emp_tasks.store import outbox, publishing

    service = "position-at-once"
    first = submit(client, service, priority=50)  # records the route
    assert queues.is_known(first["queue"])
    spec = StepCreate(service=service, payload={"duration_s": 0.05})
    assert transitions.inserts_at_once(transitions.new_step(spec, "alice", None))
    later = [submit(client, service, priority=50) for _ in range(2)]
    urgent = submit(client, service, priority=90)
    assert [s["queue_position"] for s in [first, *later]] == [0, 1, 2]
    assert [s["queue_depth"] for s in [first, *later]] == [1, 2, 3]
    assert (urgent["queue_position"], urgent["queue_depth"]) == (0, 4)
    assert [get(client, s["id"])["queue_position"] for s in [urgent, first, *later]] == [0, 1, 2, 3]
    assert publishing.flush(5.0)
    with db.tx() as tx:
        for step in [first, *later, urgent]:
            rows = tx.all(
                "SELECT envelope, dispatch, stream_id FROM events WHERE step_id = %s", [step["id"]]
            )
            assert len(rows) == 1
            envelope, dispatch, stream_id = rows[0]
            assert envelope["type"] == "step_submitted" and stream_id is not None
            assert envelope["data"] == {
                "service": service,
                "priority": step["priority"],
                "status": "pending",
            }
            assert envelope["customer_id"] == step["customer_id"]
            assert dispatch["step_id"] == step["id"] and dispatch["queue"] == step["queue"]
        assert [e["type"] for e in outbox.for_step(tx, later[0]["id"])] == ["step_submitted"]
