"""Sending a step's task to the broker, and noticing when the broker lost its data.

A task is its raw message (emp_tasks.store.broker.task_message) pushed onto its
queue's Redis list for its priority level: what `apply_async` through the default
(nameless) exchange would do, without its cost. Routing through a named exchange
would depend on kombu's binding tables in Redis, and a publish to an exchange whose
bindings a Redis restart erased is silently dropped.

A step is dispatched when the event that queued it is published (see outbox): the
dispatch instruction (emp_tasks.core.dispatch_instruction) travels in the outbox
row, and the publisher pushes the task in the same Redis script as the event, so a
process that dies between commit and send leaves both to the relay's sweeper, not to
chance. `send` is for what no event queues: a worker handing a task back, the relay
re-sending every pending step after the broker lost its data.
"""

from __future__ import annotations

import logging
import secrets
import uuid
from datetime import UTC, datetime

import redis

from emp_tasks.core.config import get_settings
from emp_tasks.core.dispatch_instruction import DispatchInstruction
from emp_tasks.store import redisdb
from emp_tasks.store.broker import task_message

logger = logging.getLogger(__name__)

EPOCH_KEY = "emp:broker-epoch"


def message(dispatch: DispatchInstruction, task_id: str) -> tuple[str, str]:
    """The list and message of the step's task; a `not_before` still ahead is its ETA."""
    eta = dispatch.not_before
    if eta is not None and eta <= datetime.now(UTC):
        eta = None
    return task_message(
        dispatch.step_id,
        dispatch.queue,
        dispatch.priority,
        task_id,
        eta,
        service=dispatch.service,
        customer_id=dispatch.customer_id,
    )


def broker_client() -> redis.Redis:
    """The broker's Redis (EMP_BROKER_URL, the events' Redis unless set)."""
    return redisdb.client(_broker_url())


def same_redis_as_events() -> bool:
    """Whether tasks and events live in one Redis (then one script publishes both)."""
    settings = get_settings()
    return (settings.broker_url or settings.redis_url) == settings.redis_url


def push(messages: list[tuple[str, str]]) -> None:
    """LPUSH each (list, message) onto the broker, in one round trip."""
    if not messages:
        return
    pipe = broker_client().pipeline(transaction=False)
    for key, body in messages:
        pipe.lpush(key, body)
    pipe.execute()


def send(dispatch: DispatchInstruction, task_id: str | None = None) -> None:
    """Put one step's task on its queue; `task_id` keeps a handed-back task's own id (what
    Flower shows and `celery control revoke` names), else a new one."""
    push([message(dispatch, task_id or str(uuid.uuid4()))])


def send_many(dispatches: list[DispatchInstruction]) -> None:
    """Put these steps' tasks on their queues, in one round trip."""
    push([message(each, str(uuid.uuid4())) for each in dispatches])


def broker_lost_data() -> bool:
    """True once per loss of the broker's data (Redis flushed or restarted empty).

    The epoch key lives beside the queues; when it is gone, so may be any queued
    task. The first caller to notice sets a new epoch and gets True.
    """
    client = broker_client()
    if client.exists(EPOCH_KEY):
        return False
    created = client.set(EPOCH_KEY, secrets.token_hex(8), nx=True)
    return bool(created)


def mark_epoch() -> None:
    """Record the current broker epoch (at relay start: nothing is lost yet)."""
    broker_client().set(EPOCH_KEY, secrets.token_hex(8), nx=True)


def _broker_url() -> str | None:
    return get_settings().broker_url
