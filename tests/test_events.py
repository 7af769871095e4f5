"""Domain events: the outbox, the `emp:events` stream and channel, commit order, the sweeper."""

from __future__ import annotations

import json

from sqlalchemy import select

from emp_tasks import relay
from emp_tasks.core.events import CHANNEL
from emp_tasks.store import db, redisdb
from emp_tasks.store.models import Event
from tests.conftest import headers, stream_events, wait_for, wait_for_status
from tests.test_steps_api import UNSERVED

ENVELOPE_KEYS = {
    "id",
    "type",
    "version",
    "timestamp",
    "correlation_id",
    "step_id",
    "workflow_id",
    "machine_id",
    "worker_id",
    "customer_id",
    "data",
}
REQUIRED_DATA = {
    "step_submitted": {"service", "priority", "status"},
    "step_assigned": {"worker_id", "machine_id", "attempt"},
    "step_started": {"attempt"},
    "step_progress": {"progress", "stage", "message"},
    "step_completed": {"result", "duration_ms", "attempt"},
    "step_cancelled": {"reason"},
    "step_failed": {"error", "attempts"},
    "step_retrying": {"error", "attempt", "retry_at"},
}


def test_a_step_publishes_its_lifecycle_in_order_with_complete_envelopes(client, system):
    response = client.post(
        "/api/steps",
        json={"service": "simulation", "payload": {"duration_s": 0.4, "progress_steps": 3}},
        headers=headers(**{"X-Correlation-ID": "events-order"}),
    )
    step_id = response.get_json()["step_id"]
    wait_for_status(client, step_id, {"completed"})
    events = wait_for(
        lambda: (e := stream_events(step_id)) and e[-1]["type"] == "step_completed" and e
    )
    assert [e["type"] for e in events] == [
        "step_submitted",
        "step_assigned",
        "step_started",
        "step_progress",
        "step_progress",
        "step_progress",
        "step_completed",
    ]
    for event in events:
        assert set(event) >= ENVELOPE_KEYS, event
        assert REQUIRED_DATA[event["type"]] <= set(event["data"]), event
        assert event["version"] == 1
        assert isinstance(event["timestamp"], int)
        assert event["correlation_id"] == "events-order"
        assert event["customer_id"] == "alice"
        assert event["step_id"] == step_id
    assert [e["data"]["progress"] for e in events[3:6]] == [25.0, 50.0, 75.0]
    assert events[1]["data"]["worker_id"] == "test-worker-1"
    assert events[-1]["data"]["attempt"] == 1
    assert events[-1]["data"]["result"]["ok"] is True
    timestamps = [e["timestamp"] for e in events]
    assert timestamps == sorted(timestamps)
    assert len({e["id"] for e in events}) == len(events)


def test_every_outbox_event_reaches_the_stream_exactly_once(client, system):
    step_id = client.post(
        "/api/steps", json={"service": "simulation"}, headers=headers()
    ).get_json()["step_id"]
    wait_for_status(client, step_id, {"completed"})
    wait_for(lambda: len(stream_events(step_id)) == 4)

    def all_marked() -> list | None:
        """The step's rows once all are marked published (in batches, within
        publishing.MARK_LINGER_S of their XADD)."""
        with db.transaction() as session:
            rows = session.execute(
                select(Event.id, Event.published_at, Event.stream_id)
                .where(Event.step_id == step_id)
                .order_by(Event.seq)
            ).all()
        return rows if rows and all(r.published_at for r in rows) else None

    marked = wait_for(all_marked)
    published = stream_events(step_id)
    assert [r.id for r in marked] == [e["id"] for e in published]
    assert [r.stream_id for r in marked] == [e["stream_id"] for e in published]


def test_events_are_also_published_on_the_channel_with_their_stream_id(client):
    pubsub = redisdb.client().pubsub()
    pubsub.subscribe(CHANNEL)
    wait_for(lambda: pubsub.get_message(timeout=0.1))  # the subscribe confirmation
    step_id = client.post("/api/steps", json={"service": UNSERVED}, headers=headers()).get_json()[
        "step_id"
    ]

    def ours():
        message = pubsub.get_message(timeout=0.2)
        if message and message["type"] == "message":
            event = json.loads(message["data"])
            return event if event["step_id"] == step_id else None
        return None

    event = wait_for(ours)
    pubsub.close()
    assert event["type"] == "step_submitted"
    assert event["stream_id"] == stream_events(step_id)[0]["stream_id"]
    assert event["db"] == redisdb.database_index()  # channels span databases; streams do not


def test_event_committed_but_not_published_is_swept_by_the_relay(client, system, override_settings):
    """A process that dies between commit and publish: the relay process publishes it."""
    override_settings(events_fast_path=False)
    step_id = client.post("/api/steps", json={"service": UNSERVED}, headers=headers()).get_json()[
        "step_id"
    ]
    with db.transaction() as session:
        row = session.scalar(select(Event).where(Event.step_id == step_id))
        assert row.published_at is None  # nothing published it on the way out
    events = wait_for(lambda: stream_events(step_id), timeout_s=15)
    assert [e["type"] for e in events] == ["step_submitted"]

    def marked_published():
        with db.transaction() as session:
            return session.scalar(select(Event.published_at).where(Event.id == row.id))

    wait_for(marked_published)


def test_relay_keeps_commit_order_when_the_fast_path_was_skipped(client, override_settings):
    override_settings(events_fast_path=False)
    step_id = client.post("/api/steps", json={"service": UNSERVED}, headers=headers()).get_json()[
        "step_id"
    ]
    client.post(f"/api/steps/{step_id}/cancel", headers=headers())
    client.post(f"/api/steps/{step_id}/retry", headers=headers())
    client.post(f"/api/steps/{step_id}/cancel", headers=headers())
    relay.sweep(min_age_s=0)
    assert [e["type"] for e in stream_events(step_id)] == [
        "step_submitted",
        "step_cancelled",
        "step_retrying",
        "step_cancelled",
    ]
