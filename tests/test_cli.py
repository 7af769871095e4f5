"""The `emp` command: administration, the HTTP client commands, and `emp run` from nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import requests

from emp_tasks.store.db import ROOT
from tests.conftest import ARTIFACTS, KEYS, free_port, headers, process_env, wait_for


def emp(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "emp_tasks.cli", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_keys_create_prints_a_key_that_authenticates_for_its_customer(services, client):
    result = emp("keys", "create", "--customer", "carol", "--name", "ci", env=process_env(services))
    assert result.returncode == 0, result.stderr
    key = result.stdout.strip()
    assert key.startswith("emp_")
    created = client.post(
        "/api/steps", json={"service": "unserved-service"}, headers={"X-API-Key": key}
    )
    assert created.status_code == 201
    assert created.get_json()["step"]["customer_id"] == "carol"


def test_db_upgrade_is_idempotent(services):
    result = emp("db", "upgrade", env=process_env(services))
    assert result.returncode == 0, result.stderr
    assert "head" in result.stdout


def test_submit_wait_status_and_events_tail_against_a_live_api(services, system, live_api):
    env = process_env(services, EMP_API_URL=live_api, EMP_API_KEY=KEYS["alice"])
    submitted = emp("submit", "--payload", '{"progress_steps": 1}', "--wait", env=env)
    assert submitted.returncode == 0, submitted.stderr
    step = json.loads(submitted.stdout)
    assert step["status"] == "completed"
    status = emp("status", step["id"], env=env)
    assert json.loads(status.stdout)["status"] == "completed"
    tail = emp("events", "tail", "--from-start", "--step", step["id"], "--count", "5", env=env)
    assert tail.returncode == 0, tail.stderr
    types = [json.loads(line)["type"] for line in tail.stdout.splitlines()]
    assert types == [
        "step_submitted",
        "step_assigned",
        "step_started",
        "step_progress",
        "step_completed",
    ]


def test_status_follow_prints_each_event_then_the_step(services, system, live_api):
    env = process_env(services, EMP_API_URL=live_api, EMP_API_KEY=KEYS["alice"])
    submitted = emp("submit", "--payload", '{"duration_s": 0.5, "progress_steps": 2}', env=env)
    step_id = json.loads(submitted.stdout)["id"]
    followed = emp("status", step_id, "--follow", env=env)
    assert followed.returncode == 0, followed.stderr
    lines = followed.stdout.splitlines()
    events = [json.loads(line) for line in lines if line.startswith('{"stream_id"')]
    assert events[0]["type"] == "step_submitted" and events[-1]["type"] == "step_completed"
    assert sum(e["type"] == "step_progress" for e in events) == 2
    final = json.loads("\n".join(lines[len(events) :]))
    assert final["status"] == "completed"
    missing = emp("status", "01a00000-0000-7000-8000-000000000000", env=env)
    assert missing.returncode == 1 and "STEP_NOT_FOUND" in missing.stderr


def test_live_api_serves_the_seed_routes_over_http(live_api, system):
    response = requests.post(
        f"{live_api}/api/jobs/submit", json={"type": "simulation"}, headers=headers(), timeout=10
    )
    assert response.status_code == 200
    job_id = response.json()["job_id"]

    def done():
        job = requests.get(
            f"{live_api}/api/jobs/{job_id}/status", headers=headers(), timeout=10
        ).json()["job"]
        return job["status"] == "completed" and job

    assert wait_for(done)["job_id"] == job_id


def test_emp_run_starts_everything_on_embedded_defaults(tmp_path: Path):
    """The README's first command: no REDIS_URL, no DATABASE_URL, nothing installed by hand."""
    port = free_port()
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in {"REDIS_URL", "DATABASE_URL", "EMP_API_KEYS", "EMP_BROKER_URL"}
    }
    env.update(
        EMP_DATA_DIR=str(tmp_path / "data"),
        PORT=str(port),
        EMP_EMBEDDED_REDIS_PORT=str(free_port()),
        PYTHONUNBUFFERED="1",
    )
    log = open(ARTIFACTS / "emp-run.log", "w")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        [sys.executable, "-m", "emp_tasks.cli", "run"],
        env=env,
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    auth = {"Authorization": "Bearer emp-dev-key"}
    try:

        def ready():
            try:
                return (
                    requests.get(f"{base}/health", timeout=1).json()["checks"]["workers"]["online"]
                    >= 1
                )
            except (requests.RequestException, KeyError, ValueError):
                return False

        wait_for(ready, timeout_s=120, interval_s=0.5)
        step_id = requests.post(
            f"{base}/api/steps",
            json={"service": "simulation", "payload": {"duration_s": 0.2}},
            headers=auth,
            timeout=10,
        ).json()["step_id"]

        def completed():
            step = requests.get(f"{base}/api/steps/{step_id}", headers=auth, timeout=10)
            return step.json()["step"]["status"] == "completed"

        wait_for(completed, timeout_s=60)
        redis_pid = int((tmp_path / "data" / "redis" / "redis.pid").read_text())
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0
        log.close()
    assert not (tmp_path / "data" / "postgres" / "postmaster.pid").exists()
    wait_for(lambda: not _alive(redis_pid), timeout_s=10)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
