"""Sending a step's task to the broker, and noticing when the broker lost its data.

Tasks go straight onto their queue's Redis list through the default (nameless)
exchange. Routing through a named exchange would depend on kombu's binding
tables in Redis, and a publish to an exchange whose bindings a Redis restart
erased is silently dropped.

A step is dispatched when the event that queued it is published (see outbox):
the dispatch instruction (emp_tasks.core.dispatch_instruction) travels in the
outbox row, so a process that dies between commit and send leaves the task to the
relay's sweeper, not to chance.
"""

from __future__ import annotations

import logging
import secrets
from datetime import UTC, datetime

from celery import Signature, group
from kombu import Exchange, Queue

from emp_tasks.core.config import get_settings
from emp_tasks.core.dispatch_instruction import DispatchInstruction
from emp_tasks.store import redisdb
from emp_tasks.store.broker import RUN_STEP, app

logger = logging.getLogger(__name__)

EPOCH_KEY = "emp:broker-epoch"
_DEFAULT_EXCHANGE = Exchange("")


def _signature(dispatch: DispatchInstruction) -> Signature:
    """The step's task, addressed to its queue's list; a future `not_before` is a countdown.

    The task is named, not imported (the sender does not load the worker's task code),
    so its `ignore_result` is repeated here to keep the message's header as the task sets it.
    """
    countdown = None
    if dispatch.not_before:
        delay = (dispatch.not_before - datetime.now(UTC)).total_seconds()
        countdown = delay if delay > 0 else None
    name = dispatch.queue
    return app.signature(
        RUN_STEP,
        args=[dispatch.step_id],
        queue=Queue(name, _DEFAULT_EXCHANGE, routing_key=name),
        exchange="",
        routing_key=name,
        priority=dispatch.priority,
        countdown=countdown,
        ignore_result=True,
        immutable=True,
    )


def send(dispatch: DispatchInstruction) -> None:
    """Put one step's task on its queue."""
    _signature(dispatch).apply_async()


def send_many(dispatches: list[DispatchInstruction]) -> None:
    """Send steps that became ready together (a workflow's fan-out) as one Celery group."""
    if len(dispatches) == 1:
        send(dispatches[0])
    elif dispatches:
        group(_signature(each) for each in dispatches).apply_async()


def broker_lost_data() -> bool:
    """True once per loss of the broker's data (Redis flushed or restarted empty).

    The epoch key lives beside the queues; when it is gone, so may be any queued
    task. The first caller to notice sets a new epoch and gets True.
    """
    client = redisdb.client(_broker_url())
    if client.exists(EPOCH_KEY):
        return False
    created = client.set(EPOCH_KEY, secrets.token_hex(8), nx=True)
    return bool(created)


def mark_epoch() -> None:
    """Record the current broker epoch (at relay start: nothing is lost yet)."""
    redisdb.client(_broker_url()).set(EPOCH_KEY, secrets.token_hex(8), nx=True)


def _broker_url() -> str | None:
    return get_settings().broker_url
