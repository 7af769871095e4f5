"""`GET /ws` over a real gunicorn web process: subscriptions, order, resume without gap
or duplicate, customer isolation, snapshot, and 200 clients at once."""

from __future__ import annotations

import json
import socket
import threading
import time
from typing import Any

import pytest
import requests
import simple_websocket

from emp_tasks import redisdb
from emp_tasks.events import CHANNEL
from tests.conftest import KEYS, headers, stream_events, wait_for

TERMINAL = {"step_completed", "step_failed", "step_cancelled"}


class Client:
    """A WebSocket client that collects what the server sends."""

    def __init__(self, base: str, who: str = "alice", query: str = "") -> None:
        url = base.replace("http://", "ws://") + f"/ws?token={KEYS[who]}{query}"
        self.ws = simple_websocket.Client.connect(url)
        self.received: list[dict[str, Any]] = []

    def send(self, **message: Any) -> None:
        self.ws.send(json.dumps(message))

    def pump(self, until=None, timeout_s: float = 20.0) -> list[dict[str, Any]]:
        """Read messages until `until(received)` holds (or, without it, for timeout_s)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if until is not None and until(self.received):
                return self.received
            raw = self.ws.receive(timeout=0.1)
            if raw is not None:
                self.received.append(json.loads(raw))
        if until is not None:
            raise AssertionError(f"not received within {timeout_s} s: {self.types()[-20:]}")
        return self.received

    def reply(self, kind: str) -> dict[str, Any]:
        self.pump(lambda got: any(m["type"] == kind for m in got), timeout_s=10)
        found = [m for m in self.received if m["type"] == kind]
        self.received = [m for m in self.received if m["type"] != kind]
        return found[-1]

    def events(self) -> list[dict[str, Any]]:
        return [m for m in self.received if "stream_id" in m]

    def types(self) -> list[str]:
        return [m["type"] for m in self.received]

    def close(self) -> None:
        self.ws.close()


def submit_step(base: str, payload: dict, who: str = "alice") -> str:
    body = {"service": "simulation", "payload": payload}
    answer = requests.post(f"{base}/api/steps", json=body, headers=headers(who), timeout=10)
    assert answer.status_code == 201, answer.text
    return answer.json()["step_id"]


def submit_chain(base: str, length: int, duration_s: float) -> str:
    body = {
        "name": "ws chain",
        "steps": [
            {
                "service": "simulation",
                "payload": {"duration_s": duration_s},
                "depends_on": [index - 1] if index else [],
            }
            for index in range(length)
        ],
    }
    answer = requests.post(f"{base}/api/workflows", json=body, headers=headers(), timeout=10)
    assert answer.status_code == 201, answer.text
    return answer.json()["workflow_id"]


def workflow_done(messages: list[dict[str, Any]]) -> bool:
    return any(m["type"] == "workflow_completed" for m in messages)


def test_without_a_valid_key_the_upgrade_is_refused(live_api):
    url = live_api.replace("http://", "ws://") + "/ws?token=wrong"
    with pytest.raises(simple_websocket.ConnectionError) as refused:
        simple_websocket.Client.connect(url)
    assert refused.value.status_code == 401


def test_a_workflow_subscriber_receives_its_events_in_order(live_api, system):
    client = Client(live_api)
    try:
        client.send(type="subscribe", workflow_ids=["placeholder"])
        client.reply("subscribed")
        workflow_id = submit_chain(live_api, 3, 0.05)
        client.send(type="subscribe_workflow", workflow_id=workflow_id)
        assert workflow_id in client.reply("subscribed")["workflow_ids"]
        client.pump(workflow_done)
        wait_for(lambda: workflow_done(stream_events(workflow_id=workflow_id)))
    finally:
        client.close()
    got = client.events()
    expected = [
        e
        for e in stream_events(workflow_id=workflow_id)
        if e["stream_id"] in {g["stream_id"] for g in got}
    ]
    # Every event of the workflow after subscribing, in stream order, none twice, no other.
    assert [e["stream_id"] for e in got] == sorted(
        (e["stream_id"] for e in got), key=lambda s: tuple(map(int, s.split("-")))
    )
    assert len({e["id"] for e in got}) == len(got)
    assert all(e["workflow_id"] == workflow_id for e in got)
    assert [e["id"] for e in got] == [e["id"] for e in expected]
    assert got[-1]["type"] == "workflow_completed"
    assert [e["type"] for e in got].count("step_completed") == 3


def test_resume_delivers_exactly_the_missed_events_then_live_ones(live_api, system):
    first = Client(live_api)
    workflow_id = submit_chain(live_api, 4, 0.8)
    first.send(type="subscribe", workflow_ids=[workflow_id])
    first.pump(lambda got: "step_started" in [m["type"] for m in got])
    first.close()
    last = first.events()[-1]["stream_id"]
    time.sleep(1.2)  # events happen while the client is away

    second = Client(live_api)
    try:
        second.send(type="subscribe", workflow_ids=[workflow_id])
        second.reply("subscribed")
        second.send(type="resume", after=last)
        second.pump(workflow_done, timeout_s=30)
    finally:
        second.close()
    everything = stream_events(workflow_id=workflow_id)
    key = [e["stream_id"] for e in everything].index(last)
    missed_and_live = everything[key + 1 :]
    got = second.events()
    assert [e["id"] for e in got] == [e["id"] for e in missed_and_live]
    resumed_at = second.received.index(next(m for m in second.received if m["type"] == "resumed"))
    assert resumed_at > 0 and resumed_at < len(second.received) - 1  # missed, then live ones
    assert [e["id"] for e in first.events()] + [e["id"] for e in got] == [
        e["id"] for e in everything[everything.index(first.events()[0]) :]
    ]


def test_resume_on_connect_with_after(live_api, system):
    step_id = submit_step(live_api, {})
    wait_for(lambda: "step_completed" in [e["type"] for e in stream_events(step_id)])
    events = stream_events(step_id)
    client = Client(live_api, query=f"&after={events[0]['stream_id']}")
    try:
        client.pump(lambda got: "resumed" in [m["type"] for m in got])
    finally:
        client.close()
    mine = [e for e in client.events() if e.get("step_id") == step_id]
    assert [e["id"] for e in mine] == [e["id"] for e in events[1:]]
    assert all(e["customer_id"] == "alice" for e in client.events())


def test_a_customer_never_receives_another_customers_events(live_api, system):
    alice = Client(live_api, "alice")
    bob = Client(live_api, "bob")
    try:
        bob.send(type="subscribe", all=True)
        assert bob.reply("error")["code"] == "FORBIDDEN"
        bob.send(type="snapshot")
        assert bob.reply("error")["code"] == "FORBIDDEN"
        step_id = submit_step(live_api, {"duration_s": 0.2, "progress_steps": 2})
        alice.send(type="subscribe", step_ids=[step_id])
        bob.send(
            type="subscribe",
            step_ids=[step_id],
            machine_ids=["test-machine-1"],
        )
        bob.send(type="subscribe_job", job_id=step_id)
        alice.pump(lambda got: TERMINAL & {m["type"] for m in got})
        bob.send(type="resume", after="0-0")
        bob.pump(lambda got: "resumed" in [m["type"] for m in got])
        bob.pump(timeout_s=0.5)
    finally:
        alice.close()
        bob.close()
    assert {e["step_id"] for e in alice.events()} == {step_id}
    assert not [e for e in bob.events() if e.get("customer_id") != "bob"]
    assert not [e for e in bob.events() if e.get("step_id") == step_id]


def test_admin_snapshot_and_fleet_events(live_api, system):
    admin = Client(live_api, "admin")
    try:
        admin.send(type="snapshot")
        snapshot = admin.reply("snapshot")
        assert "test-worker-1" in [w["id"] for w in snapshot["workers"]]
        assert "test-machine-1" in [m["id"] for m in snapshot["machines"]]
        assert {"queues", "counts"} <= set(snapshot)
        assert snapshot["counts"]["total"] >= 0
        admin.send(type="ping")
        assert admin.reply("pong") == {"type": "pong"}
        admin.send(type="launch")
        assert admin.reply("error")["code"] == "VALIDATION_FAILED"
        admin.send(type="resume", after="yesterday")
        assert admin.reply("error")["code"] == "VALIDATION_FAILED"
    finally:
        admin.close()


def test_two_hundred_clients_all_receive_a_broadcast_event(live_api, system):
    clients: list[Client] = []
    failures: list[BaseException] = []

    def connect() -> None:
        try:
            client = Client(live_api, "admin")
            client.send(type="subscribe", all=True)
            client.reply("subscribed")
            clients.append(client)
        except BaseException as exc:  # reported below
            failures.append(exc)

    def channel_subscriptions() -> int:
        return dict(redisdb.client().pubsub_numsub(CHANNEL)).get(CHANNEL, 0)

    before = channel_subscriptions()
    threads = [threading.Thread(target=connect) for _ in range(200)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    try:
        assert not failures and len(clients) == 200, failures[:3]
        # One Redis subscription for the web process, however many sockets it serves.
        assert channel_subscriptions() - before <= 1
        step_id = submit_step(live_api, {})
        received = []

        def listen(client: Client) -> None:
            client.pump(
                lambda got: any(
                    m.get("step_id") == step_id and m["type"] == "step_completed" for m in got
                ),
                timeout_s=30,
            )
            received.append(client)

        listeners = [threading.Thread(target=listen, args=(c,)) for c in clients]
        for thread in listeners:
            thread.start()
        for thread in listeners:
            thread.join(60)
        assert len(received) == 200
    finally:
        for client in clients:
            client.close()


def test_dead_connections_are_cleaned_up(live_api, system):
    def subscribers() -> int:
        admin = Client(live_api, "admin")
        try:
            admin.send(type="snapshot")
            return admin.reply("snapshot")["subscribers"] - 1  # not counting this one
        finally:
            admin.close()

    before = subscribers()
    dead = [Client(live_api, "alice") for _ in range(3)]
    wait_for(lambda: subscribers() >= before + 3, timeout_s=10)
    for client in dead:
        client.ws.sock.shutdown(socket.SHUT_RDWR)  # vanish without a closing handshake
    wait_for(lambda: subscribers() <= before, timeout_s=15)


def test_another_deployments_events_on_the_shared_channel_are_ignored(live_api, system):
    """Pub/sub spans a Redis server's databases: a run on another index must not leak in."""
    client = Client(live_api, "admin")
    try:
        step_id = submit_step(live_api, {"duration_s": 0.5})
        client.send(type="subscribe", step_ids=[step_id])
        client.reply("subscribed")
        foreign = {
            "stream_id": "99999999999999-0",  # far ahead of this stream
            "db": redisdb.database_index() + 1,
            "id": "foreign-event",
            "type": "step_completed",
            "step_id": step_id,
            "customer_id": "alice",
            "data": {},
        }
        redisdb.client().publish(CHANNEL, json.dumps(foreign))
        client.pump(lambda got: TERMINAL & {m["type"] for m in got})
    finally:
        client.close()
    ids = [e["id"] for e in client.events()]
    assert "foreign-event" not in ids
    assert ids[-1] == stream_events(step_id)[-1]["id"]  # and this stream's events still came
