"""Workflows: exact DAG execution, failure policies, cancellation, one step_details."""

from __future__ import annotations

import json
from datetime import datetime

import pytest

from tests.conftest import headers, kill_9, stream_events, wait_for
from tests.test_steps_api import assert_error


def create(client, steps: list[dict], who: str = "alice", **fields) -> dict:
    body = {"name": fields.pop("name", "test workflow"), "steps": steps, **fields}
    response = client.post("/api/workflows", json=body, headers=headers(who))
    assert response.status_code == 201, response.get_json()
    return response.get_json()


def status(client, workflow_id: str, who: str = "alice") -> dict:
    response = client.get(f"/api/workflows/{workflow_id}/status", headers=headers(who))
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def wait_finished(client, workflow_id: str, timeout_s: float = 60) -> dict:
    def done():
        body = status(client, workflow_id)
        return body if body["workflow"]["status"] in {"completed", "failed", "cancelled"} else None

    return wait_for(done, timeout_s=timeout_s, interval_s=0.1)


def sim(duration_s: float = 0, depends_on: list[int] | None = None, **payload) -> dict:
    return {
        "service": "simulation",
        "payload": {"duration_s": duration_s, **payload},
        "depends_on": depends_on or [],
    }


def at(value: str) -> datetime:
    return datetime.fromisoformat(value)


def workflow_events(workflow_id: str) -> list[dict]:
    return [e for e in stream_events(workflow_id=workflow_id) if e["type"].startswith("workflow_")]


# --- shape and validation ------------------------------------------------------------------


def test_create_answers_ids_and_the_workflow(client):
    body = create(client, [sim(), sim(depends_on=[0])], description="two steps")
    assert body["success"] is True
    assert len(body["step_ids"]) == 2 and body["job_ids"] == body["step_ids"]
    workflow = body["workflow"]
    assert workflow["id"] == body["workflow_id"]
    assert workflow["total_steps"] == 2 and workflow["description"] == "two steps"
    for key in (
        "name",
        "status",
        "completed_steps",
        "failed_steps",
        "progress_percentage",
        "created_at",
        "started_at",
        "completed_at",
    ):
        assert key in workflow
    alias = client.post(
        "/api/workflows/create", json={"name": "a", "steps": [sim()]}, headers=headers()
    )
    assert alias.status_code == 201


@pytest.mark.parametrize(
    ("body", "fields"),
    [
        ({"steps": [sim()]}, {"name"}),
        ({"name": "  ", "steps": [sim()]}, {"name"}),
        ({"name": "x", "steps": []}, {"steps"}),
        ({"name": "x", "steps": [sim(depends_on=[0])]}, {"steps.0.depends_on.0"}),
        ({"name": "x", "steps": [sim(), sim(depends_on=[1])]}, {"steps.1.depends_on.0"}),
        ({"name": "x", "steps": [sim(), sim(depends_on=[0, 0])]}, {"steps.1.depends_on"}),
        (
            {"name": "x", "steps": [sim(), {"service": "simulation", "priority": 500}]},
            {"steps.1.priority"},
        ),
        ({"name": "x", "steps": [sim()], "failure_policy": "sometimes"}, {"failure_policy"}),
    ],
)
def test_invalid_workflow_is_rejected_naming_each_field(client, body, fields):
    error = assert_error(
        client.post("/api/workflows", json=body, headers=headers()), 400, "VALIDATION_FAILED"
    )
    assert {detail["field"] for detail in error["details"]} == fields


def test_too_many_steps_is_rejected(client, override_settings):
    override_settings(max_workflow_steps=3)
    body = {"name": "big", "steps": [sim() for _ in range(4)]}
    error = assert_error(
        client.post("/api/workflows", json=body, headers=headers()), 400, "VALIDATION_FAILED"
    )
    assert error["details"][0]["field"] == "steps"


def test_workflows_are_scoped_to_their_customer(client):
    workflow_id = create(client, [{"service": "unserved-service"}])["workflow_id"]
    assert_error(
        client.get(f"/api/workflows/{workflow_id}", headers=headers("bob")),
        404,
        "WORKFLOW_NOT_FOUND",
    )
    assert_error(
        client.post(f"/api/workflows/{workflow_id}/cancel", headers=headers("bob")),
        404,
        "WORKFLOW_NOT_FOUND",
    )
    listed = client.get("/api/workflows?limit=200", headers=headers("bob")).get_json()
    assert workflow_id not in {w["id"] for w in listed["workflows"]}
    assert client.get(f"/api/workflows/{workflow_id}", headers=headers("admin")).status_code == 200


def test_same_idempotency_key_returns_the_original_workflow(client):
    body = {"name": "idem", "steps": [{"service": "unserved-service"}]}
    first = client.post("/api/workflows", json=body, headers=headers(**{"Idempotency-Key": "wf-1"}))
    again = client.post("/api/workflows", json=body, headers=headers(**{"Idempotency-Key": "wf-1"}))
    assert again.status_code == 200
    assert again.get_json()["workflow_id"] == first.get_json()["workflow_id"]
    assert again.get_json()["step_ids"] == first.get_json()["step_ids"]


def test_list_and_stats(client):
    workflow_id = create(client, [{"service": "unserved-service"}], who="bob")["workflow_id"]
    listed = client.get("/api/workflows?status=pending", headers=headers("bob")).get_json()
    assert workflow_id in {w["id"] for w in listed["workflows"]}
    stats = client.get("/api/workflows/stats?timeframe=hour", headers=headers("bob")).get_json()
    assert stats["stats"]["pending"] >= 1 and stats["stats"]["total"] >= 1


# --- execution -----------------------------------------------------------------------------


def test_linear_chain_passes_results_along(client, system):
    body = create(
        client,
        [
            sim(result={"image": "a.png"}),
            sim(depends_on=[0]),
            sim(depends_on=[1]),
        ],
    )
    done = wait_finished(client, body["workflow_id"])
    assert done["workflow"]["status"] == "completed"
    assert done["workflow"]["progress_percentage"] == 100.0
    first, second, third = done["steps"]
    assert first["result"] == {"image": "a.png"}
    assert second["result"]["inputs"] == {"0": {"image": "a.png"}}
    assert third["result"]["inputs"] == {"1": second["result"]}
    assert at(second["started_at"]) >= at(first["completed_at"])
    assert at(third["started_at"]) >= at(second["completed_at"])


def test_diamond_joins_only_after_both_branches(client, system):
    body = create(client, [sim(), sim(0.3, [0]), sim(0.6, [0]), sim(0, [1, 2])])
    done = wait_finished(client, body["workflow_id"])
    assert done["workflow"]["status"] == "completed"
    top, left, right, join = done["steps"]
    assert join["depends_on"] == [1, 2]
    assert join["result"]["inputs"].keys() == {"1", "2"}
    assert at(left["started_at"]) >= at(top["completed_at"])
    assert at(right["started_at"]) >= at(top["completed_at"])
    assert at(join["started_at"]) >= max(at(left["completed_at"]), at(right["completed_at"]))


def test_n_shaped_dag_starts_each_step_when_its_own_dependencies_finish(client, start_worker):
    """A->C, B->C, B->D: D must start when B finishes, while A is still running."""
    start_worker("dag-sim", "dag-1", concurrency=3)
    steps = [
        {"service": "dag-sim", "payload": {"duration_s": 3}},  # A
        {"service": "dag-sim", "payload": {"duration_s": 0.2}},  # B
        {"service": "dag-sim", "depends_on": [0, 1]},  # C
        {"service": "dag-sim", "depends_on": [1]},  # D
    ]
    body = create(client, steps)
    done = wait_finished(client, body["workflow_id"])
    assert done["workflow"]["status"] == "completed"
    a, b, c, d = done["steps"]
    assert at(d["started_at"]) >= at(b["completed_at"])
    assert at(d["completed_at"]) < at(a["completed_at"])  # D did not wait for A
    assert at(c["started_at"]) >= at(a["completed_at"])


def test_step_started_and_completed_events_carry_the_workflow(client, system):
    body = create(client, [sim(), sim(depends_on=[0])])
    workflow_id = body["workflow_id"]
    wait_finished(client, workflow_id)
    wait_for(lambda: any(e["type"] == "workflow_completed" for e in workflow_events(workflow_id)))
    types = [e["type"] for e in workflow_events(workflow_id)]
    assert types == [
        "workflow_submitted",
        "workflow_step_completed",
        "workflow_step_completed",
        "workflow_completed",
    ]
    submitted, first, second, completed = workflow_events(workflow_id)
    assert submitted["data"] == {"name": "test workflow", "total_steps": 2}
    assert first["data"]["step_index"] == 0 and first["data"]["completed_steps"] == 1
    assert second["data"]["total_steps"] == 2
    assert completed["data"]["success_count"] == 2
    assert completed["data"]["failed_count"] == 0
    assert completed["data"]["duration_ms"] >= 0
    assert completed["data"]["step_details"] == status(client, workflow_id)["steps"]
    waiting_step = body["step_ids"][1]
    step_types = [e["type"] for e in stream_events(step_id=waiting_step)]
    assert step_types[:3] == ["step_submitted", "step_queued", "step_assigned"]


# --- failure policies ----------------------------------------------------------------------


def test_fail_fast_fails_the_workflow_and_skips_or_cancels_the_rest(client, system):
    steps = [
        sim(fail="fatal"),  # 0 fails
        sim(depends_on=[0]),  # 1 skipped: depends on the failure
        {"service": "unserved-service"},  # 2 never started: cancelled
        sim(depends_on=[1]),  # 3 skipped transitively
    ]
    body = create(client, steps)
    workflow_id = body["workflow_id"]
    done = wait_finished(client, workflow_id)
    workflow = done["workflow"]
    assert workflow["status"] == "failed"
    assert workflow["failed_step_index"] == 0
    assert workflow["error"]["code"] == "SIMULATED_FATAL"
    assert [s["status"] for s in done["steps"]] == ["failed", "skipped", "cancelled", "skipped"]
    assert done["steps"][0]["error"]["code"] == "SIMULATED_FATAL"


def test_continue_runs_independent_branches_and_skips_dependents(client, system):
    steps = [sim(fail="fatal"), sim(depends_on=[0]), sim(0.2), sim(depends_on=[2])]
    body = create(client, steps, failure_policy="continue")
    done = wait_finished(client, body["workflow_id"])
    assert [s["status"] for s in done["steps"]] == ["failed", "skipped", "completed", "completed"]
    assert done["workflow"]["status"] == "failed"
    assert done["workflow"]["failed_step_index"] == 0
    assert done["workflow"]["completed_steps"] == 2
    assert done["workflow"]["failed_steps"] == 1


def test_failed_workflow_event_has_the_same_step_details_as_the_status(client, system):
    body = create(client, [sim(), sim(depends_on=[0], fail="fatal"), sim(depends_on=[1])])
    workflow_id = body["workflow_id"]
    done = wait_finished(client, workflow_id)

    def failed_event():
        found = [e for e in workflow_events(workflow_id) if e["type"] == "workflow_failed"]
        return found[0] if found else None

    event = wait_for(failed_event)
    assert event["data"]["step_details"] == done["steps"]
    assert event["data"]["failed_step_index"] == 1
    assert event["data"]["error"] == done["steps"][1]["error"]
    assert event["data"]["step_details"][1]["error"]["code"] == "SIMULATED_FATAL"
    assert json.dumps(event["data"]["step_details"], sort_keys=True) == json.dumps(
        status(client, workflow_id)["steps"], sort_keys=True
    )


def test_retryable_failure_inside_a_workflow_is_retried_before_advancing(client, system):
    body = create(client, [sim(fail="retryable", fail_attempts=1), sim(depends_on=[0])])
    done = wait_finished(client, body["workflow_id"])
    assert done["workflow"]["status"] == "completed"
    assert done["steps"][0]["attempts"] == 2


# --- cancellation --------------------------------------------------------------------------


def test_cancel_stops_a_running_workflow(client, system):
    body = create(client, [sim(30), sim(depends_on=[0]), {"service": "unserved-service"}])
    workflow_id = body["workflow_id"]
    wait_for(lambda: status(client, workflow_id)["steps"][0]["status"] == "running")
    response = client.post(
        f"/api/workflows/{workflow_id}/cancel", json={"reason": "stop"}, headers=headers()
    )
    assert response.status_code == 200
    cancelled = response.get_json()
    assert cancelled["workflow"]["status"] == "cancelled"
    assert [s["status"] for s in status(client, workflow_id)["steps"]] == ["cancelled"] * 3
    event = wait_for(
        lambda: [e for e in workflow_events(workflow_id) if e["type"] == "workflow_cancelled"]
    )[0]
    assert event["data"]["reason"] == "stop"
    assert len(event["data"]["step_details"]) == 3
    assert_error(
        client.post(f"/api/workflows/{workflow_id}/cancel", headers=headers()), 409, "INVALID_STATE"
    )


# --- crashes and scale ---------------------------------------------------------------------


def test_worker_killed_during_a_fan_in_completes_the_workflow_once(client, start_worker):
    doomed = start_worker("fanin-sim", "fanin-doomed", concurrency=3)
    steps = [
        {"service": "fanin-sim", "payload": {"duration_s": 0.1}},
        {"service": "fanin-sim", "payload": {"duration_s": 2}},
        {"service": "fanin-sim", "payload": {"duration_s": 2}},
        {"service": "fanin-sim", "depends_on": [0, 1, 2]},
    ]
    body = create(client, steps)
    workflow_id = body["workflow_id"]
    wait_for(
        lambda: (
            [s["status"] for s in status(client, workflow_id)["steps"]][:3]
            == ["completed", "running", "running"]
        )
    )
    kill_9(doomed)
    start_worker("fanin-sim", "fanin-survivor", concurrency=3)
    done = wait_finished(client, workflow_id)
    assert done["workflow"]["status"] == "completed"
    assert done["workflow"]["completed_steps"] == 4
    assert [s["attempts"] for s in done["steps"]] == [1, 2, 2, 1]
    join = body["step_ids"][3]
    wait_for(lambda: any(e["type"] == "step_completed" for e in stream_events(step_id=join)))
    assert [e["type"] for e in stream_events(step_id=join)].count("step_queued") == 1
    # A publisher killed between its script and marking the rows published repeats an entry
    # with the same event id (the documented duplicate); distinct ids are the events recorded.
    recorded = {e["id"]: e for e in workflow_events(workflow_id)}.values()
    types = [e["type"] for e in recorded]
    assert types.count("workflow_completed") == 1
    assert types.count("workflow_step_completed") == 4
    completed = [e for e in recorded if e["type"] == "workflow_step_completed"]
    assert len({e["data"]["step_id"] for e in completed}) == 4


def test_fan_out_and_fan_in_of_a_thousand_steps_completes(client, system):
    steps = (
        [sim()]
        + [sim(depends_on=[0]) for _ in range(998)]
        + [{"service": "simulation", "depends_on": list(range(1, 999))}]
    )
    body = create(client, steps, name="fan 1-998-1")
    done = wait_finished(client, body["workflow_id"], timeout_s=300)
    assert done["workflow"]["status"] == "completed"
    assert done["workflow"]["completed_steps"] == 1000
    assert len(done["steps"][999]["result"]["inputs"]) == 998


def test_chain_of_two_hundred_steps_completes(client, system):
    steps = [sim()] + [sim(depends_on=[i]) for i in range(199)]
    body = create(client, steps, name="chain 200")
    done = wait_finished(client, body["workflow_id"], timeout_s=300)
    assert done["workflow"]["status"] == "completed"
    assert all(s["attempts"] == 1 for s in done["steps"])
