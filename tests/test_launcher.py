"""`emp worker --gpus`: one worker process per GPU, pinned, responsive while a step runs.

The machine has no GPU; a fake `nvidia-smi` (outside the project) reports two.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from emp_tasks.store.broker import app
from emp_tasks.store.db import ROOT
from emp_tasks.worker.launcher import child_env
from tests.conftest import (
    ARTIFACTS,
    LEASE_S,
    headers,
    process_env,
    wait_for,
    wait_for_status,
    worker_status,
)
from tests.test_capabilities import fake_nvidia_smi

SERVICE = "gpu-launch"


def worker_row(client, worker_id: str) -> dict | None:
    answer = client.get(f"/api/workers/{worker_id}", headers=headers("admin"))
    return answer.get_json()["worker"] if answer.status_code == 200 else None


@pytest.fixture
def gpu_launcher(services, system, tmp_path):
    env = process_env(
        services,
        PATH=fake_nvidia_smi(tmp_path),
        EMP_WORKER_SERVICES=SERVICE,
        EMP_CONNECTORS=json.dumps({SERVICE: "simulation"}),
        EMP_WORKER_ID="launch",
        EMP_MACHINE_ID="launch-box",
        EMP_LEASE_TIMEOUT_S=LEASE_S,
    )
    log = open(ARTIFACTS / "launcher.log", "w")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        [sys.executable, "-m", "emp_tasks.cli", "worker", "--gpus", "all"],
        env=env,
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    yield process
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)
    log.close()


def test_one_pinned_single_step_worker_per_gpu(client, gpu_launcher):
    for gpu in ("0", "1"):
        wait_for(lambda gpu=gpu: worker_status(f"launch-gpu{gpu}") == "online", timeout_s=60)
    gpu0 = worker_row(client, "launch-gpu0")
    gpu1 = worker_row(client, "launch-gpu1")
    assert gpu0["capabilities"]["cuda_visible_devices"] == "0"
    assert gpu0["capabilities"]["gpu_memory_gb"] == 24.0
    assert gpu0["capabilities"]["gpu_model"] == "NVIDIA GeForce RTX 4090"
    assert gpu1["capabilities"]["cuda_visible_devices"] == "1"
    assert gpu1["capabilities"]["gpu_memory_gb"] == 16.0
    for row in (gpu0, gpu1):
        assert row["pool"] == "threads" and row["concurrency"] == 1
        assert row["machine_id"] == "launch-box"

    # A 20 GB step can only run on GPU 0. While it runs, the worker still answers
    # control messages, and a cancel stops the step.
    step_id = client.post(
        "/api/steps",
        json={
            "service": SERVICE,
            "payload": {"duration_s": 30},
            "requirements": {"gpu_memory_gb": 20},
        },
        headers=headers(),
    ).get_json()["step_id"]
    assert wait_for_status(client, step_id, {"running"}, timeout_s=30)["worker_id"] == "launch-gpu0"
    replies = app.control.ping(destination=["launch-gpu0@launch-box"], timeout=3.0)
    assert replies and "launch-gpu0@launch-box" in replies[0]
    client.post(f"/api/steps/{step_id}/cancel", headers=headers())
    wait_for_status(client, step_id, {"cancelled"})
    wait_for(lambda: worker_row(client, "launch-gpu0")["current_step_id"] is None)

    # A worker that dies is started again under the same identity.
    first_pid = gpu1["pid"]
    os.kill(first_pid, signal.SIGKILL)
    wait_for(
        lambda: (
            (row := worker_row(client, "launch-gpu1"))["pid"] != first_pid
            and row["status"] == "online"
        ),
        timeout_s=60,
    )

    # SIGTERM stops every worker cleanly.
    gpu_launcher.send_signal(signal.SIGTERM)
    assert gpu_launcher.wait(60) == 0
    assert worker_status("launch-gpu0") == "offline"
    assert worker_status("launch-gpu1") == "offline"


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--gpus", "0,1", "--pool", "prefork"], "CUDA does not survive fork"),
        (["--gpus", "0,zero"], "comma-separated GPU indices"),
    ],
)
def test_gpu_worker_refuses_a_bad_command_line(services, arguments, message):
    done = subprocess.run(
        [sys.executable, "-m", "emp_tasks.cli", "worker", *arguments],
        env=process_env(services),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert message in done.stderr


def test_each_gpu_process_gets_its_own_backend_and_identity():
    env = child_env(
        {"EMP_CONNECTORS": '{"sdxl": {"kind": "comfyui", "url": "http://127.0.0.1:818{gpu}"}}'},
        "3",
        "box-gpu3",
    )
    assert json.loads(env["EMP_CONNECTORS"])["sdxl"]["url"] == "http://127.0.0.1:8183"
    assert env["CUDA_VISIBLE_DEVICES"] == "3"
    assert env["EMP_WORKER_ID"] == "box-gpu3" and env["EMP_WORKER_CONCURRENCY"] == "1"
