"""The process's Redis client for events, pub/sub, heartbeats and rate limits."""

from __future__ import annotations

import redis

from emp_tasks.core.config import get_settings

_clients: dict[str, redis.Redis] = {}


def client(url: str | None = None) -> redis.Redis:
    if url is None:
        url = get_settings().redis_url
    assert url is not None
    if url not in _clients:
        _clients[url] = redis.Redis.from_url(
            url,
            decode_responses=True,
            socket_timeout=5,
            socket_connect_timeout=2,
            health_check_interval=30,
        )
    return _clients[url]


def reset_clients() -> None:
    """Forget clients (after fork, or when tests switch Redis)."""
    for each in _clients.values():
        each.close()
    _clients.clear()


def database_index(url: str | None = None) -> int:
    """The database number the process's Redis client uses (pub/sub spans all of them)."""
    return int(client(url).connection_pool.connection_kwargs.get("db", 0) or 0)
