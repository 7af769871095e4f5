"""The bare Celery side of the benchmark: start a worker subprocess, time N no-op tasks.

The worker runs `celery -A bench.bare_celery worker` with the pool asked for and
two concurrent slots; this process sends the tasks from a thread pool and waits
for every result, so throughput covers the same path as ours: submit, broker,
worker, stored outcome. Then, on the same worker, each workflow shape is sent as
one Celery canvas (chain, chord; the chord's counter kept by the Redis result
backend) and timed from `apply_async` until its final result is back.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.cpu import CpuMeter
from bench.ours import PROGRESS_REPORTS
from bench.stats import BenchError, Deadline, Result, WorkflowResult
from bench.workflows import Shape
from emp_tasks.store.db import ROOT

CONCURRENCY = 2
READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0


def _worker_command(pool: str) -> list[str]:
    from bench import bare_celery

    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "bench.bare_celery",
        "worker",
        "--pool",
        pool,
        "--concurrency",
        str(CONCURRENCY),
        "--without-mingle",
        "--without-gossip",
        "-Q",
        bare_celery.QUEUE,
        "--hostname",
        f"bench-{pool}-{os.getpid()}@%h",
        "--loglevel",
        "WARNING",
    ]


def _stop(process: subprocess.Popen[bytes]) -> None:
    """End the worker and its pool children (it leads its own process group)."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    # Prefork children may outlive a parent killed hard; sweep the group once more.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)


def _tail(log_path: Path, chars: int = 3000) -> str:
    try:
        return log_path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def _wait_until_serving(process: subprocess.Popen[bytes], log_path: Path) -> None:
    """Send one task and wait for its result: the worker is then consuming the queue."""
    from celery.exceptions import TimeoutError as CeleryTimeout

    from bench import bare_celery

    deadline = Deadline(READY_TIMEOUT_S)
    probe = bare_celery.noop.delay(-1)
    while True:
        if process.poll() is not None:
            code = process.returncode
            raise BenchError(f"bare Celery worker exited ({code}):\n{_tail(log_path)}")
        if deadline.expired:
            raise BenchError(f"bare Celery worker silent for {READY_TIMEOUT_S:g} s")
        with contextlib.suppress(CeleryTimeout):
            probe.get(timeout=min(1.0, max(0.1, deadline.remaining())))
            return


def _send_and_collect(
    indexes: range, deadline: Deadline, progress_reports: int = 0
) -> tuple[int, float | None, list[str], float | None]:
    """One client thread: send its share, then wait for each result.

    Returns (results that came back ok, when the last one did, errors, when the first send began).
    Each thread keeps its own AsyncResults: Celery's result backend is thread-local.
    """
    from bench import bare_celery

    first_send = time.perf_counter()
    if progress_reports:
        pending = [bare_celery.progress_noop.delay(i, progress_reports) for i in indexes]
    else:
        pending = [bare_celery.noop.delay(index) for index in indexes]
    done, last, errors = 0, None, []
    for result in pending:
        try:
            value = result.get(timeout=max(0.1, deadline.remaining()))
        except Exception as exc:  # a timeout or a task failure: counted, reported
            errors.append(f"{type(exc).__name__}: {exc}"[:200])
            if deadline.expired:
                break
            continue
        if isinstance(value, dict) and value.get("ok"):
            done += 1
            last = time.perf_counter()
        else:
            errors.append(f"unexpected result {value!r}"[:200])
    return done, last, errors, first_send


def _batch(
    count: int,
    threads: int,
    deadline: Deadline,
    result: Result | None,
    meter: CpuMeter | None = None,
    progress_reports: int = 0,
) -> int:
    """Send `count` tasks from `threads` clients and wait for all; fill `result` if given
    (with the CPU `meter` measured over the batch)."""
    shares = [range(start, count, threads) for start in range(min(threads, count))]
    started = time.perf_counter()
    if meter is not None:
        meter.start()
    with ThreadPoolExecutor(max_workers=len(shares), thread_name_prefix="bench-bare") as pool:
        outcomes = list(
            pool.map(lambda share: _send_and_collect(share, deadline, progress_reports), shares)
        )
    done = sum(outcome[0] for outcome in outcomes)
    if meter is not None and result is not None:
        result.cpu_s = meter.stop()
    if result is not None:
        result.submitted = count
        result.completed = done
        result.failed = count - done
        lasts = [outcome[1] for outcome in outcomes if outcome[1] is not None]
        firsts = [outcome[3] for outcome in outcomes if outcome[3] is not None]
        first = min(firsts, default=started)
        if lasts:
            result.elapsed_s = max(lasts) - first
        for outcome in outcomes:
            result.errors.extend(outcome[2][:3])
        if done != count and not result.errors:
            result.errors.append(f"only {done} of {count} results arrived")
    return done


def _run_workflow(shape: Shape, timeout_s: float) -> WorkflowResult:
    """One `apply_async` of the shape's canvas, then `.get` on its last task's result."""
    from bench import bare_celery

    outcome = WorkflowResult(shape=shape.key, steps=shape.steps, hops=shape.hops)
    signature = shape.celery_signature(bare_celery.noop)
    deadline = Deadline(timeout_s)
    started = time.perf_counter()
    try:
        pending = signature.apply_async()
        outcome.submit_ms = (time.perf_counter() - started) * 1000
        value = pending.get(timeout=max(0.1, deadline.remaining()))
    except Exception as exc:  # a timeout or a task failure: reported
        outcome.errors.append(f"{type(exc).__name__}: {exc}"[:300])
        return outcome
    finished = time.perf_counter()
    if isinstance(value, dict) and value.get("ok"):
        outcome.elapsed_s = finished - started
    else:
        outcome.errors.append(f"unexpected result {value!r}"[:300])
    return outcome


def run(
    redis_url: str,
    pool: str,
    tasks: int,
    threads: int,
    warmup: int,
    timeout_s: float,
    log_path: Path,
    workflows: Sequence[Shape] = (),
    workflow_timeout_s: float = 120.0,
    progress_tasks: int = 0,
    single_submits: int = 0,
    peer_port: int = 0,
) -> Result:
    """Run one bare Celery worker with `pool` and measure `tasks` no-op tasks end to end,
    with the CPU each process used.

    Then `progress_tasks` tasks that report progress as often as the progress row's steps
    do, each of `workflows`, one after another on the drained queue, with its own deadline,
    and `single_submits` POSTs from one client to the Flask peer (bench.flask_peer) on
    `peer_port`.
    """
    os.environ["EMP_BENCH_REDIS_URL"] = redis_url  # for the bare app in this process
    result = Result(name=f"bare Celery ({pool})", requested=tasks)
    env = dict(os.environ, EMP_BENCH_REDIS_URL=redis_url, PYTHONUNBUFFERED="1")
    log = open(log_path, "wb")  # noqa: SIM115 - closed below, after the worker is gone
    process = subprocess.Popen(
        _worker_command(pool),
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    meter = CpuMeter.for_system({"worker": process.pid}, None, redis_url)
    try:
        _wait_until_serving(process, log_path)
        if warmup:
            warmed = _batch(warmup, threads, Deadline(READY_TIMEOUT_S), None)
            if warmed != warmup:
                raise BenchError(f"warm-up: {warmed} of {warmup} tasks came back")
        _batch(tasks, threads, Deadline(timeout_s), result, meter)
        if progress_tasks and result.completed == tasks:
            result.progress = Result(name=result.name, requested=progress_tasks)
            _batch(
                progress_tasks,
                threads,
                Deadline(timeout_s),
                result.progress,
                meter,
                progress_reports=PROGRESS_REPORTS,
            )
        if single_submits:
            from bench import flask_peer  # loads the bare app: EMP_BENCH_REDIS_URL is set now

            with flask_peer.serve(peer_port, log_path.with_name("flask-peer.log")) as base:
                result.single_submit_ms, errors = flask_peer.single_client(base, single_submits)
            result.errors.extend(errors[:3])
        for shape in workflows:
            if process.poll() is not None or result.completed != tasks:
                break  # reported below as not run
            result.workflows[shape.key] = _run_workflow(shape, workflow_timeout_s)
        if process.poll() is not None:
            result.errors.append(f"worker exited ({process.returncode}) during the run")
    except BenchError as exc:
        result.errors.append(str(exc))
    finally:
        _stop(process)
        log.close()
    for shape in workflows:
        if shape.key not in result.workflows:
            skipped = WorkflowResult(shape=shape.key, steps=shape.steps, hops=shape.hops)
            skipped.errors.append(
                "not run: the worker stopped or the tasks before it did not complete"
            )
            result.workflows[shape.key] = skipped
    return result
