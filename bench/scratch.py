"""Throwaway environments for benchmark and test runs: a fresh database and Redis index.

Harness code, not part of the product: `python -m bench` and the test suite
(tests/conftest.py) both create their runs here.

Each run creates its own database on the PostgreSQL server and claims a Redis
database index no other run holds, so concurrent runs on one machine never see
each other's steps, queues or events. With no server URLs, embedded servers are
used (in a data folder of their own).
"""

from __future__ import annotations

import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import redis

from emp_tasks import embedded
from emp_tasks.store import db

REDIS_LOCK = "emp:scratch-lock"
LOCK_TTL_S = 6 * 3600


def server_urls(data_dir: Path, embedded_redis_port: int) -> tuple[str, str]:
    """REDIS_URL and DATABASE_URL from the environment, else embedded servers."""
    redis_url, database_url = os.environ.get("REDIS_URL"), os.environ.get("DATABASE_URL")
    if redis_url and database_url:
        return redis_url, database_url
    return (
        redis_url or embedded.start_redis(data_dir, embedded_redis_port),
        database_url or embedded.start_postgres(data_dir),
    )


def _with_path(url: str, path: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=path))


@dataclass
class Scratch:
    redis_url: str
    database_url: str
    server_database_url: str
    database_name: str
    lock: redis.Redis

    def drop(self) -> None:
        db.forget(self.database_url)
        shutil.rmtree(Path(".emp") / "bench" / "outputs" / self.database_name, ignore_errors=True)
        with psycopg.connect(self.server_database_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{self.database_name}" WITH (FORCE)')
        for key in self.lock.scan_iter("*"):
            self.lock.delete(key)
        self.lock.close()


def _claim_redis_db(url: str) -> tuple[str, redis.Redis]:
    token = secrets.token_hex(8)
    for index in range(1, 16):
        candidate = _with_path(url, f"/{index}")
        client = redis.Redis.from_url(candidate, decode_responses=True)
        if client.set(REDIS_LOCK, token, nx=True, ex=LOCK_TTL_S):
            for key in client.scan_iter("*"):
                if key != REDIS_LOCK:
                    client.delete(key)
            return candidate, client
        client.close()
    raise RuntimeError("Redis databases 1-15 are all held by other runs")


def create(prefix: str, data_dir: Path, embedded_redis_port: int) -> Scratch:
    """A migrated, empty database and an empty Redis index for one run."""
    redis_base, database_base = server_urls(data_dir, embedded_redis_port)
    name = f"{prefix}_{os.getpid()}_{secrets.token_hex(3)}"
    with psycopg.connect(database_base, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    database_url = _with_path(database_base, f"/{name}")
    redis_url, lock = _claim_redis_db(redis_base)
    db.upgrade(database_url)
    return Scratch(redis_url, database_url, database_base, name, lock)
