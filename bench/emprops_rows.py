"""The EmProps row (EMP Tasks only): a workflow's end to EmProps' receipt of its notification.

The Procfile's `emprops` process runs beside the others with EMPROPS_API_URL naming a
fake EmProps in this process (a ThreadingHTTPServer on 127.0.0.1 answering 200). The row
submits `workflows` one-step EmProps workflows at a steady `rate` and times, for each,
the workflow row's `completed_at` (PostgreSQL, the transaction that records
`workflow_completed`) to the moment the fake EmProps got `POST /jobs/<job>/complete`.
Both times are this host's wall clock. A notification received twice is counted (it
must never happen) and fails the row.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler

import requests
from sqlalchemy import select

from bench.stats import Deadline, EmpropsResult
from bench.webhook_rows import QuietServer
from emp_tasks.core.status import WorkflowStatus
from emp_tasks.store import db
from emp_tasks.store.models import Workflow

LABEL = "EmProps notification: workflow completed to EmProps received p50 / p99 (ms)"
REQUEST_TIMEOUT_S = 30.0


class FakeEmprops:
    """Answers 200 to every `POST /jobs/<job>/complete|fail`, recording its first receipt."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.received: dict[str, float] = {}
        self.duplicates = 0
        self.unexpected: list[str] = []
        self._server: QuietServer | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> FakeEmprops:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                at = time.time()
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")
                owner._record(self.path, at)

            def log_message(self, *args: object) -> None:
                pass

        self._server = QuietServer(("127.0.0.1", 0), Handler)
        threading.Thread(
            target=self._server.serve_forever, name="bench-emprops", daemon=True
        ).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def _record(self, path: str, at: float) -> None:
        parts = path.strip("/").split("/")
        with self._lock:
            if len(parts) != 3 or parts[0] != "jobs" or parts[2] not in ("complete", "fail"):
                if len(self.unexpected) < 10:
                    self.unexpected.append(path[:200])
            elif parts[1] in self.received:
                self.duplicates += 1
            else:
                self.received[parts[1]] = at

    def receipt(self, job_id: str) -> float | None:
        with self._lock:
            return self.received.get(job_id)


def measure(
    base_url: str,
    headers: dict[str, str],
    fake: FakeEmprops,
    workflows: int,
    rate: float,
    timeout_s: float,
    check_alive: Callable[[], None],
) -> EmpropsResult:
    """Submit the row's workflows at `rate`, wait for every notification, time each."""
    outcome = EmpropsResult(workflows=workflows, rate=rate)
    deadline = Deadline(workflows / rate + timeout_s)
    session = requests.Session()
    jobs: dict[str, str] = {}  # job id -> workflow id
    start = time.perf_counter()
    try:
        for index in range(workflows):
            delay = start + index / rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            job = f"bench-{os.getpid()}-{index}"
            body = {
                "name": f"emprops {index}",
                "steps": [{"service": "simulation", "payload": {}}],
                "emprops": {"job_id": job},
            }
            try:
                response = session.post(
                    base_url + "/api/workflows",
                    json=body,
                    headers=headers,
                    timeout=REQUEST_TIMEOUT_S,
                )
            except requests.RequestException as exc:
                outcome.errors.append(f"POST /api/workflows: {type(exc).__name__}: {exc}")
                continue
            if response.status_code != 201:
                outcome.errors.append(
                    f"POST /api/workflows: HTTP {response.status_code}: {response.text[:200]}"
                )
                continue
            jobs[job] = response.json()["workflow_id"]
        outcome.submitted = len(jobs)
        while not deadline.expired and any(fake.receipt(job) is None for job in jobs):
            check_alive()
            time.sleep(0.05)
        time.sleep(0.5)  # a notification sent twice would arrive meanwhile
    finally:
        session.close()
    with db.transaction() as session_db:
        rows = {
            row.id: row
            for row in session_db.execute(
                select(Workflow.id, Workflow.status, Workflow.completed_at).where(
                    Workflow.id.in_(list(jobs.values()))
                )
            )
        }
    for job, workflow_id in jobs.items():
        row, at = rows.get(workflow_id), fake.receipt(job)
        if at is not None:
            outcome.received += 1
        if row is None or row.status != WorkflowStatus.COMPLETED or row.completed_at is None:
            outcome.errors.append(f"workflow {workflow_id}: {row.status if row else 'missing'}")
        elif at is not None:
            outcome.latencies_ms.append((at - row.completed_at.timestamp()) * 1000)
    outcome.duplicates = fake.duplicates
    if outcome.received < workflows:
        outcome.errors.append(
            f"{outcome.received} of {workflows} notifications within {deadline.seconds:g} s"
        )
    if fake.unexpected:
        outcome.errors.append(f"unexpected requests, first: {fake.unexpected[0]}")
    return outcome


def summary(name: str, outcome: EmpropsResult) -> str:
    text = (
        f"{name}, EmProps notifications: {outcome.received} of {outcome.workflows} received "
        f"({outcome.submitted} workflows submitted at {outcome.rate:g}/s; "
        f"{outcome.duplicates} received twice)"
    )
    for error in outcome.errors[:3]:
        text += f"\n  error: {error}"
    return text


def describe() -> str:
    return (
        "EmProps row (EMP Tasks only): one-step workflows with `emprops`, submitted at a "
        "steady rate; the workflow row's completed_at to the receipt of its notification at "
        "a fake EmProps in the bench process (the `emprops` process, as in the Procfile)."
    )
