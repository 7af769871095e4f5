"""A worker's presence in the fleet, from inside its process.

Registers the worker when Celery is ready, heartbeats it, and keeps it consuming
exactly the queues it should: every recorded route it can serve while it is
online, none while it is draining or removed, and not, for REFUSE_S, a queue where it
was handed a step it cannot serve. What Celery actually consumes is read on every tick
and converged on that (a manual `add_consumer` or `cancel_consumer` is undone within a
tick), and the heartbeat reports what Celery actually consumes. A thread does the database work
(heartbeat, read routes and status) every heartbeat interval, and at once when
a nudge arrives on `emp:fleet`; a Celery consumer step applies the wanted queue
set from inside the consumer's own event loop, the only place where adding and
cancelling consumers is safe.

Every worker also consumes its own queue, `emp.worker.<worker_id>`, so Celery
always has one queue to consume, even while the worker takes no steps.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Any

from celery import bootsteps

from emp_tasks import connectors, metrics, workers
from emp_tasks.core.config import get_settings
from emp_tasks.core.status import WorkerStatus
from emp_tasks.core.times import iso, now
from emp_tasks.routes import queues, routing
from emp_tasks.routes.capabilities import Capabilities
from emp_tasks.store import db, redisdb

logger = logging.getLogger(__name__)

APPLY_INTERVAL_S = 0.2
BACKEND_CHECK_INTERVAL_S = 30.0
REFUSE_S = 60.0
"""How long a worker leaves a queue alone after it was handed a step there it cannot serve."""


def own_queue(worker_id: str) -> str:
    return routing.worker_queue(worker_id)


def wanted_queues(caps: Capabilities, status: WorkerStatus | None) -> list[str]:
    """The route queues this worker should consume in this status."""
    if status not in (WorkerStatus.ONLINE, None):
        return []
    with db.transaction() as session:
        routes = queues.all_routes(session)
    return sorted(route.queue for route in routes if not routing.unmet(caps, route))


def backend_health(services: list[str]) -> dict[str, Any]:
    """Each service's backend health, for connectors that can tell (ComfyUI can)."""
    report: dict[str, Any] = {}
    for service in services:
        try:
            check = getattr(connectors.get(service), "health", None)
            if check is not None:
                report[service] = {**check(), "checked_at": iso(now())}
        except Exception as exc:
            report[service] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:300]}
    return report


def connector_models(service: str) -> list[str] | None:
    """The models the service's connector reports, if it can tell (ComfyUI can)."""
    connector = connectors.get(service)
    models = getattr(connector, "models", None)
    if models is None:
        return None
    try:
        return list(models())
    except Exception:
        logger.warning(
            "Connector did not list its models",
            exc_info=True,
            extra={"action": "connector_models_failed", "service": service},
        )
        return None


class Presence:
    def __init__(self, caps: Capabilities, pool: str, concurrency: int) -> None:
        settings = get_settings()
        self.worker_id = settings.worker_id
        self.machine_id = settings.machine_id
        self.caps = caps
        self.pool = pool
        self.concurrency = concurrency
        self.lease_timeout_s = float(settings.lease_timeout_s)
        self.status: WorkerStatus | None = None
        self.registered = False
        self._backends: dict[str, Any] | None = None
        self.wanted: set[str] = set()
        self.consumed: set[str] = set()
        self._refused: dict[str, float] = {}  # queue -> monotonic time the refusal ends
        self._stopped_consuming: dict[str, threading.Event] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    # --- called from Celery signals and the consumer step ----------------------------------

    def start(self) -> None:
        """Register (retried by the heartbeat thread if the database is not there yet)."""
        try:
            self._register()
        except Exception:
            logger.warning(
                "Worker not registered yet; retrying",
                exc_info=True,
                extra={"action": "worker_register_failed", "worker_id": self.worker_id},
            )
        self._thread = threading.Thread(target=self._run, name="emp-presence", daemon=True)
        self._thread.start()
        threading.Thread(target=self._listen, name="emp-fleet-nudges", daemon=True).start()
        threading.Thread(target=self._check_backends, name="emp-backends", daemon=True).start()

    def _register(self) -> None:
        self.status = workers.register(
            self.worker_id,
            self.machine_id,
            self.caps,
            hostname=socket.gethostname(),
            pid=os.getpid(),
            pool=self.pool,
            concurrency=self.concurrency,
            heartbeat_timeout_s=self.lease_timeout_s,
        )
        self.registered = True
        try:
            metrics.admit_services(self.caps.services)
        except Exception:  # labels only: the scrape admits served services too
            logger.warning("Services not admitted as labels", exc_info=True)
        self._refresh_wanted()
        logger.info(
            "Worker registered",
            extra={
                "action": "worker_registered",
                "worker_id": self.worker_id,
                "status": str(self.status),
                "queues": len(self.wanted),
            },
        )

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        try:
            workers.stop(self.worker_id)
        except Exception:
            logger.exception("Worker not marked offline", extra={"action": "worker_stop_failed"})

    def accepting(self) -> bool:
        """May this worker start a new step now? (Not while draining or removed.)"""
        return self.status in (WorkerStatus.ONLINE, None)

    def target(self) -> set[str]:
        """The queues to consume now: the wanted ones, less those refused a while ago."""
        moment = time.monotonic()
        with self._lock:
            self._refused = {q: until for q, until in self._refused.items() if until > moment}
            return self.wanted - set(self._refused)

    def refuse(self, queue: str) -> threading.Event:
        """Stop consuming `queue` for REFUSE_S (this worker was handed a step there it cannot
        serve); the event is set once Celery no longer consumes it.

        Only the next tick's read of what Celery consumes (`applied`) says so: `consumed`
        may be a tick old, and miss a queue added from outside since (`add_consumer`),
        which Celery would go on taking the step back from.
        """
        with self._lock:
            self._refused[queue] = time.monotonic() + REFUSE_S
            return self._stopped_consuming.setdefault(queue, threading.Event())

    def applied(self, consumed: set[str]) -> None:
        """What Celery actually consumes (read by the consumer step on every tick)."""
        with self._lock:
            self.consumed = set(consumed)
            for queue in list(self._stopped_consuming):
                if queue not in self.consumed:
                    self._stopped_consuming.pop(queue).set()

    def nudge(self) -> None:
        self._wake.set()

    # --- the thread ------------------------------------------------------------------------

    def _refresh_wanted(self) -> None:
        wanted = set(wanted_queues(self.caps, self.status))
        with self._lock:
            self.wanted = wanted

    def _beat(self) -> None:
        if not self.registered:
            self._register()
            return
        with self._lock:
            consumed = sorted(self.consumed)
        backends, self._backends = self._backends, None
        status = workers.heartbeat(self.worker_id, consumed, backends)
        if status is None:  # the registry lost us (a restored database): register again
            self._register()
            return
        if status != self.status:
            logger.info(
                "Worker status changed",
                extra={"action": "worker_status", "worker_id": self.worker_id, "status": status},
            )
        self.status = status
        self._refresh_wanted()

    def _run(self) -> None:
        interval = workers.heartbeat_interval(self.lease_timeout_s)
        while not self._stop.is_set():
            self._wake.wait(interval)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self._beat()
            except Exception:
                logger.warning(
                    "Heartbeat failed", exc_info=True, extra={"action": "worker_heartbeat_failed"}
                )

    def _check_backends(self) -> None:
        """Ask each connector how its backend is (slow backends never delay heartbeats)."""
        while not self._stop.is_set():
            self._backends = backend_health(self.caps.services)
            self._stop.wait(BACKEND_CHECK_INTERVAL_S)

    def _listen(self) -> None:
        """Wake the heartbeat thread when the fleet changes (a new route, a drain)."""
        while not self._stop.is_set():
            try:
                pubsub = redisdb.client().pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(queues.FLEET_CHANNEL)
                while not self._stop.is_set():
                    if pubsub.get_message(timeout=1.0) is not None:
                        self._wake.set()
            except Exception:
                logger.warning(
                    "Fleet channel lost; retrying",
                    exc_info=True,
                    extra={"action": "fleet_channel_failed"},
                )
                self._stop.wait(1.0)


_presence: Presence | None = None


def current() -> Presence | None:
    """This worker process's presence (None outside a worker, e.g. in tests)."""
    return _presence


def install(caps: Capabilities, pool: str, concurrency: int) -> Presence:
    global _presence
    _presence = Presence(caps, pool, concurrency)
    return _presence


class QueueSync(bootsteps.StartStopStep):
    """Consumer step: converge the consumed queues on the presence's wanted set."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self._timer = None

    def start(self, consumer: Any) -> None:
        presence = current()
        if presence is None:
            return
        self._timer = consumer.timer.call_repeatedly(
            APPLY_INTERVAL_S, self._apply, (consumer, presence), priority=10
        )

    def stop(self, consumer: Any) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    @staticmethod
    def _apply(consumer: Any, presence: Presence) -> None:
        """Compare what Celery consumes with the target on every tick and converge: a
        manual `add_consumer` / `cancel_consumer` (Flower, `celery control`) is undone."""
        if consumer.task_consumer is None:
            return
        own = own_queue(presence.worker_id)
        actual = {queue.name for queue in consumer.task_consumer.queues} - {own}
        target = presence.target()
        add, remove = target - actual, actual - target
        manual = (actual - presence.consumed) | (presence.consumed - actual)
        if manual:
            logger.warning(
                "Consumed queues changed from outside; reverting",
                extra={
                    "action": "consumers_reverted",
                    "worker_id": presence.worker_id,
                    "added": sorted(actual - presence.consumed),
                    "cancelled": sorted(presence.consumed - actual),
                },
            )
        for name in sorted(remove):
            consumer.cancel_task_queue(name)
        for name in sorted(add):
            consumer.add_task_queue(name)
        if add or remove:
            actual = {queue.name for queue in consumer.task_consumer.queues} - {own}
        presence.applied(actual)
