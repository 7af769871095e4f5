"""Database tables. The schema changes only through migrations in `migrations/`."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    SmallInteger,
    String,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from emp_tasks.core.priority import broker_priority_sql
from emp_tasks.core.status import (
    ACTIVE_STEP_STATUSES,
    UNFINISHED_DELIVERY_STATUSES,
    DeliveryStatus,
    StepStatus,
    WorkerStatus,
    WorkflowStatus,
)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSONB, list[Any]: JSONB}


def _now_column() -> Mapped[datetime]:
    return mapped_column(DateTime(timezone=True), server_default=func.now(), nullable=False)


def _status_column(statuses: type[StrEnum]) -> Mapped[Any]:
    """A status column: VARCHAR(20) in the schema (as the migrations made it), the enum in
    Python. The allowed values are each table's CHECK constraint, written out below."""
    return mapped_column(
        Enum(
            statuses,
            native_enum=False,
            create_constraint=False,
            length=20,
            values_callable=lambda members: [member.value for member in members],
        ),
        nullable=False,
    )


def _status_check(statuses: type[StrEnum], name: str) -> CheckConstraint:
    return CheckConstraint(
        "status IN (" + ", ".join(f"'{s.value}'" for s in statuses) + ")", name=name
    )


def _status_in(statuses: frozenset[StrEnum]) -> str:
    """SQL for a partial index's predicate, the statuses in their enum's order."""
    ordered = [s for s in type(next(iter(statuses))) if s in statuses]
    return "status IN (" + ", ".join(f"'{s.value}'" for s in ordered) + ")"


class Workflow(Base):
    __tablename__ = "workflows"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    customer_id: Mapped[str] = mapped_column(String(200), nullable=False)
    name: Mapped[str] = mapped_column(String(500), nullable=False)
    description: Mapped[str | None] = mapped_column(Text)
    status: Mapped[WorkflowStatus] = _status_column(WorkflowStatus)
    failure_policy: Mapped[str] = mapped_column(String(20), nullable=False, default="fail_fast")
    priority: Mapped[int] = mapped_column(Integer, nullable=False, default=50)
    total_steps: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    completed_steps: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    failed_steps: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    failed_step_index: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    cancel_reason: Mapped[str | None] = mapped_column(Text)
    webhook_url: Mapped[str | None] = mapped_column(Text)
    webhook_events: Mapped[list[Any] | None] = mapped_column(JSONB)
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", JSONB, nullable=False, default=dict)
    correlation_id: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = _now_column()
    updated_at: Mapped[datetime] = _now_column()
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    completed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        Index("ix_workflows_customer_id_id", "customer_id", "id"),
        Index("ix_workflows_created_at", "created_at"),
        _status_check(WorkflowStatus, "ck_workflows_status"),
    )


class StepLog(Base):
    """One line a connector reported while an attempt ran (emp_tasks.steps.attempt_logs)."""

    __tablename__ = "step_logs"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    step_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("steps.id", ondelete="CASCADE"), nullable=False
    )
    attempt: Mapped[int] = mapped_column(Integer, nullable=False)
    level: Mapped[str] = mapped_column(String(10), nullable=False)
    message: Mapped[str] = mapped_column(Text, nullable=False)
    logged_at: Mapped[datetime] = _now_column()

    __table_args__ = (Index("ix_step_logs_step_id_attempt_id", "step_id", "attempt", "id"),)


class EmpropsNotification(Base):
    """What EmProps must hear about one of its workflows: `waiting` until the workflow ends,
    `pending` (with the body) until EmProps answers 2xx (`delivered`) or refuses it for good
    (`failed`, replayable). emp_tasks.emprops."""

    __tablename__ = "emprops_notifications"

    workflow_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("workflows.id", ondelete="CASCADE"), primary_key=True
    )
    job_id: Mapped[str] = mapped_column(String(200), nullable=False)
    collection_id: Mapped[str | None] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(20), nullable=False, default="waiting")
    event_id: Mapped[str | None] = mapped_column(String(36))
    path: Mapped[str | None] = mapped_column(String(20))
    body: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    last_status: Mapped[int | None] = mapped_column(Integer)
    next_attempt_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    notified_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = _now_column()


class Step(Base):
    __tablename__ = "steps"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    customer_id: Mapped[str] = mapped_column(String(200), nullable=False)
    service: Mapped[str] = mapped_column(String(200), nullable=False)
    queue: Mapped[str] = mapped_column(String(250), nullable=False)
    """The Celery queue of the step's route (service, requirements, customer): see routing."""
    status: Mapped[StepStatus] = _status_column(StepStatus)
    priority: Mapped[int] = mapped_column(Integer, nullable=False, default=50)
    payload: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False, default=dict)
    requirements: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False, default=dict)
    result: Mapped[Any | None] = mapped_column(JSONB)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    progress: Mapped[float] = mapped_column(Float, nullable=False, default=0.0)
    stage: Mapped[str | None] = mapped_column(String(200))
    message: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    max_retries: Mapped[int] = mapped_column(Integer, nullable=False, default=3)
    timeout_s: Mapped[float] = mapped_column(Float, nullable=False, default=1800.0)
    workflow_id: Mapped[str | None] = mapped_column(
        String(36), ForeignKey("workflows.id", ondelete="CASCADE")
    )
    step_index: Mapped[int | None] = mapped_column(Integer)
    depends_on: Mapped[list[Any]] = mapped_column(JSONB, nullable=False, default=list)
    remaining_deps: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    """Dependencies not yet completed; the step is queued when this reaches 0."""
    worker_id: Mapped[str | None] = mapped_column(String(200))
    machine_id: Mapped[str | None] = mapped_column(String(200))
    webhook_url: Mapped[str | None] = mapped_column(Text)
    webhook_events: Mapped[list[Any] | None] = mapped_column(JSONB)
    correlation_id: Mapped[str | None] = mapped_column(String(200))
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", JSONB, nullable=False, default=dict)
    cancel_reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = _now_column()
    updated_at: Mapped[datetime] = _now_column()
    queued_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    completed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        Index(
            "ix_steps_active_lease",
            "lease_expires_at",
            postgresql_where=text(_status_in(ACTIVE_STEP_STATUSES)),
        ),
        Index(
            "ix_steps_pending_expiry",
            "expires_at",
            postgresql_where=text(f"status = '{StepStatus.PENDING}' AND expires_at IS NOT NULL"),
        ),
        Index("ix_steps_customer_id_id", "customer_id", "id"),
        Index("ix_steps_customer_id_status_id", "customer_id", "status", "id"),
        Index("ix_steps_status_id", "status", "id"),
        Index("ix_steps_created_at", "created_at"),
        Index("ix_steps_customer_id_created_at", "customer_id", "created_at"),
        Index("ix_steps_workflow_id_step_index", "workflow_id", "step_index"),
        Index(
            "ix_steps_queue_order",  # the order workers take pending steps (queue positions)
            "queue",
            text(f"({broker_priority_sql()})"),
            "queued_at",
            "id",
            postgresql_where=text(f"status = '{StepStatus.PENDING}'"),
        ),
        Index(
            "ix_steps_worker_id_active",
            "worker_id",
            postgresql_where=text(_status_in(ACTIVE_STEP_STATUSES)),
        ),
        Index(
            "ix_steps_depends_on",
            "depends_on",
            postgresql_using="gin",
            postgresql_ops={"depends_on": "jsonb_path_ops"},
        ),
        _status_check(StepStatus, "ck_steps_status"),
        CheckConstraint("priority BETWEEN 0 AND 100", name="ck_steps_priority"),
    )


class QueueCount(Base):
    """Pending steps per queue and broker level, as net changes per PostgreSQL backend.

    Kept by triggers on `steps` (migration 0011: every insert, delete or update that
    makes a step pending or not, or moves a pending one) in the changing transaction, so
    the sum over `backend` is a queue level's exact pending count in any snapshot. Each
    backend changes only its own row, so no two transactions wait for one counter; the
    rows of backends that have ended are folded into backend 0
    (emp_tasks.steps.queue_order.compact_counts).
    """

    __tablename__ = "queue_counts"

    queue: Mapped[str] = mapped_column(String(250), primary_key=True)
    level: Mapped[int] = mapped_column(SmallInteger, primary_key=True)
    backend: Mapped[int] = mapped_column(Integer, primary_key=True)
    """`pg_backend_pid()` of the backend whose changes these are; 0: backends that ended."""
    pending: Mapped[int] = mapped_column(BigInteger, nullable=False)


class Attempt(Base):
    """One execution of a step on one worker: the audit trail of what ran where."""

    __tablename__ = "step_attempts"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    step_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("steps.id", ondelete="CASCADE"), nullable=False
    )
    attempt: Mapped[int] = mapped_column(Integer, nullable=False)
    worker_id: Mapped[str | None] = mapped_column(String(200))
    machine_id: Mapped[str | None] = mapped_column(String(200))
    outcome: Mapped[str] = mapped_column(String(20), nullable=False, default="running")
    error: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    started_at: Mapped[datetime] = _now_column()
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    cold_start: Mapped[bool | None] = mapped_column(Boolean)
    """Whether the backend had to load the step's models (None: the step names none)."""
    model_load_ms: Mapped[int | None] = mapped_column(Integer)

    __table_args__ = (UniqueConstraint("step_id", "attempt", name="uq_step_attempts_step_attempt"),)


class Event(Base):
    """The outbox: each committed transition's event, written in the same transaction.

    `seq` orders events; within one aggregate (a step, a workflow, a worker) it is
    commit order because every transition locks the aggregate's row first.
    """

    __tablename__ = "events"

    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(36), nullable=False, unique=True)
    type: Mapped[str] = mapped_column(String(100), nullable=False)
    aggregate: Mapped[str] = mapped_column(String(250), nullable=False)
    step_id: Mapped[str | None] = mapped_column(String(36))
    workflow_id: Mapped[str | None] = mapped_column(String(36))
    customer_id: Mapped[str | None] = mapped_column(String(200))
    envelope: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False)
    created_at: Mapped[datetime] = _now_column()
    published_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    stream_id: Mapped[str | None] = mapped_column(String(40))
    dispatch: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    """Set on events that queue a step (`step_submitted`, `step_retrying`): the relay
    sends the step's Celery task when it publishes the event."""
    webhook: Mapped[bool] = mapped_column(
        Boolean, nullable=False, default=False, server_default=text("false")
    )
    """The step's or workflow's own `webhook_url` wants this event: published with the
    stream entry's `webhook` field, so the webhooks process skips the rest unread."""

    __table_args__ = (
        Index(
            "ix_events_unpublished",
            "seq",
            postgresql_where=text("published_at IS NULL"),
        ),
        Index("ix_events_aggregate_seq", "aggregate", "seq"),
        Index("ix_events_step_id_seq", "step_id", "seq"),
    )


class ApiKey(Base):
    """A key created with `emp keys create`; only its SHA-256 is stored."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    key_hash: Mapped[str] = mapped_column(String(64), nullable=False, unique=True)
    prefix: Mapped[str] = mapped_column(String(20), nullable=False)
    customer_id: Mapped[str] = mapped_column(String(200), nullable=False)
    admin: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    name: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = _now_column()
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class IdempotencyKey(Base):
    """The resource a customer's Idempotency-Key created, kept for 24 hours."""

    __tablename__ = "idempotency_keys"

    customer_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    resource_type: Mapped[str] = mapped_column(String(50), nullable=False)
    resource_id: Mapped[str] = mapped_column(String(36), nullable=False)
    created_at: Mapped[datetime] = _now_column()

    __table_args__ = (Index("ix_idempotency_keys_created_at", "created_at"),)


class WebhookEndpoint(Base):
    """A customer's registered webhook receiver."""

    __tablename__ = "webhook_endpoints"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    customer_id: Mapped[str] = mapped_column(String(200), nullable=False)
    url: Mapped[str] = mapped_column(Text, nullable=False)
    secret: Mapped[str] = mapped_column(String(200), nullable=False)
    events: Mapped[list[Any]] = mapped_column(JSONB, nullable=False)
    filters: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False, default=dict)
    headers: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False, default=dict)
    active: Mapped[bool] = mapped_column(Boolean, nullable=False, default=True)
    description: Mapped[str | None] = mapped_column(Text)
    legacy_event_names: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    disabled_reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = _now_column()
    updated_at: Mapped[datetime] = _now_column()

    __table_args__ = (Index("ix_webhook_endpoints_customer_id", "customer_id", "active"),)


class WebhookDelivery(Base):
    """One event to one target: created once per (event, target), retried until done."""

    __tablename__ = "webhook_deliveries"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    endpoint_id: Mapped[str | None] = mapped_column(
        String(36), ForeignKey("webhook_endpoints.id", ondelete="CASCADE")
    )
    target: Mapped[str] = mapped_column(Text, nullable=False)
    url: Mapped[str] = mapped_column(Text, nullable=False)
    customer_id: Mapped[str | None] = mapped_column(String(200))
    event_id: Mapped[str] = mapped_column(String(36), nullable=False)
    event_type: Mapped[str] = mapped_column(String(100), nullable=False)
    body: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False)
    status: Mapped[DeliveryStatus] = _status_column(DeliveryStatus)
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    claimed_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = _now_column()
    updated_at: Mapped[datetime] = _now_column()
    delivered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        UniqueConstraint("event_id", "target", name="uq_webhook_deliveries_event_target"),
        Index(
            "ix_webhook_deliveries_due",
            "next_attempt_at",
            postgresql_where=text(_status_in(UNFINISHED_DELIVERY_STATUSES)),
        ),
        Index("ix_webhook_deliveries_endpoint_id", "endpoint_id", "created_at"),
    )


class WebhookAttempt(Base):
    """One HTTP request of a delivery: the delivery log."""

    __tablename__ = "webhook_attempts"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    delivery_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("webhook_deliveries.id", ondelete="CASCADE"), nullable=False
    )
    attempt: Mapped[int] = mapped_column(Integer, nullable=False)
    status_code: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    duration_ms: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    attempted_at: Mapped[datetime] = _now_column()

    __table_args__ = (Index("ix_webhook_attempts_delivery_id", "delivery_id", "attempt"),)


class Route(Base):
    """A Celery queue and the requirements every step on it has (see emp_tasks.routes.routing).

    Workers read this table to decide which queues they can consume.
    """

    __tablename__ = "routes"

    queue: Mapped[str] = mapped_column(String(250), primary_key=True)
    service: Mapped[str] = mapped_column(String(200), nullable=False)
    customer_id: Mapped[str | None] = mapped_column(String(200))
    requirements: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False, default=dict)
    created_at: Mapped[datetime] = _now_column()


class Machine(Base):
    """A host of one or more workers (one per GPU)."""

    __tablename__ = "machines"

    id: Mapped[str] = mapped_column(String(200), primary_key=True)
    hostname: Mapped[str | None] = mapped_column(String(255))
    first_seen_at: Mapped[datetime] = _now_column()
    last_seen_at: Mapped[datetime] = _now_column()
    removed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Worker(Base):
    """One Celery worker process: what it can do, what it consumes, whether it is alive."""

    __tablename__ = "workers"

    id: Mapped[str] = mapped_column(String(200), primary_key=True)
    machine_id: Mapped[str] = mapped_column(
        String(200), ForeignKey("machines.id", ondelete="CASCADE"), nullable=False
    )
    status: Mapped[WorkerStatus] = _status_column(WorkerStatus)
    status_reason: Mapped[str | None] = mapped_column(Text)
    capabilities: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False, default=dict)
    queues: Mapped[list[Any]] = mapped_column(JSONB, nullable=False, default=list)
    """The queues the worker reported consuming at its last heartbeat."""
    backends: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False, default=dict)
    loaded_models: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False, default=dict)
    """Per service, the models its backend has loaded now (warm placement)."""
    """Each service's backend health as its connector last reported it (e.g. ComfyUI's
    `/system_stats`)."""
    hostname: Mapped[str | None] = mapped_column(String(255))
    pid: Mapped[int | None] = mapped_column(Integer)
    pool: Mapped[str | None] = mapped_column(String(20))
    concurrency: Mapped[int] = mapped_column(Integer, nullable=False, default=1)
    heartbeat_timeout_s: Mapped[float] = mapped_column(Float, nullable=False, default=60.0)
    """The worker's EMP_LEASE_TIMEOUT_S: silent this long, it is offline."""
    version: Mapped[str | None] = mapped_column(String(40))
    started_at: Mapped[datetime] = _now_column()
    last_heartbeat_at: Mapped[datetime] = _now_column()
    stopped_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = _now_column()

    __table_args__ = (
        Index("ix_workers_machine_id", "machine_id"),
        Index("ix_workers_status_heartbeat", "status", "last_heartbeat_at"),
        _status_check(WorkerStatus, "ck_workers_status"),
    )
