"""Attempt leases, queue deadlines, and task dispatch through the outbox

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23 20:50:00
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("steps", sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column(
        "steps", sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True)
    )
    op.add_column("events", sa.Column("dispatch", postgresql.JSONB(), nullable=True))
    op.create_index(
        "ix_steps_active_lease",
        "steps",
        ["lease_expires_at"],
        postgresql_where=sa.text("status IN ('assigned', 'running')"),
    )
    op.create_index(
        "ix_steps_pending_expiry",
        "steps",
        ["expires_at"],
        postgresql_where=sa.text("status = 'pending' AND expires_at IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_steps_pending_expiry", table_name="steps")
    op.drop_index("ix_steps_active_lease", table_name="steps")
    op.drop_column("events", "dispatch")
    op.drop_column("steps", "lease_expires_at")
    op.drop_column("steps", "expires_at")
