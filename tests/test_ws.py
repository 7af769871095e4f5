"""`GET /ws` over a real gunicorn web process: subscriptions, order, resume without gap
or duplicate, customer isolation, snapshot, 200 clients at once, the socket caps that
keep REST threads free, and bad client messages that cost an error, not the session."""

from __future__ import annotations

import base64
import contextlib
import json
import math
import os
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

import pytest
import requests
import simple_websocket

from emp_tasks import auth
from emp_tasks.core.config import Settings
from emp_tasks.core.events import CHANNEL
from emp_tasks.store import redisdb
from tests.conftest import (
    KEYS,
    headers,
    stream_events,
    wait_for,
    web_process,
)

TERMINAL = {"step_completed", "step_failed", "step_cancelled"}
PER_KEY = 16  # EMP_WS_MAX_PER_KEY's default
CAPPED_THREADS = 32  # EMP_WEB_THREADS of the `capped_api` web process


class Client:
    """A WebSocket client that collects what the server sends."""

    def __init__(
        self, base: str, who: str = "alice", query: str = "", token: str | None = None
    ) -> None:
        url = base.replace("http://", "ws://") + f"/ws?token={token or KEYS[who]}{query}"
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
    # Admin keys enough for 200 sockets within EMP_WS_MAX_PER_KEY each.
    tokens = [
        auth.create_key("ops", admin=True, name="ws-broadcast")[0]
        for _ in range(math.ceil(200 / PER_KEY))
    ]
    clients: list[Client] = []
    failures: list[BaseException] = []

    def connect(index: int) -> None:
        try:
            client = Client(live_api, token=tokens[index % len(tokens)])
            client.send(type="subscribe", all=True)
            client.reply("subscribed")
            clients.append(client)
        except BaseException as exc:  # reported below
            failures.append(exc)

    def channel_subscriptions() -> int:
        return dict(redisdb.client().pubsub_numsub(CHANNEL)).get(CHANNEL, 0)

    before = channel_subscriptions()
    threads = [threading.Thread(target=connect, args=(index,)) for index in range(200)]
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


# --- socket caps: REST keeps its threads ---------------------------------------------------


@pytest.fixture(scope="module")
def capped_api(services) -> Iterator[str]:
    """A web process with 32 threads and the default socket caps; yields its base URL."""
    defaults = {"EMP_WS_MAX_PER_KEY": "", "EMP_WS_MAX_PER_PROCESS": ""}  # blank: the default
    with web_process(services, "web-capped.log", CAPPED_THREADS, **defaults) as base:
        yield base


def test_the_process_cap_always_leaves_rest_threads(settings):
    def cap(threads: int, explicit: int | None = None) -> int:
        changed = replace(settings, web_threads=threads, ws_max_per_process=explicit)
        return changed.ws_sockets_per_process

    assert (cap(32), cap(256), cap(12), cap(8)) == (24, 224, 4, 0)
    assert cap(32, explicit=10) == 10
    assert cap(32, explicit=1000) == 31  # never the last thread


def process_cap(settings: Settings) -> int:
    return replace(settings, web_threads=CAPPED_THREADS).ws_sockets_per_process


def open_sockets(base: str, who: str, count: int) -> list[Client]:
    """`count` sockets for one key, each retried while slots of earlier tests drain."""
    opened: list[Client] = []

    def one() -> Client | None:
        try:
            return Client(base, who)
        except simple_websocket.ConnectionError as exc:
            if exc.status_code in (429, 503):
                return None
            raise

    try:
        for _ in range(count):
            opened.append(wait_for(one, timeout_s=15))
    except BaseException:
        close_all(opened)
        raise
    return opened


def close_all(clients: list[Client]) -> None:
    for client in clients:
        with contextlib.suppress(simple_websocket.ConnectionClosed):
            client.close()


def refused_status(base: str, who: str) -> int:
    with pytest.raises(simple_websocket.ConnectionError) as refused:
        Client(base, who).close()
    return refused.value.status_code


def upgrade_answer(base: str, who: str) -> requests.Response:
    """A WebSocket upgrade request sent with plain HTTP, to read a refusal's body."""
    upgrade = {
        "Connection": "Upgrade",
        "Upgrade": "websocket",
        "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode(),
    }
    return requests.get(f"{base}/ws", params={"token": KEYS[who]}, headers=upgrade, timeout=10)


def rest_answers(base: str, who: str, count: int) -> list[int]:
    """Statuses of `count` concurrent REST requests by one key."""

    def one(_: int) -> int:
        return requests.get(f"{base}/api/steps", headers=headers(who), timeout=30).status_code

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(one, range(count)))


def test_a_keys_seventeenth_socket_is_refused_while_another_key_connects(capped_api):
    alice = open_sockets(capped_api, "alice", PER_KEY)
    try:
        assert refused_status(capped_api, "alice") == 429
        answer = upgrade_answer(capped_api, "alice")
        assert answer.status_code == 429
        assert answer.headers["Retry-After"]
        error = answer.json()["error"]
        assert answer.json()["success"] is False and error["code"] == "RATE_LIMITED"
        assert error["details"] == [{"limit": "EMP_WS_MAX_PER_KEY", "max": PER_KEY}]

        bob = Client(capped_api, "bob")
        bob.send(type="ping")
        assert bob.reply("pong") == {"type": "pong"}
        bob.close()

        # A closed socket gives its slot back.
        alice.pop().close()
        alice.extend(open_sockets(capped_api, "alice", 1))
    finally:
        close_all(alice)


def test_sockets_over_the_process_cap_are_refused(capped_api, settings):
    cap = process_cap(settings)
    assert PER_KEY < cap < CAPPED_THREADS
    held = open_sockets(capped_api, "alice", PER_KEY)
    try:
        held += open_sockets(capped_api, "bob", cap - PER_KEY)
        assert refused_status(capped_api, "bob") == 503
        answer = upgrade_answer(capped_api, "admin")
        assert answer.status_code == 503 and answer.headers["Retry-After"]
        error = answer.json()["error"]
        assert error["code"] == "UNAVAILABLE"
        assert error["details"] == [{"limit": "EMP_WS_MAX_PER_PROCESS", "max": cap}]
        # Every socket held still works.
        held[-1].send(type="ping")
        assert held[-1].reply("pong") == {"type": "pong"}
    finally:
        close_all(held)


def test_rest_answers_while_a_key_holds_its_max_sockets_idle(capped_api):
    held = open_sockets(capped_api, "alice", PER_KEY)
    try:
        assert rest_answers(capped_api, "bob", 2 * CAPPED_THREADS) == [200] * 2 * CAPPED_THREADS
    finally:
        close_all(held)


def test_rest_answers_while_the_process_holds_its_max_sockets(capped_api, settings):
    cap = process_cap(settings)
    held = open_sockets(capped_api, "alice", PER_KEY)
    try:
        held += open_sockets(capped_api, "bob", cap - PER_KEY)
        assert refused_status(capped_api, "admin") == 503
        assert rest_answers(capped_api, "admin", 2 * CAPPED_THREADS) == [200] * 2 * CAPPED_THREADS
    finally:
        close_all(held)


# --- bad client messages cost an error, not the session ------------------------------------


def still_answers(client: Client) -> None:
    client.send(type="ping")
    assert client.reply("pong") == {"type": "pong"}


def test_an_oversized_message_is_an_error_and_the_session_goes_on(live_api):
    client = Client(live_api)
    try:
        for size in (64 * 1024 + 1, 4 * 1024 * 1024):
            client.ws.send(json.dumps({"type": "ping", "padding": "x" * size}))
            error = client.reply("error")
            assert error["code"] == "VALIDATION_FAILED" and "65536 bytes" in error["message"]
            still_answers(client)
    finally:
        client.close()


def test_deeply_nested_messages_are_an_error_and_the_session_goes_on(live_api):
    client = Client(live_api)
    try:
        past_the_parser = "[" * 30_000 + "]" * 30_000  # RecursionError in json.loads
        past_the_limit = {"type": "ping", "nested": json.loads("[" * 70 + "]" * 70)}
        for raw in (past_the_parser, json.dumps(past_the_limit)):
            client.ws.send(raw)
            error = client.reply("error")
            assert error["code"] == "VALIDATION_FAILED" and "nest" in error["message"]
            still_answers(client)
    finally:
        client.close()


def test_subscribing_past_the_sockets_id_limit_is_an_error_and_changes_nothing(live_api):
    client = Client(live_api)
    try:
        client.send(type="subscribe", step_ids=[f"step-{n}" for n in range(600)])
        assert client.reply("subscribed")["counts"]["step_ids"] == 600
        client.send(
            type="subscribe",
            workflow_ids=[f"workflow-{n}" for n in range(300)],
            machine_ids=[f"machine-{n}" for n in range(101)],
        )
        error = client.reply("error")
        assert error["code"] == "VALIDATION_FAILED" and "1000" in error["message"]
        client.send(type="subscribe", workflow_ids=["workflow-x"])
        subscribed = client.reply("subscribed")
        assert subscribed["counts"] == {"step_ids": 600, "workflow_ids": 1, "machine_ids": 0}
        assert subscribed["workflow_ids"] == ["workflow-x"]
    finally:
        client.close()


def test_subscribed_stays_small_for_thousands_of_ids(live_api):
    client = Client(live_api)
    try:
        for batch in range(5):  # 5,000 ids in all
            ids = [f"step-{batch}-{n}" for n in range(1000)]
            client.send(type="subscribe", step_ids=ids)
            subscribed = client.reply("subscribed")
            assert len(json.dumps(subscribed)) < 512
            assert subscribed["counts"]["step_ids"] == 1000 and "step_ids" not in subscribed
            client.send(type="unsubscribe", step_ids=ids)
            assert client.reply("subscribed")["step_ids"] == []
    finally:
        client.close()


def test_a_resume_id_redis_refuses_is_an_error_and_the_session_goes_on(live_api, system):
    client = Client(live_api)
    try:
        for after in ("99999999999999999999-0", "18446744073709551615-18446744073709551615"):
            client.send(type="resume", after=after)
            assert client.reply("error")["code"] == "VALIDATION_FAILED"
            still_answers(client)
        client.send(type="resume", after="0-0")
        assert client.reply("resumed") == {"type": "resumed", "after": "0-0"}
    finally:
        client.close()


def _threads_named(name: str) -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == name]


def test_the_process_hub_stops_its_thread_and_a_new_one_serves_later_sockets(services):
    """Stopped before the process's Redis clients close (the suite's own end, a shutdown),
    the hub leaves no thread that could be frozen mid-command; a later socket gets a new hub."""
    from emp_tasks import live

    admin = auth.Principal(customer_id="ops", admin=True, key_id="test")
    first = live.hub()
    subscriber = live.Subscriber(admin, lambda: None)
    first.add(subscriber)
    assert first.ready.is_set() and _threads_named("emp-live-hub")
    live.stop()
    assert not _threads_named("emp-live-hub")
    second = live.hub()
    assert second is not first
    second.add(live.Subscriber(admin, lambda: None))
    assert second.ready.is_set() and len(_threads_named("emp-live-hub")) == 1
    live.stop()
