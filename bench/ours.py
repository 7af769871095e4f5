"""The EMP Tasks side of the benchmark: the Procfile's web, worker and relay, driven over HTTP.

Steps are submitted with `POST /api/steps` from a pool of client threads (one
requests.Session each); completion is read from PostgreSQL, not over HTTP, so
the measurement does not load the API while the worker drains the queue. Then,
on the same processes, each workflow shape is submitted with one
`POST /api/workflows` and its row in `workflows` is polled until it is completed.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import requests
from sqlalchemy import func, select

from bench.stats import BenchError, Deadline, Result, WorkflowResult
from bench.workflows import Shape
from emp_tasks import config, db, redisdb, workers
from emp_tasks.models import TERMINAL_STEP_STATUSES, Step, StepStatus, Workflow, WorkflowStatus
from emp_tasks.scratch import Scratch
from emp_tasks.supervisor import ProcessGroup

API_KEY = "bench-key"
PROCESSES = ["web", "worker", "relay"]
STEP_BODY = {"service": "simulation"}
START_TIMEOUT_S = 90.0
WARMUP_TIMEOUT_S = 60.0
REQUEST_TIMEOUT_S = 30.0
POLL_INTERVAL_S = 0.1
SET_BY_BENCH = frozenset(
    {
        "EMP_API_KEYS",
        "EMP_BIND",
        "EMP_RATE_LIMIT_PER_MINUTE",
        "EMP_WORKER_CONCURRENCY",
        "EMP_WORKER_ID",
        "EMP_LOG_LEVEL",
    }
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def process_env(run: Scratch, port: int) -> dict[str, str]:
    """This process's environment (so EMP_* tuning passes through) with the bench's settings."""
    settings = {
        "REDIS_URL": run.redis_url,
        "DATABASE_URL": run.database_url,
        "EMP_API_KEYS": f"{API_KEY}:bench:admin",
        "PORT": str(port),
        "EMP_BIND": "127.0.0.1",
        "EMP_RATE_LIMIT_PER_MINUTE": "0",
        "EMP_WORKER_CONCURRENCY": "2",
        "EMP_WORKER_ID": f"bench-worker-{os.getpid()}",
        "EMP_LOG_LEVEL": "WARNING",
        "PYTHONUNBUFFERED": "1",
    }
    return {**os.environ, **settings}


def use_scratch(run: Scratch) -> None:
    """Point this process's settings, Redis client and database helpers at the scratch run."""
    os.environ["REDIS_URL"] = run.redis_url
    os.environ["DATABASE_URL"] = run.database_url
    config.reset_settings()
    redisdb.reset_clients()


class _Clients:
    """One requests.Session per client thread, all closed at the end."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.headers = {"Authorization": f"Bearer {API_KEY}"}
        self._local = threading.local()
        self._sessions: list[requests.Session] = []
        self._lock = threading.Lock()

    def session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
            with self._lock:
                self._sessions.append(session)
        return session

    def close(self) -> None:
        for session in self._sessions:
            session.close()


class _System:
    """The running Procfile processes and what they are checked against while waiting."""

    def __init__(self, group: ProcessGroup, log_path: Path) -> None:
        self.group = group
        self.log_path = log_path

    def check_alive(self) -> None:
        for name, process in self.group.processes.items():
            code = process.poll()
            if code is not None:
                tail = self.log_path.read_text(errors="replace")[-3000:]
                raise BenchError(f"process {name} exited with {code}:\n{tail}")

    def wait_ready(self, base_url: str, deadline: Deadline) -> None:
        while True:
            self.check_alive()
            try:
                if requests.get(base_url + "/health/ready", timeout=1).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if deadline.expired:
                raise BenchError(f"/health/ready not 200 within {deadline.seconds:g} s")
            time.sleep(0.2)
        while workers.online_count() < 1:
            self.check_alive()
            if deadline.expired:
                raise BenchError(f"no worker heartbeat within {deadline.seconds:g} s")
            time.sleep(0.1)


def _submit_one(clients: _Clients, deadline: Deadline) -> tuple[str | None, float, str | None]:
    if deadline.expired:
        return None, 0.0, "submit deadline passed"
    started = time.perf_counter()
    try:
        response = clients.session().post(
            clients.base_url + "/api/steps",
            json=STEP_BODY,
            headers=clients.headers,
            timeout=REQUEST_TIMEOUT_S,
        )
    except requests.RequestException as exc:
        return None, (time.perf_counter() - started) * 1000, f"{type(exc).__name__}: {exc}"
    elapsed_ms = (time.perf_counter() - started) * 1000
    if response.status_code != 201:
        return None, elapsed_ms, f"HTTP {response.status_code}: {response.text[:200]}"
    return response.json()["step_id"], elapsed_ms, None


def _submit(
    clients: _Clients, count: int, threads: int, deadline: Deadline
) -> tuple[list[str], list[float], list[str], float, float]:
    """Submit `count` steps; return ids, latencies (ms), errors, and start and end times."""
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="bench-submit") as pool:
        outcomes = list(pool.map(lambda _: _submit_one(clients, deadline), range(count)))
    finished = time.perf_counter()
    ids = [step_id for step_id, _, _ in outcomes if step_id is not None]
    latencies = [ms for step_id, ms, _ in outcomes if step_id is not None]
    errors = [error for _, _, error in outcomes if error is not None]
    return ids, latencies, errors, started, finished


def _status_counts(ids: list[str]) -> dict[str, int]:
    with db.transaction() as session:
        rows = session.execute(
            select(Step.status, func.count()).where(Step.id.in_(ids)).group_by(Step.status)
        )
        return {status: count for status, count in rows}


def _wait_terminal(
    system: _System, ids: list[str], deadline: Deadline
) -> tuple[dict[str, int], float]:
    """Poll PostgreSQL until every id is terminal (or the deadline); return counts and when."""
    terminal = {str(status) for status in TERMINAL_STEP_STATUSES}
    while True:
        counts = _status_counts(ids)
        seen = time.perf_counter()
        if sum(counts.get(status, 0) for status in terminal) >= len(ids) or deadline.expired:
            return counts, seen
        system.check_alive()
        time.sleep(POLL_INTERVAL_S)


def _get_one(clients: _Clients, step_id: str) -> tuple[float, str | None]:
    started = time.perf_counter()
    try:
        response = clients.session().get(
            f"{clients.base_url}/api/steps/{step_id}",
            headers=clients.headers,
            timeout=REQUEST_TIMEOUT_S,
        )
    except requests.RequestException as exc:
        return (time.perf_counter() - started) * 1000, f"{type(exc).__name__}: {exc}"
    elapsed_ms = (time.perf_counter() - started) * 1000
    if response.status_code != 200:
        return elapsed_ms, f"GET step: HTTP {response.status_code}: {response.text[:200]}"
    return elapsed_ms, None


def _status_latencies(
    clients: _Clients, ids: list[str], requests_count: int, threads: int
) -> tuple[list[float], list[str]]:
    targets = [ids[index % len(ids)] for index in range(requests_count)]
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="bench-status") as pool:
        outcomes = list(pool.map(lambda step_id: _get_one(clients, step_id), targets))
    latencies = [ms for ms, error in outcomes if error is None]
    errors = [error for _, error in outcomes if error is not None]
    return latencies, errors


def _measure(system: _System, clients: _Clients, options: dict[str, Any], result: Result) -> None:
    steps, threads = options["steps"], options["threads"]
    warmup = options["warmup"]
    if warmup:
        deadline = Deadline(WARMUP_TIMEOUT_S)
        ids, _, errors, _, _ = _submit(clients, warmup, threads, deadline)
        if errors:
            raise BenchError(f"warm-up submit failed: {errors[0]}")
        counts, _ = _wait_terminal(system, ids, deadline)
        if counts.get(StepStatus.COMPLETED, 0) != warmup:
            raise BenchError(f"warm-up: steps not all completed: {counts}")

    deadline = Deadline(options["timeout_s"])
    ids, latencies, errors, started, submitted = _submit(clients, steps, threads, deadline)
    result.submitted, result.submit_ms = len(ids), latencies
    result.submit_elapsed_s = submitted - started
    if errors:
        result.errors.append(f"{len(errors)} submits failed, first: {errors[0]}")
    if not ids:
        return
    counts, seen = _wait_terminal(system, ids, deadline)
    result.completed = counts.get(StepStatus.COMPLETED, 0)
    result.failed = sum(n for status, n in counts.items() if status != StepStatus.COMPLETED)
    if result.completed == steps:
        result.elapsed_s = seen - started
    else:
        result.errors.append(f"steps by status at the deadline: {counts}")

    result.status_ms, errors = _status_latencies(clients, ids, options["status_requests"], threads)
    if errors:
        result.errors.append(f"{len(errors)} status reads failed, first: {errors[0]}")


def _workflow_row(workflow_id: str) -> Any:
    """(status, completed_steps, error, created_at, completed_at) of one workflow, or None."""
    query = select(
        Workflow.status,
        Workflow.completed_steps,
        Workflow.error,
        Workflow.created_at,
        Workflow.completed_at,
    ).where(Workflow.id == workflow_id)
    with db.transaction() as session:
        return session.execute(query).one_or_none()


def _cancel_workflow(clients: _Clients, workflow_id: str) -> None:
    """Best effort, so a workflow left over does not load the next measurement."""
    with contextlib.suppress(requests.RequestException):
        clients.session().post(
            f"{clients.base_url}/api/workflows/{workflow_id}/cancel",
            json={"reason": "benchmark deadline passed"},
            headers=clients.headers,
            timeout=REQUEST_TIMEOUT_S,
        )


def _run_workflow(
    system: _System, clients: _Clients, shape: Shape, timeout_s: float
) -> WorkflowResult:
    """One `POST /api/workflows`, then poll the workflow's row until completed or the deadline."""
    outcome = WorkflowResult(shape=shape.key, steps=shape.steps, hops=shape.hops)
    body = shape.emp_body()
    deadline = Deadline(timeout_s)
    started = time.perf_counter()
    try:
        response = clients.session().post(
            clients.base_url + "/api/workflows",
            json=body,
            headers=clients.headers,
            timeout=max(1.0, min(REQUEST_TIMEOUT_S, deadline.remaining())),
        )
    except requests.RequestException as exc:
        outcome.errors.append(f"POST /api/workflows: {type(exc).__name__}: {exc}")
        return outcome
    outcome.submit_ms = (time.perf_counter() - started) * 1000
    if response.status_code != 201:
        text = response.text[:200]
        outcome.errors.append(f"POST /api/workflows: HTTP {response.status_code}: {text}")
        return outcome
    workflow_id = response.json()["workflow_id"]
    while True:
        workflow = _workflow_row(workflow_id)
        seen = time.perf_counter()
        state = workflow.status if workflow is not None else "missing"
        if state == WorkflowStatus.COMPLETED:
            outcome.elapsed_s = seen - started
            if workflow.completed_at is not None:
                outcome.server_s = (workflow.completed_at - workflow.created_at).total_seconds()
            return outcome
        if state in (WorkflowStatus.FAILED, WorkflowStatus.CANCELLED):
            outcome.errors.append(f"workflow {workflow_id} ended {state}: {workflow.error}")
            return outcome
        if deadline.expired:
            done = workflow.completed_steps if workflow is not None else 0
            outcome.errors.append(
                f"workflow {workflow_id} still {state} after {timeout_s:g} s, "
                f"{done} of {shape.steps} steps completed"
            )
            _cancel_workflow(clients, workflow_id)
            return outcome
        system.check_alive()
        time.sleep(POLL_INTERVAL_S)


def _measure_workflows(
    system: _System, clients: _Clients, options: dict[str, Any], result: Result
) -> None:
    """Each shape in turn, on a drained queue; skipped when the steps did not all complete."""
    for shape in options.get("workflows", ()):
        if result.completed != result.requested:
            outcome = WorkflowResult(shape=shape.key, steps=shape.steps, hops=shape.hops)
            outcome.errors.append("not run: the step measurement before it did not complete")
        else:
            try:
                outcome = _run_workflow(system, clients, shape, options["workflow_timeout_s"])
            except BenchError as exc:
                outcome = WorkflowResult(shape=shape.key, steps=shape.steps, hops=shape.hops)
                outcome.errors.append(str(exc))
        result.workflows[shape.key] = outcome


def run(run: Scratch, options: dict[str, Any], log_path: Path) -> Result:
    """Start web, worker and relay on the scratch run, measure, and stop them.

    `options["workflows"]` (shapes, may be empty) are measured after the steps, on the same
    processes, each with `options["workflow_timeout_s"]`.
    """
    use_scratch(run)
    result = Result(name="EMP Tasks", requested=options["steps"])
    port = free_port()
    log = open(log_path, "w")  # noqa: SIM115 - closed below, after the processes are gone
    group = ProcessGroup(process_env(run, port), names=PROCESSES, output=log)
    clients = _Clients(f"http://127.0.0.1:{port}")
    try:
        group.start()
        system = _System(group, log_path)
        system.wait_ready(clients.base_url, Deadline(START_TIMEOUT_S))
        _measure(system, clients, options, result)
        _measure_workflows(system, clients, options, result)
    except BenchError as exc:
        result.errors.append(str(exc))
    finally:
        clients.close()
        group.stop()
        log.close()
    for shape in options.get("workflows", ()):
        if shape.key not in result.workflows:
            skipped = WorkflowResult(shape=shape.key, steps=shape.steps, hops=shape.hops)
            skipped.errors.append("not run: EMP Tasks stopped before it")
            result.workflows[shape.key] = skipped
    return result
