"""The warm placement rows (EMP Tasks only): a mixed-model run with affinity on and off.

On the scratch run, after the other rows: `web` and `relay`, and two workers (threads,
concurrency 1) serving one simulation service with two models, loading a model in
EMP_SIM_MODEL_LOAD_S = LOAD_S. BURSTS bursts of BURST steps alternate between the two
models (each step names its model in `requirements.models` and `payload.model`, runs
STEP_S); a burst is submitted when the last one completed. Once with EMP_AFFINITY on,
once off (the web process restarted with it; the workers keep what they loaded). The
rows: model loads (attempts with `cold_start`) per 100 steps, and the run's wall time
from the first submit to the last completion.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests
from sqlalchemy import func, select

from bench import ours
from bench.scratch import Scratch
from bench.stats import DASH, BenchError, Deadline, only_ours
from emp_tasks import workers
from emp_tasks.store import db
from emp_tasks.store.models import Attempt, Step
from emp_tasks.supervisor import ProcessGroup

SERVICE = "bench-warm"
MODELS = ["bench-model-a", "bench-model-b"]
BURSTS = 12
BURST = 4
STEP_S = 0.02
LOAD_S = 1.0
TIMEOUT_S = 180.0


@dataclass
class AffinityRun:
    affinity: bool
    steps: int = 0
    loads: int = 0
    elapsed_s: float | None = None
    errors: list[str] = field(default_factory=list)

    @property
    def loads_per_100(self) -> float | None:
        return 100 * self.loads / self.steps if self.steps else None


@dataclass
class AffinityResult:
    runs: list[AffinityRun] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors and len(self.runs) == 2 and not any(r.errors for r in self.runs)


def _worker_env(run: Scratch, port: int, worker_id: str) -> dict[str, str]:
    return {
        **ours.process_env(run, port),
        "EMP_WORKER_ID": worker_id,
        "EMP_MACHINE_ID": f"{worker_id}-machine",
        "EMP_WORKER_CONCURRENCY": "1",
        "EMP_WORKER_SERVICES": SERVICE,
        "EMP_CONNECTORS": json.dumps({SERVICE: "simulation"}),
        "EMP_WORKER_MODELS": json.dumps({SERVICE: MODELS}),
        "EMP_WORKER_GPU_MEMORY_GB": "24",
        "EMP_SIM_MODEL_LOAD_S": str(LOAD_S),
    }


def _submit(session: requests.Session, base_url: str, model: str) -> str:
    response = session.post(
        base_url + "/api/steps",
        json={
            "service": SERVICE,
            "payload": {"model": model, "duration_s": STEP_S},
            "requirements": {"models": [model]},
        },
        headers={"Authorization": f"Bearer {ours.API_KEY}"},
        timeout=30,
    )
    if response.status_code != 201:
        raise BenchError(f"POST /api/steps: HTTP {response.status_code}: {response.text[:200]}")
    return response.json()["step_id"]


def _completed(ids: list[str]) -> int:
    with db.transaction() as session:
        return session.scalar(
            select(func.count()).where(Step.id.in_(ids), Step.status == "completed")
        )


def _measure(base_url: str, outcome: AffinityRun) -> None:
    session = requests.Session()
    deadline = Deadline(TIMEOUT_S)
    ids: list[str] = []
    started = time.perf_counter()
    for burst in range(BURSTS):
        batch = [_submit(session, base_url, MODELS[burst % 2]) for _ in range(BURST)]
        ids += batch
        while _completed(batch) < len(batch):
            if deadline.expired:
                raise BenchError(f"affinity {'on' if outcome.affinity else 'off'}: timed out")
            time.sleep(0.02)
    outcome.elapsed_s = time.perf_counter() - started
    outcome.steps = len(ids)
    with db.transaction() as session_db:
        outcome.loads = session_db.scalar(
            select(func.count()).where(Attempt.step_id.in_(ids), Attempt.cold_start.is_(True))
        )


def _start(env: dict[str, str], names: list[str], log) -> ProcessGroup:
    return ProcessGroup(env, names=names, output=log).start()


def run(scratch: Scratch, log_path: Path) -> AffinityResult:
    ours.use_scratch(scratch)
    result = AffinityResult()
    port = ours.free_port()
    base_url = f"http://127.0.0.1:{port}"
    log = open(log_path, "w")  # noqa: SIM115 - closed below, after the processes are gone
    groups: list[ProcessGroup] = []
    try:
        for worker_id in ("bench-warm-1", "bench-warm-2"):
            groups.append(_start(_worker_env(scratch, port, worker_id), ["worker"], log))
        deadline = Deadline(ours.START_TIMEOUT_S)
        while workers.online_count() < 2:  # the other rows' worker has stopped by now
            if deadline.expired:
                raise BenchError("the two warm-placement workers did not come online")
            time.sleep(0.2)
        for affinity in (True, False):
            env = {**ours.process_env(scratch, port), "EMP_AFFINITY": "on" if affinity else "off"}
            front = _start(env, ["web", "relay"], log)
            outcome = AffinityRun(affinity=affinity)
            try:
                ours._System(front, log_path).wait_ready(base_url, Deadline(ours.START_TIMEOUT_S))
                _measure(base_url, outcome)
            except BenchError as exc:
                outcome.errors.append(str(exc))
            finally:
                front.stop()
            result.runs.append(outcome)
    except BenchError as exc:
        result.errors.append(str(exc))
    finally:
        for group in groups:
            group.stop()
        log.close()
    return result


def rows(result: AffinityResult | None, baselines: int) -> list[list[str]]:
    if result is None:
        return []
    out = []
    for run in result.runs:
        state = "on" if run.affinity else "off"
        label = f"mixed models, {run.steps or BURSTS * BURST} steps, affinity {state}"
        ok = not run.errors and run.elapsed_s is not None
        loads = f"{run.loads_per_100:.1f}" if ok and run.loads_per_100 is not None else DASH
        elapsed = f"{run.elapsed_s:.2f}" if ok else DASH
        out.append(only_ours(f"{label}: model loads per 100 steps", loads, baselines))
        out.append(only_ours(f"{label}: first submit to last completed (s)", elapsed, baselines))
    return out


def summary(result: AffinityResult) -> str:
    parts = [
        f"affinity {'on' if r.affinity else 'off'}: {r.loads} loads in {r.steps} steps"
        for r in result.runs
    ]
    text = "EMP Tasks, warm placement: " + "; ".join(parts)
    for error in (result.errors + [e for r in result.runs for e in r.errors])[:3]:
        text += f"\n  error: {error}"
    return text


NOTE = (
    f"Warm placement rows (EMP Tasks only): two workers (concurrency 1) of one simulation "
    f"service holding one model at a time, loading one in {LOAD_S:g} s; {BURSTS} bursts of "
    f"{BURST} {STEP_S:g} s steps alternating between two models, each burst after the last "
    "completed; once with EMP_AFFINITY on and once off (web and relay restarted with it); "
    "EMP_AFFINITY_WAIT_MS at its default (500): a burst longer than that on the warm worker "
    "also loads the model on the other."
)
