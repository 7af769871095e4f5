"""The EMP Tasks side of the benchmark: the Procfile's processes, over HTTP.

Steps are submitted with `POST /api/steps` from a pool of client threads (one
kept-alive connection each, bench.keepalive); completion is read from PostgreSQL, not over HTTP, so
the measurement does not load the API while the worker drains the queue. Then,
on the same processes, each workflow shape is submitted with one
`POST /api/workflows` and its row in `workflows` is polled until it is completed.
Last, each webhook configuration (bench.webhook_rows) registers its endpoints
with `POST /api/webhooks`, submits steps at a steady rate, waits for every
`step_completed` webhook at a local receiver, and deletes its endpoints again.
Then each live configuration (bench.live_rows) connects its WebSocket clients,
submits steps at a steady rate and waits until every client has every event of
those steps. Last, the EmProps row (bench.emprops_rows) submits EmProps workflows and
times their notifications at a fake EmProps.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from bench import emprops_rows
from bench.cpu import CpuMeter
from bench.keepalive import ERRORS as HTTP_ERRORS
from bench.keepalive import KeepAlive
from bench.live_rows import Audience, LiveRow
from bench.scratch import Scratch
from bench.stats import (
    BenchError,
    Deadline,
    EmpropsResult,
    LiveResult,
    Result,
    WebhookResult,
    WorkflowResult,
)
from bench.webhook_rows import Receiver, WebhookRow
from bench.workflows import Shape
from emp_tasks import workers
from emp_tasks.core import config, events
from emp_tasks.core.status import TERMINAL_STEP_STATUSES, StepStatus, WorkflowStatus
from emp_tasks.store import db, redisdb
from emp_tasks.store.models import Event, Step, WebhookDelivery, Workflow
from emp_tasks.supervisor import ProcessGroup
from emp_tasks.webhooks import delivery

API_KEY = "bench-key"
PROCESSES = ["web", "worker", "webhooks", "relay", "emprops"]
STEP_BODY = {"service": "simulation"}
PROGRESS_REPORTS = 4
PROGRESS_BODY = {"service": "simulation", "payload": {"progress_steps": PROGRESS_REPORTS}}
START_TIMEOUT_S = 90.0
WARMUP_TIMEOUT_S = 60.0
REQUEST_TIMEOUT_S = 30.0
POLL_INTERVAL_S = 0.1
WEBHOOK_THREADS = 4  # client threads submitting the webhook rows' steps at their steady rate
WEBHOOK_WARMUP = 3  # steps per webhook configuration before the measured ones
CATCH_UP_TIMEOUT_S = 60.0  # for the webhooks process to have read the whole event stream
WEB_THREADS = 256  # each WebSocket holds one web thread: the 200-client row, plus HTTP
LIVE_WARMUP = 3  # steps per live configuration before the measured ones
CONNECT_TIMEOUT_S = 60.0  # for a live configuration's clients to connect and subscribe
SET_BY_BENCH = frozenset(
    {
        "EMP_API_KEYS",
        "EMP_WEBHOOK_ALLOW_PRIVATE",
        "EMP_BIND",
        "EMP_RATE_LIMIT_PER_MINUTE",
        "EMP_WORKER_CONCURRENCY",
        "EMP_WORKER_ID",
        "EMP_WEB_THREADS",
        "EMP_LOG_LEVEL",
        "EMPROPS_API_URL",
        "EMPROPS_API_KEY",
    }
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


OUTPUTS_ROOT = Path(".emp") / "bench" / "outputs"  # bench.scratch removes a run's folder


def process_env(run: Scratch, port: int, emprops_url: str | None = None) -> dict[str, str]:
    """This process's environment (so EMP_* tuning passes through) with the bench's settings;
    `emprops_url`: the fake EmProps of the EmProps row, if one runs."""
    settings = {
        "REDIS_URL": run.redis_url,
        "DATABASE_URL": run.database_url,
        "EMP_API_KEYS": f"{API_KEY}:bench:admin",
        "PORT": str(port),
        "EMP_BIND": "127.0.0.1",
        "EMP_RATE_LIMIT_PER_MINUTE": "0",
        "EMP_WORKER_CONCURRENCY": "2",
        "EMP_WEB_THREADS": str(WEB_THREADS),
        "EMP_WORKER_ID": f"bench-worker-{os.getpid()}",
        "EMP_LOG_LEVEL": "WARNING",
        "EMP_WEBHOOK_ALLOW_PRIVATE": "true",  # the receiver is on 127.0.0.1
        # Outputs of this run (the output rows) in a folder of their own, gone with it
        "EMP_STORAGE_URL": (OUTPUTS_ROOT / run.database_name).resolve().as_uri(),
        "PYTHONUNBUFFERED": "1",
    }
    if emprops_url is not None:
        settings |= {"EMPROPS_API_URL": emprops_url, "EMPROPS_API_KEY": "bench-emprops-key"}
    return {**os.environ, **settings}


def use_scratch(run: Scratch) -> None:
    """Point this process's settings, Redis client and database helpers at the scratch run."""
    os.environ["REDIS_URL"] = run.redis_url
    os.environ["DATABASE_URL"] = run.database_url
    config.reset_settings()
    redisdb.reset_clients()


class _Clients:
    """One kept-alive connection per client thread (bench.keepalive), all closed at the end."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.headers = {"Authorization": f"Bearer {API_KEY}"}
        self._local = threading.local()
        self._sessions: list[KeepAlive] = []
        self._lock = threading.Lock()

    def session(self) -> KeepAlive:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = KeepAlive(self.base_url)
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
        probe = KeepAlive(base_url)
        while True:
            self.check_alive()
            try:
                if probe.get(base_url + "/health/ready", timeout=1).status_code == 200:
                    break
            except HTTP_ERRORS:
                pass
            if deadline.expired:
                raise BenchError(f"/health/ready not 200 within {deadline.seconds:g} s")
            time.sleep(0.2)
        probe.close()
        while workers.online_count() < 1:
            self.check_alive()
            if deadline.expired:
                raise BenchError(f"no worker heartbeat within {deadline.seconds:g} s")
            time.sleep(0.1)


def _submit_one(
    clients: _Clients, deadline: Deadline, body: dict[str, Any] = STEP_BODY
) -> tuple[str | None, float, str | None]:
    if deadline.expired:
        return None, 0.0, "submit deadline passed"
    started = time.perf_counter()
    try:
        response = clients.session().post(
            clients.base_url + "/api/steps",
            json=body,
            headers=clients.headers,
            timeout=REQUEST_TIMEOUT_S,
        )
    except HTTP_ERRORS as exc:
        return None, (time.perf_counter() - started) * 1000, f"{type(exc).__name__}: {exc}"
    elapsed_ms = (time.perf_counter() - started) * 1000
    if response.status_code != 201:
        return None, elapsed_ms, f"HTTP {response.status_code}: {response.text[:200]}"
    return response.json()["step_id"], elapsed_ms, None


def _submit(
    clients: _Clients,
    count: int,
    threads: int,
    deadline: Deadline,
    body: dict[str, Any] = STEP_BODY,
) -> tuple[list[str], list[float], list[str], float, float]:
    """Submit `count` steps; return ids, latencies (ms), errors, and start and end times."""
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="bench-submit") as pool:
        outcomes = list(pool.map(lambda _: _submit_one(clients, deadline, body), range(count)))
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
    except HTTP_ERRORS as exc:
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


def _warm_up(system: _System, clients: _Clients, count: int, threads: int) -> None:
    deadline = Deadline(WARMUP_TIMEOUT_S)
    ids, _, errors, _, _ = _submit(clients, count, threads, deadline)
    if errors:
        raise BenchError(f"warm-up submit failed: {errors[0]}")
    counts, _ = _wait_terminal(system, ids, deadline)
    if counts.get(StepStatus.COMPLETED, 0) != count:
        raise BenchError(f"warm-up: steps not all completed: {counts}")


def _steps_phase(
    system: _System,
    clients: _Clients,
    meter: CpuMeter,
    result: Result,
    threads: int,
    timeout_s: float,
    body: dict[str, Any],
) -> list[str]:
    """Submit `result.requested` steps and wait for all, CPU metered; return their ids."""
    deadline = Deadline(timeout_s)
    meter.start()
    ids, latencies, errors, started, submitted = _submit(
        clients, result.requested, threads, deadline, body
    )
    result.submitted, result.submit_ms = len(ids), latencies
    result.submit_elapsed_s = submitted - started
    if errors:
        result.errors.append(f"{len(errors)} submits failed, first: {errors[0]}")
    if not ids:
        return ids
    counts, seen = _wait_terminal(system, ids, deadline)
    result.cpu_s = meter.stop()
    result.completed = counts.get(StepStatus.COMPLETED, 0)
    result.failed = sum(n for status, n in counts.items() if status != StepStatus.COMPLETED)
    if result.completed == result.requested:
        result.elapsed_s = seen - started
    else:
        result.errors.append(f"steps by status at the deadline: {counts}")
    return ids


def _single_client(system: _System, clients: _Clients, count: int) -> tuple[list[float], list[str]]:
    """`count` submits from one client, one after another (the steps run meanwhile), then
    wait for those steps, so the next phase starts on an empty queue."""
    deadline = Deadline(REQUEST_TIMEOUT_S + count)
    outcomes = [_submit_one(clients, deadline) for _ in range(count)]
    ids = [step_id for step_id, _, _ in outcomes if step_id]
    errors = [error for _, _, error in outcomes if error]
    counts, _ = _wait_terminal(system, ids, deadline)
    if counts.get(StepStatus.COMPLETED, 0) != len(ids):
        errors.append(f"single-client steps by status at the deadline: {counts}")
    return [ms for step_id, ms, _ in outcomes if step_id], errors


OUTPUT_BODY = {"service": "simulation", "payload": {"images": 1, "width": 590, "height": 590}}
"""One noise PNG of 590 x 590 pixels: about 1 MB, stored before the step completes."""
NO_OUTPUT_BODY = {"service": "simulation", "payload": {}}


def _one_at_a_time(
    system: _System, clients: _Clients, count: int, body: dict[str, Any]
) -> tuple[list[float], list[str]]:
    """Submit `count` steps one after another, each after the last completed; return each
    one's created_at to completed_at (ms), as PostgreSQL recorded them."""
    deadline = Deadline(REQUEST_TIMEOUT_S + 2 * count)
    latencies: list[float] = []
    errors: list[str] = []
    for _ in range(count):
        step_id, _, error = _submit_one(clients, deadline, body)
        if step_id is None:
            errors.append(error or "no step id")
            continue
        while not deadline.expired:
            with db.transaction() as session:
                row = session.get(Step, step_id)
            if row is not None and row.status in TERMINAL_STEP_STATUSES:
                break
            system.check_alive()
            time.sleep(0.01)
        if row is None or row.status != StepStatus.COMPLETED:
            errors.append(f"step {step_id}: {row.status if row else 'missing'} ({row.error})")
            continue
        latencies.append((row.completed_at - row.created_at).total_seconds() * 1000)
    return latencies, errors


def _measure(
    system: _System, clients: _Clients, meter: CpuMeter, options: dict[str, Any], result: Result
) -> None:
    steps, threads = options["steps"], options["threads"]
    if options["warmup"]:
        _warm_up(system, clients, options["warmup"], threads)
    ids = _steps_phase(system, clients, meter, result, threads, options["timeout_s"], STEP_BODY)
    if not ids:
        return
    result.status_ms, errors = _status_latencies(clients, ids, options["status_requests"], threads)
    if errors:
        result.errors.append(f"{len(errors)} status reads failed, first: {errors[0]}")
    if options.get("single_submits"):
        result.single_submit_ms, errors = _single_client(system, clients, options["single_submits"])
        if errors:
            result.errors.append(f"{len(errors)} single-client submits failed: {errors[0]}")
    if options.get("output_steps"):
        count = options["output_steps"]
        result.no_output_ms, errors = _one_at_a_time(system, clients, count, NO_OUTPUT_BODY)
        result.output_ms, more = _one_at_a_time(system, clients, count, OUTPUT_BODY)
        if errors or more:
            result.errors.append(f"{len(errors + more)} output steps failed: {(errors + more)[0]}")
    if options.get("progress_steps") and result.completed == steps:
        progress = result.progress = Result(name=result.name, requested=options["progress_steps"])
        _steps_phase(system, clients, meter, progress, threads, options["timeout_s"], PROGRESS_BODY)


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
    with contextlib.suppress(HTTP_ERRORS):
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
    except HTTP_ERRORS as exc:
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


# --- webhook latency rows ------------------------------------------------------------------


def _register_webhook(clients: _Clients, url: str) -> str:
    """`POST /api/webhooks` for `url`, subscribed to step_completed; return the endpoint id."""
    body = {"url": url, "events": ["step_completed"], "description": "benchmark receiver"}
    try:
        response = clients.session().post(
            clients.base_url + "/api/webhooks",
            json=body,
            headers=clients.headers,
            timeout=REQUEST_TIMEOUT_S,
        )
    except HTTP_ERRORS as exc:
        raise BenchError(f"POST /api/webhooks: {type(exc).__name__}: {exc}") from exc
    if response.status_code != 201:
        text = response.text[:200]
        raise BenchError(f"POST /api/webhooks: HTTP {response.status_code}: {text}")
    return response.json()["webhook"]["id"]


def _delete_webhooks(clients: _Clients, endpoint_ids: list[str]) -> list[str]:
    """`DELETE /api/webhooks/{id}` for each (their deliveries go with them); return errors."""
    errors = []
    for endpoint_id in endpoint_ids:
        try:
            response = clients.session().delete(
                f"{clients.base_url}/api/webhooks/{endpoint_id}",
                headers=clients.headers,
                timeout=REQUEST_TIMEOUT_S,
            )
        except HTTP_ERRORS as exc:
            errors.append(f"DELETE /api/webhooks/{endpoint_id}: {type(exc).__name__}: {exc}")
            continue
        if response.status_code != 200:
            errors.append(f"DELETE /api/webhooks/{endpoint_id}: HTTP {response.status_code}")
    return errors


def _paced_submit(
    clients: _Clients, count: int, rate: float, deadline: Deadline
) -> tuple[list[str], list[str]]:
    """Submit `count` steps, the i-th not before start + i / rate; return ids and errors.

    WEBHOOK_THREADS clients share the schedule, so one slow call does not delay the next.
    """
    indexes = itertools.count()
    lock = threading.Lock()
    outcomes: list[tuple[int, str | None, str | None]] = []
    start = time.perf_counter()

    def client() -> None:
        while True:
            with lock:
                index = next(indexes)
            if index >= count:
                return
            delay = start + index / rate - time.perf_counter()
            if delay > 0:
                time.sleep(min(delay, deadline.remaining()))
            step_id, _, error = _submit_one(clients, deadline)
            with lock:
                outcomes.append((index, step_id, error))

    threads = min(WEBHOOK_THREADS, count)
    with ThreadPoolExecutor(threads, thread_name_prefix="bench-paced-submit") as pool:
        for future in [pool.submit(client) for _ in range(threads)]:
            future.result()
    outcomes.sort(key=lambda outcome: outcome[0])
    ids = [step_id for _, step_id, _ in outcomes if step_id is not None]
    errors = [error for _, _, error in outcomes if error is not None]
    return ids, errors


def _consumer_state() -> tuple[bool, str]:
    """Whether the webhooks process has read and acknowledged all of emp:events, and why not."""
    client = redisdb.client()
    if not client.exists(events.STREAM):
        return False, f"no {events.STREAM} stream yet"
    groups = {group["name"]: group for group in client.xinfo_groups(events.STREAM)}
    group = groups.get(delivery.GROUP)
    if group is None:
        return False, f"no consumer group {delivery.GROUP} yet"
    last = client.xinfo_stream(events.STREAM)["last-generated-id"]
    read = group["last-delivered-id"]
    if read != last or group["pending"]:
        return False, f"group read up to {read} of {last}, {group['pending']} unacknowledged"
    return True, ""


def _wait_caught_up(system: _System, deadline: Deadline) -> None:
    """Until the webhooks process has consumed the stream, so no backlog is measured."""
    while True:
        caught_up, why = _consumer_state()
        if caught_up:
            return
        if deadline.expired:
            raise BenchError(f"webhooks process behind after {deadline.seconds:g} s: {why}")
        system.check_alive()
        time.sleep(POLL_INTERVAL_S)


def _wait_webhooks(
    system: _System, receiver: Receiver, ids: list[str], endpoints: int, deadline: Deadline
) -> int:
    """Until every (endpoint, step) webhook of `ids` arrived or the deadline; return how many."""
    expected = len(ids) * endpoints
    while True:
        received = receiver.count(ids)
        if received >= expected or deadline.expired:
            return received
        system.check_alive()
        time.sleep(POLL_INTERVAL_S / 2)


def _webhook_latencies(
    receiver: Receiver, ids: list[str], urls: dict[str, int], outcome: WebhookResult
) -> None:
    """Fill `outcome` from the step rows' completed_at, the delivery rows and the receipts."""
    step_id_of = WebhookDelivery.body["data"]["step_id"].astext
    with db.transaction() as session:
        steps = {
            row.id: row
            for row in session.execute(
                select(Step.id, Step.status, Step.completed_at).where(Step.id.in_(ids))
            )
        }
        recorded = {
            (row.step_id, urls[row.url]): row.created_at
            for row in session.execute(
                select(
                    step_id_of.label("step_id"), WebhookDelivery.url, WebhookDelivery.created_at
                ).where(
                    WebhookDelivery.event_type == "step_completed",
                    WebhookDelivery.url.in_(list(urls)),
                    step_id_of.in_(ids),
                )
            )
            if row.url in urls
        }
    statuses: dict[str, int] = {}
    for step_id in ids:
        step = steps.get(step_id)
        status = str(step.status) if step is not None else "missing"
        statuses[status] = statuses.get(status, 0) + 1
        if step is None or step.status != StepStatus.COMPLETED or step.completed_at is None:
            continue
        outcome.completed += 1
        done = step.completed_at.timestamp()
        for index, at in receiver.receipts(step_id).items():
            outcome.latencies_ms.append((at - done) * 1000)
            created = recorded.get((step_id, index))
            if created is not None:
                outcome.recorded_ms.append((created.timestamp() - done) * 1000)
                outcome.sent_ms.append((at - created.timestamp()) * 1000)
    if outcome.completed != len(ids):
        outcome.errors.append(f"webhook rows' steps by status at the deadline: {statuses}")


def _measure_webhooks(
    system: _System, clients: _Clients, row: WebhookRow, timeout_s: float
) -> WebhookResult:
    """Register the row's endpoints, warm up, submit its steps, wait, delete the endpoints."""
    outcome = row.empty_result()
    receiver = Receiver().start()
    urls = {receiver.url(index): index for index in range(row.endpoints)}
    endpoint_ids: list[str] = []
    try:
        _wait_caught_up(system, Deadline(CATCH_UP_TIMEOUT_S))
        for url in urls:
            endpoint_ids.append(_register_webhook(clients, url))

        deadline = Deadline(WARMUP_TIMEOUT_S)
        ids, errors = _paced_submit(clients, WEBHOOK_WARMUP, row.rate, deadline)
        if errors:
            raise BenchError(f"webhook warm-up submit failed: {errors[0]}")
        received = _wait_webhooks(system, receiver, ids, row.endpoints, deadline)
        if received != len(ids) * row.endpoints:
            raise BenchError(
                f"webhook warm-up: {received} of {len(ids) * row.endpoints} webhooks "
                f"within {deadline.seconds:g} s"
            )

        deadline = Deadline(row.steps / row.rate + timeout_s)
        ids, errors = _paced_submit(clients, row.steps, row.rate, deadline)
        outcome.submitted, outcome.expected = len(ids), row.expected
        if errors:
            outcome.errors.append(f"{len(errors)} submits failed, first: {errors[0]}")
        outcome.received = _wait_webhooks(system, receiver, ids, row.endpoints, deadline)
        _webhook_latencies(receiver, ids, urls, outcome)
        if outcome.received < outcome.expected:
            outcome.errors.append(
                f"{outcome.received} of {outcome.expected} webhooks received "
                f"within {deadline.seconds:g} s"
            )
    except BenchError as exc:
        outcome.errors.append(str(exc))
    finally:
        outcome.errors.extend(_delete_webhooks(clients, endpoint_ids)[:3])
        receiver.stop()
        outcome.duplicates = receiver.duplicates
        if receiver.unexpected:
            outcome.errors.append(f"unexpected requests, first: {receiver.unexpected[0]}")
    return outcome


def _measure_webhook_rows(
    system: _System, clients: _Clients, options: dict[str, Any], result: Result
) -> None:
    """Each webhook configuration in turn; skipped when the steps did not all complete."""
    for row in options.get("webhooks", ()):
        if result.completed != result.requested:
            outcome = row.empty_result()
            outcome.errors.append("not run: the step measurement before it did not complete")
        else:
            outcome = _measure_webhooks(system, clients, row, options["webhook_timeout_s"])
        result.webhooks[row.key] = outcome


# --- live event latency rows ---------------------------------------------------------------


def _step_event_ids(ids: list[str]) -> list[str]:
    """The ids of every event of these steps in the outbox."""
    with db.transaction() as session:
        return list(session.scalars(select(Event.id).where(Event.step_id.in_(ids))))


def _live_steps(
    system: _System,
    clients: _Clients,
    audience: Audience,
    count: int,
    rate: float,
    deadline: Deadline,
) -> tuple[list[str], list[str], dict[str, int], list[str]]:
    """Submit `count` steps at `rate`, wait for them and for every client to have their events.

    Return the step ids, the submit errors, the steps by status and the steps' event ids.
    """
    ids, errors = _paced_submit(clients, count, rate, deadline)
    counts, _ = _wait_terminal(system, ids, deadline) if ids else ({}, 0.0)
    event_ids = _step_event_ids(ids) if ids else []
    audience.wait(event_ids, deadline, system.check_alive)
    return ids, errors, counts, event_ids


def _measure_live(system: _System, clients: _Clients, row: LiveRow, timeout_s: float) -> LiveResult:
    """Connect the row's clients, warm up, submit its steps, wait for every delivery, close."""
    outcome = row.empty_result()
    audience = Audience(clients.base_url, API_KEY)
    try:
        audience.connect(row.clients, Deadline(CONNECT_TIMEOUT_S))
        deadline = Deadline(WARMUP_TIMEOUT_S)
        _, errors, _, event_ids = _live_steps(
            system, clients, audience, LIVE_WARMUP, row.rate, deadline
        )
        received, expected = audience.received(event_ids), len(event_ids) * row.clients
        if errors or not event_ids or received != expected:
            why = errors[0] if errors else f"{received} of {expected} events received"
            raise BenchError(f"live warm-up within {deadline.seconds:g} s: {why}")

        deadline = Deadline(row.steps / row.rate + timeout_s)
        ids, errors, counts, event_ids = _live_steps(
            system, clients, audience, row.steps, row.rate, deadline
        )
        outcome.submitted = len(ids)
        outcome.completed = counts.get(StepStatus.COMPLETED, 0)
        if errors:
            outcome.errors.append(f"{len(errors)} submits failed, first: {errors[0]}")
        if outcome.completed != len(ids):
            outcome.errors.append(f"live rows' steps by status at the deadline: {counts}")
        audience.fill(event_ids, outcome)
        if outcome.missing:
            outcome.errors.append(
                f"{outcome.missing} of {outcome.expected} deliveries missing "
                f"after {deadline.seconds:g} s"
            )
    except BenchError as exc:
        outcome.errors.append(str(exc))
    finally:
        audience.close()
    return outcome


def _measure_live_rows(
    system: _System, clients: _Clients, options: dict[str, Any], result: Result
) -> None:
    """Each live configuration in turn; skipped when the steps did not all complete."""
    for row in options.get("live", ()):
        if result.completed != result.requested:
            outcome = row.empty_result()
            outcome.errors.append("not run: the step measurement before it did not complete")
        else:
            outcome = _measure_live(system, clients, row, options["live_timeout_s"])
        result.live[row.key] = outcome


def _measure_emprops(
    system: _System,
    clients: _Clients,
    fake: emprops_rows.FakeEmprops,
    options: dict[str, Any],
    result: Result,
) -> EmpropsResult:
    """The EmProps row; skipped when the steps did not all complete."""
    if result.completed != result.requested:
        outcome = EmpropsResult(options["emprops_workflows"], options["emprops_rate"])
        outcome.errors.append("not run: the step measurement before it did not complete")
        return outcome
    return emprops_rows.measure(
        clients.base_url,
        clients.headers,
        fake,
        options["emprops_workflows"],
        options["emprops_rate"],
        options["emprops_timeout_s"],
        system.check_alive,
    )


def run(run: Scratch, options: dict[str, Any], log_path: Path) -> Result:
    """Start web, worker, webhooks and relay on the scratch run, measure, and stop them.

    `options["workflows"]` (shapes, may be empty) are measured after the steps, on the same
    processes, each with `options["workflow_timeout_s"]`; then `options["webhooks"]`
    (bench.webhook_rows.WebhookRow, may be empty), each with `options["webhook_timeout_s"]`
    after its last scheduled submit; then `options["live"]` (bench.live_rows.LiveRow, may be
    empty), each with `options["live_timeout_s"]` after its last scheduled submit.
    """
    use_scratch(run)
    result = Result(name="EMP Tasks", requested=options["steps"])
    port = free_port()
    fake_emprops = emprops_rows.FakeEmprops().start()
    log = open(log_path, "w")  # noqa: SIM115 - closed below, after the processes are gone
    group = ProcessGroup(process_env(run, port, fake_emprops.url), names=PROCESSES, output=log)
    clients = _Clients(f"http://127.0.0.1:{port}")
    try:
        group.start()
        system = _System(group, log_path)
        system.wait_ready(clients.base_url, Deadline(START_TIMEOUT_S))
        pids = {name: process.pid for name, process in group.processes.items()}
        meter = CpuMeter.for_system(pids, run.database_url, run.redis_url)
        _measure(system, clients, meter, options, result)
        _measure_workflows(system, clients, options, result)
        _measure_webhook_rows(system, clients, options, result)
        _measure_live_rows(system, clients, options, result)
        if options.get("emprops_workflows"):
            result.emprops = _measure_emprops(system, clients, fake_emprops, options, result)
    except BenchError as exc:
        result.errors.append(str(exc))
    finally:
        clients.close()
        group.stop()
        fake_emprops.stop()
        log.close()
    for shape in options.get("workflows", ()):
        if shape.key not in result.workflows:
            skipped = WorkflowResult(shape=shape.key, steps=shape.steps, hops=shape.hops)
            skipped.errors.append("not run: EMP Tasks stopped before it")
            result.workflows[shape.key] = skipped
    for row in options.get("webhooks", ()):
        if row.key not in result.webhooks:
            hook = row.empty_result()
            hook.errors.append("not run: EMP Tasks stopped before it")
            result.webhooks[row.key] = hook
    for row in options.get("live", ()):
        if row.key not in result.live:
            live = row.empty_result()
            live.errors.append("not run: EMP Tasks stopped before it")
            result.live[row.key] = live
    return result
