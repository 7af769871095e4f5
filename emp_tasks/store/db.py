"""Database access: one engine per process, short transactions, migrations through Alembic."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Engine, create_engine
from sqlalchemy.orm import Session, sessionmaker

from emp_tasks.core.config import get_settings

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]

_engines: dict[str, Engine] = {}
_sessionmakers: dict[str, sessionmaker[Session]] = {}


def sqlalchemy_url(url: str) -> str:
    """Use the psycopg 3 driver whatever scheme the operator wrote."""
    for prefix in ("postgresql+psycopg://", "postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    raise ValueError("DATABASE_URL must be a PostgreSQL URL (postgresql://...)")


def _resolve(url: str | None) -> str:
    if url is None:
        url = get_settings().database_url
    assert url is not None
    return url


def engine(url: str | None = None) -> Engine:
    url = _resolve(url)
    if url not in _engines:
        _engines[url] = create_engine(
            sqlalchemy_url(url),
            pool_size=int(os.environ.get("EMP_DB_POOL_SIZE", "10")),
            max_overflow=20,
            pool_pre_ping=True,
            pool_recycle=1800,
            # A failed statement's parameters are customers' payloads and webhook
            # secrets: keep them out of exception text, and so out of every log.
            hide_parameters=True,
        )
        _sessionmakers[url] = sessionmaker(_engines[url], expire_on_commit=False)
    return _engines[url]


AFTER_COMMIT = "emp_after_commit"


def after_commit(session: Session, key: str, callback: Callable[[Session], None]) -> None:
    """Run `callback` once, after this session's transaction commits (never on rollback).

    Used for work that must only follow a durable change: publishing its events
    and sending its Celery task. A failing callback is logged, not raised: the
    change is committed, and the relay sweeper and reconcile loop finish the job.
    """
    session.info.setdefault(AFTER_COMMIT, {}).setdefault(key, callback)


@contextmanager
def transaction(url: str | None = None) -> Iterator[Session]:
    """A session whose work commits on success and rolls back on any exception."""
    url = _resolve(url)
    engine(url)
    with _sessionmakers[url]() as session:
        with session.begin():
            yield session
        for key, callback in session.info.pop(AFTER_COMMIT, {}).items():
            try:
                callback(session)
            except Exception:
                logger.exception(
                    "After-commit work failed", extra={"action": "after_commit", "key": key}
                )


def forget(url: str) -> None:
    """Close and drop this URL's engine (before its database is dropped)."""
    bound = _engines.pop(url, None)
    _sessionmakers.pop(url, None)
    if bound is not None:
        bound.dispose()


def dispose_engines() -> None:
    """Drop pooled connections (after fork: a child must not share its parent's sockets)."""
    for bound in _engines.values():
        bound.dispose(close=False)


def alembic_config(url: str):
    from alembic.config import Config

    config = Config(str(ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(ROOT / "migrations"))
    config.attributes["database_url"] = url
    return config


def upgrade(url: str, revision: str = "head") -> None:
    """Apply migrations; concurrent callers serialise on a PostgreSQL advisory lock."""
    from alembic import command

    command.upgrade(alembic_config(url), revision)
