"""CPU time per process over one measured window: what each part of a system spent.

Wall time on a shared machine is noisy; CPU time is what a step costs. A meter
snapshots the user + system CPU seconds of named process trees (a Procfile
process and its children, a Celery worker and its pool), of the PostgreSQL
server's processes (every child of the postmaster: backends, WAL writer,
checkpointer) and of the Redis server, when they run on this machine, and of this
benchmark process itself (the clients). Processes that start inside the window count
whole; processes that exit inside it are lost (none do in a run: pools hold their
connections).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable

import psutil
import redis

CLIENT = "client (bench)"
POSTGRES = "PostgreSQL"
REDIS = "Redis"


def _cpu(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def _tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def postgres_processes(database_url: str) -> Callable[[], list[psutil.Process]]:
    """Every process of the local PostgreSQL server `database_url` names (none if remote)."""
    import psycopg

    try:
        with psycopg.connect(database_url, connect_timeout=3) as connection:
            backend = connection.execute("SELECT pg_backend_pid()").fetchone()[0]
        postmaster = psutil.Process(backend).parent()
    except (psycopg.Error, psutil.Error):
        return list
    if postmaster is None:
        return list

    def processes() -> list[psutil.Process]:
        with contextlib.suppress(psutil.Error):
            return postmaster.children()
        return []

    return processes


def redis_process(redis_url: str) -> Callable[[], list[psutil.Process]]:
    """The local Redis server `redis_url` names (none if it runs elsewhere)."""
    try:
        client = redis.Redis.from_url(redis_url, socket_connect_timeout=2)
        pid = int(client.info("server")["process_id"])
        client.close()
        process = psutil.Process(pid)
        if "redis" not in process.name():
            return list
    except (redis.RedisError, psutil.Error, KeyError, ValueError):
        return list
    return lambda: [process]


class CpuMeter:
    """CPU seconds each group of processes used between `start()` and `stop()`."""

    def __init__(self, groups: dict[str, Callable[[], Iterable[psutil.Process]]]) -> None:
        self.groups = {**groups, CLIENT: lambda: [psutil.Process(os.getpid())]}
        self._before: dict[str, dict[int, float]] = {}

    @classmethod
    def for_system(cls, pids: dict[str, int], database_url: str | None, redis_url: str) -> CpuMeter:
        """The named process trees (name -> root pid) with the servers they use."""
        groups: dict[str, Callable[[], Iterable[psutil.Process]]] = {
            name: (lambda pid=pid: _tree(pid)) for name, pid in pids.items()
        }
        if database_url is not None:
            groups[POSTGRES] = postgres_processes(database_url)
        groups[REDIS] = redis_process(redis_url)
        return cls(groups)

    def _read(self) -> dict[str, dict[int, float]]:
        readings: dict[str, dict[int, float]] = {}
        for name, processes in self.groups.items():
            readings[name] = {}
            for process in processes():
                with contextlib.suppress(psutil.Error):
                    readings[name][process.pid] = _cpu(process)
        return readings

    def start(self) -> None:
        self._before = self._read()

    def stop(self) -> dict[str, float]:
        """CPU seconds per group since `start()`."""
        after = self._read()
        used: dict[str, float] = {}
        for name, readings in after.items():
            before = self._before.get(name, {})
            used[name] = sum(max(0.0, cpu - before.get(pid, 0.0)) for pid, cpu in readings.items())
        return used
