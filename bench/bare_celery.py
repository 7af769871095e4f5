"""The bare Celery baseline app: one no-op task, Redis as broker and result backend.

Loaded by the baseline's worker subprocess (`celery -A bench.bare_celery worker`)
and by the benchmark process that sends it tasks. Celery's defaults are kept on
purpose: this is the "plain Celery" the system is compared against. The Redis URL
comes from EMP_BENCH_REDIS_URL (set by bench.baseline to the run's scratch Redis).
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery

REDIS_URL_ENV = "EMP_BENCH_REDIS_URL"
QUEUE = "bench.bare"
NOOP = "bench.noop"
PROGRESS_NOOP = "bench.progress_noop"


def _redis_url() -> str:
    url = os.environ.get(REDIS_URL_ENV)
    if not url:
        raise RuntimeError(f"{REDIS_URL_ENV} must name the Redis the baseline runs on")
    return url


app = Celery("bench_bare", broker=_redis_url(), backend=_redis_url())
app.conf.update(
    task_default_queue=QUEUE,
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    result_expires=3600,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)


@app.task(name=NOOP)
def noop(index: int) -> dict[str, Any]:
    """Do nothing; return a small dict so the result backend carries a real value."""
    return {"ok": True, "index": index}


@app.task(name=PROGRESS_NOOP, bind=True)
def progress_noop(self: Any, index: int, reports: int) -> dict[str, Any]:
    """Report progress `reports` times the way Celery does (result backend states), then
    return like `noop`: the peer of a step with progress reports."""
    for report in range(1, reports + 1):
        self.update_state(state="PROGRESS", meta={"progress": 100 * report / (reports + 1)})
    return {"ok": True, "index": index}
