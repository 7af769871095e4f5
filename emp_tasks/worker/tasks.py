"""The worker side of Celery: the task that runs a step, and the worker's signal handlers.

Importing this module registers `run_step` on the broker's app, connects the
worker signals (fresh connections after fork, presence start and stop) and adds
the presence consumer step; every worker loads it (`emp worker`, celeryconfig's
`include`). Senders only need emp_tasks.store.broker.
"""

from __future__ import annotations

import psycopg
from celery.signals import worker_process_init, worker_ready, worker_shutdown
from redis.exceptions import ConnectionError as RedisConnectionError
from sqlalchemy.exc import OperationalError

from emp_tasks.store import db, outbox, redisdb
from emp_tasks.store.broker import RUN_STEP, app
from emp_tasks.worker import execution, presence, revokes


@app.task(
    name=RUN_STEP,
    acks_late=True,
    ignore_result=True,
    # The database or Redis was briefly unreachable: send the task again rather than
    # acknowledge it and leave a pending step without one.
    autoretry_for=(OperationalError, psycopg.OperationalError, RedisConnectionError),
    retry_backoff=1,
    retry_backoff_max=30,
    max_retries=None,
)
def run_step(step_id: str) -> str:
    return execution.run_step(step_id, run_step.request.id)


@worker_process_init.connect
def _fresh_connections_after_fork(**_: object) -> None:
    db.dispose_engines()
    redisdb.reset_clients()


_revokes = revokes.Watch()


@worker_ready.connect
def _announce(**_: object) -> None:
    if presence.current() is not None:
        presence.current().start()
    _revokes.start()


@worker_shutdown.connect
def _retire(**_: object) -> None:
    _revokes.stop()
    if presence.current() is not None:
        presence.current().stop()
    outbox.flush()  # what this worker committed is published before it goes


app.steps["consumer"].add(presence.QueueSync)
