"""Pending steps indexed in the order workers take them, for queue positions

Replaces ix_steps_queue_pending (queue) by ix_steps_queue_order (queue, broker level,
queued_at, id), both partial on pending steps: the same rows, so no more index writes,
and a step's queue position is one range count on it.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-03 07:30:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

# emp_tasks.core.priority.broker_priority_sql() as of this revision
LEVEL = (
    "greatest(0, (9 - least(9, greatest(0, priority) * 10 / 101)) - CASE WHEN"
    " (workflow_id IS NOT NULL AND jsonb_array_length(depends_on) > 0) THEN 1 ELSE 0 END)"
)


def upgrade() -> None:
    op.execute(
        "CREATE INDEX ix_steps_queue_order ON steps"
        f" (queue, ({LEVEL}), queued_at, id) WHERE status = 'pending'"
    )
    op.drop_index("ix_steps_queue_pending", table_name="steps")


def downgrade() -> None:
    op.create_index(
        "ix_steps_queue_pending", "steps", ["queue"], postgresql_where=sa.text("status = 'pending'")
    )
    op.drop_index("ix_steps_queue_order", table_name="steps")
