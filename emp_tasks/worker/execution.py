"""Running one step attempt on a worker, top to bottom.

begin (database check, assigned + started) -> connector.run(...) -> complete | fail.
The connector's `cancel_requested()` is answered from PostgreSQL (cancelled or
superseded attempt) and from the step's timeout, so cancellation works even
when Celery's in-memory revokes were lost.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import traceback
from typing import Any

from emp_tasks import connectors, metrics
from emp_tasks.connectors.base import FailureType, StepFailure, StepInterrupted, StepRun
from emp_tasks.core.config import get_settings
from emp_tasks.steps import attempts
from emp_tasks.store import dispatch
from emp_tasks.worker import leases, model_loads, outputs, presence
from emp_tasks.worker.attempt_log import AttemptLog

logger = logging.getLogger(__name__)

STOP_CHECK_INTERVAL_S = 0.25
REFUSE_WAIT_S = 2.0


class _StopSignal:
    """Answers `cancel_requested()`: timeout locally, cancellation from the database."""

    def __init__(self, run: StepRun) -> None:
        self.run = run
        self.started = time.monotonic()
        self.deadline = self.started + run.timeout_s
        self.timed_out = False
        self.superseded = False
        self._next_check = self.started + STOP_CHECK_INTERVAL_S

    def __call__(self) -> bool:
        if self.superseded or self.timed_out:
            return True
        now = time.monotonic()
        if now >= self.deadline:
            self.timed_out = True
            return True
        if now >= self._next_check:
            self._next_check = now + STOP_CHECK_INTERVAL_S
            if isinstance(self.run.log_sink, AttemptLog):
                self.run.log_sink.flush_if_due()
            self.superseded = attempts.should_stop(self.run.step_id, self.run.attempt)
        return self.superseded


def run_step(step_id: str, task_id: str | None = None) -> str:
    """Run the step's next attempt here; return what became of it (for logs).

    A worker that is draining, or that lacks what the step requires, sends the
    step's task (with its id, `task_id`) back to its queue for another worker and leaves
    the step pending.
    """
    settings = get_settings()
    here = presence.current()
    if here is not None and not here.accepting():
        attempts.send_again(step_id, task_id)
        metrics.recovered(handed_back=1)
        logger.info(
            "Worker not accepting work; step handed back",
            extra={"action": "step_handed_back", "step_id": step_id, "reason": "draining"},
        )
        return "handed back"
    try:
        run = attempts.begin(
            step_id,
            settings.worker_id,
            settings.machine_id,
            caps=here.caps if here is not None else None,
        )
    except attempts.NotServable as refused:
        if here is not None:
            # Stop consuming that queue before the task goes back on it, so that this
            # worker does not take it again (at most one hand-back per busy thread).
            here.refuse(refused.dispatch_spec.queue).wait(REFUSE_WAIT_S)
            here.nudge()  # re-read the routes
        dispatch.send(refused.dispatch_spec, task_id)
        metrics.recovered(handed_back=1)
        logger.warning(
            "Step needs what this worker lacks; handed back",
            extra={
                "action": "step_handed_back",
                "step_id": step_id,
                "unmet": refused.unmet,
                "queue": refused.dispatch_spec.queue,
            },
        )
        return "handed back"
    if run is None:
        return "dropped"
    run = dataclasses.replace(
        run, log_sink=AttemptLog(step_id, run.attempt), load_sink=model_loads.AttemptLoads()
    )
    leases.hold(step_id, run.attempt)
    try:
        timer = metrics.attempt_started(run)
        return timer.finished(_run_attempt(run))
    finally:
        leases.release(step_id)


def _run_attempt(run: StepRun) -> str:
    settings = get_settings()
    step_id = run.step_id
    connector = connectors.get(run.service)
    if connector is None:
        failure = StepFailure(
            f"worker {settings.worker_id} has no connector for service {run.service!r}",
            type=FailureType.SYSTEM,
            code="NO_CONNECTOR",
        )
        return _fail(run, failure)
    stop = _StopSignal(run)
    progress = attempts.Progress(run)

    def report_progress(value: float, stage: str | None = None, message: str | None = None) -> None:
        if not progress.report(value, stage, message):
            stop.superseded = True

    log = {"step_id": step_id, "attempt": run.attempt, "service": run.service}
    logger.info("Step started", extra={"action": "step_run", **log})
    try:
        result: Any = connector.run(run, run.inputs, report_progress, stop)
    except StepInterrupted:
        if stop.timed_out:
            return _fail(run, _timeout_failure(run), progress=progress)
        logger.info(
            "Step stopped: cancelled or superseded", extra={"action": "step_stopped", **log}
        )
        _before_outcome(run)
        return "stopped"
    except StepFailure as failure:
        return _fail(run, failure, progress=progress)
    except Exception as exc:
        logger.exception("Connector crashed", extra={"action": "step_crashed", **log})
        return _fail(
            run,
            StepFailure(
                f"{type(exc).__name__}: {exc}",
                type=FailureType.SYSTEM,
                code="CONNECTOR_ERROR",
            ),
            detail=traceback.format_exc(limit=5),
            progress=progress,
        )
    if stop.timed_out:
        return _fail(run, _timeout_failure(run), progress=progress)
    try:
        result = outputs.store_files(run, result, stop)
    except StepInterrupted:
        if stop.timed_out:
            return _fail(run, _timeout_failure(run), progress=progress)
        logger.info("Step stopped while storing outputs", extra={"action": "step_stopped", **log})
        return "stopped"
    except StepFailure as failure:
        return _fail(run, failure, progress=progress)
    duration_ms = int((time.monotonic() - stop.started) * 1000)
    _before_outcome(run)
    if attempts.complete(
        step_id,
        run.attempt,
        result,
        duration_ms,
        workflow_id=run.workflow_id,
        subjects=run.subjects,
    ):
        return "completed"
    return "superseded"


def _timeout_failure(run: StepRun) -> StepFailure:
    return StepFailure(
        f"step exceeded its timeout of {run.timeout_s:g} s",
        type=FailureType.TIMEOUT,
        code="TIMEOUT",
    )


def _before_outcome(run: StepRun) -> None:
    """The attempt's last log lines and its model loads, written before its outcome is."""
    if isinstance(run.log_sink, AttemptLog):
        run.log_sink.flush(final=True)
    here = presence.current()
    if here is not None:
        model_loads.after_attempt(run, here.worker_id, here.caps.services, here.caps.models)


def _fail(
    run: StepRun,
    failure: StepFailure,
    detail: str | None = None,
    progress: attempts.Progress | None = None,
) -> str:
    _before_outcome(run)
    outcome = attempts.fail(
        run.step_id,
        run.attempt,
        failure.as_error(detail or None),
        workflow_id=run.workflow_id,
        progress=progress,
    )
    return "superseded" if outcome.status is None else str(outcome.status)
