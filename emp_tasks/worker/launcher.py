"""The GPU worker launcher: `emp worker --gpus 0,1` runs one worker process per GPU.

CUDA does not survive `fork`, and one GPU runs one generation at a time. So each
GPU gets its own `emp worker` process with CUDA_VISIBLE_DEVICES pinned to it,
concurrency 1 and the threads pool: the step runs on a thread while the
consumer thread keeps answering control messages and heartbeats, and
cancellation reaches the step through the database. The prefork pool is never
used here. Worker ids are stable (`<base>-gpu<index>`), so a restarted process
takes over its predecessor's identity and re-queues what that one left running.
`{gpu}` in EMP_CONNECTORS or EMP_WORKER_CONFIG becomes each process's GPU index,
for a backend per GPU (`"url": "http://127.0.0.1:818{gpu}"`).

The launcher restarts a worker that exits unexpectedly (with backoff) and, on
SIGTERM or SIGINT, asks every worker to finish its step and stop.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

from emp_tasks.core.config import ConfigError, get_settings
from emp_tasks.routes import capabilities

logger = logging.getLogger(__name__)

RESTART_BACKOFF_S = (1.0, 2.0, 5.0, 10.0, 30.0)
STABLE_AFTER_S = 60.0
STOP_TIMEOUT_S = 60.0


def parse_gpus(spec: str, env: dict[str, str] | None = None) -> list[str]:
    """`0,1` -> ["0", "1"]; `all` -> every GPU nvidia-smi (or torch) lists."""
    spec = spec.strip()
    if spec == "all":
        env = dict(os.environ if env is None else env)
        env.pop("CUDA_VISIBLE_DEVICES", None)
        found = [gpu.index for gpu in capabilities.visible_gpus(env)]
        if not found:
            raise ConfigError("--gpus all: no GPU found (nvidia-smi and torch see none)")
        return found
    indices = [part.strip() for part in spec.split(",") if part.strip()]
    if not indices or not all(part.isdigit() for part in indices):
        raise ConfigError(f"--gpus must be 'all' or comma-separated GPU indices, got {spec!r}")
    if len(set(indices)) != len(indices):
        raise ConfigError(f"--gpus names a GPU twice: {spec!r}")
    return indices


@dataclass
class _Child:
    gpu: str
    worker_id: str
    process: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    restarts: int = 0
    next_start: float = 0.0
    env: dict[str, str] = field(default_factory=dict)


def worker_id_for(base: str, gpu: str) -> str:
    return f"{base}-gpu{gpu}"


PER_GPU_SETTINGS = ("EMP_CONNECTORS", "EMP_WORKER_CONFIG")
"""Settings in which `{gpu}` becomes the GPU index: a ComfyUI per GPU on its own port."""


def child_env(base_env: dict[str, str], gpu: str, worker_id: str) -> dict[str, str]:
    env = dict(base_env)
    for name in PER_GPU_SETTINGS:
        if name in env:
            env[name] = env[name].replace("{gpu}", gpu)
    env["CUDA_VISIBLE_DEVICES"] = gpu
    env["EMP_WORKER_ID"] = worker_id
    env["EMP_WORKER_CONCURRENCY"] = "1"
    return env


class Launcher:
    def __init__(self, gpus: list[str], extra_args: list[str] | None = None) -> None:
        settings = get_settings()
        base = os.environ.get("EMP_WORKER_ID") or settings.machine_id
        env = dict(os.environ)
        env.setdefault("EMP_MACHINE_ID", settings.machine_id)
        self.children = []
        for gpu in gpus:
            worker_id = worker_id_for(base, gpu)
            self.children.append(_Child(gpu, worker_id, env=child_env(env, gpu, worker_id)))
        self.extra_args = extra_args or []
        self.stopping = False

    def _argv(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "emp_tasks.cli",
            "worker",
            "--pool",
            "threads",
            "--concurrency",
            "1",
            *self.extra_args,
        ]

    def _start(self, child: _Child) -> None:
        child.process = subprocess.Popen(self._argv(), env=child.env)
        child.started = time.monotonic()
        logger.info(
            "GPU worker started",
            extra={
                "action": "gpu_worker_start",
                "worker_id": child.worker_id,
                "gpu": child.gpu,
                "pid": child.process.pid,
            },
        )

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        for child in self.children:
            self._start(child)
        while not self.stopping:
            self._supervise()
            time.sleep(0.5)
        return self._stop_all()

    def _supervise(self) -> None:
        now = time.monotonic()
        for child in self.children:
            if child.process is None:
                if now >= child.next_start:
                    self._start(child)
                continue
            code = child.process.poll()
            if code is None:
                if now - child.started > STABLE_AFTER_S:
                    child.restarts = 0
                continue
            delay = RESTART_BACKOFF_S[min(child.restarts, len(RESTART_BACKOFF_S) - 1)]
            logger.warning(
                "GPU worker exited; restarting",
                extra={
                    "action": "gpu_worker_exit",
                    "worker_id": child.worker_id,
                    "exit_code": code,
                    "restart_in_s": delay,
                },
            )
            child.restarts += 1
            child.process = None
            child.next_start = now + delay

    def _on_signal(self, *_: object) -> None:
        self.stopping = True

    def _stop_all(self) -> int:
        running = [c.process for c in self.children if c.process and c.process.poll() is None]
        for process in running:
            process.send_signal(signal.SIGTERM)  # Celery's warm shutdown: finish, then stop
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for process in running:
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        return 0
