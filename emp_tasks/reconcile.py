"""Recovery that no single request or worker can do: the relay runs it periodically.

- workers silent for their lease timeout are marked offline, their steps re-queued;
- attempts whose worker stopped renewing its lease are failed as lost and retried;
- pending steps past their queue deadline fail with EXPIRED;
- when the broker lost its data (Redis flushed or restarted empty), every pending
  step's task is sent again. PostgreSQL knows every step; Redis is only transport;
- pending steps whose task is nowhere in the broker (purged, deleted, taken by a worker
  that died before it began) are sent again (emp_tasks.steps.stranded).
Each recovery counts in `emp_attempts_recovered_total{reason}`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from emp_tasks import metrics, workers
from emp_tasks.steps import recovery, stranded
from emp_tasks.store import dispatch

logger = logging.getLogger(__name__)


@dataclass
class Report:
    offline: int = 0
    lost: int = 0
    expired: int = 0
    redispatched: int = 0
    stranded: int = 0

    def __bool__(self) -> bool:
        return bool(self.offline or self.lost or self.expired or self.redispatched or self.stranded)


_stranded = stranded.Watch()
"""The stranded-step rule's suspects from the last scan (this relay's)."""


def run_once() -> Report:
    report = Report()
    report.offline = len(workers.mark_silent_offline())
    for step_id, attempt in recovery.expired_leases():
        if recovery.lose(step_id, attempt).status is not None:
            report.lost += 1
    for step_id in recovery.overdue():
        if recovery.expire(step_id):
            report.expired += 1
    if dispatch.broker_lost_data():
        logger.warning(
            "Broker data lost; re-sending every pending step",
            extra={"action": "broker_data_lost"},
        )
        report.redispatched = recovery.redispatch_pending()
    else:
        report.stranded = len(_stranded.scan().resent)
    metrics.recovered(
        expired=report.expired,
        stranded=report.stranded,
        redispatched=report.redispatched,
    )
    return report
