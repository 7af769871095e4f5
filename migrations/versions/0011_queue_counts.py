"""Pending steps counted per queue and broker level, kept by triggers on steps

`queue_counts` holds, per (queue, level, backend), the net change to that queue's
pending steps at that level made by one PostgreSQL backend (`pg_backend_pid()`): the
sum over backends is the exact count, in any snapshot, because the triggers change it
in the same transaction as the steps. One row per backend means two transactions never
wait for each other's counter (a backend runs one transaction at a time); the relay
folds the rows of backends that have ended into backend 0. A queue position is then a
few counter rows plus a count of the steps queued after it, instead of a count of every
step ahead of it.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-07 17:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


# emp_tasks.core.priority.broker_priority_sql() over OLD / NEW as of this revision
def _level(row: str) -> str:
    return (
        f"greatest(0, (9 - least(9, greatest(0, {row}.priority) * 10 / 101)) - CASE WHEN"
        f" ({row}.workflow_id IS NOT NULL AND jsonb_array_length({row}.depends_on) > 0)"
        " THEN 1 ELSE 0 END)"
    )


def _add(row: str, delta: int) -> str:
    return (
        "INSERT INTO queue_counts AS c (queue, level, backend, pending)"
        f" VALUES ({row}.queue, {_level(row)}, pg_backend_pid(), {delta})"
        " ON CONFLICT (queue, level, backend) DO UPDATE SET pending = c.pending + excluded.pending;"
    )


FUNCTION = f"""
CREATE FUNCTION steps_count_pending() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF TG_OP <> 'INSERT' AND OLD.status = 'pending' THEN
    {_add("OLD", -1)}
  END IF;
  IF TG_OP <> 'DELETE' AND NEW.status = 'pending' THEN
    {_add("NEW", 1)}
  END IF;
  RETURN NULL;
END
$$
"""
TRIGGERS = {
    "steps_pending_inserted": "AFTER INSERT ON steps FOR EACH ROW WHEN (NEW.status = 'pending')",
    "steps_pending_deleted": "AFTER DELETE ON steps FOR EACH ROW WHEN (OLD.status = 'pending')",
    "steps_pending_changed": (
        "AFTER UPDATE ON steps FOR EACH ROW WHEN ("
        "(OLD.status = 'pending' OR NEW.status = 'pending') AND ("
        "OLD.status IS DISTINCT FROM NEW.status OR OLD.queue IS DISTINCT FROM NEW.queue"
        " OR OLD.priority IS DISTINCT FROM NEW.priority"
        " OR OLD.workflow_id IS DISTINCT FROM NEW.workflow_id"
        " OR OLD.depends_on IS DISTINCT FROM NEW.depends_on))"
    ),
}


def upgrade() -> None:
    op.create_table(
        "queue_counts",
        sa.Column("queue", sa.String(250), nullable=False),
        sa.Column("level", sa.SmallInteger(), nullable=False),
        sa.Column("backend", sa.Integer(), nullable=False),
        sa.Column("pending", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("queue", "level", "backend"),
    )
    op.execute(FUNCTION)
    # No step changes between the count below and the triggers taking over.
    op.execute("LOCK TABLE steps IN SHARE ROW EXCLUSIVE MODE")
    for name, when in TRIGGERS.items():
        op.execute(f"CREATE TRIGGER {name} {when} EXECUTE FUNCTION steps_count_pending()")
    level = _level("steps")
    op.execute(
        "INSERT INTO queue_counts (queue, level, backend, pending)"
        f" SELECT queue, {level}, 0, count(*) FROM steps WHERE status = 'pending'"
        f" GROUP BY queue, {level}"
    )


def downgrade() -> None:
    for name in TRIGGERS:
        op.execute(f"DROP TRIGGER {name} ON steps")
    op.execute("DROP FUNCTION steps_count_pending()")
    op.drop_table("queue_counts")
