"""The Celery application object, the name of the task that runs a step, and that task's
message as the Redis transport stores it.

A leaf: it imports no task code, so sending a step's task (emp_tasks.store.dispatch)
never loads the worker. The task body and the worker's signal handlers are in
emp_tasks.worker.tasks, which every worker loads (`emp worker`, and celeryconfig's
`include` for `celery -A emp_tasks.store.broker worker`).

`task_message` writes the message `apply_async` would put on the queue's Redis list
(task protocol 2, the JSON serializer, the default exchange, the queue's list for the
broker priority level), so a publisher can push it with a plain LPUSH, inside the same
Redis script that publishes the event queueing the step (emp_tasks.store.publishing).
Building it here costs a few microseconds; `apply_async` costs about a millisecond.
"""

from __future__ import annotations

import base64
import json
import uuid
from datetime import datetime

from celery import Celery
from celery.utils.nodenames import anon_nodename

app = Celery("emp_tasks")
app.config_from_object("celeryconfig")

RUN_STEP = "emp.run_step"

_NO_CANVAS = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
_ORIGIN = anon_nodename()


def queue_list(queue: str, priority: int) -> str:
    """The Redis list that holds `queue`'s messages of broker priority `priority`.

    The Redis transport keeps one list per priority level: the queue's name for level 0,
    `<queue><sep><level>` for the others (celeryconfig's priority steps are every level).
    """
    separator = app.conf.broker_transport_options.get("sep", ":")
    return f"{queue}{separator}{priority}" if priority else queue


def task_message(
    step_id: str,
    queue: str,
    priority: int,
    task_id: str,
    eta: datetime | None = None,
    *,
    service: str | None = None,
    customer_id: str | None = None,
) -> tuple[str, str]:
    """The Redis list and the message (JSON) that run `step_id` on a worker consuming `queue`.

    `task_id` names the Celery task (the event's id when an event queues it, so a repeated
    publish repeats the same task); `eta` holds it on the worker until then. `service` and
    `customer_id` travel as kwargs, for operators' tools (Flower shows them); the task
    reads the step from PostgreSQL.
    """
    kwargs = {
        name: value
        for name, value in (("service", service), ("customer_id", customer_id))
        if value is not None
    }
    body = json.dumps([[step_id], kwargs, _NO_CANVAS])
    message = {
        "body": base64.b64encode(body.encode()).decode("ascii"),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {
            "lang": "py",
            "task": RUN_STEP,
            "id": task_id,
            "shadow": None,
            "eta": eta.isoformat() if eta is not None else None,
            "expires": None,
            "group": None,
            "group_index": None,
            "retries": 0,
            "timelimit": [None, None],
            "root_id": task_id,
            "parent_id": None,
            "argsrepr": repr((step_id,)),
            "kwargsrepr": repr(kwargs),
            "origin": _ORIGIN,
            "ignore_result": True,
            "replaced_task_nesting": 0,
            "stamped_headers": None,
            "stamps": {},
        },
        "properties": {
            "correlation_id": task_id,
            "reply_to": None,
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": queue},
            "priority": priority,
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
        },
    }
    return queue_list(queue, priority), json.dumps(message)
