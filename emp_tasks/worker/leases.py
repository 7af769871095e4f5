"""Attempt leases: a worker process keeps renewing the lease of every step it runs.

`steps.attempts.begin` grants a lease of EMP_LEASE_TIMEOUT_S; while the attempt runs, a thread
in the same process renews it every third of that. When the process dies
(`kill -9`, a lost machine), renewals stop and the relay's reconcile loop
re-queues the step as a new attempt; the dead attempt is fenced out.
The renewer lives in the process that runs the step, whatever the Celery pool.
"""

from __future__ import annotations

import logging
import threading
import time

from emp_tasks.core.config import get_settings
from emp_tasks.steps import attempts as step_attempts

logger = logging.getLogger(__name__)

_running: dict[str, int] = {}
_lock = threading.Lock()
_renewer: threading.Thread | None = None


def hold(step_id: str, attempt: int) -> None:
    """This process runs `attempt` of the step: keep its lease alive."""
    with _lock:
        _running[step_id] = attempt
    _ensure_renewer()


def release(step_id: str) -> None:
    with _lock:
        _running.pop(step_id, None)


def held() -> dict[str, int]:
    with _lock:
        return dict(_running)


def _ensure_renewer() -> None:
    global _renewer
    with _lock:
        if _renewer is not None and _renewer.is_alive():
            return
        _renewer = threading.Thread(target=_renew_forever, name="emp-leases", daemon=True)
        _renewer.start()


def _renew_forever() -> None:
    interval = max(0.2, get_settings().lease_timeout_s / 3)
    while True:
        time.sleep(interval)
        attempts = held()
        if not attempts:
            continue
        try:
            step_attempts.renew_leases(attempts)
        except Exception:
            logger.exception("Lease renewal failed", extra={"action": "lease_renew_failed"})
