"""Server-Sent Events of a step or a workflow, through the real `web` process, and the
Python client (`emp_tasks.client`) that reads them."""

from __future__ import annotations

import time

import pytest
import requests

from emp_tasks import client as api_client
from emp_tasks.client import Client, parse_sse
from tests.conftest import KEYS, headers, stream_events


def alice(live_api: str) -> Client:
    return Client(live_api, KEYS["alice"])


def step_types(step_id: str) -> list[tuple[str, str]]:
    """(stream id, type) of every event of the step on the stream, in order."""
    return [(e["stream_id"], e["type"]) for e in stream_events(step_id=step_id)]


def test_a_client_reads_every_event_of_a_step_in_order_and_the_stream_ends(live_api, system):
    api = alice(live_api)
    step = api.submit("simulation", {"duration_s": 1, "progress_steps": 3})
    received = list(api.stream(step_id=step["id"]))
    assert received[-1].type == "step_completed"
    assert [(e.id, e.type) for e in received] == step_types(step["id"])
    assert [e.type for e in received][:1] == ["step_submitted"]
    assert all(e.data["step_id"] == step["id"] for e in received)
    assert "stream_id" not in received[0].data and received[0].data["id"]


def test_resuming_with_last_event_id_yields_exactly_the_events_after_it(live_api, system):
    api = alice(live_api)
    step = api.submit("simulation", {"duration_s": 0.3})
    everything = list(api.stream(step_id=step["id"]))
    assert len(everything) >= 4
    middle = everything[1].id
    resumed = list(api.stream(step_id=step["id"], last_event_id=middle))
    assert [(e.id, e.type) for e in resumed] == [(e.id, e.type) for e in everything[2:]]


def test_the_raw_stream_is_text_event_stream_with_sse_fields(live_api, system):
    api = alice(live_api)
    step = api.submit("simulation", {"duration_s": 0.05})
    with requests.get(
        f"{live_api}/api/steps/{step['id']}/stream", headers=headers(), stream=True, timeout=30
    ) as response:
        assert response.status_code == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        assert response.headers["Cache-Control"] == "no-cache"
        text = response.text  # the server closes the stream after the terminal event
    blocks = [b for b in text.split("\n\n") if b.strip() and not b.startswith(("retry", ":"))]
    assert blocks[0].startswith("id: ") and "\nevent: step_submitted\ndata: {" in blocks[0]
    assert blocks[-1].split("\n")[1] == "event: step_completed"


def test_a_workflow_stream_carries_its_steps_and_ends_with_the_workflow(live_api, system):
    api = alice(live_api)
    quick = {"service": "simulation", "payload": {"duration_s": 0.05}}
    workflow = api.workflow([quick, {**quick, "depends_on": [0]}], name="streamed")
    received = list(api.stream(workflow_id=workflow["id"]))
    types = [e.type for e in received]
    assert types[0] == "workflow_submitted" and types[-1] == "workflow_completed"
    assert types.count("step_completed") == 2
    assert {e.data["workflow_id"] for e in received} == {workflow["id"]}


def test_another_customers_step_cannot_be_streamed(live_api, system):
    step = alice(live_api).submit("simulation", {"duration_s": 0.05})
    with pytest.raises(api_client.NotFound):
        list(Client(live_api, KEYS["bob"]).stream(step_id=step["id"]))
    admin = list(Client(live_api, KEYS["admin"]).stream(step_id=step["id"]))
    assert admin[-1].type == "step_completed"


def test_a_bad_last_event_id_is_refused_with_400(live_api, system):
    step = alice(live_api).submit("simulation", {"duration_s": 0.05})
    response = requests.get(
        f"{live_api}/api/steps/{step['id']}/stream",
        headers=headers(**{"Last-Event-ID": "not-an-id"}),
        timeout=10,
    )
    assert response.status_code == 400
    assert response.json()["error"]["details"][0]["field"] == "Last-Event-ID"


def test_a_quiet_stream_sends_heartbeat_comments(client, monkeypatch):
    from web import streams

    monkeypatch.setattr(streams, "HEARTBEAT_S", 0.2)
    created = client.post(
        "/api/steps", json={"service": "streams-nobody", "payload": {}}, headers=headers()
    ).get_json()["step"]
    response = client.get(f"/api/steps/{created['id']}/stream", headers=headers(), buffered=False)
    assert response.status_code == 200
    chunks = iter(response.response)
    seen: list[str] = []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not any(": heartbeat" in c for c in seen):
        seen.append(next(chunks).decode())
    response.close()
    assert any(": heartbeat" in c for c in seen), seen
    events = list(parse_sse("".join(seen).split("\n")))
    assert [e.type for e in events] == ["step_submitted"]


def test_the_client_raises_typed_errors(live_api):
    with pytest.raises(api_client.Unauthorized):
        Client(live_api, "wrong-key").get("01a00000-0000-7000-8000-000000000000")
    with pytest.raises(api_client.Invalid) as invalid:
        alice(live_api).submit("simulation", {}, priority=500)
    assert invalid.value.code == "VALIDATION_FAILED"
    with pytest.raises(api_client.Unreachable):
        Client("http://127.0.0.1:9", KEYS["alice"], timeout_s=2).get("x")


def test_wait_returns_the_terminal_step(live_api, system):
    api = alice(live_api)
    step = api.submit("simulation", {"duration_s": 0.5})
    done = api.wait(step["id"], timeout_s=30)
    assert done["status"] == "completed"
