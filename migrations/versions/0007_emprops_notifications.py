"""EmProps: one notification per EmProps workflow, durable until EmProps answers 2xx

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03 02:00:00
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "emprops_notifications",
        sa.Column(
            "workflow_id",
            sa.String(36),
            sa.ForeignKey("workflows.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("job_id", sa.String(200), nullable=False),
        sa.Column("collection_id", sa.String(200)),
        sa.Column("status", sa.String(20), nullable=False, server_default="waiting"),
        sa.Column("event_id", sa.String(36)),
        sa.Column("path", sa.String(20)),
        sa.Column("body", postgresql.JSONB()),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("last_error", sa.Text()),
        sa.Column("last_status", sa.Integer()),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True)),
        sa.Column("notified_at", sa.DateTime(timezone=True)),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
        sa.CheckConstraint(
            "status IN ('waiting', 'pending', 'delivered', 'failed')",
            name="ck_emprops_notifications_status",
        ),
    )
    op.create_index(
        "ix_emprops_notifications_due",
        "emprops_notifications",
        ["next_attempt_at"],
        postgresql_where=sa.text("status = 'pending'"),
    )


def downgrade() -> None:
    op.drop_table("emprops_notifications")
