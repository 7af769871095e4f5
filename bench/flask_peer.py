"""The peer of single-client submit latency: a minimal Flask endpoint that only calls
`apply_async` on the bare Celery app, under gunicorn's threaded worker as `web` runs.

`serve()` starts it in a subprocess (`gunicorn bench.flask_peer:app`) on a free port.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import requests
from flask import Flask, jsonify

from bench import bare_celery
from bench.stats import BenchError, Deadline
from emp_tasks.store.db import ROOT

app = Flask(__name__)
WORKERS = 2
THREADS = 32
READY_TIMEOUT_S = 60.0


@app.post("/submit")
def submit():
    task = bare_celery.noop.apply_async((0,))
    return jsonify({"success": True, "task_id": task.id}), 201


@contextlib.contextmanager
def serve(port: int, log_path: Path) -> Iterator[str]:
    """Run the peer under gunicorn on 127.0.0.1:`port`; yield its base URL."""
    command = [
        sys.executable,
        "-m",
        "gunicorn",
        "--workers",
        str(WORKERS),
        "--worker-class",
        "gthread",
        "--threads",
        str(THREADS),
        "--bind",
        f"127.0.0.1:{port}",
        "bench.flask_peer:app",
    ]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command,
            cwd=ROOT,
            env=dict(os.environ),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = Deadline(READY_TIMEOUT_S)
            while True:
                if process.poll() is not None:
                    raise BenchError(f"Flask peer exited ({process.returncode})")
                with contextlib.suppress(requests.RequestException):
                    requests.get(base + "/", timeout=1)
                    break
                if deadline.expired:
                    raise BenchError(f"Flask peer silent for {READY_TIMEOUT_S:g} s")
                time.sleep(0.2)
            yield base
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def single_client(base: str, count: int) -> tuple[list[float], list[str]]:
    """`count` POSTs from one client, one after another: latencies (ms) and errors."""
    latencies, errors = [], []
    with requests.Session() as session:
        for _ in range(count):
            started = time.perf_counter()
            try:
                response = session.post(
                    base + "/submit", json={"service": "simulation"}, timeout=30
                )
            except requests.RequestException as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
                continue
            if response.status_code == 201:
                latencies.append((time.perf_counter() - started) * 1000)
            else:
                errors.append(f"HTTP {response.status_code}")
    return latencies, errors
