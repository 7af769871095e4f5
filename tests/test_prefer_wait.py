"""`Prefer: wait=N`: the answer waits (on the live event hub) until the subject ended."""

from __future__ import annotations

import time

import requests

from tests.conftest import headers


def post(live_api: str, path: str, body: dict, wait: str | None = None) -> requests.Response:
    extra = {"Prefer": f"wait={wait}"} if wait else {}
    return requests.post(live_api + path, json=body, headers=headers(**extra), timeout=90)


def get(live_api: str, path: str, wait: str | None = None) -> requests.Response:
    extra = {"Prefer": f"wait={wait}"} if wait else {}
    return requests.get(live_api + path, headers=headers(**extra), timeout=90)


def one_step_workflow(seconds: float) -> dict:
    return {"name": "w", "steps": [{"service": "simulation", "payload": {"duration_s": seconds}}]}


def test_a_workflow_posted_with_wait_comes_back_completed(live_api, system):
    started = time.monotonic()
    response = post(live_api, "/api/workflows", one_step_workflow(1), wait="10")
    assert response.status_code == 201, response.text
    assert response.headers["Preference-Applied"] == "wait=10"
    assert response.json()["workflow"]["status"] == "completed"
    assert 1 <= time.monotonic() - started < 10


def test_a_short_wait_on_a_long_workflow_answers_when_the_time_is_up(live_api, system):
    created = post(live_api, "/api/workflows", one_step_workflow(5)).json()
    assert (
        "Preference-Applied" not in post(live_api, "/api/workflows", one_step_workflow(0)).headers
    )
    started = time.monotonic()
    response = get(live_api, f"/api/workflows/{created['workflow_id']}", wait="1")
    elapsed = time.monotonic() - started
    assert response.status_code == 200
    assert response.headers["Preference-Applied"] == "wait=1"
    assert response.json()["workflow"]["status"] in ("pending", "running")
    assert 0.9 <= elapsed < 4


def test_wait_on_an_ended_workflow_or_another_customers_answers_at_once(live_api, system):
    done = post(live_api, "/api/workflows", one_step_workflow(0), wait="10").json()
    started = time.monotonic()
    again = get(live_api, f"/api/workflows/{done['workflow_id']}", wait="30")
    assert again.json()["workflow"]["status"] == "completed"
    assert time.monotonic() - started < 2
    other = requests.get(
        f"{live_api}/api/workflows/{done['workflow_id']}",
        headers=headers("bob", Prefer="wait=30"),
        timeout=10,
    )
    assert other.status_code == 404


def test_a_one_second_step_posted_with_wait_comes_back_completed(live_api, system):
    body = {"service": "simulation", "payload": {"duration_s": 1}}
    started = time.monotonic()
    response = post(live_api, "/api/steps", body, wait="10")
    assert response.status_code == 201, response.text
    assert response.headers["Preference-Applied"] == "wait=10"
    answer = response.json()
    assert answer["status"] == "completed" and answer["step"]["status"] == "completed"
    assert answer["step"]["queue_position"] is None
    assert 1 <= time.monotonic() - started < 10


def test_wait_one_on_a_five_second_step_answers_after_about_a_second(live_api, system):
    created = post(live_api, "/api/steps", {"service": "simulation", "payload": {"duration_s": 5}})
    step_id = created.json()["step_id"]
    started = time.monotonic()
    response = get(live_api, f"/api/steps/{step_id}", wait="1")
    elapsed = time.monotonic() - started
    assert response.headers["Preference-Applied"] == "wait=1"
    assert response.json()["step"]["status"] in ("pending", "assigned", "running")
    assert 0.9 <= elapsed < 4
    assert (
        get(live_api, f"/api/steps/{step_id}", wait="bogus").headers.get("Preference-Applied")
        is None
    )
