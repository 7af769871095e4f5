"""Per-attempt step logs: connectors' lines stored bounded, served at /api/steps/{id}/logs."""

from __future__ import annotations

from emp_tasks.auth import Principal
from emp_tasks.steps import attempt_logs
from emp_tasks.worker.attempt_log import AttemptLog
from tests.conftest import headers, wait_for_status
from tests.test_steps_api import assert_error


def submit(client, payload: dict, **fields) -> str:
    body = {"service": "simulation", "payload": payload, **fields}
    response = client.post("/api/steps", json=body, headers=headers())
    assert response.status_code == 201, response.get_json()
    return response.get_json()["step_id"]


def logs(client, step_id: str, who: str = "alice", **query):
    return client.get(f"/api/steps/{step_id}/logs", query_string=query, headers=headers(who))


def test_log_lines_of_each_attempt_are_served_with_their_attempt(client, system):
    step_id = submit(
        client,
        {"log_lines": ["loading model", "sampling"], "fail": "retryable", "fail_attempts": 1},
        max_retries=1,
    )
    assert wait_for_status(client, step_id, {"completed"})["attempts"] == 2
    answer = logs(client, step_id).get_json()
    assert answer["success"] is True
    assert [(line["attempt"], line["message"]) for line in answer["logs"]] == [
        (1, "loading model"),
        (1, "sampling"),
        (2, "loading model"),
        (2, "sampling"),
    ]
    assert {line["level"] for line in answer["logs"]} == {"info"}
    assert all(line["timestamp"].endswith("Z") for line in answer["logs"])
    second = logs(client, step_id, attempt=2).get_json()["logs"]
    assert [line["attempt"] for line in second] == [2, 2]


def test_logs_are_written_before_the_step_completes(client, system):
    step_id = submit(client, {"log_lines": ["only line"]})
    wait_for_status(client, step_id, {"completed"})
    assert [line["message"] for line in logs(client, step_id).get_json()["logs"]] == ["only line"]


def test_another_customer_gets_404_and_a_bad_attempt_400(client, system):
    step_id = submit(client, {"log_lines": ["secret"]})
    wait_for_status(client, step_id, {"completed"})
    assert logs(client, step_id, who="bob").status_code == 404
    assert logs(client, step_id, who="admin").status_code == 200
    assert_error(logs(client, step_id, attempt=0), 400, "VALIDATION_FAILED")
    assert_error(logs(client, step_id, attempt="x"), 400, "VALIDATION_FAILED")


def test_an_attempt_keeps_at_most_the_limit_and_says_how_many_it_left_out(client):
    response = client.post(
        "/api/steps", json={"service": "logs-nobody", "payload": {}}, headers=headers()
    )
    step_id = response.get_json()["step_id"]
    log = AttemptLog(step_id, 1, limit=5)
    for n in range(12):
        log("info", f"line {n}")
        log.flush()  # as often as possible: the held last line must survive this
    log.flush(final=True)
    admin = Principal(customer_id="ops", admin=True, key_id="test")
    kept = [line["message"] for line in attempt_logs.read(step_id, admin)]
    assert kept == [
        "line 0",
        "line 1",
        "line 2",
        "line 3",
        "8 more lines were not kept (EMP_STEP_LOG_LINES=5)",
    ]
    exactly = AttemptLog(step_id, 2, limit=3)
    for n in range(3):
        exactly("warning", f"w{n}")
    exactly.flush(final=True)
    second = attempt_logs.read(step_id, admin, attempt=2)
    assert [(line["level"], line["message"]) for line in second] == [
        ("warning", "w0"),
        ("warning", "w1"),
        ("warning", "w2"),
    ]


def test_log_lines_must_be_strings(client, system):
    step_id = submit(client, {"log_lines": [1, 2]})
    step = wait_for_status(client, step_id, {"failed"})
    assert step["error"]["code"] == "INVALID_PAYLOAD"
