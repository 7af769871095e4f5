"""initial schema

Revision ID: 0001
Revises: 
Create Date: 2026-11-23 20:03:35.132950
"""

from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('api_keys',
    sa.Column('id', sa.String(length=36), nullable=False),
    sa.Column('key_hash', sa.String(length=64), nullable=False),
    sa.Column('prefix', sa.String(length=20), nullable=False),
    sa.Column('customer_id', sa.String(length=200), nullable=False),
    sa.Column('admin', sa.Boolean(), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('revoked_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('key_hash')
    )
    op.create_table('events',
    sa.Column('seq', sa.BigInteger(), autoincrement=True, nullable=False),
    sa.Column('id', sa.String(length=36), nullable=False),
    sa.Column('type', sa.String(length=100), nullable=False),
    sa.Column('aggregate', sa.String(length=250), nullable=False),
    sa.Column('step_id', sa.String(length=36), nullable=True),
    sa.Column('workflow_id', sa.String(length=36), nullable=True),
    sa.Column('customer_id', sa.String(length=200), nullable=True),
    sa.Column('envelope', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('published_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('stream_id', sa.String(length=40), nullable=True),
    sa.PrimaryKeyConstraint('seq'),
    sa.UniqueConstraint('id')
    )
    op.create_index('ix_events_aggregate_seq', 'events', ['aggregate', 'seq'], unique=False)
    op.create_index('ix_events_step_id_seq', 'events', ['step_id', 'seq'], unique=False)
    op.create_index('ix_events_unpublished', 'events', ['seq'], unique=False, postgresql_where=sa.text('published_at IS NULL'))
    op.create_table('idempotency_keys',
    sa.Column('customer_id', sa.String(length=200), nullable=False),
    sa.Column('key', sa.String(length=255), nullable=False),
    sa.Column('resource_type', sa.String(length=50), nullable=False),
    sa.Column('resource_id', sa.String(length=36), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.PrimaryKeyConstraint('customer_id', 'key')
    )
    op.create_index('ix_idempotency_keys_created_at', 'idempotency_keys', ['created_at'], unique=False)
    op.create_table('workflows',
    sa.Column('id', sa.String(length=36), nullable=False),
    sa.Column('customer_id', sa.String(length=200), nullable=False),
    sa.Column('name', sa.String(length=500), nullable=False),
    sa.Column('description', sa.Text(), nullable=True),
    sa.Column('status', sa.String(length=20), nullable=False),
    sa.Column('failure_policy', sa.String(length=20), nullable=False),
    sa.Column('priority', sa.Integer(), nullable=False),
    sa.Column('total_steps', sa.Integer(), nullable=False),
    sa.Column('completed_steps', sa.Integer(), nullable=False),
    sa.Column('failed_steps', sa.Integer(), nullable=False),
    sa.Column('webhook_url', sa.Text(), nullable=True),
    sa.Column('webhook_events', postgresql.JSONB(astext_type=sa.Text()), nullable=True),
    sa.Column('metadata', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
    sa.Column('correlation_id', sa.String(length=200), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('completed_at', sa.DateTime(timezone=True), nullable=True),
    sa.CheckConstraint("status IN ('pending', 'running', 'completed', 'failed', 'cancelled')", name='ck_workflows_status'),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index('ix_workflows_created_at', 'workflows', ['created_at'], unique=False)
    op.create_index('ix_workflows_customer_id_id', 'workflows', ['customer_id', 'id'], unique=False)
    op.create_table('steps',
    sa.Column('id', sa.String(length=36), nullable=False),
    sa.Column('customer_id', sa.String(length=200), nullable=False),
    sa.Column('service', sa.String(length=200), nullable=False),
    sa.Column('status', sa.String(length=20), nullable=False),
    sa.Column('priority', sa.Integer(), nullable=False),
    sa.Column('payload', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
    sa.Column('requirements', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
    sa.Column('result', postgresql.JSONB(astext_type=sa.Text()), nullable=True),
    sa.Column('error', postgresql.JSONB(astext_type=sa.Text()), nullable=True),
    sa.Column('progress', sa.Float(), nullable=False),
    sa.Column('stage', sa.String(length=200), nullable=True),
    sa.Column('message', sa.Text(), nullable=True),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('max_retries', sa.Integer(), nullable=False),
    sa.Column('timeout_s', sa.Float(), nullable=False),
    sa.Column('workflow_id', sa.String(length=36), nullable=True),
    sa.Column('step_index', sa.Integer(), nullable=True),
    sa.Column('depends_on', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
    sa.Column('worker_id', sa.String(length=200), nullable=True),
    sa.Column('machine_id', sa.String(length=200), nullable=True),
    sa.Column('webhook_url', sa.Text(), nullable=True),
    sa.Column('webhook_events', postgresql.JSONB(astext_type=sa.Text()), nullable=True),
    sa.Column('correlation_id', sa.String(length=200), nullable=True),
    sa.Column('metadata', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
    sa.Column('cancel_reason', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('queued_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('completed_at', sa.DateTime(timezone=True), nullable=True),
    sa.CheckConstraint("status IN ('waiting', 'pending', 'assigned', 'running', 'completed', 'failed', 'cancelled', 'skipped')", name='ck_steps_status'),
    sa.CheckConstraint('priority BETWEEN 0 AND 100', name='ck_steps_priority'),
    sa.ForeignKeyConstraint(['workflow_id'], ['workflows.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index('ix_steps_created_at', 'steps', ['created_at'], unique=False)
    op.create_index('ix_steps_customer_id_created_at', 'steps', ['customer_id', 'created_at'], unique=False)
    op.create_index('ix_steps_customer_id_id', 'steps', ['customer_id', 'id'], unique=False)
    op.create_index('ix_steps_customer_id_status_id', 'steps', ['customer_id', 'status', 'id'], unique=False)
    op.create_index('ix_steps_status_id', 'steps', ['status', 'id'], unique=False)
    op.create_index('ix_steps_workflow_id_step_index', 'steps', ['workflow_id', 'step_index'], unique=False)
    op.create_table('step_attempts',
    sa.Column('id', sa.BigInteger(), autoincrement=True, nullable=False),
    sa.Column('step_id', sa.String(length=36), nullable=False),
    sa.Column('attempt', sa.Integer(), nullable=False),
    sa.Column('worker_id', sa.String(length=200), nullable=True),
    sa.Column('machine_id', sa.String(length=200), nullable=True),
    sa.Column('outcome', sa.String(length=20), nullable=False),
    sa.Column('error', postgresql.JSONB(astext_type=sa.Text()), nullable=True),
    sa.Column('started_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['step_id'], ['steps.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('step_id', 'attempt', name='uq_step_attempts_step_attempt')
    )


def downgrade() -> None:
    op.drop_table('step_attempts')
    op.drop_index('ix_steps_workflow_id_step_index', table_name='steps')
    op.drop_index('ix_steps_status_id', table_name='steps')
    op.drop_index('ix_steps_customer_id_status_id', table_name='steps')
    op.drop_index('ix_steps_customer_id_id', table_name='steps')
    op.drop_index('ix_steps_customer_id_created_at', table_name='steps')
    op.drop_index('ix_steps_created_at', table_name='steps')
    op.drop_table('steps')
    op.drop_index('ix_workflows_customer_id_id', table_name='workflows')
    op.drop_index('ix_workflows_created_at', table_name='workflows')
    op.drop_table('workflows')
    op.drop_index('ix_idempotency_keys_created_at', table_name='idempotency_keys')
    op.drop_table('idempotency_keys')
    op.drop_index('ix_events_unpublished', table_name='events', postgresql_where=sa.text('published_at IS NULL'))
    op.drop_index('ix_events_step_id_seq', table_name='events')
    op.drop_index('ix_events_aggregate_seq', table_name='events')
    op.drop_table('events')
    op.drop_table('api_keys')
