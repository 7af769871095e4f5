"""Queues: the recorded routes, their depth and consumers, and steps nobody can serve.

A route is recorded in the `routes` table the first time a step is queued on
it, in the same transaction; after commit a nudge on the `emp:fleet` channel
tells workers to look again, so a capable worker starts consuming a new queue
within a moment. Workers also re-read the table on every heartbeat, so a missed
nudge delays a new queue by one heartbeat at most.

A step's warnings read the fleet's capabilities (`live_capabilities`, cached for
a second); the fleet registry (emp_tasks.workers) forgets the cache when it
changes a worker.

A queue's warnings say why its pending steps do not move: NO_CAPABLE_WORKER (unserved:
no online worker can run them) or STRANDED (a capable worker consuming the queue has a
free slot, nothing of the queue runs, and its oldest pending step has waited longer than
EMP_STRANDED_AFTER_S: its tasks are missing from the broker, or its consumers take none).
"""

from __future__ import annotations

import threading
import time
from datetime import datetime
from typing import Any

from psycopg.types.json import Jsonb
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from emp_tasks.auth import Principal
from emp_tasks.core import priority
from emp_tasks.core.config import get_settings
from emp_tasks.core.status import (
    ACTIVE_STEP_STATUSES,
    LIVE_WORKER_STATUSES,
    NOT_STARTED_STEP_STATUSES,
    StepStatus,
    WorkerStatus,
)
from emp_tasks.core.times import iso
from emp_tasks.routes import routing
from emp_tasks.routes.capabilities import Capabilities
from emp_tasks.routes.routing import Route
from emp_tasks.store import db, redisdb
from emp_tasks.store.models import Route as RouteRow
from emp_tasks.store.models import Step, Worker

FLEET_CHANNEL = "emp:fleet"
"""Pub/sub nudges to workers: a route was added, or a worker's status changed."""

NEW_ROUTES = "emp_new_routes"
_known: set[str] = set()
_known_lock = threading.Lock()


def nudge_workers(reason: str) -> None:
    redisdb.client().publish(FLEET_CHANNEL, reason)


def is_known(queue: str) -> bool:
    """Whether this process knows the queue's route is recorded (`ensure` runs nothing)."""
    with _known_lock:
        return queue in _known


def ensure(tx: db.Tx, step: Any) -> None:
    """Record the step's route if it is new (in the caller's transaction); nudge workers
    after commit."""
    if is_known(step.queue):
        return
    route = route_of(step)
    created = tx.one(
        "INSERT INTO routes (queue, service, customer_id, requirements) VALUES (%s, %s, %s, %s)"
        " ON CONFLICT DO NOTHING RETURNING queue",
        [route.queue, route.service, route.customer_id, Jsonb(route.requirements)],
    )
    info = tx.info
    info.setdefault(NEW_ROUTES, set()).add((route.queue, created is not None))
    tx.after_commit("routes_recorded", lambda: _recorded(info))


def _recorded(info: dict[str, Any]) -> None:
    recorded = info.pop(NEW_ROUTES, set())
    with _known_lock:
        _known.update(queue for queue, _ in recorded)
    if any(created for _, created in recorded):
        nudge_workers("route")


def forget_known() -> None:
    """Forget which routes this process has seen recorded (tests that reset the database)."""
    with _known_lock:
        _known.clear()


def all_routes(session: Session) -> list[Route]:
    rows = session.execute(
        select(RouteRow.queue, RouteRow.service, RouteRow.customer_id, RouteRow.requirements)
    )
    return [Route(row.queue, row.service, row.customer_id, row.requirements) for row in rows]


_ROUTES_KEPT = 10_000
_routes: dict[str, Route] = {}


def route_of(step: Any) -> Route:
    """The route of a step (its row: service, requirements, customer), kept by queue name
    (a queue is one route: its name is the route's digest)."""
    route = _routes.get(step.queue)
    if route is None:
        route = routing.route_for(step.service, step.requirements, step.customer_id)
        if len(_routes) >= _ROUTES_KEPT:
            _routes.clear()
        _routes[route.queue] = route
    return route


# --- steps nobody can serve ----------------------------------------------------------------


def warnings_for(route: Route, fleet: list[tuple[str, Capabilities]]) -> list[dict[str, Any]]:
    """Why no worker will take the route's steps, as API warnings; [] when one can.

    `fleet`: (status, capabilities) of each worker that is online or draining.
    """
    accepting = [caps for status, caps in fleet if status == WorkerStatus.ONLINE]
    lacking = [routing.unmet(caps, route) for caps in accepting]
    if any(not missing for missing in lacking):
        return []
    if any(not routing.unmet(caps, route) for status, caps in fleet):
        return [
            {
                "code": "NO_CAPABLE_WORKER",
                "message": "every worker that can run this step is draining",
                "unmet": [],
            }
        ]
    if not accepting:
        return [
            {
                "code": "NO_CAPABLE_WORKER",
                "message": "no worker is online; the step runs when a capable one joins",
                "unmet": [],
            }
        ]
    shared = [phrase for phrase in lacking[0] if all(phrase in other for other in lacking[1:])]
    if shared:
        message = "no online worker has " + "; ".join(shared)
        unmet = shared
    else:
        unmet = sorted({phrase for missing in lacking for phrase in missing})
        message = "no single online worker meets all of: " + "; ".join(unmet)
    return [
        {
            "code": "NO_CAPABLE_WORKER",
            "message": message + "; the step runs when a capable worker joins",
            "unmet": unmet,
        }
    ]


def stranded_warning(
    *,
    waiting: int,
    running: int,
    oldest_pending_s: float,
    free_consumers: int,
    broker_depth: int,
    after_s: float,
) -> dict[str, Any] | None:
    """The STRANDED warning of a queue whose pending steps should be running and are not.

    `free_consumers`: online workers consuming the queue, capable of its steps, with a free
    slot. None while nothing is wrong: no step waits, one of the queue's runs, no consumer
    has room (a busy fleet; or none consumes it yet: a worker that just joined takes its
    queues at its next heartbeat), or the oldest pending step is younger than `after_s`.
    """
    if not waiting or running or not free_consumers or oldest_pending_s <= after_s:
        return None
    if broker_depth:
        why = f"{free_consumers} consumer(s) with a free slot take none of its {broker_depth} tasks"
    else:
        why = (
            f"{free_consumers} consumer(s) with a free slot, but the broker holds no task for"
            " them (purged?); the relay sends them again"
        )
    return {
        "code": "STRANDED",
        "message": (
            f"{waiting} pending, none running, oldest waiting {oldest_pending_s:.0f} s: {why}"
        ),
        "unmet": [],
    }


def step_warnings(step: Any) -> list[dict[str, Any]]:
    """Warnings for a step that waits for a worker (pending or waiting); [] otherwise."""
    if step.status not in NOT_STARTED_STEP_STATUSES:
        return []
    return warnings_for(route_of(step), live_capabilities())


_LIVE_CACHE_S = 1.0
_live_cache: tuple[float, list[tuple[str, Capabilities]]] = (0.0, [])
_live_lock = threading.Lock()


def live_capabilities() -> list[tuple[str, Capabilities]]:
    """(status, capabilities) of online and draining workers, cached for a second."""
    global _live_cache
    with _live_lock:
        stamp, cached = _live_cache
        if time.monotonic() - stamp < _LIVE_CACHE_S:
            return cached
    with db.transaction() as session:
        rows = session.execute(
            select(Worker.status, Worker.capabilities).where(
                Worker.status.in_(LIVE_WORKER_STATUSES)
            )
        ).all()
    fresh = [(row.status, Capabilities.from_dict(row.capabilities)) for row in rows]
    with _live_lock:
        _live_cache = (time.monotonic(), fresh)
    return fresh


def forget_live() -> None:
    """This process changed the fleet: its cached view is stale."""
    global _live_cache
    with _live_lock:
        _live_cache = (0.0, [])


# --- listing -------------------------------------------------------------------------------


def _broker_depths(names: list[str]) -> dict[str, int]:
    """Messages waiting in each queue's Redis lists (one list per broker priority level)."""
    if not names:
        return {}
    client = redisdb.client(get_settings().broker_url)
    pipe = client.pipeline(transaction=False)
    levels = range(priority.BROKER_PRIORITY_LEVELS)
    for name in names:
        for level in levels:
            pipe.llen(f"{name}:{level}" if level else name)
    lengths = pipe.execute()
    width = len(levels)
    return {name: sum(lengths[i * width : (i + 1) * width]) for i, name in enumerate(names)}


def _age_s(clock: datetime, since: datetime | None) -> float:
    """Seconds since `since` by the database's clock (0: none, or a retry not due yet)."""
    return round(max(0.0, (clock - since).total_seconds()), 3) if since else 0.0


def list_queues(principal: Principal, include_idle: bool = False) -> list[dict[str, Any]]:
    """Each route's queue: steps waiting (depth, oldest pending and its age) and running,
    its consumers, its warnings (NO_CAPABLE_WORKER, STRANDED).

    Idle queues (nothing waiting or running, no consumer) are left out unless asked for.
    """
    with db.transaction() as session:
        routes = all_routes(session)
        pending = {
            row.queue: (row.count, row.oldest)
            for row in session.execute(
                select(
                    Step.queue,
                    func.count().label("count"),
                    func.min(Step.queued_at).label("oldest"),
                )
                .where(Step.status == StepStatus.PENDING)
                .group_by(Step.queue)
            )
        }
        running = dict(
            session.execute(
                select(Step.queue, func.count())
                .where(Step.status.in_(ACTIVE_STEP_STATUSES))
                .group_by(Step.queue)
            ).all()
        )
        live = session.execute(
            select(
                Worker.id, Worker.status, Worker.queues, Worker.capabilities, Worker.concurrency
            ).where(Worker.status.in_(LIVE_WORKER_STATUSES))
        ).all()
        busy_workers = dict(
            session.execute(
                select(Step.worker_id, func.count())
                .where(
                    Step.worker_id.in_([w.id for w in live]),
                    Step.status.in_(ACTIVE_STEP_STATUSES),
                )
                .group_by(Step.worker_id)
            ).all()
        )
        clock = session.scalar(select(func.now()))
    fleet = [(w.status, Capabilities.from_dict(w.capabilities)) for w in live]
    consumers: dict[str, list[str]] = {}
    for worker in live:
        for name in worker.queues or []:
            consumers.setdefault(name, []).append(worker.id)
    free = [
        (worker.id, caps)
        for worker, (status, caps) in zip(live, fleet, strict=True)
        if status == WorkerStatus.ONLINE and busy_workers.get(worker.id, 0) < worker.concurrency
    ]
    after_s = get_settings().stranded_after_s
    busy = set(pending) | set(running) | set(consumers)
    shown = [
        route
        for route in routes
        if principal.admin or route.customer_id == principal.customer_id
        if include_idle or route.queue in busy
    ]
    shown.sort(key=lambda r: (-pending.get(r.queue, (0, None))[0], r.service, r.queue))
    depths = _broker_depths([route.queue for route in shown])
    result = []
    for route in shown:
        waiting, oldest = pending.get(route.queue, (0, None))
        oldest_s = _age_s(clock, oldest)
        warnings = warnings_for(route, fleet) if waiting else []
        stranded = None
        if waiting and not warnings:
            serving = set(consumers.get(route.queue, []))
            capable = [w for w, caps in free if w in serving and not routing.unmet(caps, route)]
            stranded = stranded_warning(
                waiting=waiting,
                running=running.get(route.queue, 0),
                oldest_pending_s=oldest_s,
                free_consumers=len(capable),
                broker_depth=depths.get(route.queue, 0),
                after_s=after_s,
            )
        entry: dict[str, Any] = {
            "name": route.queue,
            "service": route.service,
            "customer_id": route.customer_id,
            "requirements": route.requirements,
            "depth": waiting,
            "broker_depth": depths.get(route.queue, 0),
            "running": running.get(route.queue, 0),
            "oldest_pending_at": iso(oldest),
            "oldest_pending_s": oldest_s,
            "consumers": len(consumers.get(route.queue, [])),
            "warnings": [*warnings, stranded] if stranded else warnings,
        }
        if principal.admin:
            entry["consumer_ids"] = sorted(consumers.get(route.queue, []))
        result.append(entry)
    return result
