"""The worker side of Celery: the task that runs a step, and the worker's signal handlers.

Importing this module registers `run_step` on the broker's app, connects the
worker signals (fresh connections after fork, presence start and stop) and adds
the presence consumer step; every worker loads it (`emp worker`, celeryconfig's
`include`). Senders only need emp_tasks.store.broker.

The task ends in the Celery state that says what became of the attempt, so Flower and
`celery events` tell the truth: SUCCESS (completed), RETRY (failed, retried later: the
step's error), FAILURE (failed for good: `StepAttemptFailed` with the step's error),
IGNORED (handed back to the queue, a duplicate of a step no longer pending, a
cancelled or superseded attempt), with a `task-ignored` event saying which when task
events are on. The message is acknowledged in every case: PostgreSQL, not Celery,
decides what runs next.
"""

from __future__ import annotations

import contextlib
from typing import Any

import psycopg
from celery.exceptions import Ignore, Retry
from celery.signals import worker_process_init, worker_ready, worker_shutdown
from redis.exceptions import ConnectionError as RedisConnectionError
from sqlalchemy.exc import OperationalError

from emp_tasks.core.status import StepStatus
from emp_tasks.store import db, publishing, redisdb
from emp_tasks.store.broker import RUN_STEP, app
from emp_tasks.worker import execution, presence, revokes


class StepAttemptFailed(Exception):
    """The step failed for good (its task's FAILURE, with the step's error)."""


IGNORED = {
    "handed back": "handed back to its queue for another worker",
    "dropped": "the step is no longer pending (a duplicate task)",
    "superseded": "the attempt was superseded (cancelled, lost or retried meanwhile)",
    "stopped": "the step was cancelled while it ran",
}
"""What `execution.run_step` reports for an attempt that ran nothing to its end."""


@app.task(
    name=RUN_STEP,
    acks_late=True,
    ignore_result=True,
    throws=(StepAttemptFailed,),  # an expected outcome: logged without a traceback
    # The database or Redis was briefly unreachable: send the task again rather than
    # acknowledge it and leave a pending step without one.
    autoretry_for=(OperationalError, psycopg.OperationalError, RedisConnectionError),
    retry_backoff=1,
    retry_backoff_max=30,
    max_retries=None,
)
def run_step(step_id: str, service: str | None = None, customer_id: str | None = None) -> str:
    # `service` and `customer_id` are for operators' eyes; the step is read from PostgreSQL.
    outcome = execution.run_step(step_id, run_step.request.id)
    if outcome == StepStatus.COMPLETED:
        return outcome
    if outcome == StepStatus.FAILED:
        raise StepAttemptFailed(_error_of(step_id))
    if outcome == StepStatus.PENDING:
        raise Retry(_error_of(step_id))
    _announce_ignored(run_step.request.id, IGNORED.get(outcome, outcome))
    raise Ignore()


def _error_of(step_id: str) -> str:
    with db.tx() as tx:
        row = tx.one("SELECT error FROM steps WHERE id = %s", [step_id])
    error = (row.error if row is not None else None) or {}
    return f"{error.get('code', 'FAILED')}: {error.get('message', '')}"[:1000]


_consumer: Any = None


def _announce_ignored(task_id: str | None, reason: str) -> None:
    """Say why the task is IGNORED, to whoever watches task events (Flower)."""
    dispatcher = getattr(_consumer, "event_dispatcher", None)
    if task_id is None or dispatcher is None or not dispatcher.enabled:
        return
    if dispatcher.groups and "task" not in dispatcher.groups:
        return
    with contextlib.suppress(Exception):  # an event is for monitoring only
        dispatcher.send("task-ignored", uuid=task_id, reason=reason)


@worker_process_init.connect
def _fresh_connections_after_fork(**_: object) -> None:
    db.dispose_engines()
    redisdb.reset_clients()


_revokes = revokes.Watch()


@worker_ready.connect
def _announce(sender: Any = None, **_: object) -> None:
    global _consumer
    _consumer = sender
    if presence.current() is not None:
        presence.current().start()
    _revokes.start()


@worker_shutdown.connect
def _retire(**_: object) -> None:
    _revokes.stop()
    if presence.current() is not None:
        presence.current().stop()
    publishing.flush()  # what this worker committed is published before it goes


app.steps["consumer"].add(presence.QueueSync)
