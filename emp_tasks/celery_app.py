"""The Celery application and the one task that runs a step."""

from __future__ import annotations

from celery import Celery
from celery.signals import worker_process_init, worker_ready, worker_shutdown
from redis.exceptions import ConnectionError as RedisConnectionError
from sqlalchemy.exc import OperationalError

app = Celery("emp_tasks")
app.config_from_object("celeryconfig")

RUN_STEP = "emp.run_step"


@app.task(
    name=RUN_STEP,
    acks_late=True,
    ignore_result=True,
    # The database or Redis was briefly unreachable: send the task again rather than
    # acknowledge it and leave a pending step without one.
    autoretry_for=(OperationalError, RedisConnectionError),
    retry_backoff=1,
    retry_backoff_max=30,
    max_retries=None,
)
def run_step(step_id: str) -> str:
    from emp_tasks import execution

    return execution.run_step(step_id)


def send_step(
    step_id: str, queue: str, broker_priority: int, countdown: float | None = None
) -> None:
    app.send_task(
        RUN_STEP, args=[step_id], queue=queue, priority=broker_priority, countdown=countdown
    )


@worker_process_init.connect
def _fresh_connections_after_fork(**_: object) -> None:
    from emp_tasks import db, redisdb

    db.dispose_engines()
    redisdb.reset_clients()


@worker_ready.connect
def _announce(**_: object) -> None:
    from emp_tasks import presence

    if presence.current() is not None:
        presence.current().start()


@worker_shutdown.connect
def _retire(**_: object) -> None:
    from emp_tasks import presence

    if presence.current() is not None:
        presence.current().stop()


def _add_queue_sync() -> None:
    from emp_tasks.presence import QueueSync

    app.steps["consumer"].add(QueueSync)


_add_queue_sync()
