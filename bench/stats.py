"""Measurement helpers owned by the benchmark: percentiles, deadlines and one system's result."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from bench.cpu import CLIENT

DASH = "—"
"""A cell with no number: not measured, failed, or no baseline equivalent."""


def median_text(values: list[float], ok: bool = True) -> str:
    """The median, one decimal, or a dash when there is none or the row failed."""
    return f"{percentile(values, 50):.1f}" if values and ok else DASH


def only_ours(label: str, value: str, baselines: int) -> list[str]:
    """A table row EMP Tasks alone has: a dash (and no ratio) under every baseline."""
    return [label, value, *([DASH, ""] * baselines)]


class BenchError(RuntimeError):
    """A benchmark phase that could not finish (a process died, a deadline passed)."""


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile: the smallest value with at least p% of values at or below it."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100.0 * len(ordered)))
    return ordered[rank - 1]


class Deadline:
    """A point in monotonic time that every wait of one phase respects."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.at = time.monotonic() + seconds

    def remaining(self) -> float:
        return max(0.0, self.at - time.monotonic())

    @property
    def expired(self) -> bool:
        return time.monotonic() >= self.at


@dataclass
class WorkflowResult:
    """One workflow submitted once by one system: how long until it had completed."""

    shape: str  # bench.workflows.Shape.key
    steps: int
    hops: int | None = None  # a chain's length, for the per-hop time
    elapsed_s: float | None = None  # from just before the submit until seen completed
    submit_ms: float | None = None  # the submit call alone (POST, or apply_async)
    server_s: float | None = None  # EMP Tasks: the row's created_at to completed_at
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors and self.elapsed_s is not None

    @property
    def throughput(self) -> float | None:
        """Steps per second over the whole workflow; None unless it completed."""
        if not self.ok or not self.elapsed_s:
            return None
        return self.steps / self.elapsed_s

    @property
    def per_hop_ms(self) -> float | None:
        if not self.ok or self.elapsed_s is None or not self.hops:
            return None
        return self.elapsed_s / self.hops * 1000


@dataclass
class WebhookResult:
    """One webhook latency configuration of EMP Tasks: steps submitted, webhooks received.

    `latencies_ms` holds, per (endpoint, step) received, the step row's `completed_at` to the
    receipt of its `step_completed` webhook at the local receiver (the first one, if repeated).
    """

    key: str  # bench.webhook_rows.WebhookRow.key
    endpoints: int
    steps: int  # requested
    rate: float  # steps per second submitted
    submitted: int = 0
    completed: int = 0  # of the submitted steps, completed by the deadline
    expected: int = 0  # webhooks: steps x endpoints
    received: int = 0  # distinct (endpoint, step) webhooks received by the deadline
    duplicates: int = 0  # webhooks received again for an (endpoint, step) already received
    latencies_ms: list[float] = field(default_factory=list)
    # completed_at to the delivery row's created_at (its recording transaction's start)
    recorded_ms: list[float] = field(default_factory=list)
    sent_ms: list[float] = field(default_factory=list)  # the delivery row's created_at to receipt
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        wanted = self.steps * self.endpoints
        return not self.errors and self.expected == wanted and self.received == wanted


@dataclass
class LiveResult:
    """One live event latency configuration of EMP Tasks: the steps' events, delivered over `/ws`.

    `latencies_ms` holds, per (client, event) received, the envelope's `timestamp` (taken when
    the event is recorded in its committing transaction) to the frame's arrival at the client.
    """

    key: str  # bench.live_rows.LiveRow.key
    clients: int
    steps: int  # requested
    rate: float  # steps per second submitted
    submitted: int = 0
    completed: int = 0  # of the submitted steps, completed by the deadline
    events: int = 0  # the submitted steps' events in the outbox
    expected: int = 0  # deliveries: events x clients
    received: int = 0  # distinct (client, event) deliveries by the deadline
    duplicates: int = 0  # events a client received again
    latencies_ms: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def missing(self) -> int:
        return self.expected - self.received

    @property
    def ok(self) -> bool:
        return (
            not self.errors
            and self.submitted == self.steps
            and self.events > 0
            and self.received == self.expected
        )


@dataclass
class EmpropsResult:
    """The EmProps row of EMP Tasks: per workflow, its row's `completed_at` to EmProps'
    receipt of the notification (bench.emprops_rows)."""

    workflows: int  # requested
    rate: float  # workflows per second submitted
    submitted: int = 0
    received: int = 0  # distinct notifications received by the deadline
    duplicates: int = 0  # notifications received again for a job already notified
    latencies_ms: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors and self.received == self.workflows and not self.duplicates


@dataclass
class Result:
    """What one system did with the N no-op steps (or tasks) it was given, and its workflows."""

    name: str
    requested: int
    submitted: int = 0
    completed: int = 0
    failed: int = 0
    elapsed_s: float | None = None  # first submit until the moment all N were complete
    submit_elapsed_s: float | None = None  # first submit until the last submit returned
    submit_ms: list[float] = field(default_factory=list)
    status_ms: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    workflows: dict[str, WorkflowResult] = field(default_factory=dict)  # by Shape.key
    webhooks: dict[str, WebhookResult] = field(default_factory=dict)  # by WebhookRow.key
    live: dict[str, LiveResult] = field(default_factory=dict)  # by LiveRow.key
    # CPU seconds each process (bench.cpu group) used while the N steps ran
    cpu_s: dict[str, float] = field(default_factory=dict)
    # the same measure with 4 progress reports per step (a smaller N), if run
    progress: Result | None = None
    # one client submitting one step at a time (ms per call); bare Celery: the Flask peer
    single_submit_ms: list[float] = field(default_factory=list)
    # one step at a time, created_at to completed_at (ms): with one 1 MB output, and with none
    output_ms: list[float] = field(default_factory=list)
    no_output_ms: list[float] = field(default_factory=list)
    emprops: EmpropsResult | None = None  # the EmProps row, if run

    @property
    def ok(self) -> bool:
        steps_ok = not self.errors and self.completed == self.requested
        workflows_ok = all(workflow.ok for workflow in self.workflows.values())
        webhooks_ok = all(hook.ok for hook in self.webhooks.values())
        progress_ok = self.progress is None or self.progress.ok
        emprops_ok = self.emprops is None or self.emprops.ok
        return (
            steps_ok
            and workflows_ok
            and webhooks_ok
            and progress_ok
            and emprops_ok
            and all(row.ok for row in self.live.values())
        )

    def cpu_ms_per_step(self, group: str | None = None) -> float | None:
        """CPU milliseconds per completed step of one process group, or of all but the client."""
        if not self.cpu_s or not self.completed:
            return None
        if group is not None:
            used = self.cpu_s.get(group)
            return None if used is None else used * 1000 / self.completed
        total = sum(used for name, used in self.cpu_s.items() if name != CLIENT)
        return total * 1000 / self.completed

    @property
    def throughput(self) -> float | None:
        """Steps per second end to end; None unless every requested step completed."""
        if self.completed != self.requested or not self.elapsed_s:
            return None
        return self.completed / self.elapsed_s

    @property
    def submit_rate(self) -> float | None:
        if self.submitted != self.requested or not self.submit_elapsed_s:
            return None
        return self.submitted / self.submit_elapsed_s
