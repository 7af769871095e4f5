"""Celery settings, read from the environment (through emp_tasks.core.config).

GPU work is long and must not be lost: acknowledge late, give a task back when
its worker dies, and let each worker process hold one task at a time. A task
that Redis redelivers is harmless because the worker re-checks the step in
PostgreSQL before running it (see emp_tasks.steps.attempts.begin).
"""

from emp_tasks.core.config import get_settings
from emp_tasks.core.priority import BROKER_PRIORITY_LEVELS

_settings = get_settings()

broker_url = _settings.broker_url
# kombu's Redis transport, keeping one client for its bookkeeping (emp_tasks.worker.transport).
broker_transport = "emp_tasks.worker.transport:Transport"
broker_connection_retry_on_startup = True
# The Redis transport polls every priority level of every consumed queue in one
# BRPOP, highest level first across all queues; among queues at the same level,
# round robin, so customers (one queue per route, see emp_tasks.routes.routing) share a
# worker fairly at equal priority.
broker_transport_options = {
    "priority_steps": list(range(BROKER_PRIORITY_LEVELS)),
    "sep": ":",
    "queue_order_strategy": "round_robin",
    "visibility_timeout": 3600,
}

# The task body and the worker's signal handlers: loaded by every worker (the app
# itself, emp_tasks.store.broker, holds no task code so that senders never load it).
include = ["emp_tasks.worker.tasks"]

task_serializer = "json"
accept_content = ["json"]
task_ignore_result = True
result_backend = None
task_acks_late = True
task_reject_on_worker_lost = True
task_default_queue = "emp.default"
task_default_priority = 5

worker_prefetch_multiplier = 1
worker_hijack_root_logger = False
worker_cancel_long_running_tasks_on_connection_loss = False
worker_send_task_events = False
worker_enable_remote_control = True
