"""Prometheus metrics: the system's state now, and how long its work took.

The web runs as several processes that restart, and the work happens elsewhere
(workers, the `webhooks` process), so no metric lives in one process's memory:

- State gauges (steps by status, queue depths, workers, outbox lag, deliveries)
  are read from PostgreSQL and Redis with aggregate queries when Prometheus scrapes.
- Histograms and counters of work done (step duration, queue wait, webhook
  attempts and latency) are recorded by the process that did the work into Redis
  hashes, so every process adds to the same series and a restart loses nothing
  but the last second. An observation is one bucket's count (not one per bucket
  it falls under: the cumulative form is computed at scrape time), the count and
  the sum; the process adds its observations up in memory and a thread of its own
  writes them every FLUSH_INTERVAL_S in one MULTI/EXEC (and at exit), so a step
  costs its worker no Redis round trip at all. Recording never fails the work it
  measures: errors are logged and the observations are dropped.

Service names are chosen by tenants, so they cannot all become label values: a
service is named in a label only once it is *admitted*, and at most
EMP_METRICS_MAX_SERVICES are, first come, kept in the Redis set `emp:metrics:services`.
Only services that workers serve are admitted (a worker recording its work, or a
scrape reading the workers' capabilities); every other service is `service="other"`.
Queue labels (one per route, so also tenant-driven) are capped the same way in
`emp:metrics:queues`; a queue not admitted is `queue="other"` under its service label.
Both caps hold where series are recorded in Redis and where they are exposed.

`exposition()` builds a fresh registry for each scrape; the process-wide default
registry of prometheus_client is not used.
"""

from __future__ import annotations

import atexit
import hmac
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString
from redis import RedisError
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from emp_tasks.auth import Principal
from emp_tasks.connectors.base import StepRun
from emp_tasks.core.config import get_settings
from emp_tasks.core.status import (
    ACTIVE_STEP_STATUSES,
    DeliveryStatus,
    StepStatus,
    WorkerStatus,
    WorkflowStatus,
)
from emp_tasks.routes import queues
from emp_tasks.store import db, redisdb
from emp_tasks.store.models import Event, Step, WebhookDelivery, Worker, Workflow

logger = logging.getLogger(__name__)


KEY_PREFIX = "emp:metrics:"
OTHER = "other"
"""The label value of every service (or queue) that is not admitted."""
SERVICES_KEY = KEY_PREFIX + "services"
QUEUES_KEY = KEY_PREFIX + "queues"


# --- which label values exist --------------------------------------------------------------

# Adds candidates, in order, while the set has room; answers the whole set. One script so
# that processes admitting at once cannot push the set past its cap.
_ADMIT = """
local cap = tonumber(ARGV[1])
for i = 2, #ARGV do
  if redis.call('SCARD', KEYS[1]) >= cap then break end
  redis.call('SADD', KEYS[1], ARGV[i])
end
return redis.call('SMEMBERS', KEYS[1])
"""


def admit(key: str, candidates: Iterable[str], cap: int) -> set[str]:
    """Admit `candidates` into the label set at `key` while it has room; the admitted set.

    A set left larger by a higher cap than today's answers its first `cap` members.
    """
    members = redisdb.client().eval(_ADMIT, 1, key, cap, *candidates)
    return set(sorted(members)[:cap])


_recording_services: set[str] = set()
"""Services this process saw admitted (the set only grows, so they stay admitted)."""


def recorded_service(service: str) -> str:
    """The label a worker records `service`'s work under: itself once admitted, else other."""
    if service in _recording_services:
        return service
    admitted = admit(SERVICES_KEY, [service], get_settings().metrics_max_services)
    _recording_services.update(admitted)
    return service if service in admitted else OTHER


# --- what is recorded ----------------------------------------------------------------------


@dataclass(frozen=True)
class Histogram:
    """A histogram kept in one Redis hash, one field per (label values, bucket): the count of
    observations in that bucket alone (above the bound before it), `+Inf` above the last."""

    name: str
    documentation: str
    labels: tuple[str, ...]
    buckets: tuple[float, ...]
    """Upper bounds, ascending, without +Inf (which is the count). Fixed: changing them
    needs a new metric name, or old and new bounds would mix in one hash."""

    @property
    def key(self) -> str:
        # "buckets:": each field holds its own bucket's count. (The hashes without it held
        # cumulative counts; they are no longer read.)
        return KEY_PREFIX + "buckets:" + self.name


@dataclass(frozen=True)
class Counter:
    """A counter kept in one Redis hash, one field per label values."""

    name: str
    documentation: str
    labels: tuple[str, ...]

    @property
    def key(self) -> str:
        return KEY_PREFIX + self.name


STEP_DURATION = Histogram(
    "emp_step_duration_seconds",
    "Time a step attempt ran on its worker, from start to completion or failure",
    ("service", "outcome"),
    (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600),
)
QUEUE_WAIT = Histogram(
    "emp_step_queue_wait_seconds",
    "Time a step attempt waited in its queue, from queued (or retry due) to start",
    ("service",),
    (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600),
)
WEBHOOK_LATENCY = Histogram(
    "emp_webhook_delivery_latency_seconds",
    "Time from an event to its successful webhook delivery, retries included",
    (),
    (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800, 3600, 21600, 86400),
)
WEBHOOK_ATTEMPTS = Counter(
    "emp_webhook_delivery_attempts_total",
    "Webhook HTTP attempts by outcome: success, the status class of a refusal, or error",
    ("outcome",),
)
ATTEMPTS_RECOVERED = Counter(
    "emp_attempts_recovered_total",
    "Steps the system recovered by itself, by reason: lost (lease ran out), expired (queue"
    " deadline passed), stranded (no task left in the broker), redispatched (the broker lost"
    " its data), requeued (given back to the queue), handed_back (a worker could not take it)",
    ("reason",),
)
STEPS_SUBMITTED = Counter(
    "emp_steps_submitted_total", "Steps accepted (workflow steps included)", ("service",)
)
STEPS_FINISHED = Counter(
    "emp_steps_finished_total",
    "Steps that reached a terminal status: completed, failed, cancelled, skipped",
    ("service", "outcome"),
)
STEP_FAILURES = Counter(
    "emp_step_failures_total",
    "Failures by error type and code: every failed attempt (retried or not), and steps"
    " failed without one (EXPIRED, REFERENCE_NOT_FOUND)",
    ("service", "type", "code"),
)
MODEL_LOADS = Counter(
    "emp_model_loads_total",
    "Models a worker's backend had to load for a step (cold starts), by service and model"
    " (a model the worker does not declare counts as other)",
    ("service", "model"),
)
RECORDED: tuple[Histogram | Counter, ...] = (
    STEP_DURATION,
    QUEUE_WAIT,
    WEBHOOK_LATENCY,
    WEBHOOK_ATTEMPTS,
    ATTEMPTS_RECOVERED,
    STEPS_SUBMITTED,
    STEPS_FINISHED,
    STEP_FAILURES,
    MODEL_LOADS,
)

# What `execution.run_step` says became of an attempt -> the duration's `outcome` label.
# Anything else (a result from an attempt no longer current) is "superseded".
_STEP_OUTCOMES = {
    StepStatus.COMPLETED.value: "completed",
    StepStatus.FAILED.value: "failed",
    StepStatus.PENDING.value: "retrying",
    "stopped": "stopped",
}


def _series(values: Iterable[str]) -> str:
    # JSON keeps any label value intact; the part after the last "|" names the sample.
    return json.dumps(list(values), separators=(",", ":"))


def _bound(upper: float) -> str:
    return floatToGoString(upper)


INF = "+Inf"


def _observe(histogram: Histogram, labels: tuple[str, ...], value: float) -> None:
    value = max(0.0, value)  # clocks of different machines may disagree a little
    series = _series(labels)
    bucket = next((_bound(upper) for upper in histogram.buckets if value <= upper), INF)
    _pending.add(histogram.key, f"{series}|{bucket}", 1)
    _pending.add(histogram.key, f"{series}|count", 1)
    _pending.add(histogram.key, f"{series}|sum", value)


_last_warning = 0.0
_warning_lock = threading.Lock()
WARNING_INTERVAL_S = 60.0
FLUSH_INTERVAL_S = 1.0


def _dropped(what: str, exc: Exception) -> None:
    """Log lost observations, at most once a minute per process (Redis may be down)."""
    global _last_warning
    with _warning_lock:
        if time.monotonic() - _last_warning < WARNING_INTERVAL_S:
            return
        _last_warning = time.monotonic()
    logger.warning(
        "Metric not recorded",
        extra={"action": "metric_dropped", "metric": what, "error": repr(exc)[:300]},
    )


class _Pending:
    """Observations of this process not yet written to Redis, added up per hash field."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._fields: dict[tuple[str, str], float] = {}
        self._flusher: threading.Thread | None = None
        self._stopping = threading.Event()

    def add(self, key: str, field: str, amount: float) -> None:
        with self._lock:
            self._fields[(key, field)] = self._fields.get((key, field), 0) + amount
            if self._flusher is None or not self._flusher.is_alive():
                self._flusher = threading.Thread(
                    target=self._flush_forever,
                    args=(self._stopping,),
                    name="emp-metrics-flush",
                    daemon=True,
                )
                self._flusher.start()

    def take(self) -> dict[tuple[str, str], float]:
        with self._lock:
            fields, self._fields = self._fields, {}
        return fields

    def stop(self, timeout_s: float) -> None:
        """Stop the flusher thread (what is pending stays, for `flush`)."""
        with self._lock:
            flusher, self._flusher = self._flusher, None
            stopping, self._stopping = self._stopping, threading.Event()
        stopping.set()
        if flusher is not None:
            flusher.join(timeout_s)

    def _flush_forever(self, stopping: threading.Event) -> None:
        while not stopping.wait(FLUSH_INTERVAL_S):
            flush()


_pending = _Pending()


def flush() -> None:
    """Write what this process observed since the last flush, in one MULTI/EXEC; never raises."""
    fields = _pending.take()
    if not fields:
        return
    try:
        pipe = redisdb.client().pipeline(transaction=True)
        for (key, field), amount in fields.items():
            if field.endswith("|sum"):
                pipe.hincrbyfloat(key, field, amount)
            else:
                pipe.hincrby(key, field, int(amount))
        pipe.execute()
    except Exception as exc:
        _dropped(", ".join(sorted({key for key, _ in fields})), exc)


def stop_flushing(timeout_s: float = 3.0) -> None:
    """Write what is pending and stop the flusher thread; a later observation starts another."""
    _pending.stop(timeout_s)
    flush()


def _forget_after_fork() -> None:
    global _pending
    _pending = _Pending()


atexit.register(flush)
os.register_at_fork(after_in_child=_forget_after_fork)


# --- recording: worker ---------------------------------------------------------------------


class AttemptTimer:
    """Times one step attempt on its worker; see `attempt_started`."""

    def __init__(self, run: StepRun) -> None:
        self.run = run
        self.started = time.monotonic()

    def finished(self, outcome: str) -> str:
        """Record the attempt's duration; return `outcome` (what `run_step` reports)."""
        service, label = self.run.service, _STEP_OUTCOMES.get(outcome, "superseded")
        duration = time.monotonic() - self.started
        _safely(
            STEP_DURATION.name,
            lambda: _observe(STEP_DURATION, (recorded_service(service), label), duration),
        )
        return outcome


def attempt_started(run: StepRun) -> AttemptTimer:
    """The worker began `run`: record how long the step waited, and start its clock."""
    if run.queue_wait_s is not None:
        wait = max(0.0, run.queue_wait_s)
        _safely(
            QUEUE_WAIT.name, lambda: _observe(QUEUE_WAIT, (recorded_service(run.service),), wait)
        )
    return AttemptTimer(run)


def _safely(what: str, observe: Callable[[], None]) -> None:
    """Observe; a failure (Redis down while a label is admitted) drops the observation."""
    try:
        observe()
    except Exception as exc:
        _dropped(what, exc)


def recovered(**counts: int) -> None:
    """Count recoveries by reason (`lost=2, stranded=1`); zero counts are left out."""
    for reason, count in counts.items():
        if count:
            _pending.add(ATTEMPTS_RECOVERED.key, _series((reason,)), count)


# --- recording: the step lifecycle (counted once its transaction commits) -----------------


def model_loaded(service: str, model: str) -> None:
    """A worker's backend loaded `model` for a step of `service`."""
    _safely(
        MODEL_LOADS.name,
        lambda: _pending.add(MODEL_LOADS.key, _series((recorded_service(service), model)), 1),
    )


def admit_services(services: Iterable[str]) -> None:
    """A worker serving these registered: they may be labels now (up to the cap)."""
    admitted = admit(SERVICES_KEY, list(services), get_settings().metrics_max_services)
    _recording_services.update(admitted)


_KNOWN_FOR_S = 10.0
_not_admitted: dict[str, float] = {}  # service -> monotonic time to ask Redis again


def service_label(service: str) -> str:
    """The label `service` is counted under where no worker runs: itself once a worker
    has admitted it, else other (never admits: tenants name services at will)."""
    if service in _recording_services:
        return service
    moment = time.monotonic()
    if _not_admitted.get(service, 0.0) > moment:
        return OTHER
    if redisdb.client().sismember(SERVICES_KEY, service):
        _recording_services.add(service)
        return service
    if len(_not_admitted) > 10_000:
        _not_admitted.clear()
    _not_admitted[service] = moment + _KNOWN_FOR_S
    return OTHER


_COUNTS_AFTER_COMMIT = "emp_metric_counts"


def count_after_commit(tx: Any, counter: Counter, *labels: str, amount: int = 1) -> None:
    """Add to `counter` once `tx` (emp_tasks.store.db.Tx) commits; nothing on rollback."""
    try:
        series = (counter.key, _series((service_label(labels[0]), *labels[1:])))
    except RedisError as exc:
        _dropped(counter.name, exc)
        return
    counts = tx.info.setdefault(_COUNTS_AFTER_COMMIT, {})
    counts[series] = counts.get(series, 0) + amount
    info = tx.info
    tx.after_commit("count_metrics", lambda: _add_counts(info.pop(_COUNTS_AFTER_COMMIT, {})))


def _add_counts(counts: dict[tuple[str, str], int]) -> None:
    for (key, series), amount in counts.items():
        _pending.add(key, series, amount)


# --- recording: webhooks -------------------------------------------------------------------


def webhook_outcome(status_code: int | None) -> str:
    """`success` for 2xx, the class (`4xx`, `5xx`, `3xx`) otherwise, `error` with no answer."""
    if status_code is None:
        return "error"
    if 200 <= status_code < 300:
        return "success"
    return f"{status_code // 100}xx"


def webhook_attempted(body: dict[str, Any], status_code: int | None) -> None:
    """One HTTP attempt of a delivery ended with `status_code` (None: no answer).

    `body` is what was sent; a success's latency runs from its `timestamp` (the event's).
    """
    outcome = webhook_outcome(status_code)
    latency: float | None = None
    if outcome == "success":
        try:
            sent = datetime.fromisoformat(str(body["timestamp"]))
            latency = (datetime.now(UTC) - sent).total_seconds()
        except (KeyError, ValueError):
            latency = None

    _pending.add(WEBHOOK_ATTEMPTS.key, _series((outcome,)), 1)
    if latency is not None:
        _observe(WEBHOOK_LATENCY, (), latency)


# --- reading what was recorded -------------------------------------------------------------


class ScrapeLabels:
    """The service labels one scrape may name, read once and shared by its sources."""

    def __init__(self) -> None:
        self._services: set[str] | None = None

    def services(self) -> set[str]:
        if self._services is None:
            try:
                served = _served_services()
            except SQLAlchemyError:
                served = []  # the database source reports the failure
            cap = get_settings().metrics_max_services
            try:
                self._services = admit(SERVICES_KEY, served, cap)
            except RedisError:
                # Name what the workers serve: bounded by the fleet's configuration.
                self._services = set(served[:cap])
        return self._services

    def service(self, name: str) -> str:
        return name if name in self.services() else OTHER


def _served_services() -> list[str]:
    """Services some registered worker serves: the only candidates for a label."""
    with db.transaction() as session:
        served = session.scalars(
            select(func.jsonb_array_elements_text(Worker.capabilities["services"]))
            .where(Worker.status != WorkerStatus.REMOVED)
            .distinct()
        ).all()
    return sorted(served)


def _histogram_family(
    histogram: Histogram, fields: dict[str, str], labels: ScrapeLabels
) -> HistogramMetricFamily:
    family = HistogramMetricFamily(
        histogram.name, histogram.documentation, labels=list(histogram.labels)
    )
    position = histogram.labels.index("service") if "service" in histogram.labels else None
    folded: dict[str, tuple[str, ...] | None] = {}
    samples: dict[tuple[str, ...], dict[str, float]] = {}
    for field, value in fields.items():
        series, _, part = field.rpartition("|")
        if series not in folded:
            values = json.loads(series)
            if position is not None and len(values) == len(histogram.labels):
                values[position] = labels.service(values[position])
            folded[series] = tuple(values) if len(values) == len(histogram.labels) else None
        key = folded[series]
        if key is not None:
            # Series recorded before their service fell under the cap add up into "other".
            parts = samples.setdefault(key, {})
            parts[part] = parts.get(part, 0.0) + float(value)
    for values, parts in sorted(samples.items()):
        if "count" not in parts:
            continue
        count = int(parts["count"])
        buckets, below = [], 0
        for upper in histogram.buckets:
            below += int(parts.get(_bound(upper), 0))
            buckets.append((_bound(upper), below))
        family.add_metric(list(values), [*buckets, (INF, count)], parts.get("sum", 0.0))
    return family


def _counter_family(counter: Counter, fields: dict[str, str]) -> CounterMetricFamily:
    family = CounterMetricFamily(counter.name, counter.documentation, labels=list(counter.labels))
    for series, value in sorted(fields.items()):
        labels = json.loads(series)
        if len(labels) == len(counter.labels):
            family.add_metric(labels, float(value))
    return family


def _recorded(labels: ScrapeLabels) -> Iterator[Metric]:
    pipe = redisdb.client().pipeline(transaction=True)
    for metric in RECORDED:
        pipe.hgetall(metric.key)
    for metric, fields in zip(RECORDED, pipe.execute(), strict=True):
        if isinstance(metric, Histogram):
            yield _histogram_family(metric, fields, labels)
        else:
            yield _counter_family(metric, fields)


# --- state read at scrape time -------------------------------------------------------------


def _with_zeros(known: Iterable[str], counted: Iterable[str]) -> list[str]:
    """Every known status (so a series reads 0 rather than vanishing), then any other seen."""
    return list(dict.fromkeys([*(str(status) for status in known), *sorted(counted)]))


def _by_status(
    name: str, documentation: str, known: Iterable[str], counts: dict[str, int]
) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, documentation, labels=["status"])
    for status in _with_zeros(known, counts):
        family.add_metric([status], counts.get(status, 0))
    return family


def _steps(session: Session, labels: ScrapeLabels) -> Iterator[Metric]:
    by_service: dict[str, dict[str, int]] = {}
    for service, status, count in session.execute(
        select(Step.service, Step.status, func.count()).group_by(Step.service, Step.status)
    ):
        counts = by_service.setdefault(labels.service(service), {})
        counts[status] = counts.get(status, 0) + count
    family = GaugeMetricFamily(
        "emp_steps", "Steps in each status, by service", labels=["status", "service"]
    )
    for service, counts in sorted(by_service.items()):
        for status in _with_zeros(StepStatus, counts):
            family.add_metric([status, service], counts.get(status, 0))
    yield family


def _workflows(session: Session) -> Iterator[Metric]:
    counts = dict(
        session.execute(select(Workflow.status, func.count()).group_by(Workflow.status)).all()
    )
    yield _by_status("emp_workflows", "Workflows in each status", WorkflowStatus, counts)


def _workers(session: Session) -> Iterator[Metric]:
    counts = dict(
        session.execute(select(Worker.status, func.count()).group_by(Worker.status)).all()
    )
    yield _by_status(
        "emp_workers", "Workers in each status (online ones take work)", WorkerStatus, counts
    )
    present = [WorkerStatus.ONLINE, WorkerStatus.DRAINING]
    busy = dict(
        session.execute(
            select(Step.worker_id, func.count())
            .where(Step.status.in_(list(ACTIVE_STEP_STATUSES)), Step.worker_id.is_not(None))
            .group_by(Step.worker_id)
        ).all()
    )
    rows = session.execute(
        select(
            Worker.id,
            Worker.concurrency,
            func.extract("epoch", func.now() - Worker.last_heartbeat_at),
        )
        .where(Worker.status.in_(present))
        .order_by(Worker.id)
    ).all()
    families = {
        "busy": GaugeMetricFamily(
            "emp_worker_busy", "Steps a live worker runs now", labels=["worker"]
        ),
        "capacity": GaugeMetricFamily(
            "emp_worker_capacity", "Steps a live worker runs at once", labels=["worker"]
        ),
        "age": GaugeMetricFamily(
            "emp_worker_heartbeat_age_seconds",
            "Seconds since a live worker's last heartbeat",
            labels=["worker"],
        ),
    }
    for worker_id, capacity, age in rows:
        families["busy"].add_metric([worker_id], busy.get(worker_id, 0))
        families["capacity"].add_metric([worker_id], capacity)
        families["age"].add_metric([worker_id], max(0.0, float(age)))
    yield from families.values()


def _webhook_deliveries(session: Session) -> Iterator[Metric]:
    counts = dict(
        session.execute(
            select(WebhookDelivery.status, func.count()).group_by(WebhookDelivery.status)
        ).all()
    )
    yield _by_status(
        "emp_webhook_deliveries", "Webhook deliveries in each status", DeliveryStatus, counts
    )


def _outbox(session: Session) -> Iterator[Metric]:
    unpublished, lag = session.execute(
        select(
            func.count(),
            func.extract("epoch", func.now() - func.min(Event.created_at)),
        ).where(Event.published_at.is_(None))
    ).one()
    yield GaugeMetricFamily(
        "emp_events_unpublished", "Committed events not yet published to Redis", value=unpublished
    )
    yield GaugeMetricFamily(
        "emp_event_publish_lag_seconds",
        "Age of the oldest committed event not yet published to Redis (0: none waiting)",
        value=max(0.0, float(lag or 0)),
    )


_OPERATOR = Principal(customer_id="", admin=True, key_id="metrics")


def _queues(labels: ScrapeLabels) -> Iterator[Metric]:
    listed = queues.list_queues(_OPERATOR, include_idle=True)
    named = admit(
        QUEUES_KEY,
        [entry["name"] for entry in listed if labels.service(entry["service"]) != OTHER],
        get_settings().metrics_max_services,
    )
    names = ["queue", "service"]
    families = {
        "depth": GaugeMetricFamily(
            "emp_queue_depth", "Pending steps in each queue (PostgreSQL)", labels=names
        ),
        "broker_depth": GaugeMetricFamily(
            "emp_queue_broker_depth", "Task messages waiting in each queue (Redis)", labels=names
        ),
        "running": GaugeMetricFamily(
            "emp_queue_running", "Steps of each queue assigned or running", labels=names
        ),
        "consumers": GaugeMetricFamily(
            "emp_queue_consumers", "Live workers consuming each queue", labels=names
        ),
    }
    oldest = GaugeMetricFamily(
        "emp_queue_oldest_pending_seconds",
        "Age of the oldest pending step in each queue (0: none pending)",
        labels=names,
    )
    now = datetime.now(UTC)
    rows: dict[tuple[str, str], dict[str, float]] = {}
    for entry in listed:
        service = labels.service(entry["service"])
        queue = entry["name"] if service != OTHER and entry["name"] in named else OTHER
        row = rows.setdefault((queue, service), dict.fromkeys([*families, "oldest"], 0.0))
        for field in families:
            row[field] += entry[field]
        since = entry["oldest_pending_at"]
        age = (now - datetime.fromisoformat(since)).total_seconds() if since else 0.0
        row["oldest"] = max(row["oldest"], age)
    for series, row in sorted(rows.items()):
        for field, family in families.items():
            family.add_metric(list(series), row[field])
        oldest.add_metric(list(series), row["oldest"])
    yield from families.values()
    yield oldest


def _database(labels: ScrapeLabels) -> list[Metric]:
    labels.services()  # before this transaction: it reads in one of its own
    with db.transaction() as session:
        return [
            *_steps(session, labels),
            *_workflows(session),
            *_workers(session),
            *_webhook_deliveries(session),
            *_outbox(session),
        ]


SOURCES: dict[str, Callable[[ScrapeLabels], Iterable[Metric]]] = {
    "database": _database,
    "queues": _queues,
    "recorded": _recorded,
}
"""Each scrape reads every source; one that fails is left out and reported as such."""


class _Scrape:
    """A prometheus_client collector that reads every source once per scrape."""

    def collect(self) -> Iterator[Metric]:
        success = GaugeMetricFamily(
            "emp_metrics_source_up",
            "1 if this scrape read the source (database, queues, recorded), 0 if it failed",
            labels=["source"],
        )
        labels = ScrapeLabels()
        for name, read in SOURCES.items():
            try:
                metrics = list(read(labels))
            except Exception:
                logger.exception(
                    "Metrics source failed",
                    extra={"action": "metrics_source_failed", "source": name},
                )
                success.add_metric([name], 0)
                continue
            success.add_metric([name], 1)
            yield from metrics
        yield success


def exposition(accept: str | None = None) -> tuple[bytes, str]:
    """The metrics in the format the scraper's Accept header asks for, and its content type."""
    registry = CollectorRegistry()
    registry.register(_Scrape())
    encode, content_type = choose_encoder(accept or "")
    return encode(registry), content_type


def token_principal(presented: str) -> Principal | None:
    """The operator, when `presented` is the EMP_METRICS_TOKEN (which reads only metrics)."""
    expected = get_settings().metrics_token
    if expected and hmac.compare_digest(presented.encode(), expected.encode()):
        return _OPERATOR
    return None
