"""The relay process: the outbox's crash path, and periodic recovery.

The fast path publishes a transaction's events right after it commits
(emp_tasks.store.publishing). The sweeper here (`sweep`, run by the `relay` process)
publishes whatever a dead or failed fast path left unmarked, through
`publishing.publish_aggregates`, so events keep their commit order whichever path
publishes them. The relay also records the broker epoch at start, runs
`reconcile` less often than it sweeps, releases steps whose warm wait is over (warm
placement, 10 times a second), folds the pending-step counters of ended database backends
once a minute (emp_tasks.steps.queue_order.compact_counts) and, with
EMP_OUTPUT_RETENTION_DAYS set, deletes outputs older than that once an hour
(`expire_outputs`).
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import timedelta

from sqlalchemy import func, select

from emp_tasks import reconcile, storage
from emp_tasks.core.config import get_settings
from emp_tasks.core.times import now
from emp_tasks.steps import affinity, queue_order
from emp_tasks.store import db, dispatch, publishing
from emp_tasks.store.models import Event

logger = logging.getLogger(__name__)

RETENTION_INTERVAL_S = 3600.0
COUNTS_COMPACT_S = 60.0
AFFINITY_CHECK_S = 0.1


def release_warm_waits_forever() -> None:
    """Warm placement's wait bound (emp_tasks.steps.affinity), checked 10 times a second."""
    while True:
        try:
            affinity.release_due()
        except Exception:
            logger.exception("Warm waits not released", extra={"action": "affinity_failed"})
            time.sleep(1.0)
        time.sleep(AFFINITY_CHECK_S)


def expire_outputs() -> int:
    """Delete stored outputs older than EMP_OUTPUT_RETENTION_DAYS; return how many."""
    days = get_settings().output_retention_days
    if days is None:
        return 0
    return storage.get().delete_older_than(now() - timedelta(days=days))


def sweep(min_age_s: float = 0.5, batch: int = 200) -> int:
    """Publish events the fast path left behind (older than `min_age_s`); return the count."""
    published = 0
    while True:
        with db.transaction() as session:
            aggregates = list(
                session.scalars(
                    select(Event.aggregate)
                    .where(
                        Event.published_at.is_(None),
                        Event.created_at
                        < func.now() - func.make_interval(0, 0, 0, 0, 0, 0, min_age_s),
                    )
                    .order_by(Event.seq)
                    .limit(batch)
                )
            )
        if not aggregates:
            return published
        published += publishing.publish_aggregates(aggregates)
        if len(aggregates) < batch:
            return published


def run_forever(interval_s: float | None = None) -> None:
    """The relay process: sweep the outbox every interval and reconcile less often.

    Survives Redis or database outages: each pass logs its failure and the next
    pass tries again.
    """
    settings = get_settings()
    interval = settings.relay_interval_s if interval_s is None else interval_s
    logger.info("Relay started", extra={"action": "relay_start", "interval_s": interval})
    try:
        dispatch.mark_epoch()
    except Exception:
        logger.exception("Broker epoch not recorded", extra={"action": "relay_epoch_failed"})
    threading.Thread(target=release_warm_waits_forever, name="emp-affinity", daemon=True).start()
    next_reconcile = 0.0
    next_retention = 0.0
    next_compact = 0.0
    while True:
        try:
            count = sweep()
            if count:
                logger.info("Swept events", extra={"action": "relay_sweep", "count": count})
        except Exception:
            logger.exception("Relay sweep failed", extra={"action": "relay_sweep_failed"})
        if time.monotonic() >= next_reconcile:
            next_reconcile = time.monotonic() + settings.reconcile_interval_s
            try:
                report = reconcile.run_once()
                if report:
                    logger.info("Reconciled", extra={"action": "reconcile", **vars(report)})
            except Exception:
                logger.exception("Reconcile failed", extra={"action": "reconcile_failed"})
        if time.monotonic() >= next_compact:
            next_compact = time.monotonic() + COUNTS_COMPACT_S
            try:
                queue_order.compact_counts()
            except Exception:
                logger.exception(
                    "Queue counters not compacted", extra={"action": "counts_compact_failed"}
                )
        if settings.output_retention_days is not None and time.monotonic() >= next_retention:
            next_retention = time.monotonic() + RETENTION_INTERVAL_S
            try:
                deleted = expire_outputs()
                logger.info(
                    "Old outputs deleted", extra={"action": "outputs_expired", "count": deleted}
                )
            except Exception:
                logger.exception(
                    "Output retention failed", extra={"action": "outputs_expire_failed"}
                )
        time.sleep(interval)
