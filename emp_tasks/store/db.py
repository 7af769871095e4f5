"""Database access: one engine per process, short transactions, migrations through Alembic.

Two ways into a transaction, on the same connection pool:

- `tx()` yields a `Tx`: SQL statements on the pooled psycopg connection itself, rows
  as named tuples. The step lifecycle (every write on its hot path) uses it: a
  transition is a handful of statements, and SQLAlchemy's per-statement and ORM work
  would cost more CPU than PostgreSQL spends on them.
- `transaction()` yields an ORM `Session`, for reads and for the tables whose writes
  are rare (the fleet, webhook endpoints). `Tx.of(session)` runs `Tx` statements in a
  session's own transaction, so a fleet change and the step transitions it causes
  commit together.

Connections are not pinged before each transaction (a round trip each time); a
connection the server closed (a restart) fails its first statement, is thrown
away, and that statement is tried once more on a fresh one.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
from psycopg.rows import namedtuple_row
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
            # Sized for the threads that use the database at once; no overflow, so a
            # burst waits for a pooled connection instead of opening and closing new ones.
            pool_size=int(os.environ.get("EMP_DB_POOL_SIZE", "10")),
            max_overflow=int(os.environ.get("EMP_DB_POOL_OVERFLOW", "0")),
            pool_timeout=30,
            pool_pre_ping=False,
            pool_recycle=1800,
            pool_use_lifo=True,
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


INSERT_CHUNK = 500


def text_array(values: Iterable[Any]) -> str:
    """A PostgreSQL array literal of these values (for `%s::text[]`, `%s::bigint[]`):
    psycopg dumps a list by looking at each of its elements, a string it sends as it is."""
    quoted = (str(value).replace("\\", "\\\\").replace('"', '\\"') for value in values)
    return "{" + ",".join(f'"{value}"' for value in quoted) + "}"


class Tx:
    """One open transaction: SQL statements on its psycopg connection, rows as named
    tuples, and work to run once it has committed (see `after_commit`)."""

    def __init__(
        self,
        connection: psycopg.Connection,
        info: dict[str, Any],
        on_commit: Callable[[str, Callable[[], None]], None],
        reconnect: Callable[[], psycopg.Connection] | None = None,
        *,
        deferring: bool = False,
        single: bool = False,
    ) -> None:
        self.connection = connection
        self.info = info
        """Scratch space for this transaction (e.g. the aggregates whose events it recorded)."""
        self.deferring = deferring
        """Whether work may wait for `before_commit` (not in an ORM session's transaction)."""
        self.single = single
        """Whether the transaction is its one statement (see `tx(single=True)`)."""
        self._on_commit = on_commit
        self._reconnect = reconnect
        self._statements = 0
        self._before_commit: dict[str, Callable[[], None]] = {}

    @classmethod
    def of(cls, session: Session) -> Tx:
        """Statements in the ORM session's own transaction (its after-commit work too)."""
        connection = session.connection().connection.driver_connection
        assert isinstance(connection, psycopg.Connection)

        def on_commit(key: str, callback: Callable[[], None]) -> None:
            after_commit(session, key, lambda _session: callback())

        return cls(connection, session.info, on_commit)

    def execute(self, sql: str, params: Any = None) -> psycopg.Cursor[Any]:
        if self.single and self._statements:
            raise RuntimeError("a single-statement transaction runs one statement")
        cursor = self.connection.cursor(row_factory=namedtuple_row)
        try:
            cursor.execute(sql, params, prepare=None)
        except psycopg.OperationalError:
            # A pooled connection the server closed since its last use: nothing of this
            # transaction ran yet, so its first statement is safe to send again elsewhere.
            if self._statements or self._reconnect is None or not self.connection.broken:
                raise
            self.connection = self._reconnect()
            cursor = self.connection.cursor(row_factory=namedtuple_row)
            cursor.execute(sql, params)
        self._statements += 1
        return cursor

    def one(self, sql: str, params: Any = None) -> Any:
        """The statement's first row, or None."""
        return self.execute(sql, params).fetchone()

    def all(self, sql: str, params: Any = None) -> list[Any]:
        return self.execute(sql, params).fetchall()

    def insert(
        self, head: str, template: str, rows: list[Sequence[Any]], tail: str = ""
    ) -> list[Any]:
        """`head VALUES template, template, … tail` for these rows, in chunks of
        INSERT_CHUNK rows; the rows the statements return, in order.

        Plain VALUES rather than arrays to unnest: psycopg dumps each array by looking at
        its elements, which costs more than the insert itself for the few rows of a step.
        """
        returned: list[Any] = []
        for start in range(0, len(rows), INSERT_CHUNK):
            chunk = rows[start : start + INSERT_CHUNK]
            values = ", ".join([template] * len(chunk))
            params = [value for row in chunk for value in row]
            cursor = self.execute(f"{head} VALUES {values} {tail}", params)
            if _returns_rows(cursor):
                returned.extend(cursor.fetchall())
        return returned

    def before_commit(self, key: str, callback: Callable[[], None]) -> None:
        """Run `callback` once (per key) as this transaction's last statements (only when
        `deferring`): e.g. one INSERT of every event it recorded, instead of one each."""
        assert self.deferring
        self._before_commit.setdefault(key, callback)

    def _finish(self) -> None:
        while self._before_commit:
            key = next(iter(self._before_commit))
            self._before_commit.pop(key)()

    def after_commit(self, key: str, callback: Callable[[], None]) -> None:
        """Run `callback` once (per key) after this transaction commits, never on rollback."""
        self._on_commit(key, callback)


def _returns_rows(cursor: psycopg.Cursor[Any]) -> bool:
    """Whether the statement returned rows (RETURNING), read from its result's field count:
    `cursor.description` would build a Column object for each of a step's 34 columns."""
    result = cursor.pgresult
    return result is not None and result.nfields > 0


@contextmanager
def tx(url: str | None = None, *, single: bool = False) -> Iterator[Tx]:
    """A transaction on a pooled psycopg connection: commits on success, rolls back on
    any exception, then runs its after-commit work (see `after_commit`).

    `single`: the transaction is one statement (a data-modifying CTE writes everything
    it changes), sent in autocommit: one round trip, where BEGIN and COMMIT would make
    three. A second statement raises; so does recording events apart from it.
    """
    pool = engine(url).pool
    holder = {"fairy": pool.connect()}
    callbacks: dict[str, Callable[[], None]] = {}

    def connection() -> psycopg.Connection:
        driver = holder["fairy"].driver_connection
        if single:
            driver.autocommit = True
        return driver

    def reconnect() -> psycopg.Connection:
        holder["fairy"].invalidate()
        holder["fairy"] = pool.connect()
        return connection()

    try:
        transaction = Tx(
            connection(),
            {},
            lambda key, callback: callbacks.setdefault(key, callback),
            reconnect,
            deferring=not single,
            single=single,
        )
        try:
            yield transaction
            transaction._finish()
            transaction.connection.commit()
        except BaseException:
            if transaction.connection.broken:
                holder["fairy"].invalidate()
            else:
                transaction.connection.rollback()
            raise
    finally:
        if single and not holder["fairy"].driver_connection.broken:
            holder["fairy"].driver_connection.autocommit = False
        holder["fairy"].close()
    _run_after_commit(callbacks.items())


def _run_after_commit(callbacks: Iterable[tuple[str, Callable[[], None]]]) -> None:
    for key, callback in callbacks:
        try:
            callback()
        except Exception:
            logger.exception(
                "After-commit work failed", extra={"action": "after_commit", "key": key}
            )


@contextmanager
def transaction(url: str | None = None) -> Iterator[Session]:
    """A session whose work commits on success and rolls back on any exception."""
    url = _resolve(url)
    engine(url)
    with _sessionmakers[url]() as session:
        with session.begin():
            yield session
        callbacks = session.info.pop(AFTER_COMMIT, {})
        _run_after_commit((key, lambda c=c: c(session)) for key, c in callbacks.items())


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
