"""Warm placement: what each worker has loaded, and whether each attempt had to load

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-03 07:50:00
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "workers",
        sa.Column(
            "loaded_models",
            postgresql.JSONB(),
            nullable=False,
            server_default=sa.text("'{}'::jsonb"),
        ),
    )
    op.add_column("step_attempts", sa.Column("cold_start", sa.Boolean()))
    op.add_column("step_attempts", sa.Column("model_load_ms", sa.Integer()))


def downgrade() -> None:
    op.drop_column("step_attempts", "model_load_ms")
    op.drop_column("step_attempts", "cold_start")
    op.drop_column("workers", "loaded_models")
