"""Alembic environment: online migrations only, serialised by an advisory lock."""

from alembic import context
from sqlalchemy import text

from emp_tasks import embedded
from emp_tasks.store import db
from emp_tasks.store.models import Base

MIGRATION_LOCK_ID = 0x454D50  # any constant shared by every migrating process

config = context.config
url = config.attributes.get("database_url")
if url is None:  # the `alembic` command line: the servers every `emp` command uses
    url = embedded.bootstrap().database_url

connectable = config.attributes.get("connection") or db.engine(url)

with connectable.connect() as connection:
    connection.execute(text("SELECT pg_advisory_lock(:id)"), {"id": MIGRATION_LOCK_ID})
    connection.commit()
    try:
        context.configure(connection=connection, target_metadata=Base.metadata, compare_type=True)
        with context.begin_transaction():
            context.run_migrations()
        connection.commit()
    finally:
        connection.execute(text("SELECT pg_advisory_unlock(:id)"), {"id": MIGRATION_LOCK_ID})
        connection.commit()
