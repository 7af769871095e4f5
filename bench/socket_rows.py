"""The WebSocket cap rows (EMP Tasks only): REST latency beside idle WebSockets.

A web process of its own (`emp api`: one gunicorn worker with the shipped
EMP_WEB_THREADS default, the default socket caps) on the scratch run. REST is
`GET /api/steps` by a key that holds no socket, REST_REQUESTS requests from
REST_THREADS client threads. It is timed idle, then while SOCKETS sockets attempted
by one key are held open and idle, then while SOCKETS sockets attempted over as many
keys as EMP_WS_MAX_PER_KEY needs are held (the process's cap refuses the rest), and
last while SOCKETS requests wait with `Prefer: wait=60` on a workflow that does not end
(no worker runs in this process group): those granted a slot hold it, the others are
answered at once; the workflow is cancelled after REST was timed, which ends the waits.
Every connection and request is to 127.0.0.1 and has a deadline.
"""

from __future__ import annotations

import collections
import contextlib
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import requests
import simple_websocket

from bench import ours
from bench.live_rows import Socket, socket_keys
from bench.scratch import Scratch
from bench.stats import BenchError, Deadline
from emp_tasks.supervisor import ProcessGroup

SOCKETS = 200  # attempted per loaded phase
WEB_THREADS = 32  # the shipped EMP_WEB_THREADS default
REST_REQUESTS = 300
REST_THREADS = 8
CONNECT_THREADS = 16
PHASE_TIMEOUT_S = 60.0  # to connect a phase's sockets, and for them to be released after
REQUEST_TIMEOUT_S = 10.0
START_TIMEOUT_S = 60.0


@dataclass
class SocketPhase:
    """REST latency while `accepted` of `attempted` idle sockets (from `keys` keys) are open."""

    label: str
    attempted: int = 0
    keys: int = 0
    accepted: int = 0
    refused: collections.Counter[int] = field(default_factory=collections.Counter)  # by status
    waiting: int = 0  # `Prefer: wait` requests that were granted a wait (waits phase)
    rest_ms: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors and len(self.rest_ms) == REST_REQUESTS


@dataclass
class SocketResult:
    """The phases, in order, and the caps the web process ran with."""

    web_threads: int = WEB_THREADS
    per_key: int | None = None
    per_process: int | None = None
    phases: list[SocketPhase] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors and bool(self.phases) and all(p.ok for p in self.phases)


def _rest_latencies(base_url: str, key: str, outcome: SocketPhase) -> None:
    """Time REST_REQUESTS `GET /api/steps` by `key`, one keep-alive session per thread."""
    sessions: list[requests.Session] = []

    def batch(count: int) -> tuple[list[float], list[str]]:
        session = requests.Session()
        sessions.append(session)
        times, errors = [], []
        for _ in range(count):
            started = time.perf_counter()
            try:
                answer = session.get(
                    base_url + "/api/steps",
                    params={"limit": 1},
                    headers={"Authorization": f"Bearer {key}"},
                    timeout=REQUEST_TIMEOUT_S,
                )
            except requests.RequestException as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
                continue
            if answer.status_code == 200:
                times.append((time.perf_counter() - started) * 1000)
            else:
                errors.append(f"HTTP {answer.status_code}: {answer.text[:200]}")
        return times, errors

    shares = [REST_REQUESTS // REST_THREADS] * REST_THREADS
    shares[0] += REST_REQUESTS - sum(shares)
    try:
        with ThreadPoolExecutor(REST_THREADS, "bench-rest") as pool:
            for times, errors in pool.map(batch, shares):
                outcome.rest_ms.extend(times)
                if errors:
                    outcome.errors.append(f"{len(errors)} REST requests failed: {errors[0]}")
    finally:
        for session in sessions:
            session.close()


def _open(ws_url: str, keys: list[str], outcome: SocketPhase) -> list[Socket]:
    """Attempt SOCKETS sockets spread over `keys`; count the accepted and the refused."""
    deadline = Deadline(PHASE_TIMEOUT_S)
    outcome.attempted, outcome.keys = SOCKETS, len(keys)

    def one(index: int) -> Socket | int | str:
        url = f"{ws_url}/ws?token={keys[index % len(keys)]}"
        try:
            return Socket(url, lambda raw, arrived_ms: None, max(0.1, deadline.remaining()))
        except simple_websocket.ConnectionError as exc:
            return exc.status_code or f"connection error: {exc}"
        except OSError as exc:
            return f"{type(exc).__name__}: {exc}"

    with ThreadPoolExecutor(CONNECT_THREADS, "bench-sockets") as pool:
        answers = list(pool.map(one, range(SOCKETS)))
    opened = [answer for answer in answers if isinstance(answer, Socket)]
    outcome.accepted = len(opened)
    outcome.refused.update(answer for answer in answers if isinstance(answer, int))
    failures = [answer for answer in answers if isinstance(answer, str)]
    if failures:
        outcome.errors.append(f"{len(failures)} sockets failed, first: {failures[0]}")
    return opened


def _open_sockets(ws_url: str, admin_key: str) -> tuple[int, int, int]:
    """(open, per-key cap, process cap) from the admin snapshot; its own socket not counted."""
    deadline = Deadline(PHASE_TIMEOUT_S)
    while True:
        with contextlib.suppress(simple_websocket.ConnectionError, OSError):
            client = simple_websocket.Client.connect(f"{ws_url}/ws?token={admin_key}")
            try:
                client.send(json.dumps({"type": "snapshot"}))
                while (raw := client.receive(timeout=max(0.1, deadline.remaining()))) is not None:
                    message = json.loads(raw)
                    if message.get("type") == "snapshot":
                        sockets = message["sockets"]
                        return sockets["open"] - 1, sockets["max_per_key"], sockets["max"]
            finally:
                client.close()
        if deadline.expired:
            raise BenchError(f"no admin snapshot within {deadline.seconds:g} s")
        time.sleep(0.1)


def _drain(ws_url: str, admin_key: str) -> None:
    """Wait until the web process has released every socket of the phase before."""
    deadline = Deadline(PHASE_TIMEOUT_S)
    while _open_sockets(ws_url, admin_key)[0] > 0:
        if deadline.expired:
            raise BenchError(f"sockets still open {deadline.seconds:g} s after closing them")
        time.sleep(0.05)


def _phase(
    base_url: str, label: str, rest_key: str, keys: list[str], admin_key: str
) -> SocketPhase:
    """Open the phase's sockets (none without keys), time REST, close them, wait for release."""
    outcome = SocketPhase(label)
    ws_url = base_url.replace("http://", "ws://", 1)
    opened = _open(ws_url, keys, outcome) if keys else []
    try:
        _rest_latencies(base_url, rest_key, outcome)
    finally:
        for client in opened:
            with contextlib.suppress(simple_websocket.ConnectionClosed, OSError):
                client.close()
    if opened:
        _drain(ws_url, admin_key)
    return outcome


def _wait_phase(base_url: str, label: str, rest_key: str, keys: list[str]) -> SocketPhase:
    """REST latency while SOCKETS `Prefer: wait=60` requests wait on a pending workflow."""
    outcome = SocketPhase(label, attempted=SOCKETS, keys=len(keys))
    created = requests.post(
        base_url + "/api/workflows",
        json={"name": "bench waits", "steps": [{"service": "simulation", "payload": {}}]},
        headers={"Authorization": f"Bearer {keys[0]}"},
        timeout=REQUEST_TIMEOUT_S,
    )
    if created.status_code != 201:
        outcome.errors.append(f"POST /api/workflows: HTTP {created.status_code}")
        return outcome
    workflow_id = created.json()["workflow_id"]

    def one(index: int) -> str:
        key = keys[index % len(keys)]
        response = requests.get(
            f"{base_url}/api/workflows/{workflow_id}",
            headers={"Authorization": f"Bearer {key}", "Prefer": "wait=60"},
            timeout=90,
        )
        return response.headers.get("Preference-Applied", "") if response.ok else "error"

    with ThreadPoolExecutor(SOCKETS, thread_name_prefix="bench-wait") as pool:
        futures = [pool.submit(one, index) for index in range(SOCKETS)]
        time.sleep(2.0)  # the granted ones are holding their threads now
        _rest_latencies(base_url, rest_key, outcome)
        requests.post(
            f"{base_url}/api/workflows/{workflow_id}/cancel",
            json={"reason": "bench: end the waits"},
            headers={"Authorization": f"Bearer {keys[0]}"},
            timeout=REQUEST_TIMEOUT_S,
        )
        answers = [future.result() for future in futures]
    outcome.waiting = sum(answer == "wait=60" for answer in answers)
    outcome.accepted = outcome.waiting
    if "error" in answers:
        outcome.errors.append(f"{answers.count('error')} waiting requests failed")
    return outcome


def _check_alive(group: ProcessGroup, log_path: Path) -> None:
    code = group.processes["web"].poll()
    if code is not None:
        tail = log_path.read_text(errors="replace")[-3000:]
        raise BenchError(f"the web process exited with {code}:\n{tail}")


def run(run: Scratch, log_path: Path) -> SocketResult:
    """Start a web process on the scratch run, measure the three phases, stop it."""
    ours.use_scratch(run)
    result = SocketResult()
    port = ours.free_port()
    env = {**ours.process_env(run, port), "EMP_WEB_THREADS": str(WEB_THREADS)}
    env["EMP_WEB_WORKERS"] = "1"
    base_url = f"http://127.0.0.1:{port}"
    log = open(log_path, "w")  # noqa: SIM115 - closed below, after the process is gone
    group = ProcessGroup(env, names=["web"], output=log)
    try:
        group.start()
        deadline = Deadline(START_TIMEOUT_S)
        while True:
            _check_alive(group, log_path)
            with contextlib.suppress(requests.RequestException):
                if requests.get(base_url + "/health/ready", timeout=1).status_code == 200:
                    break
            if deadline.expired:
                raise BenchError(f"/health/ready not 200 within {deadline.seconds:g} s")
            time.sleep(0.2)
        ws_url = base_url.replace("http://", "ws://", 1)
        _, result.per_key, result.per_process = _open_sockets(ws_url, ours.API_KEY)
        rest_key = socket_keys(1, admin=False)[0]
        _rest_latencies(base_url, rest_key, SocketPhase("warm-up"))  # connections, caches
        one_key = socket_keys(1, admin=False)
        spread = socket_keys(SOCKETS, admin=False)
        phases = [
            ("none", []),
            (f"{SOCKETS} attempted by one key", one_key),
            (f"{SOCKETS} attempted over {len(spread)} keys", spread),
        ]
        for label, keys in phases:
            result.phases.append(_phase(base_url, label, rest_key, keys, ours.API_KEY))
            _check_alive(group, log_path)
        waits = f"{SOCKETS} requests waiting with Prefer: wait=60 over {len(spread)} keys"
        result.phases.append(_wait_phase(base_url, waits, rest_key, spread))
        _check_alive(group, log_path)
    except BenchError as exc:
        result.errors.append(str(exc))
    finally:
        group.stop()
        log.close()
    return result
