"""Request limits counted in Redis in fixed one-minute windows.

Two limits: requests per API key, and failed authentications per client address
(so nobody can guess keys or the metrics token at speed, or flood the key lookup).
When Redis cannot answer, requests are allowed: a limit protects the service, it
must not take it down.
"""

from __future__ import annotations

import logging
import time

import redis

from emp_tasks.store import redisdb

logger = logging.getLogger(__name__)

WINDOW_S = 60


def _window() -> int:
    return int(time.time() // WINDOW_S)


def _wait(window: int) -> int:
    """Seconds until `window` ends (at least 1, for a Retry-After header)."""
    return max(1, (window + 1) * WINDOW_S - int(time.time()))


def seconds_until_allowed(key_id: str, limit_per_minute: int) -> int:
    """0 if this request may proceed, else how many seconds until the window resets."""
    if limit_per_minute <= 0:
        return 0
    window = _window()
    count = _count(f"emp:ratelimit:{key_id}:{window}")
    if count is None:
        logger.warning("Rate limit not checked: Redis unavailable", extra={"action": "ratelimit"})
        return 0
    if count <= limit_per_minute:
        return 0
    return _wait(window)


def _count(name: str) -> int | None:
    """Add one to this window's counter; its new value, or None when Redis cannot answer."""
    try:
        pipe = redisdb.client().pipeline(transaction=False)
        pipe.incr(name)
        pipe.expire(name, WINDOW_S + 5)
        count, _ = pipe.execute()
    except redis.RedisError:
        return None
    return count


def _failures_key(address: str, window: int) -> str:
    return f"emp:authfail:{address}:{window}"


def seconds_until_auth_allowed(address: str, limit_per_minute: int) -> int:
    """0 if `address` may try to authenticate, else seconds until its window resets.

    Checked before a credential is looked at, so an address over its limit learns
    nothing, not even when it has guessed right.
    """
    if limit_per_minute <= 0:
        return 0
    window = _window()
    try:
        count = int(redisdb.client().get(_failures_key(address, window)) or 0)
    except redis.RedisError:
        logger.warning(
            "Failed-authentication limit not checked: Redis unavailable",
            extra={"action": "auth_throttle"},
        )
        return 0
    return _wait(window) if count >= limit_per_minute else 0


def authentication_failed(address: str, limit_per_minute: int) -> None:
    """Count one refused credential against `address` in this minute's window."""
    if limit_per_minute <= 0:
        return
    count = _count(_failures_key(address, _window()))
    if count == limit_per_minute:
        logger.warning(
            "Authentication throttled for a client address",
            extra={"action": "auth_throttled", "address": address, "failures": count},
        )
