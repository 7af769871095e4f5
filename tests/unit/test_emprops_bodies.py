"""What EmProps is sent for a workflow's terminal event, and the backoff between tries."""

from __future__ import annotations

import pytest

from emp_tasks.core import config
from emp_tasks.emprops import notifications


def envelope(kind: str, data: dict) -> dict:
    return {
        "id": "ev-1",
        "type": kind,
        "workflow_id": "wf-1",
        "timestamp": "2026-12-03T00:00:00.000Z",
        "data": data,
    }


def step(index: int, *urls: str) -> dict:
    outputs = [{"url": url, "content_type": "image/png"} for url in urls]
    return {"step_index": index, "status": "completed", "result": {"outputs": outputs}}


def test_a_completed_workflow_sends_every_output_in_step_order_and_the_last_steps_first():
    details = [step(1, "b1", "b2"), step(0, "a1"), step(2, "c1", "c2")]
    path, body = notifications.body_of(envelope("workflow_completed", {"step_details": details}))
    assert path == "complete"
    assert [o["url"] for o in body["outputs"]] == ["a1", "b1", "b2", "c1", "c2"]
    assert body["workflow_output"] == "c1"
    assert body["step_details"] is details
    assert body["status"] == "completed" and body["completed_at"] == "2026-12-03T00:00:00.000Z"


def test_a_completed_workflow_whose_last_step_made_no_file_has_no_workflow_output():
    details = [step(0, "a1"), {"step_index": 1, "status": "completed", "result": {"ok": 1}}]
    _, body = notifications.body_of(envelope("workflow_completed", {"step_details": details}))
    assert body["workflow_output"] is None
    assert [o["url"] for o in body["outputs"]] == ["a1"]


def test_failed_and_cancelled_workflows_go_to_fail_with_an_error():
    error = {"code": "SIMULATED_FATAL", "message": "boom"}
    path, body = notifications.body_of(envelope("workflow_failed", {"error": error}))
    assert (path, body["status"], body["error"]) == ("fail", "failed", error)
    path, body = notifications.body_of(envelope("workflow_cancelled", {"reason": "user"}))
    assert (path, body["status"]) == ("fail", "cancelled")
    assert body["error"] == {"code": "WORKFLOW_CANCELLED", "message": "user"}


@pytest.mark.parametrize("attempts", range(1, 12))
def test_backoff_doubles_up_to_the_ceiling_with_jitter_of_50_to_100_percent(monkeypatch, attempts):
    settings = config.Settings.from_env({"EMPROPS_RETRY_BASE_S": "1", "EMPROPS_RETRY_MAX_S": "60"})
    monkeypatch.setattr(notifications, "get_settings", lambda: settings)
    ceiling = min(60.0, 2.0 ** (attempts - 1))
    delays = [notifications.next_delay_s(attempts) for _ in range(200)]
    assert all(ceiling / 2 <= d <= ceiling for d in delays)
    assert max(delays) - min(delays) > ceiling / 10
