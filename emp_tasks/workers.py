"""Worker presence: each worker heartbeats a short-lived key in Redis while it runs."""

from __future__ import annotations

import json
import logging
import threading
import time

from emp_tasks import redisdb
from emp_tasks.config import get_settings

logger = logging.getLogger(__name__)

HEARTBEAT_KEY = "emp:worker:{worker_id}"
HEARTBEAT_INTERVAL_S = 5.0
HEARTBEAT_TTL_S = 20

_stop = threading.Event()


def _beat() -> None:
    settings = get_settings()
    key = HEARTBEAT_KEY.format(worker_id=settings.worker_id)
    value = json.dumps(
        {
            "worker_id": settings.worker_id,
            "machine_id": settings.machine_id,
            "services": list(settings.worker_services),
        }
    )
    while not _stop.is_set():
        try:
            redisdb.client().set(key, value, ex=HEARTBEAT_TTL_S)
        except Exception:
            logger.warning("Heartbeat failed", extra={"action": "worker_heartbeat_failed"})
        _stop.wait(HEARTBEAT_INTERVAL_S)
    try:
        redisdb.client().delete(key)
    except Exception:
        logger.warning("Heartbeat key not removed", extra={"action": "worker_heartbeat_failed"})


def start_heartbeat() -> None:
    _stop.clear()
    threading.Thread(target=_beat, name="emp-heartbeat", daemon=True).start()


def stop_heartbeat() -> None:
    _stop.set()


def online_count() -> int:
    """Workers whose heartbeat has not expired."""
    return sum(1 for _ in redisdb.client().scan_iter(match=HEARTBEAT_KEY.format(worker_id="*")))


def wait_for_workers(count: int = 1, timeout_s: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if online_count() >= count:
            return True
        time.sleep(0.1)
    return False
