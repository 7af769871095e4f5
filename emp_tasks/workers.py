"""The fleet registry: machines and workers in PostgreSQL, and every change to them.

A worker registers when it starts (`register`: `worker_online`), heartbeats while
it runs (`heartbeat`), and says goodbye when it stops (`stop`: `worker_offline`).
The relay's reconcile loop marks a worker that went silent for its lease timeout
offline (`mark_silent_offline`) and re-queues the steps it was running. Operators
drain and resume workers and remove machines; each change records a
`worker_status_changed` event and nudges the worker over `emp:fleet`.

Statuses: `online` (takes work) -> `draining` (finishes what it runs, takes
nothing new) -> `online` again on resume; `offline` (stopped or silent);
`removed` (its machine was deleted; it takes nothing until it registers again).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from psycopg.types.json import Jsonb
from sqlalchemy import func, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from emp_tasks import __version__
from emp_tasks.core.errors import InvalidState, NotFound
from emp_tasks.core.events import EventType
from emp_tasks.core.status import ACTIVE_STEP_STATUSES, LIVE_WORKER_STATUSES, WorkerStatus
from emp_tasks.core.times import now
from emp_tasks.routes import queues
from emp_tasks.routes.capabilities import Capabilities
from emp_tasks.steps import recovery
from emp_tasks.store import db, outbox
from emp_tasks.store.models import Machine, Step, Worker

logger = logging.getLogger(__name__)

W = WorkerStatus


def aggregate(worker_id: str) -> str:
    return f"worker:{worker_id}"


def _record(session: Session, worker: Worker, event_type: EventType, data: dict[str, Any]) -> None:
    outbox.record(
        db.Tx.of(session),
        event_type,
        aggregate=aggregate(worker.id),
        data={"worker_id": worker.id, "machine_id": worker.machine_id, **data},
        machine_id=worker.machine_id,
        worker_id=worker.id,
    )


def _set_status(
    session: Session, worker: Worker, status: WorkerStatus, reason: str | None
) -> WorkerStatus:
    previous = WorkerStatus(worker.status)
    worker.status = status
    worker.status_reason = reason
    worker.updated_at = now()
    if status == W.OFFLINE:
        worker.stopped_at = now()
        _record(
            session,
            worker,
            EventType.WORKER_OFFLINE,
            {"status": status.value, "previous": previous.value, "reason": reason},
        )
    else:
        _record(
            session,
            worker,
            EventType.WORKER_STATUS_CHANGED,
            {"status": status.value, "previous": previous.value, "reason": reason},
        )
    return previous


# --- the worker's side ---------------------------------------------------------------------


def register(
    worker_id: str,
    machine_id: str,
    caps: Capabilities,
    *,
    hostname: str | None = None,
    pid: int | None = None,
    pool: str | None = None,
    concurrency: int = 1,
    heartbeat_timeout_s: float = 60.0,
) -> WorkerStatus:
    """A worker process started: record it online (a drained worker stays draining).

    Steps still assigned to an earlier process with the same worker id are not
    running any more; they are re-queued at once instead of waiting for their lease.
    """
    with db.transaction() as session:
        # The workers of one machine (one per GPU) register at the same moment: upsert.
        session.execute(
            insert(Machine)
            .values(id=machine_id, hostname=hostname)
            .on_conflict_do_update(
                index_elements=[Machine.id],
                set_={"hostname": hostname, "last_seen_at": func.now(), "removed_at": None},
            )
        )
        worker = session.get(Worker, worker_id, with_for_update=True)
        fresh = worker is None
        if worker is None:
            worker = Worker(id=worker_id, machine_id=machine_id, status=W.OFFLINE, queues=[])
            session.add(worker)
        status = W.DRAINING if worker.status == W.DRAINING else W.ONLINE
        worker.machine_id = machine_id
        worker.status = status
        worker.status_reason = "registered"
        worker.capabilities = caps.as_dict()
        worker.hostname = hostname
        worker.pid = pid
        worker.pool = pool
        worker.concurrency = concurrency
        worker.heartbeat_timeout_s = heartbeat_timeout_s
        worker.version = __version__
        worker.started_at = worker.last_heartbeat_at = worker.updated_at = now()
        worker.stopped_at = None
        worker.queues = []
        worker.backends = {}
        session.flush()
        _record(
            session,
            worker,
            EventType.WORKER_ONLINE,
            {"status": status.value, "capabilities": caps.as_dict(), "first_seen": fresh},
        )
        tx = db.Tx.of(session)
        for step in recovery.active_of_workers(tx, [worker_id]):
            recovery.requeue(tx, step, "WORKER_RESTARTED", f"worker {worker_id} restarted")
    queues.nudge_workers(f"worker:{worker_id}")
    return status


def heartbeat(
    worker_id: str, consumed: list[str], backends: dict[str, Any] | None = None
) -> WorkerStatus | None:
    """The worker is alive and consumes `consumed`; return its status (None: not registered).

    A worker the reconciler marked offline while it was, in fact, alive (a long
    pause, a database outage) comes back online here.
    """
    with db.transaction() as session:
        worker = session.get(Worker, worker_id, with_for_update=True)
        if worker is None:
            return None
        worker.last_heartbeat_at = now()
        if sorted(worker.queues or []) != sorted(consumed):
            worker.queues = sorted(consumed)
        if backends is not None:
            worker.backends = backends
        if worker.status == W.OFFLINE:
            worker.stopped_at = None
            worker.status = W.ONLINE
            worker.status_reason = "heartbeat resumed"
            _record(
                session,
                worker,
                EventType.WORKER_ONLINE,
                {"status": W.ONLINE.value, "capabilities": worker.capabilities, "resumed": True},
            )
        session.execute(
            update(Machine).where(Machine.id == worker.machine_id).values(last_seen_at=func.now())
        )
        return WorkerStatus(worker.status)


def stop(worker_id: str, reason: str = "stopped") -> None:
    """The worker process is shutting down cleanly."""
    with db.transaction() as session:
        worker = session.get(Worker, worker_id, with_for_update=True)
        if worker is None or worker.status not in LIVE_WORKER_STATUSES:
            return
        worker.queues = []
        _set_status(session, worker, W.OFFLINE, reason)


# --- operators -----------------------------------------------------------------------------


def _locked(session: Session, worker_id: str) -> Worker:
    worker = session.get(Worker, worker_id, with_for_update=True)
    if worker is None:
        raise NotFound("worker", worker_id)
    return worker


def drain(worker_id: str, reason: str | None = None) -> FleetWorker:
    """Stop giving the worker new steps; what it runs now finishes."""
    return _operate(worker_id, W.ONLINE, W.DRAINING, reason or "drained by an operator")


def resume(worker_id: str) -> FleetWorker:
    """Let a drained worker take new steps again."""
    return _operate(worker_id, W.DRAINING, W.ONLINE, "resumed by an operator")


def _operate(
    worker_id: str, source: WorkerStatus, target: WorkerStatus, reason: str
) -> FleetWorker:
    """An operator's status change; repeating it is harmless, any other status refuses."""
    with db.transaction() as session:
        worker = _locked(session, worker_id)
        if worker.status == source:
            _set_status(session, worker, target, reason)
        elif worker.status != target:
            raise InvalidState(
                f"worker {worker_id} is {worker.status}; only a worker that is {source.value}"
                f" can become {target.value}"
            )
        result = _with_steps(session, [worker])[0]
    queues.forget_live()
    queues.nudge_workers(f"worker:{worker_id}")
    return result


def remove_machine(machine_id: str) -> dict[str, Any]:
    """Take a machine out of the fleet: its workers take nothing more and the steps they
    run are re-queued for other workers (without spending the steps' retries)."""
    with db.transaction() as session:
        machine = session.get(Machine, machine_id, with_for_update=True)
        if machine is None or machine.removed_at is not None:
            raise NotFound("machine", machine_id)
        machine.removed_at = now()
        fleet = list(
            session.scalars(
                select(Worker)
                .where(Worker.machine_id == machine_id)
                .order_by(Worker.id)
                .with_for_update()
            )
        )
        for worker in fleet:
            if worker.status != W.REMOVED:
                worker.queues = []
                _set_status(session, worker, W.REMOVED, f"machine {machine_id} removed")
        requeued = []
        tx = db.Tx.of(session)
        for step in recovery.active_of_workers(tx, [worker.id for worker in fleet]):
            recovery.requeue(tx, step, "MACHINE_REMOVED", f"machine {machine_id} was removed")
            requeued.append(step.id)
    queues.forget_live()
    queues.nudge_workers(f"machine:{machine_id}")
    return {"machine_id": machine_id, "requeued_step_ids": requeued}


# --- the reconciler ------------------------------------------------------------------------


def mark_silent_offline(limit: int = 100) -> list[str]:
    """Workers silent for longer than their lease timeout: offline, their steps re-queued."""
    with db.transaction() as session:
        silent = list(
            session.scalars(
                select(Worker)
                .where(
                    Worker.status.in_(LIVE_WORKER_STATUSES),
                    Worker.last_heartbeat_at
                    < func.now() - func.make_interval(0, 0, 0, 0, 0, 0, Worker.heartbeat_timeout_s),
                )
                .order_by(Worker.id)
                .limit(limit)
                .with_for_update(skip_locked=True)
            )
        )
        for worker in silent:
            silence = (now() - worker.last_heartbeat_at).total_seconds()
            logger.warning(
                "Worker silent; marked offline",
                extra={"action": "worker_offline", "worker_id": worker.id, "silent_s": silence},
            )
            worker.queues = []
            _set_status(session, worker, W.OFFLINE, f"no heartbeat for {silence:.1f} s")
        tx = db.Tx.of(session)
        for step in recovery.active_of_workers(tx, [worker.id for worker in silent]):
            recovery.lose_with_worker(tx, step)
    return [worker.id for worker in silent]


# --- reading -------------------------------------------------------------------------------


@dataclass(frozen=True)
class FleetWorker:
    """A worker's row and the steps it is running now (oldest first)."""

    worker: Worker
    current_step_ids: list[str]


@dataclass(frozen=True)
class FleetMachine:
    """A machine's row and its workers."""

    machine: Machine
    workers: list[FleetWorker]


def _with_steps(session: Session, fleet: list[Worker]) -> list[FleetWorker]:
    current: dict[str, list[str]] = {}
    if fleet:
        rows = session.execute(
            select(Step.worker_id, Step.id)
            .where(Step.worker_id.in_([w.id for w in fleet]), Step.status.in_(ACTIVE_STEP_STATUSES))
            .order_by(Step.id)
        )
        for worker_id, step_id in rows:
            current.setdefault(worker_id, []).append(step_id)
    return [FleetWorker(worker, current.get(worker.id, [])) for worker in fleet]


def list_workers(status: str | None = None, machine_id: str | None = None) -> list[FleetWorker]:
    with db.transaction() as session:
        query = select(Worker).order_by(Worker.machine_id, Worker.id)
        if status:
            query = query.where(Worker.status == status)
        if machine_id:
            query = query.where(Worker.machine_id == machine_id)
        return _with_steps(session, list(session.scalars(query)))


def get_worker(worker_id: str) -> FleetWorker:
    with db.transaction() as session:
        worker = session.get(Worker, worker_id)
        if worker is None:
            raise NotFound("worker", worker_id)
        return _with_steps(session, [worker])[0]


def list_machines() -> list[FleetMachine]:
    with db.transaction() as session:
        machines = list(
            session.scalars(
                select(Machine).where(Machine.removed_at.is_(None)).order_by(Machine.id)
            )
        )
        fleet = _with_steps(
            session,
            list(
                session.scalars(
                    select(Worker)
                    .where(Worker.machine_id.in_([m.id for m in machines]))
                    .order_by(Worker.id)
                )
            ),
        )
    return [
        FleetMachine(machine, [w for w in fleet if w.worker.machine_id == machine.id])
        for machine in machines
    ]


def get_machine(machine_id: str) -> FleetMachine:
    with db.transaction() as session:
        machine = session.get(Machine, machine_id)
        if machine is None or machine.removed_at is not None:
            raise NotFound("machine", machine_id)
        fleet = _with_steps(
            session,
            list(
                session.scalars(
                    select(Worker).where(Worker.machine_id == machine_id).order_by(Worker.id)
                )
            ),
        )
    return FleetMachine(machine, fleet)


def online_count() -> int:
    with db.transaction() as session:
        return session.scalar(
            select(func.count()).select_from(Worker).where(Worker.status == W.ONLINE)
        )


HEARTBEAT_MAX_INTERVAL_S = 5.0


def set_loaded_models(worker_id: str, loaded: dict[str, list[str]]) -> None:
    """What the worker's backends hold now, per service (warm placement reads it)."""
    with db.tx() as tx:
        tx.execute(
            "UPDATE workers SET loaded_models = %s WHERE id = %s", [Jsonb(loaded), worker_id]
        )


def heartbeat_interval(lease_timeout_s: float) -> float:
    """Beat at least three times per lease timeout, and at least every 5 s."""
    return max(0.2, min(HEARTBEAT_MAX_INTERVAL_S, lease_timeout_s / 3))
