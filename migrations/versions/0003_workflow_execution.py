"""Workflow execution: dependency counters, failure details

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23 20:50:00
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "steps",
        sa.Column("remaining_deps", sa.Integer(), nullable=False, server_default="0"),
    )
    op.alter_column("steps", "remaining_deps", server_default=None)
    op.create_index(
        "ix_steps_depends_on",
        "steps",
        ["depends_on"],
        postgresql_using="gin",
        postgresql_ops={"depends_on": "jsonb_path_ops"},
    )
    op.add_column("workflows", sa.Column("failed_step_index", sa.Integer(), nullable=True))
    op.add_column("workflows", sa.Column("error", postgresql.JSONB(), nullable=True))
    op.add_column("workflows", sa.Column("cancel_reason", sa.Text(), nullable=True))


def downgrade() -> None:
    op.drop_column("workflows", "cancel_reason")
    op.drop_column("workflows", "error")
    op.drop_column("workflows", "failed_step_index")
    op.drop_index("ix_steps_depends_on", table_name="steps")
    op.drop_column("steps", "remaining_deps")
