"""Celery's threads pool, answering `revoke --terminate` instead of failing it.

A thread cannot be killed, so Celery's threads pool refuses to terminate a job and the
control command fails (its reply is an error). Here terminating is a no-op: Celery
then announces the task revoked (`task_revoked`, Flower's REVOKED), the revoke watch
cancels the step (emp_tasks.worker.revokes), and the step's thread stops cooperatively
within a stop check (emp_tasks.worker.execution), as a cancel through the API does.
`emp worker --pool threads` runs this pool.
"""

from __future__ import annotations

import logging

from celery.concurrency.thread import TaskPool as ThreadsPool

logger = logging.getLogger(__name__)

NAME = "emp_tasks.worker.threads:TaskPool"


class TaskPool(ThreadsPool):
    def terminate_job(self, pid: int | None, signal: int | None = None) -> None:
        logger.info(
            "Terminate asked for a step's thread: it stops once its step is cancelled",
            extra={"action": "terminate_cooperatively", "signal": signal},
        )
