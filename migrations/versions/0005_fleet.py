"""Fleet: routes (queue per requirements), steps.queue, machines and workers

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-23 22:30:00
"""

import hashlib
import json

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def _queue(service: str, customer_id: str | None, requirements: dict) -> str:
    """The queue name rule of this revision (emp_tasks.routing.route_for at the time)."""
    key = json.dumps(
        {"customer": customer_id, "requirements": requirements},
        sort_keys=True,
        separators=(",", ":"),
    )
    return f"emp.{service}.{hashlib.sha1(key.encode()).hexdigest()[:12]}"


def upgrade() -> None:
    op.create_table(
        "routes",
        sa.Column("queue", sa.String(length=250), nullable=False),
        sa.Column("service", sa.String(length=200), nullable=False),
        sa.Column("customer_id", sa.String(length=200), nullable=True),
        sa.Column("requirements", postgresql.JSONB(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("queue"),
    )
    op.create_table(
        "machines",
        sa.Column("id", sa.String(length=200), nullable=False),
        sa.Column("hostname", sa.String(length=255), nullable=True),
        sa.Column("first_seen_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("last_seen_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("removed_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "workers",
        sa.Column("id", sa.String(length=200), nullable=False),
        sa.Column("machine_id", sa.String(length=200), nullable=False),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("status_reason", sa.Text(), nullable=True),
        sa.Column("capabilities", postgresql.JSONB(), nullable=False),
        sa.Column("queues", postgresql.JSONB(), nullable=False),
        sa.Column("backends", postgresql.JSONB(), nullable=False, server_default="{}"),
        sa.Column("hostname", sa.String(length=255), nullable=True),
        sa.Column("pid", sa.Integer(), nullable=True),
        sa.Column("pool", sa.String(length=20), nullable=True),
        sa.Column("concurrency", sa.Integer(), nullable=False),
        sa.Column("heartbeat_timeout_s", sa.Float(), nullable=False),
        sa.Column("version", sa.String(length=40), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("last_heartbeat_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("stopped_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint(
            "status IN ('online', 'draining', 'offline', 'removed')", name="ck_workers_status"
        ),
        sa.ForeignKeyConstraint(["machine_id"], ["machines.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_workers_machine_id", "workers", ["machine_id"])
    op.create_index("ix_workers_status_heartbeat", "workers", ["status", "last_heartbeat_at"])

    op.add_column("steps", sa.Column("queue", sa.String(length=250), nullable=True))
    connection = op.get_bind()
    combos = connection.execute(
        sa.text("SELECT DISTINCT service, customer_id, requirements::text AS r FROM steps")
    ).all()
    for service, customer_id, raw in combos:
        requirements = json.loads(raw)
        queue = _queue(service, customer_id, requirements)
        connection.execute(
            sa.text(
                "UPDATE steps SET queue = :queue WHERE service = :service"
                " AND customer_id = :customer AND requirements = CAST(:r AS jsonb)"
            ),
            {"queue": queue, "service": service, "customer": customer_id, "r": raw},
        )
        connection.execute(
            sa.text(
                "INSERT INTO routes (queue, service, customer_id, requirements)"
                " VALUES (:queue, :service, :customer, CAST(:r AS jsonb))"
                " ON CONFLICT DO NOTHING"
            ),
            {"queue": queue, "service": service, "customer": customer_id, "r": raw},
        )
    op.alter_column("steps", "queue", nullable=False)
    op.create_index(
        "ix_steps_queue_pending", "steps", ["queue"], postgresql_where=sa.text("status = 'pending'")
    )
    op.create_index(
        "ix_steps_worker_id_active",
        "steps",
        ["worker_id"],
        postgresql_where=sa.text("status IN ('assigned', 'running')"),
    )


def downgrade() -> None:
    op.drop_index("ix_steps_worker_id_active", table_name="steps")
    op.drop_index("ix_steps_queue_pending", table_name="steps")
    op.drop_column("steps", "queue")
    op.drop_index("ix_workers_status_heartbeat", table_name="workers")
    op.drop_index("ix_workers_machine_id", table_name="workers")
    op.drop_table("workers")
    op.drop_table("machines")
    op.drop_table("routes")
