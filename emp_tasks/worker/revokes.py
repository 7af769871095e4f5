"""Celery's revokes cancel steps: what Flower or `celery control revoke` asks, PostgreSQL does.

A revoke is a broadcast every worker keeps in memory (`celery.worker.state.revoked`);
Celery itself only drops the task's message when a worker receives it, and
`--terminate` cannot stop a thread. Left there, a revoked step would stay pending with
no task (or run to completion). So each worker watches its revoked set and cancels the
step a newly revoked task runs, like `POST /api/steps/{id}/cancel` (a running step stops
cooperatively, from `cancel_requested()`); with or without `--terminate`, the step ends
`cancelled`. The task is found by its id: a task this worker holds, or the outbox event
that sent it (a task's id is its event's id; a hand-back keeps it). The `task_revoked`
signal covers what that lookup cannot find (a task sent with a new id, after the broker
lost its data): when the revoked task's message reaches a worker, its step is cancelled
then. Cancelling a step that already ended changes nothing, so every worker may act on
the same broadcast.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Any

from celery.signals import task_revoked
from celery.worker import state as worker_state

from emp_tasks.auth import Principal
from emp_tasks.core.errors import InvalidState, NotFound
from emp_tasks.steps import client
from emp_tasks.store import db

logger = logging.getLogger(__name__)

CHECK_INTERVAL_S = 0.5
OPERATOR = Principal(customer_id="operator", admin=True, key_id="celery-revoke")


def step_of_task(task_id: str) -> str | None:
    """The step a task runs: one this worker holds, else the event that sent it."""
    for request in list(worker_state.active_requests) + list(worker_state.reserved_requests):
        if request.id == task_id and request.args:
            return str(request.args[0])
    with db.tx() as tx:
        row = tx.one("SELECT step_id FROM events WHERE id = %s AND dispatch IS NOT NULL", [task_id])
    return row.step_id if row is not None else None


def cancel_revoked(step_id: str, task_id: str) -> bool:
    """Cancel the step of a revoked task; False when it had already ended (or is unknown)."""
    try:
        client.cancel(step_id, OPERATOR, f"revoked through Celery (task {task_id})")
    except (InvalidState, NotFound):
        return False
    logger.info(
        "Step cancelled: its task was revoked",
        extra={"action": "step_revoked", "step_id": step_id, "task_id": task_id},
    )
    return True


class Watch:
    """A thread cancelling the steps of tasks newly revoked, and of revoked messages."""

    def __init__(self) -> None:
        self._seen: set[str] = set(worker_state.revoked)
        self._size = len(worker_state.revoked)
        self._arrived: queue.Queue[tuple[str, str]] = queue.Queue()
        self._todo: list[str] = []  # revoked task ids not handled yet (kept across failures)
        self._stop = threading.Event()

    def start(self) -> None:
        task_revoked.connect(self._on_revoked_message, weak=False)
        threading.Thread(target=self._run, name="emp-revokes", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def _on_revoked_message(self, request: Any = None, **_: Any) -> None:
        # Celery's consumer thread: no database work here.
        args = getattr(request, "args", None) or ()
        task_id = getattr(request, "id", None)
        if args and task_id:
            self._arrived.put((str(args[0]), str(task_id)))

    def newly_revoked(self) -> list[str]:
        revoked = worker_state.revoked
        if len(revoked) == self._size and not self._changed(revoked):
            return []
        current = set(revoked)
        new = sorted(current - self._seen)
        self._seen, self._size = current, len(revoked)
        return new

    def _changed(self, revoked: Any) -> bool:
        # A full LimitedSet keeps its size while old ids expire and new ones arrive.
        maxlen = getattr(revoked, "maxlen", None)
        return bool(maxlen) and len(revoked) >= maxlen

    def tick(self) -> None:
        self._todo += self.newly_revoked()
        while self._todo:
            step_id = step_of_task(self._todo[0])
            if step_id is not None:
                cancel_revoked(step_id, self._todo[0])
            self._todo.pop(0)
        while True:
            try:
                step_id, task_id = self._arrived.get_nowait()
            except queue.Empty:
                return
            cancel_revoked(step_id, task_id)

    def _run(self) -> None:
        while not self._stop.wait(CHECK_INTERVAL_S):
            try:
                self.tick()
            except Exception:
                logger.warning(
                    "Revoked tasks not handled yet; retrying",
                    exc_info=True,
                    extra={"action": "revokes_failed"},
                )
