"""Test harness: real PostgreSQL, real Redis, real Celery worker and relay processes.

Each run gets its own database (created on the server DATABASE_URL points at,
or on an embedded server) and its own Redis database index, so concurrent runs
on one machine never see each other's steps or events.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import requests
from sqlalchemy import select

from bench import scratch
from emp_tasks import live, metrics, workers
from emp_tasks.core import config
from emp_tasks.core.events import STREAM
from emp_tasks.store import publishing, redisdb
from emp_tasks.store.db import ROOT

ARTIFACTS = ROOT / "test-artifacts"
KEYS = {
    "alice": "test-key-alice",
    "bob": "test-key-bob",
    "admin": "test-key-admin",
}
WEBHOOK_SECRET = "whsec_" + "dGVzdC1zZWNyZXQtZm9yLXdlYmhvb2tzLTEyMzQ="
API_KEYS = f"{KEYS['alice']}:alice,{KEYS['bob']}:bob,{KEYS['admin']}:ops:admin"


def headers(who: str = "alice", **extra: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[who]}", **extra}


def wait_for(predicate: Callable[[], Any], timeout_s: float = 20.0, interval_s: float = 0.05):
    """Poll until `predicate()` is truthy; return its value or fail with the last one."""
    deadline = time.monotonic() + timeout_s
    value = predicate()
    while not value:
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s} s (last: {value!r})")
        time.sleep(interval_s)
        value = predicate()
    return value


def wait_for_workers(count: int = 1, timeout_s: float = 30.0) -> bool:
    """Whether `count` workers are online within `timeout_s` (the fleet registry's view)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if workers.online_count() >= count:
            return True
        time.sleep(0.1)
    return False


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- per-run services ----------------------------------------------------------------------


@pytest.fixture(scope="session")
def services() -> Iterator[dict[str, str]]:
    port = int(os.environ.get("EMP_TEST_EMBEDDED_REDIS_PORT", "6391"))
    run = scratch.create("emp_test", ROOT / ".emp" / "test", port)
    overrides = {
        "REDIS_URL": run.redis_url,
        "DATABASE_URL": run.database_url,
        "EMP_API_KEYS": API_KEYS,
        "EMP_RETRY_BASE_S": "0.2",
        "EMP_RETRY_MAX_S": "1",
        "EMP_RELAY_INTERVAL_S": "0.2",
        "EMP_RECONCILE_INTERVAL_S": "0.3",
        "EMP_BROKER_POLL_S": "0.2",  # a stopping worker waits out its BRPOP first
        # Every test's workers serve services of their own, and all share this run's Redis
        # index: at the default cap of 50 label values, whichever test comes later sees its
        # service counted as `other`. The cap's own tests set theirs.
        "EMP_METRICS_MAX_SERVICES": "1000",
        "EMP_RATE_LIMIT_PER_MINUTE": "0",
        "EMP_WEBHOOK_ALLOW_PRIVATE": "true",
        "EMP_WEBHOOK_SECRET": WEBHOOK_SECRET,
        "EMP_WEBHOOK_RETRY_SCHEDULE": "0.2,0.3,0.5,1,1,2,2,4",
        "EMP_WEBHOOK_TIMEOUT_S": "3",
        "EMP_LOG_LEVEL": "INFO",
        "EMP_STORAGE_URL": (ROOT / ".emp" / "test" / "outputs").as_uri(),
    }
    saved = {key: os.environ.get(key) for key in overrides}
    os.environ.update(overrides)
    config.reset_settings()
    ARTIFACTS.mkdir(exist_ok=True)
    try:
        yield {"redis_url": run.redis_url, "database_url": run.database_url}
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        # This process's own threads stop before its Redis clients close, so none is
        # frozen mid-command (holding its pool's lock) when the interpreter exits.
        live.stop()
        metrics.stop_flushing()
        publishing.flush()
        redisdb.reset_clients()
        run.drop()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[dict[str, str]]:
    """A real S3-protocol server (moto's server mode) on 127.0.0.1 with one bucket; the
    settings a process needs to store outputs there."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "EMP_STORAGE_URL": "s3://emp-test-outputs/generated",
        "EMP_STORAGE_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_ACCESS_KEY_ID": "emp-test",
        "AWS_SECRET_ACCESS_KEY": "emp-test-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    boto3.client(
        "s3",
        endpoint_url=env["EMP_STORAGE_ENDPOINT_URL"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env["AWS_DEFAULT_REGION"],
    ).create_bucket(Bucket="emp-test-outputs")
    try:
        yield env
    finally:
        server.stop()


@pytest.fixture(scope="session")
def settings(services) -> config.Settings:
    return config.get_settings()


@pytest.fixture
def override_settings(settings) -> Iterator[Callable[..., config.Settings]]:
    """Change settings for one test (e.g. a tiny rate limit), restored afterwards."""

    def apply(**changes: Any) -> config.Settings:
        config._settings = replace(settings, **changes)
        return config._settings

    yield apply
    config._settings = settings


# --- processes -----------------------------------------------------------------------------


class RunningSystem:
    """Procfile processes started for the tests, with their combined log file."""

    def __init__(self, names: list[str], env: dict[str, str], log: Path) -> None:
        from emp_tasks.supervisor import ProcessGroup

        self.log_path = log
        self._log = open(log, "w")  # noqa: SIM115 - closed in stop()
        self.group = ProcessGroup(env, names=names, output=self._log).start()

    def stop(self) -> None:
        self.group.stop()
        self._log.close()


def stop_all(running: list[RunningSystem]) -> None:
    """Stop these together: each shuts down while the others do."""
    for each in running:
        each.group.terminate()
    for each in running:
        each.stop()


def process_env(services: dict[str, str], **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        REDIS_URL=services["redis_url"],
        DATABASE_URL=services["database_url"],
        EMP_API_KEYS=API_KEYS,
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


@pytest.fixture(scope="session")
def system(services) -> Iterator[RunningSystem]:
    """A worker (simulation connector, 2 threads) and the relay, from the Procfile."""
    env = process_env(
        services,
        EMP_WORKER_ID="test-worker-1",
        EMP_MACHINE_ID="test-machine-1",
        EMP_WORKER_CONCURRENCY="2",
    )
    running = RunningSystem(["worker", "relay"], env, ARTIFACTS / "system.log")
    try:
        assert wait_for_workers(1, timeout_s=60), running.log_path.read_text()[-3000:]
        yield running
    finally:
        running.stop()


LEASE_S = "2"


@pytest.fixture
def start_worker(services, system) -> Iterator[Callable[..., RunningSystem]]:
    """Start `emp worker` processes for one service; all are stopped after the test."""
    started: list[RunningSystem] = []

    def start(
        service: str,
        worker_id: str,
        concurrency: int = 1,
        connector: str | dict[str, Any] = "simulation",
        **env_vars: str,
    ) -> RunningSystem:
        """`connector`: the service's EMP_CONNECTORS entry; `env_vars`: more settings."""
        env = process_env(
            services,
            EMP_WORKER_SERVICES=service,
            EMP_CONNECTORS=json.dumps({service: connector}),
            EMP_WORKER_ID=worker_id,
            EMP_MACHINE_ID=f"machine-{worker_id}",
            EMP_WORKER_CONCURRENCY=str(concurrency),
            EMP_LEASE_TIMEOUT_S=LEASE_S,
            **env_vars,
        )
        running = RunningSystem(["worker"], env, ARTIFACTS / f"worker-{worker_id}.log")
        started.append(running)
        wait_for(lambda: worker_status(worker_id) == "online", timeout_s=60, interval_s=0.1)
        return running

    yield start
    stop_all(started)


def worker_status(worker_id: str) -> str | None:
    from emp_tasks.store import db
    from emp_tasks.store.models import Worker

    with db.transaction() as session:
        return session.scalar(select(Worker.status).where(Worker.id == worker_id))


def kill_9(running: RunningSystem) -> None:
    process = running.group.processes["worker"]
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(10)


@contextlib.contextmanager
def web_process(services: dict[str, str], log_name: str, threads: int, **env_vars: str):
    """The `web` process from the Procfile on a free port, one gunicorn worker; its URL."""
    port = free_port()
    env = process_env(
        services,
        PORT=str(port),
        EMP_BIND="127.0.0.1",
        EMP_WEB_WORKERS="1",
        EMP_WEB_THREADS=str(threads),
        **env_vars,
    )
    running = RunningSystem(["web"], env, ARTIFACTS / log_name)
    base = f"http://127.0.0.1:{port}"

    def up() -> bool:
        with contextlib.suppress(requests.RequestException):
            return requests.get(base + "/health/ready", timeout=1).status_code == 200
        return False

    try:
        wait_for(up, timeout_s=60, interval_s=0.2)
        yield base
    finally:
        running.stop()


@pytest.fixture(scope="session")
def live_api(services) -> Iterator[str]:
    """The `web` process with 256 threads (one test holds 200 sockets); its base URL."""
    with web_process(services, "web.log", 256) as base:
        yield base


@pytest.fixture
def app(services):
    from web import create_app

    return create_app()


@pytest.fixture
def client(app):
    return app.test_client()


# --- observing the system ------------------------------------------------------------------


def fetch_output(client, url: str) -> bytes:
    """The bytes behind an output's URL: the file store's through the app under test (its
    links name EMP_PUBLIC_URL, where no server listens in tests), any other over HTTP."""
    base = config.get_settings().api_base_url + "/outputs/"
    if url.startswith(base):
        response = client.get(url.removeprefix(config.get_settings().api_base_url))
        assert response.status_code == 200, response.get_json()
        return response.data
    response = requests.get(url, timeout=10)
    assert response.status_code == 200, response.text[:300]
    return response.content


def stream_events(step_id: str | None = None, workflow_id: str | None = None) -> list[dict]:
    """Envelopes on `emp:events`, oldest first, optionally for one step or workflow."""
    found = []
    for stream_id, fields in redisdb.client().xrange(STREAM, "-", "+"):
        envelope = json.loads(fields["event"])
        assert fields["type"] == envelope["type"]
        if step_id and envelope.get("step_id") != step_id:
            continue
        if workflow_id and envelope.get("workflow_id") != workflow_id:
            continue
        found.append({"stream_id": stream_id, **envelope})
    return found


def wait_for_status(
    client, step_id: str, statuses: set[str], who: str = "alice", timeout_s: float = 30.0
) -> dict:
    def current() -> dict | None:
        step = client.get(f"/api/steps/{step_id}", headers=headers(who)).get_json()["step"]
        return step if step["status"] in statuses else None

    return wait_for(current, timeout_s=timeout_s)
