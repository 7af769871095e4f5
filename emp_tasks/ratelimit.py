"""Per-key request rate limit: a fixed one-minute window counted in Redis."""

from __future__ import annotations

import logging
import time

import redis

from emp_tasks import redisdb

logger = logging.getLogger(__name__)

WINDOW_S = 60


def seconds_until_allowed(key_id: str, limit_per_minute: int) -> int:
    """0 if this request may proceed, else how many seconds until the window resets.

    When Redis cannot answer, requests are allowed: the limit protects the service,
    it must not take it down.
    """
    if limit_per_minute <= 0:
        return 0
    window = int(time.time() // WINDOW_S)
    name = f"emp:ratelimit:{key_id}:{window}"
    try:
        pipe = redisdb.client().pipeline(transaction=False)
        pipe.incr(name)
        pipe.expire(name, WINDOW_S + 5)
        count, _ = pipe.execute()
    except redis.RedisError:
        logger.warning("Rate limit not checked: Redis unavailable", extra={"action": "ratelimit"})
        return 0
    if count <= limit_per_minute:
        return 0
    return max(1, (window + 1) * WINDOW_S - int(time.time()))
