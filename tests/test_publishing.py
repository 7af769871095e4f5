"""Publishing: the task pushed with its event, a publisher dying between XADD and marking
the rows, and the ordering rule of progress reports as the consumers apply it."""

from __future__ import annotations

import base64
import json

import pytest
from kombu import Exchange, Queue
from sqlalchemy import select

from emp_tasks import relay
from emp_tasks.core.events import STREAM, Envelope, EventType, step_aggregate
from emp_tasks.core.ids import new_id
from emp_tasks.store import broker, db, publishing, redisdb
from emp_tasks.store.models import Event, WebhookDelivery
from emp_tasks.webhooks import delivery
from tests import test_webhooks
from tests.conftest import headers, stream_events, wait_for, wait_for_status
from tests.test_steps_api import UNSERVED
from tests.test_ws import Client

# The webhook tests' receiver and `webhooks` process fixtures, used here too.
receiver = test_webhooks.receiver
start_webhooks = test_webhooks.start_webhooks


def submit(client, service: str = "simulation", payload: dict | None = None, **fields) -> str:
    body = {"service": service, "payload": payload or {}, **fields}
    response = client.post("/api/steps", json=body, headers=headers())
    assert response.status_code == 201, response.get_json()
    return response.get_json()["step_id"]


# --- the task's message --------------------------------------------------------------------


def test_the_raw_task_message_is_the_one_apply_async_queues(services):
    """What the publish script pushes is what Celery's own `apply_async` would queue."""
    queue = f"emp.raw-check.{new_id()[:8]}"
    signature = broker.app.signature(
        broker.RUN_STEP,
        args=["step-raw"],
        queue=Queue(queue, Exchange(""), routing_key=queue),
        exchange="",
        routing_key=queue,
        priority=3,
        ignore_result=True,
        immutable=True,
    )
    with broker.app.connection_for_write(services["redis_url"]) as connection:
        signature.apply_async(connection=connection, task_id="task-raw")
    key, raw = broker.task_message("step-raw", queue, 3, "task-raw")
    client = redisdb.client()
    assert client.llen(key) == 1, "apply_async queued on another list"
    theirs, ours = json.loads(client.rpop(key)), json.loads(raw)

    def body(message: dict) -> list:
        return json.loads(base64.b64decode(message["body"]))

    assert body(ours) == body(theirs)
    assert set(ours) == set(theirs)
    assert {k: v for k, v in ours.items() if k not in ("body", "headers", "properties")} == {
        k: v for k, v in theirs.items() if k not in ("body", "headers", "properties")
    }
    assert set(ours["headers"]) == set(theirs["headers"])
    for name, value in theirs["headers"].items():
        if name != "origin":  # the sending process's name
            assert ours["headers"][name] == value, name
    assert set(ours["properties"]) == set(theirs["properties"])
    for name in ("correlation_id", "delivery_mode", "delivery_info", "priority", "body_encoding"):
        assert ours["properties"][name] == theirs["properties"][name], name


def test_a_task_pushed_with_its_event_is_run_by_a_real_worker(
    client, start_worker, override_settings
):
    start_worker("raw-sim", "raw-1")
    override_settings(events_fast_path=False)
    step_id = submit(client, "raw-sim")
    queue = client.get(f"/api/steps/{step_id}", headers=headers()).get_json()["step"]["queue"]
    publishing.publish_aggregates([step_aggregate(step_id)])  # the script: XADD, PUBLISH, LPUSH
    step = wait_for_status(client, step_id, {"completed"})
    assert step["queue"] == queue and step["attempts"] == 1
    assert [e["type"] for e in stream_events(step_id)][0] == "step_submitted"


# --- a publisher that dies between XADD and marking the rows -------------------------------


@pytest.fixture
def refuse_marking():
    """Make marking one step's events published fail, as a publisher killed after its Redis
    script and before its commit would leave them: published, still unmarked."""
    created: list[str] = []

    def refuse(step_id: str) -> None:
        name = f"emp_test_refuse_{len(created)}"
        with db.tx() as tx:
            tx.execute(
                f"CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS"
                " $$ BEGIN RAISE EXCEPTION 'publisher died'; END $$"
            )
            tx.execute(
                f"CREATE TRIGGER {name} BEFORE UPDATE OF published_at ON events FOR EACH ROW"
                f" WHEN (NEW.step_id = '{step_id}') EXECUTE FUNCTION {name}()"
            )
        created.append(name)

    yield refuse
    with db.tx() as tx:
        for name in created:
            tx.execute(f"DROP TRIGGER IF EXISTS {name} ON events")
            tx.execute(f"DROP FUNCTION IF EXISTS {name}()")


def test_a_publisher_dying_after_its_script_repeats_the_event_with_the_same_id(
    client, override_settings, refuse_marking
):
    override_settings(events_fast_path=False)
    step_id = submit(client, UNSERVED)
    refuse_marking(step_id)
    with pytest.raises(Exception, match="publisher died"):
        publishing.publish_aggregates([step_aggregate(step_id)])
    with db.transaction() as session:
        row = session.execute(
            select(Event.id, Event.published_at).where(Event.step_id == step_id)
        ).one()
    assert row.published_at is None  # the rows stay unpublished: nothing is lost
    first = stream_events(step_id)
    assert [e["id"] for e in first] == [row.id]

    with db.tx() as tx:  # the publisher comes back
        tx.execute("DROP TRIGGER emp_test_refuse_0 ON events")
    publishing.publish_aggregates([step_aggregate(step_id)])
    again = stream_events(step_id)
    assert len(again) >= 2 and {e["id"] for e in again} == {row.id}  # repeated, same id

    def marked() -> bool:
        with db.transaction() as session:
            return session.scalar(select(Event.published_at).where(Event.id == row.id))

    wait_for(marked)
    queue = client.get(f"/api/steps/{step_id}", headers=headers()).get_json()["step"]["queue"]
    messages = [json.loads(m) for m in redisdb.client().lrange(broker.queue_list(queue, 5), 0, -1)]
    mine = [m for m in messages if json.loads(base64.b64decode(m["body"]))[0] == [step_id]]
    assert len(mine) >= 2 and {m["headers"]["id"] for m in mine} == {row.id}
    client.post(f"/api/steps/{step_id}/cancel", headers=headers())


# --- the gate: commit order kept without a database round trip ----------------------------


def stream_types(step_id: str) -> list[str]:
    return [e["type"] for e in stream_events(step_id)]


def gate_of(step_id: str) -> str | None:
    return redisdb.client().get(publishing.GATE_PREFIX + step_aggregate(step_id))


def test_an_event_whose_predecessor_is_unpublished_is_published_after_it(client, override_settings):
    step_id = submit(client, UNSERVED)  # the fast path publishes it and opens the gate
    wait_for(lambda: stream_types(step_id) == ["step_submitted"])
    assert gate_of(step_id) is not None
    override_settings(events_fast_path=False)
    client.post(f"/api/steps/{step_id}/cancel", headers=headers())  # committed, unpublished
    override_settings(events_fast_path=True)
    client.post(f"/api/steps/{step_id}/retry", headers=headers())  # behind the cancel
    assert publishing.flush()
    assert stream_types(step_id) == ["step_submitted", "step_cancelled", "step_retrying"]
    client.post(f"/api/steps/{step_id}/cancel", headers=headers())
    assert publishing.flush()
    assert stream_types(step_id)[-1] == "step_cancelled"
    assert gate_of(step_id) is None  # a step that ended leaves no gate behind


def test_an_event_the_gate_does_not_know_goes_through_the_locked_path(client, override_settings):
    override_settings(events_fast_path=False)
    step_id = submit(client, UNSERVED)  # committed, unpublished: no gate
    override_settings(events_fast_path=True)
    client.post(f"/api/steps/{step_id}/cancel", headers=headers())
    assert publishing.flush()
    assert stream_types(step_id) == ["step_submitted", "step_cancelled"]
    with db.transaction() as session:
        marks = session.scalars(select(Event.published_at).where(Event.step_id == step_id)).all()
    assert len(marks) == 2 and all(marks)


def test_the_fast_path_never_publishes_again_what_the_gate_let_through(client, override_settings):
    override_settings(events_fast_path=False)
    step_id = submit(client, UNSERVED)
    publishing.publish_aggregates([step_aggregate(step_id)])  # the sweeper was first
    with db.tx() as tx:
        row = tx.one(
            "SELECT seq, id, type, envelope::text AS envelope, webhook FROM events"
            " WHERE step_id = %s",
            [step_id],
        )
    late = publishing.Outgoing(
        step_aggregate(step_id), row.seq, 0, row.id, row.type, row.envelope, row.webhook, None
    )
    publishing.publisher().notify([late])  # the commit's own fast path, late
    assert publishing.flush()
    assert [e["id"] for e in stream_events(step_id)] == [row.id]
    client.post(f"/api/steps/{step_id}/cancel", headers=headers())


def test_a_flush_for_order_waits_for_the_stream_not_for_the_mark(client, monkeypatch):
    """What a first progress report waits for: its step_started in the stream. The row's
    mark goes with the next batch, and a full flush still waits for it."""
    monkeypatch.setattr(publishing, "MARK_LINGER_S", 30.0)
    step_id = submit(client, UNSERVED)
    assert publishing.flush(marked=False)
    assert stream_types(step_id) == ["step_submitted"]

    def published_at():
        with db.transaction() as session:
            return session.scalar(select(Event.published_at).where(Event.step_id == step_id))

    assert published_at() is None  # it waits with its batch
    assert publishing.flush()
    assert published_at() is not None
    client.post(f"/api/steps/{step_id}/cancel", headers=headers())


def test_a_fast_path_dying_before_its_mark_repeats_the_event_with_the_same_id(
    client, refuse_marking
):
    step_id = submit(client, UNSERVED)
    wait_for(lambda: stream_types(step_id) == ["step_submitted"])
    assert publishing.flush()
    refuse_marking(step_id)
    client.post(f"/api/steps/{step_id}/cancel", headers=headers())
    assert publishing.flush()  # published; its mark failed
    assert stream_types(step_id) == ["step_submitted", "step_cancelled"]
    with db.transaction() as session:
        row = session.execute(
            select(Event.id, Event.published_at).where(
                Event.step_id == step_id, Event.type == "step_cancelled"
            )
        ).one()
    assert row.published_at is None  # unmarked: the sweeper's to publish again

    with db.tx() as tx:  # the database takes marks again
        tx.execute("DROP TRIGGER emp_test_refuse_0 ON events")
    relay.sweep(min_age_s=0)
    assert [e["id"] for e in stream_events(step_id) if e["type"] == "step_cancelled"] == [
        row.id,
        row.id,
    ]
    with db.transaction() as session:
        assert session.scalar(select(Event.published_at).where(Event.id == row.id))


# --- progress of an attempt that is over ---------------------------------------------------


def late_report(step: dict, attempt: int) -> Envelope:
    """What a worker still running a superseded attempt, or one that missed the end of its
    step, would publish."""
    envelope = Envelope.new(
        EventType.STEP_PROGRESS,
        data={"progress": 99.0, "stage": "late", "message": "too late", "attempt": attempt},
        correlation_id=step["correlation_id"],
        step_id=step["id"],
        customer_id=step["customer_id"],
        worker_id=step["worker_id"],
        machine_id=step["machine_id"],
    )
    publishing.publish_now(envelope, webhook=True)
    return envelope


RETRIED = {"fail": "retryable", "fail_attempts": 1, "progress_steps": 2, "duration_s": 0.2}
"""Fails its first attempt after two reports, then completes after two more."""


def late_reports(client, step_id: str) -> list[str]:
    """A report of the superseded first attempt and one of the finished second: their ids."""
    step = wait_for_status(client, step_id, {"completed"})
    assert step["attempts"] == 2
    wait_for(lambda: "step_completed" in [e["type"] for e in stream_events(step_id)])
    return [late_report(step, 1).id, late_report(step, 2).id]


def test_websocket_clients_never_see_progress_of_an_attempt_that_is_over(client, live_api, system):
    watcher = Client(live_api, who="admin")
    try:
        watcher.send(type="subscribe", all=True)
        watcher.reply("subscribed")
        before = redisdb.client().xrevrange(STREAM, count=1)[0][0]
        step_id = submit(client, payload=RETRIED)
        late = late_reports(client, step_id)
        marker = submit(client)  # events after the late ones: once it has them, the hub is past
        watcher.pump(
            lambda got: any(
                m["type"] == "step_completed" and m.get("step_id") == marker for m in got
            )
        )
    finally:
        watcher.close()
    live = [e["id"] for e in watcher.events() if e.get("step_id") == step_id]
    real = [e for e in stream_events(step_id) if e["id"] not in late]
    assert live == [e["id"] for e in real]
    assert [e["data"]["attempt"] for e in real if e["type"] == "step_progress"] == [1, 1, 2, 2]

    resumed = Client(live_api, who="admin", query=f"&after={before}")
    try:
        resumed.pump(lambda got: "resumed" in [m["type"] for m in got])
    finally:
        resumed.close()
    assert [e["id"] for e in resumed.events() if e.get("step_id") == step_id] == live


def test_webhooks_never_deliver_progress_of_an_attempt_that_is_over(
    client, system, receiver, start_webhooks
):
    start_webhooks()
    test_webhooks.register(client, receiver.url + "/endpoint", events=["step_progress"])
    step_id = submit(
        client,
        payload=RETRIED,
        webhook_url=receiver.url + "/own",
        webhook_events=["step_progress", "step_completed"],
    )
    late = late_reports(client, step_id)
    marker = submit(client, webhook_url=receiver.url + "/marker")
    wait_for_status(client, marker, {"completed"})
    wait_for(lambda: [r for r in receiver.received if r.path == "/hook/marker"], timeout_s=30)

    def consumed() -> bool:
        group = {g["name"]: g for g in redisdb.client().xinfo_groups(STREAM)}[delivery.GROUP]
        return group["pending"] == 0

    wait_for(consumed)
    with db.transaction() as session:
        recorded = session.scalars(
            select(WebhookDelivery.event_id).where(WebhookDelivery.event_id.in_(late))
        ).all()
    assert recorded == []

    def progress_by_path() -> dict[str, list[int]]:
        by_path: dict[str, list[int]] = {}
        for received in receiver.of_type("step_progress"):
            body = json.loads(received.body)
            if body["data"]["step_id"] == step_id:
                by_path.setdefault(received.path, []).append(body["data"]["attempt"])
        return by_path

    # Deliveries to different targets are sent independently: the marker's may come first.
    wait_for(lambda: sum(len(each) for each in progress_by_path().values()) >= 8, timeout_s=30)
    by_path = progress_by_path()
    assert {path: sorted(attempts) for path, attempts in by_path.items()} == {
        "/hook/own": [1, 1, 2, 2],
        "/hook/endpoint": [1, 1, 2, 2],
    }
    assert not {json.loads(r.body)["id"] for r in receiver.received} & set(late)


def test_with_a_broker_of_its_own_the_task_is_pushed_there_after_its_event(
    client, services, override_settings
):
    """EMP_BROKER_URL on another Redis database: the events' script cannot push the task, so
    the publisher pushes it onto the broker right after the script."""
    base, _, index = services["redis_url"].rpartition("/")
    other = f"{base}/{(int(index or 0) + 8) % 16}"
    override_settings(events_fast_path=False, broker_url=other)
    step_id = submit(client, UNSERVED)
    queue = client.get(f"/api/steps/{step_id}", headers=headers()).get_json()["step"]["queue"]
    broker_redis = redisdb.client(other)
    key = broker.queue_list(queue, 5)
    try:
        publishing.publish_aggregates([step_aggregate(step_id)])
        pushed = [json.loads(m) for m in broker_redis.lrange(key, 0, -1)]
        assert [json.loads(base64.b64decode(m["body"]))[0] for m in pushed] == [[step_id]]
        elsewhere = [json.loads(m) for m in redisdb.client().lrange(key, 0, -1)]
        assert step_id not in {json.loads(base64.b64decode(m["body"]))[0][0] for m in elsewhere}
        assert [e["type"] for e in stream_events(step_id)] == ["step_submitted"]
        assert pushed[0]["headers"]["id"] == stream_events(step_id)[0]["id"]
    finally:
        broker_redis.delete(key)
        client.post(f"/api/steps/{step_id}/cancel", headers=headers())
