"""Warm placement: a step naming models goes to a worker that has them loaded.

Loading a model is the costliest part of a GPU step after the generation. A step whose
`requirements.models` names models is sent, when it is queued, to one capable online
worker's own queue (`emp.worker.<id>`, which every worker consumes beside its routes)
instead of its route's shared queue:

1. a *warm* worker: its backend holds every model (`workers.loaded_models`, written by
   the worker after each attempt), or it was just chosen to load them (a claim in Redis
   for CLAIM_S, so that a burst of one model goes to one worker while it loads);
   the least loaded of them (running steps and tasks waiting in its own queue, per slot);
2. otherwise a worker that can load them: an idle one first, preferring one whose
   loaded models another worker holds too (so the fleet keeps one warm copy of each);
3. otherwise (no capable worker online) the shared queue, as without placement.

Every step sent to a worker's own queue gets a deadline EMP_AFFINITY_WAIT_MS away
(emp_tasks.steps.affinity): if it has not started by then, its task is also put on the
shared queue, where any capable worker takes it (the copy left behind is dropped by
`attempts.begin`). So a step never waits longer than that on a busy warm worker while
another can run it, and a step sent to a worker that died is recovered like any other.
Routing rules (capabilities, customer isolation) are those of the shared queue: only
workers that may consume the step's route are candidates. `EMP_AFFINITY=off` turns
placement off.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from emp_tasks.core.config import get_settings
from emp_tasks.core.status import ACTIVE_STEP_STATUSES, WorkerStatus
from emp_tasks.routes import queues, routing
from emp_tasks.routes.capabilities import Capabilities
from emp_tasks.store import census, redisdb
from emp_tasks.store.db import Tx

CLAIM_S = 10.0
CLAIM_KEY = "emp:warming:{worker}"
"""A worker chosen to load models, per service: warm for placement until it reports them
loaded (the worker then deletes it) or CLAIM_S pass."""
LOAD_TIMES = "emp:model-load-ms"
"""The last load time of each `<service>|<model>` (workers write it after a load)."""
DEADLINES = "emp:affinity"
"""Steps sent to a worker's own queue, scored by when they go to the shared queue too."""
_ACTIVE = [status.value for status in ACTIVE_STEP_STATUSES]


def models_of(step: Any) -> list[str]:
    """The models a step names (`requirements.models`), sorted; [] for none."""
    named = (step.requirements or {}).get("models") or []
    return sorted({str(model) for model in named if isinstance(model, str)})


@dataclass
class Candidate:
    worker_id: str
    concurrency: int
    busy: int
    loaded: list[str]
    queued: int = 0
    claimed: list[str] | None = None

    @property
    def load(self) -> float:
        return (self.busy + self.queued) / max(1, self.concurrency)

    def holds(self, models: list[str]) -> bool:
        have = set(self.loaded) | set(self.claimed or [])
        return set(models) <= have


def _candidates(tx: Tx, step: Any) -> list[Candidate]:
    route = queues.route_of(step)
    rows = tx.all(
        "SELECT w.id, w.capabilities, w.concurrency, w.loaded_models,"
        " (SELECT count(*) FROM steps s WHERE s.worker_id = w.id AND s.status = ANY(%s)) AS busy"
        " FROM workers w WHERE w.status = %s ORDER BY w.id",
        [_ACTIVE, WorkerStatus.ONLINE.value],
    )
    found = []
    for row in rows:
        if routing.unmet(Capabilities.from_dict(row.capabilities or {}), route):
            continue
        loaded = (row.loaded_models or {}).get(step.service) or []
        found.append(Candidate(row.id, row.concurrency, row.busy, list(loaded)))
    return found


def _with_broker_state(candidates: list[Candidate], service: str) -> None:
    """Tasks already waiting in each candidate's own queue, and its loading claim."""
    waiting = census.depths([routing.worker_queue(c.worker_id) for c in candidates])
    events = redisdb.client().pipeline(transaction=False)
    for candidate in candidates:
        events.hget(CLAIM_KEY.format(worker=candidate.worker_id), service)
    claims = events.execute()
    for index, candidate in enumerate(candidates):
        candidate.queued = waiting[routing.worker_queue(candidate.worker_id)]
        raw = claims[index]
        candidate.claimed = json.loads(raw) if raw else None


def _hold(tx: Tx, step_id: str, loading_ms: int = 0) -> None:
    wait_s = (get_settings().affinity_wait_ms + loading_ms) / 1000

    def deadline() -> None:
        redisdb.client().zadd(DEADLINES, {step_id: time.time() + wait_s})

    tx.after_commit(f"affinity:{step_id}", deadline)


def due(limit: int = 500) -> list[str]:
    """Steps whose time on a worker's own queue is up (taken off the deadline set)."""
    client = redisdb.client()
    ids = client.zrangebyscore(DEADLINES, "-inf", time.time(), start=0, num=limit)
    if ids:
        client.zrem(DEADLINES, *ids)
    return list(ids)


def loaded_reported(worker_id: str) -> None:
    """The worker published what it holds: its loading claims are over."""
    redisdb.client().delete(CLAIM_KEY.format(worker=worker_id))


def record_load_time(service: str, model: str, load_ms: int) -> None:
    """A worker loaded `model`: how long that took, for the next deadlines."""
    redisdb.client().hset(LOAD_TIMES, f"{service}|{model}", int(load_ms))


def _load_time_ms(service: str, models: list[str]) -> int:
    times = redisdb.client().hmget(LOAD_TIMES, [f"{service}|{model}" for model in models])
    return max((int(t) for t in times if t is not None), default=0)


def choose(tx: Tx, step: Any) -> str | None:
    """The own queue of the worker a step naming models should go to (its deadline held
    for after the commit); None: its route's shared queue.

    A step sent to a worker that still has to load its models (it was chosen to, or is
    loading them) may wait that long more: loading them on another worker would take as
    long. Only the wait on a warm worker is bounded by EMP_AFFINITY_WAIT_MS alone."""
    chosen = _choose(tx, step)
    if chosen is None:
        return None
    target, warm = chosen
    loading = 0 if warm else _load_time_ms(step.service, models_of(step))
    _hold(tx, step.id, loading)
    return target


def may_choose(step: Any) -> bool:
    """Whether `choose` looks for a warm worker for this step (else it runs no statement)."""
    return get_settings().affinity and bool(models_of(step))


def _choose(tx: Tx, step: Any) -> tuple[str, bool] | None:
    if not may_choose(step):
        return None
    models = models_of(step)
    candidates = _candidates(tx, step)
    if not candidates:
        return None
    _with_broker_state(candidates, step.service)
    warm = [c for c in candidates if c.holds(models)]
    if warm:
        chosen = min(warm, key=lambda c: (c.load, c.worker_id))
        return routing.worker_queue(chosen.worker_id), set(models) <= set(chosen.loaded)
    held_elsewhere = {
        model: sum(model in c.loaded for c in candidates) for c in candidates for model in c.loaded
    }

    def redundancy(c: Candidate) -> int:
        # 0 when every model it holds is held by another worker too (or it holds none)
        return sum(1 for model in c.loaded if held_elsewhere.get(model, 0) <= 1)

    chosen = min(candidates, key=lambda c: (c.load > 0, c.load, redundancy(c), c.worker_id))
    claim = CLAIM_KEY.format(worker=chosen.worker_id)
    pipe = redisdb.client().pipeline(transaction=False)
    pipe.hset(claim, step.service, json.dumps(models))
    pipe.expire(claim, int(CLAIM_S))
    pipe.execute()
    return routing.worker_queue(chosen.worker_id), False
