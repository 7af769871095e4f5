"""Recovery that no single request or worker can do: the relay runs it periodically.

- attempts whose worker stopped renewing its lease are failed as lost and retried;
- pending steps past their queue deadline fail with EXPIRED;
- when the broker lost its data (Redis flushed or restarted empty), every pending
  step's task is sent again. PostgreSQL knows every step; Redis is only transport.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from emp_tasks import dispatch, steps

logger = logging.getLogger(__name__)


@dataclass
class Report:
    lost: int = 0
    expired: int = 0
    redispatched: int = 0

    def __bool__(self) -> bool:
        return bool(self.lost or self.expired or self.redispatched)


def run_once() -> Report:
    report = Report()
    for step_id, attempt in steps.expired_leases():
        if steps.lose(step_id, attempt).status is not None:
            report.lost += 1
    for step_id in steps.overdue():
        if steps.expire(step_id):
            report.expired += 1
    if dispatch.broker_lost_data():
        logger.warning(
            "Broker data lost; re-sending every pending step",
            extra={"action": "broker_data_lost"},
        )
        report.redispatched = steps.redispatch_pending()
    return report
