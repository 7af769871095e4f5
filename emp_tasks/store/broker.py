"""The Celery application object and the name of the task that runs a step.

A leaf: it imports no task code, so sending a step's task (emp_tasks.store.dispatch)
never loads the worker. The task body and the worker's signal handlers are in
emp_tasks.worker.tasks, which every worker loads (`emp worker`, and celeryconfig's
`include` for `celery -A emp_tasks.store.broker worker`).
"""

from __future__ import annotations

from celery import Celery

app = Celery("emp_tasks")
app.config_from_object("celeryconfig")

RUN_STEP = "emp.run_step"
