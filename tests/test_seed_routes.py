"""Seed-compatible routes (API.md, "Seed-compatible routes"): same behaviour, job naming."""

from __future__ import annotations

from tests.conftest import headers, wait_for, wait_for_status
from tests.test_steps_api import UNSERVED, assert_error


def job(client, job_id: str, who: str = "alice") -> dict:
    return client.get(f"/api/jobs/{job_id}", headers=headers(who)).get_json()["job"]


def test_jobs_submit_answers_job_id_and_submitted(client, system):
    response = client.post("/api/jobs/submit", json={"job_type": "simulation"}, headers=headers())
    assert response.status_code == 200
    body = response.get_json()
    assert body["success"] is True and body["status"] == "submitted"
    done = wait_for(lambda: (j := job(client, body["job_id"]))["status"] == "completed" and j)
    assert done["job_id"] == done["id"] == body["job_id"]


def test_jobs_status_route_and_its_not_found_code(client):
    job_id = client.post(
        "/api/jobs/submit", json={"service": UNSERVED}, headers=headers()
    ).get_json()["job_id"]
    body = client.get(f"/api/jobs/{job_id}/status", headers=headers()).get_json()
    assert body["success"] is True and body["job"]["job_id"] == job_id
    assert_error(client.get("/api/jobs/missing/status", headers=headers()), 404, "JOB_NOT_FOUND")
    assert_error(client.get("/api/jobs/missing", headers=headers()), 404, "JOB_NOT_FOUND")
    assert_error(
        client.get(f"/api/jobs/{job_id}/status", headers=headers("bob")), 404, "JOB_NOT_FOUND"
    )


def test_jobs_cancel_answers_a_message(client):
    job_id = client.post(
        "/api/jobs/submit", json={"service": UNSERVED}, headers=headers()
    ).get_json()["job_id"]
    body = client.post(f"/api/jobs/{job_id}/cancel", headers=headers()).get_json()
    assert body["success"] is True and job_id in body["message"]
    assert job(client, job_id)["status"] == "cancelled"
    assert_error(client.post(f"/api/jobs/{job_id}/cancel", headers=headers()), 409, "INVALID_STATE")


def test_jobs_stats_match_steps_stats(client):
    jobs = client.get("/api/jobs/stats?timeframe=week", headers=headers()).get_json()
    steps = client.get("/api/steps/stats?timeframe=week", headers=headers()).get_json()
    assert jobs["timeframe"] == "week"
    assert jobs["stats"] == steps["stats"]


def test_post_jobs_creates_with_message_and_timestamp(client):
    response = client.post("/api/jobs", json={"service": UNSERVED}, headers=headers())
    assert response.status_code == 201
    body = response.get_json()
    assert body["success"] is True and body["job_id"] and body["message"]
    assert body["timestamp"].endswith("Z")


def test_list_jobs_has_total_and_job_ids(client):
    for _ in range(3):
        client.post("/api/jobs", json={"service": "listed-jobs"}, headers=headers("bob"))
    body = client.get("/api/jobs?service=listed-jobs&limit=2", headers=headers("bob")).get_json()
    assert body["total"] == 3
    assert len(body["jobs"]) == 2
    assert all(j["job_id"] == j["id"] for j in body["jobs"])
    assert body["next_cursor"]


def test_submit_step_and_get_step_behave_as_api_steps(client, system):
    response = client.post("/submit-step", json={"service": "simulation"}, headers=headers())
    assert response.status_code == 201
    step_id = response.get_json()["step_id"]
    wait_for_status(client, step_id, {"completed"})
    body = client.get(f"/step/{step_id}", headers=headers()).get_json()
    assert body["step"]["status"] == "completed"
    assert_error(client.get("/step/missing", headers=headers()), 404, "STEP_NOT_FOUND")


def test_legacy_submit_job_and_get_job_carry_a_deprecation_header(client):
    submitted = client.post("/submit-job", json={"type": UNSERVED}, headers=headers())
    assert submitted.status_code == 200
    assert submitted.headers["Deprecation"]
    body = submitted.get_json()
    assert body["status"] == "submitted"
    fetched = client.get(f"/job/{body['job_id']}", headers=headers())
    assert fetched.headers["Deprecation"]
    assert fetched.get_json()["job"]["job_id"] == body["job_id"]
    assert_error(client.get("/job/missing", headers=headers()), 404, "JOB_NOT_FOUND")


def test_seed_routes_validate_like_the_steps_api(client):
    for route in ("/api/jobs/submit", "/api/jobs", "/submit-step", "/submit-job"):
        assert_error(
            client.post(route, json={"priority": 3}, headers=headers()), 400, "VALIDATION_FAILED"
        )
        assert_error(client.post(route, json={"service": "simulation"}), 401, "UNAUTHORIZED")
