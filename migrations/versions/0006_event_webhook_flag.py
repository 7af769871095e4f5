"""Outbox: a flag on events that the resource's own webhook wants

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02 21:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A constant default: PostgreSQL adds the column without rewriting the table.
    op.add_column(
        "events",
        sa.Column("webhook", sa.Boolean(), server_default=sa.text("false"), nullable=False),
    )


def downgrade() -> None:
    op.drop_column("events", "webhook")
