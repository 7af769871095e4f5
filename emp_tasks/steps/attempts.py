"""Worker commands: what a worker reports about the attempt it runs — begin it (assigned
and started), report progress, complete or fail it, hand its task back, keep its
lease, and ask whether it should stop.

Every report is fenced by the attempt number: a call for an attempt that is no
longer the step's current one changes nothing, so a superseded worker's late
result or progress is ignored. A step that finishes advances its workflow
(emp_tasks.steps.workflows); the state changes go through
emp_tasks.steps.transitions.

These run once or twice per step on every worker, so each is a few statements:
`begin` usually one statement in autocommit (the UPDATE, the attempt's row, the
workflow's start and the two events, their envelopes completed from the row), else a
transaction that checks the worker's capabilities before it commits;
`complete` of a step outside any workflow one statement in autocommit (the fenced
UPDATE, the attempt's close and its event: no BEGIN, no COMMIT), and of a workflow's
step a transaction that also advances its workflow.

Progress is ephemeral: a report is published to the stream and channel at once,
not recorded in the outbox, and the step's row takes it at most once per
EMP_PROGRESS_WRITE_INTERVAL_S (and always its first report, which is how a
superseded attempt learns it is superseded). A report follows its attempt's
`step_started` on the stream and precedes its terminal event: the reporting thread
waits until its own process has published the attempt's begin, and reports before
it completes or fails. Consumers ignore a `step_progress` whose attempt is not the
step's current running attempt (emp_tasks.live, the webhooks process).

Named `attempts`, not `worker`: `emp_tasks.worker` is the process package that
calls these commands, and `steps.worker` beside it would read as part of it.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from emp_tasks.connectors.base import EventSubjects, StepRun
from emp_tasks.core import events
from emp_tasks.core.config import get_settings
from emp_tasks.core.dispatch_instruction import DispatchInstruction
from emp_tasks.core.errors import StepError
from emp_tasks.core.events import EventType
from emp_tasks.core.status import ACTIVE_STEP_STATUSES, StepStatus, step_may_become
from emp_tasks.core.times import now
from emp_tasks.routes import queues, routing
from emp_tasks.routes.capabilities import Capabilities
from emp_tasks.steps import transitions, workflows
from emp_tasks.store import db, dispatch, outbox, publishing
from emp_tasks.store.db import Tx
from emp_tasks.webhooks import endpoints as webhooks

logger = logging.getLogger(__name__)

S = StepStatus

# The code of an attempt lost with its worker (emp_tasks.steps.recovery); its attempt
# is recorded as `lost` rather than `failed`.
WORKER_LOST = "WORKER_LOST"

UNKNOWN: Any = object()
"""`workflow_id` not given: the step's workflow is looked up (and locked) in one statement."""

PUBLISH_WAIT_S = 2.0
"""How long a first progress report waits for its attempt's begin to be published."""

assert step_may_become(S.PENDING, S.ASSIGNED) and step_may_become(S.ASSIGNED, S.RUNNING)
_BEGIN_STEP = f"""
WITH s AS (
  UPDATE steps SET status = '{S.RUNNING.value}', attempts = attempts + 1,
    worker_id = %(worker)s, machine_id = %(machine)s, started_at = now(), updated_at = now(),
    lease_expires_at = now() + make_interval(secs => %(lease)s)
  WHERE id = %(id)s AND status = '{S.PENDING.value}' AND (expires_at IS NULL OR expires_at > now())
  {{servable}}
  RETURNING {transitions.STEP_COLUMNS}
), attempt AS (
  INSERT INTO step_attempts (step_id, attempt, worker_id, machine_id, outcome, started_at)
  SELECT id, attempts, worker_id, machine_id, 'running', started_at FROM s
)"""
_INPUTS = """(
  SELECT jsonb_object_agg(d.step_index::text, d.result) FROM steps d
  WHERE d.id IN (SELECT jsonb_array_elements_text(s.depends_on))
) AS inputs"""
_BEGIN = _BEGIN_STEP.format(servable="") + f" SELECT s.*, {_INPUTS} FROM s"
"""Assigned and started in one statement: pending (not past its queue deadline) to running,
a new attempt with its row in the audit trail, and the results of its dependencies."""


_BEGIN_AT_ONCE = (
    _BEGIN_STEP
    + f""", workflow AS ({workflows.start_sql("(SELECT workflow_id FROM s)")}
), recorded AS ({{recorded}})
SELECT s.*, {_INPUTS}, (
  SELECT jsonb_agg(jsonb_build_object('id', r.id, 'seq', r.seq, 'prior', r.prior,
    'webhook', r.webhook, 'text', r.text)) FROM recorded r
) AS recorded FROM s"""
)
"""`_BEGIN` with the rest of a begin in the same statement, the whole transaction: the
workflow's start (`workflows.on_step_started`) and the two events, their envelopes
completed from the row (emp_tasks.store.outbox.templates_sql). `servable`: only a step of
a queue this worker is known to serve (else nothing, and `begin` takes the long way)."""
_WEBHOOK_WANTS = webhooks.own_webhook_wants_sql(
    "s.webhook_url", "s.webhook_events", "e.type", webhooks.TERMINAL_STEP_EVENTS
)


@dataclass(frozen=True)
class FailureOutcome:
    status: StepStatus | None


class NotServable(Exception):
    """The worker lacks what the step requires; the step's task goes back to its queue."""

    def __init__(self, unmet: list[str], dispatch_spec: DispatchInstruction) -> None:
        super().__init__("; ".join(unmet))
        self.unmet = unmet
        self.dispatch_spec = dispatch_spec


_unmet_by_queue: dict[tuple[int, str], list[str]] = {}
_servable_queues: dict[int, set[str]] = {}
"""Per capabilities, the queues found to need nothing they lack (`begin` in one statement)."""


def _unmet(caps: Capabilities, step: Any) -> list[str]:
    """What `caps` lacks for the step's route; a queue is one route, so asked once each."""
    key = (id(caps), step.queue)
    found = _unmet_by_queue.get(key)
    if found is None:
        found = _unmet_by_queue[key] = routing.unmet(caps, queues.route_of(step))
        if not found:
            _servable_queues.setdefault(id(caps), set()).add(step.queue)
    return found


def begin(
    step_id: str, worker_id: str, machine_id: str, caps: Capabilities | None = None
) -> StepRun | None:
    """Take a pending step for this worker as a new attempt and mark it running.

    Returns None if the step is not pending. This database check is what makes a
    cancelled step or a redelivered task harmless: Celery's own revokes and acks
    live in memory and in Redis, which may be lost. Assignment and start are one
    transaction (two events): a worker calls this right before the connector runs.

    With the worker's capabilities, the step's requirements are checked again here
    (routing sends a step only to capable workers; this makes it a guarantee):
    raises NotServable, leaving the step pending, when the worker lacks any.

    Usually that transaction is one statement (`_BEGIN_AT_ONCE`, in autocommit): always
    without capabilities, and with them for a step of a queue this process already found
    the worker serves. Otherwise (a new queue, or that statement changed nothing) it is a
    transaction that reads the step's queue before it commits.
    """
    servable = _servable_queues.get(id(caps)) if caps is not None else None
    if caps is None or servable:
        run = _begin_at_once(step_id, worker_id, machine_id, servable)
        if run is not None:
            return run
        if caps is None:
            expire(step_id)
            return None
    with db.tx() as tx:
        # No workflow lock: starting a step changes no workflow counter, and parallel
        # steps of one workflow must not queue behind each other here.
        step = tx.one(_BEGIN, _begin_params(step_id, worker_id, machine_id))
        if step is not None and caps is not None:
            unmet = _unmet(caps, step)
            if unmet:
                raise NotServable(unmet, transitions.task_spec(step))  # rolls the start back
        if step is not None:
            assigned = transitions.event_of(
                step,
                EventType.STEP_ASSIGNED,
                _assigned_data(step.worker_id, step.machine_id, step.attempts),
                None,
            )
            started = transitions.event_of(
                step, EventType.STEP_STARTED, {"attempt": step.attempts}, None
            )
            outbox.record_all(tx, [assigned, started])
            if step.workflow_id is not None:
                workflows.on_step_started(tx, step)
    if step is None:
        expire(step_id)
        return None
    return _run_of(step)


def _begin_params(step_id: str, worker_id: str, machine_id: str) -> dict[str, Any]:
    lease = float(get_settings().lease_timeout_s)
    return {"id": step_id, "worker": worker_id, "machine": machine_id, "lease": lease}


def _begin_at_once(
    step_id: str, worker_id: str, machine_id: str, servable: set[str] | None
) -> StepRun | None:
    """`begin` in one statement (`_BEGIN_AT_ONCE`); None if it changed nothing."""
    aggregate = events.step_aggregate(step_id)
    subjects = {"step_id": step_id, "machine_id": machine_id, "worker_id": worker_id}
    templates = [
        outbox.event(
            EventType.STEP_ASSIGNED,
            aggregate=aggregate,
            data=_assigned_data(worker_id, machine_id, 0),  # the row completes the attempt
            **subjects,
        ),
        outbox.event(EventType.STEP_STARTED, aggregate=aggregate, data={"attempt": 0}, **subjects),
    ]
    recorded, params = outbox.templates_sql(templates, "s", _WEBHOOK_WANTS)
    params |= _begin_params(step_id, worker_id, machine_id)
    condition = ""
    if servable is not None:
        condition = "AND queue = ANY(%(servable)s::text[])"
        params["servable"] = db.text_array(sorted(servable))
    with db.tx(single=True) as tx:
        step = tx.one(_BEGIN_AT_ONCE.format(servable=condition, recorded=recorded), params)
        if step is not None:
            outbox.templates_recorded(tx, templates, step.recorded)
    return _run_of(step) if step is not None else None


def _run_of(step: Any) -> StepRun:
    """The StepRun of the attempt a begin statement started (`step` its row)."""
    return StepRun(
        step_id=step.id,
        service=step.service,
        attempt=step.attempts,
        payload=step.payload,
        requirements=step.requirements,
        timeout_s=step.timeout_s,
        customer_id=step.customer_id,
        inputs=step.inputs or {},
        queue_wait_s=(step.started_at - step.queued_at).total_seconds() if step.queued_at else None,
        subjects=EventSubjects.of(step),
    )


def _assigned_data(worker_id: str, machine_id: str, attempt: int) -> dict[str, Any]:
    return {"worker_id": worker_id, "machine_id": machine_id, "attempt": attempt}


def expire(step_id: str) -> bool:
    """Fail a pending step whose queue deadline passed, advancing its workflow; True if it
    did. Anything else (the step not pending: cancelled, running, redelivered) is logged."""
    with db.tx() as tx:
        step = transitions.lock(tx, step_id)
        if step is not None and step.status == S.PENDING and step.expires_at is not None:
            expired = transitions.expire(tx, step_id)
            if expired is not None:
                workflows.on_step_finished(tx, expired)
                return True
    logger.info(
        "Step not pending; task dropped",
        extra={
            "action": "step_assign_skipped",
            "step_id": step_id,
            "status": None if step is None else step.status,
        },
    )
    return False


def lock_current(
    tx: Tx,
    step_id: str,
    attempt: int,
    allowed: frozenset[StepStatus],
    *,
    workflow_id: Any = UNKNOWN,
) -> Any:
    """The step's row, locked (its workflow's first), if `attempt` is still its current
    attempt in an allowed status; else None. `workflow_id` (None: no workflow) saves
    looking it up."""
    if workflow_id is UNKNOWN:
        transitions.lock_workflow_of(tx, step_id)
    else:
        transitions.lock_workflow(tx, workflow_id)
    step = tx.one(
        f"SELECT {transitions.STEP_COLUMNS} FROM steps WHERE id = %s FOR UPDATE", [step_id]
    )
    if step is None or step.attempts != attempt or StepStatus(step.status) not in allowed:
        _fenced(step_id, attempt, None if step is None else step.status)
        return None
    return step


def _fenced(step_id: str, attempt: int, status: str | None) -> None:
    logger.info(
        "Superseded attempt ignored",
        extra={
            "action": "step_attempt_fenced",
            "step_id": step_id,
            "attempt": attempt,
            "status": status,
        },
    )


# --- progress ------------------------------------------------------------------------------


def _write_progress(
    tx: Tx, step_id: str, attempt: int, progress: float, stage: str | None, message: str | None
) -> Any:
    """The fenced write of a report into the step's row; the row's subjects, or None."""
    return tx.one(
        "UPDATE steps SET progress = %s, stage = %s, message = %s, updated_at = now()"
        " WHERE id = %s AND attempts = %s AND status = %s"
        " RETURNING id, correlation_id, workflow_id, machine_id, worker_id, customer_id,"
        " webhook_url, webhook_events",
        [progress, stage, message, step_id, attempt, S.RUNNING.value],
    )


def _publish_progress(
    step: Any, attempt: int, progress: float, stage: str | None, message: str | None
) -> None:
    """Publish a report of the step (its row, or a StepRun's `subjects`) at once."""
    recorded = transitions.event_of(
        step,
        EventType.STEP_PROGRESS,
        {"progress": progress, "stage": stage, "message": message, "attempt": attempt},
        None,
    )
    try:
        publishing.publish_now(recorded.envelope, webhook=recorded.webhook)
    except Exception:
        logger.warning(
            "Progress not published",
            exc_info=True,
            extra={"action": "progress_publish_failed", "step_id": step.id},
        )


def _clamp(progress: float) -> float:
    return max(0.0, min(100.0, float(progress)))


def report_progress(
    step_id: str,
    attempt: int,
    progress: float,
    stage: str | None = None,
    message: str | None = None,
) -> bool:
    """One report written and published at once; False when `attempt` is superseded."""
    progress = _clamp(progress)
    with db.tx() as tx:
        step = _write_progress(tx, step_id, attempt, progress, stage, message)
    if step is None:
        _fenced(step_id, attempt, None)
        return False
    _publish_progress(step, attempt, progress, stage, message)
    return True


class Progress:
    """The progress reports of one running attempt (the worker makes one per attempt)."""

    def __init__(self, run: StepRun) -> None:
        self.run = run
        self.interval_s = get_settings().progress_write_interval_s
        self._written_at: float | None = None
        self._begin_published = False
        self.unwritten: tuple[float, str | None, str | None] | None = None
        """The last report the row has not taken yet (`fail` writes it; `complete` sets 100)."""
        self._lock = threading.Lock()

    def report(self, progress: float, stage: str | None = None, message: str | None = None) -> bool:
        """Publish the report, write it to the row when due; False once superseded."""
        run = self.run
        progress = _clamp(progress)
        with self._lock:
            due = self._written_at is None or time.monotonic() - self._written_at >= self.interval_s
            if due:
                self._written_at = time.monotonic()
            self.unwritten = None if due else (progress, stage, message)
        if due:
            with db.tx() as tx:
                if _write_progress(tx, run.step_id, run.attempt, progress, stage, message) is None:
                    _fenced(run.step_id, run.attempt, None)
                    return False
        if not self._begin_published:
            # The attempt's step_started, published by this process, comes first (in the
            # stream; its row may be marked published later, with the next batch).
            publishing.flush(PUBLISH_WAIT_S, marked=False)
            self._begin_published = True
        _publish_progress(run.subjects, run.attempt, progress, stage, message)
        return True


# --- the end of an attempt -----------------------------------------------------------------


def complete(
    step_id: str,
    attempt: int,
    result: Any,
    duration_ms: int,
    *,
    workflow_id: Any = UNKNOWN,
    subjects: EventSubjects | None = None,
) -> bool:
    """The attempt succeeded: the step is completed with its result (False: superseded).

    `workflow_id` (None: no workflow), when the caller knows it, saves looking it up. A
    step outside any workflow whose event `subjects` the caller has (its StepRun's) is
    completed in one statement: the fenced UPDATE, the attempt's close and the event.
    """
    data = {"result": result, "duration_ms": duration_ms, "attempt": attempt}
    change: dict[str, Any] = {
        "sets": {
            "result": result,
            "error": None,
            "progress": 100.0,
            "completed_at": transitions.NOW,
        },
        "within": ACTIVE_STEP_STATUSES,
        "attempt": attempt,
        "closing": "completed",
    }
    if workflow_id is None and subjects is not None:
        event = transitions.event_of(subjects, EventType.STEP_COMPLETED, data, None)
        with db.tx(single=True) as tx:
            rows = transitions.apply(
                tx,
                [step_id],
                S.COMPLETED,
                EventType.STEP_COMPLETED,
                data,
                recorded=event,
                columns=transitions.RETURNED_FOR_COUNTS,  # the caller needs no more
                **change,
            )
    else:
        with db.tx() as tx:
            if workflow_id is UNKNOWN:
                transitions.lock_workflow_of(tx, step_id)
            else:
                transitions.lock_workflow(tx, workflow_id)
            rows = transitions.apply(
                tx, [step_id], S.COMPLETED, EventType.STEP_COMPLETED, data, **change
            )
            if rows:
                workflows.on_step_finished(tx, rows[0])
    if not rows:
        _fenced(step_id, attempt, None)
        return False
    return True


def retry_delay_s(attempt: int) -> float:
    """Exponential backoff with jitter: base * 2^(attempt-1), capped, times 0.5-1.0."""
    settings = get_settings()
    ceiling = min(settings.retry_max_s, settings.retry_base_s * 2 ** max(0, attempt - 1))
    return ceiling * random.uniform(0.5, 1.0)


def fail(
    step_id: str,
    attempt: int,
    error: StepError,
    *,
    workflow_id: Any = UNKNOWN,
    progress: Progress | None = None,
) -> FailureOutcome:
    """Record a failed attempt: back to pending for a retry, or failed for good."""
    with db.tx() as tx:
        step = lock_current(tx, step_id, attempt, ACTIVE_STEP_STATUSES, workflow_id=workflow_id)
        if step is None:
            return FailureOutcome(status=None)
        last = progress.unwritten if progress is not None else None
        sets = dict(zip(("progress", "stage", "message"), last, strict=True)) if last else {}
        return fail_current(tx, step, error, **sets)


def fail_current(tx: Tx, step: Any, error: StepError, **sets: Any) -> FailureOutcome:
    """Fail the step's current attempt (the caller holds the step's locks): retried
    after a backoff while retries remain and the error is retryable, else failed;
    `sets`: other columns to change with it."""
    outcome = "lost" if error.code == WORKER_LOST else "failed"
    transitions.finish_attempts(tx, [(step.id, step.attempts)], outcome, error)
    if error.retryable and step.attempts <= step.max_retries:
        transitions.count_failure(tx, step.service, error.to_json())
        at = now() + timedelta(seconds=retry_delay_s(step.attempts))
        transitions.queue_retry(tx, step, error, at, **sets)
        return FailureOutcome(status=S.PENDING)
    failed = transitions.apply_one(
        tx,
        step,
        S.FAILED,
        EventType.STEP_FAILED,
        {"error": error.to_json(), "attempts": step.attempts},
        sets={"error": error.to_json(), "completed_at": transitions.NOW, **sets},
    )
    workflows.on_step_finished(tx, failed)
    return FailureOutcome(status=S.FAILED)


# --- while it runs -------------------------------------------------------------------------


def renew_leases(attempts: dict[str, int]) -> int:
    """Extend the leases of these running attempts (step id -> attempt); return how many.

    Rows are locked in id order, as every other multi-step locker does, so renewing
    several leases never deadlocks with, say, a workflow cancel.
    """
    if not attempts:
        return 0
    with db.tx() as tx:
        renewed = tx.all(
            "UPDATE steps SET lease_expires_at = now() + make_interval(secs => %(lease)s)"
            " WHERE id IN (SELECT s.id FROM steps s"
            " JOIN unnest(%(ids)s::varchar[], %(attempts)s::int[]) AS held(id, attempt)"
            " ON s.id = held.id AND s.attempts = held.attempt"
            # By primary key, whatever the statistics say (no plan that scans the table).
            " WHERE s.id = ANY(%(ids)s) AND s.status = ANY(%(active)s) ORDER BY s.id FOR UPDATE)"
            " RETURNING id",
            {
                "lease": float(get_settings().lease_timeout_s),
                "ids": list(attempts),
                "attempts": list(attempts.values()),
                "active": [status.value for status in ACTIVE_STEP_STATUSES],
            },
        )
    return len(renewed)


def send_again(step_id: str, task_id: str | None = None) -> bool:
    """Send a pending step's task once more (a worker handed it back, keeping the task's
    id); False if not pending."""
    with db.tx() as tx:
        step = transitions.read(tx, step_id)
    if step is None or step.status != S.PENDING:
        return False
    dispatch.send(transitions.task_spec(step), task_id)
    return True


def record_load(step_id: str, attempt: int, cold: bool, load_ms: int) -> None:
    """Whether the attempt had to load its models (`cold_start`), and how long it took."""
    with db.tx() as tx:
        tx.execute(
            "UPDATE step_attempts SET cold_start = %s, model_load_ms = %s"
            " WHERE step_id = %s AND attempt = %s",
            [cold, load_ms if cold else None, step_id, attempt],
        )


def should_stop(step_id: str, attempt: int) -> bool:
    """True once `attempt` is no longer the step's running attempt (cancelled or superseded)."""
    with db.tx() as tx:
        row = tx.one("SELECT status, attempts FROM steps WHERE id = %s", [step_id])
    return (
        row is None or row.attempts != attempt or StepStatus(row.status) not in ACTIVE_STEP_STATUSES
    )
