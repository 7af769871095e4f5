"""Webhook endpoints and matching: who wants which event.

A customer registers endpoints (event types or `*`, optional filters by service
and workflow); steps and workflows may also name a `webhook_url` of their own.
`targets_for(event)` answers, for one published event, every place it must go.
Delivery itself (signing, sending, retries) is emp_tasks.webhooks.delivery.
"""

from __future__ import annotations

import secrets
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from emp_tasks.auth import Principal
from emp_tasks.core import signing, targets
from emp_tasks.core.config import get_settings
from emp_tasks.core.errors import NotFound, ValidationFailed
from emp_tasks.core.events import EventType, legacy_name
from emp_tasks.core.ids import new_id
from emp_tasks.core.status import StepStatus
from emp_tasks.specs import WebhookCreate, WebhookUpdate
from emp_tasks.store import db, redisdb
from emp_tasks.store.models import Step, WebhookEndpoint, Workflow

TERMINAL_STEP_EVENTS = ("step_completed", "step_failed", "step_cancelled")
TERMINAL_WORKFLOW_EVENTS = ("workflow_completed", "workflow_failed", "workflow_cancelled")
TEST_EVENT = "webhook_test"


def check_target(field: str, url: str | None) -> None:
    """Refuse a URL that webhooks may not reach (400 naming `field`).

    The message says why but never which address the host resolved to: that
    would turn the check into a probe of internal DNS.
    """
    if url is None:
        return
    try:
        targets.vet(url, get_settings().webhook_allow_private)
    except targets.TargetRefused as exc:
        raise ValidationFailed(field, str(exc)) from exc


def _check_secret(secret: str) -> None:
    try:
        signing.key_of(secret)
    except signing.InvalidSecret as exc:
        raise ValidationFailed("secret", str(exc)) from exc


# --- endpoint registry ---------------------------------------------------------------------


def visible(session: Session, endpoint_id: str, principal: Principal) -> WebhookEndpoint:
    endpoint = session.get(WebhookEndpoint, endpoint_id)
    if endpoint is None or not principal.may_see(endpoint.customer_id):
        raise NotFound("webhook", endpoint_id)
    return endpoint


def create(spec: WebhookCreate, principal: Principal) -> WebhookEndpoint:
    check_target("url", spec.url)
    secret = spec.secret or signing.new_secret()
    _check_secret(secret)
    now = datetime.now(UTC)
    endpoint = WebhookEndpoint(
        id=new_id(),
        customer_id=principal.customer_for(spec.customer_id),
        url=spec.url,
        secret=secret,
        events=spec.events,
        filters=spec.filters.model_dump(exclude_none=True),
        headers=spec.headers,
        active=spec.active,
        description=spec.description,
        legacy_event_names=spec.legacy_event_names,
        created_at=now,
        updated_at=now,
    )
    with db.transaction() as session:
        session.add(endpoint)
    changed()
    return endpoint


def list_endpoints(principal: Principal) -> list[WebhookEndpoint]:
    query = select(WebhookEndpoint).order_by(WebhookEndpoint.id.desc())
    if not principal.admin:
        query = query.where(WebhookEndpoint.customer_id == principal.customer_id)
    with db.transaction() as session:
        return list(session.scalars(query))


def get(endpoint_id: str, principal: Principal) -> WebhookEndpoint:
    with db.transaction() as session:
        return visible(session, endpoint_id, principal)


def update(endpoint_id: str, spec: WebhookUpdate, principal: Principal) -> WebhookEndpoint:
    changes = spec.model_dump(exclude_unset=True)
    # Ownership first: another customer's id is a 404 before any name is resolved, so
    # nobody learns about an endpoint, or makes this server resolve, for ids not theirs.
    get(endpoint_id, principal)
    if "url" in changes:
        check_target("url", changes["url"])
    if changes.get("secret"):
        _check_secret(changes["secret"])
    with db.transaction() as session:
        endpoint = visible(session, endpoint_id, principal)
        for name, value in changes.items():
            if name == "filters" and value is not None:
                value = {key: item for key, item in value.items() if item is not None}
            if value is not None or name == "description":
                setattr(endpoint, name, value)
        if changes.get("active"):
            endpoint.disabled_reason = None
        endpoint.updated_at = datetime.now(UTC)
    changed()
    return endpoint


def delete(endpoint_id: str, principal: Principal) -> None:
    with db.transaction() as session:
        session.delete(visible(session, endpoint_id, principal))
    changed()


# --- the registry as the webhooks process sees it -------------------------------------------

VERSION_KEY = "emp:webhooks:endpoints-version"
"""A new random value each time an endpoint is created, changed, disabled or deleted."""


def changed() -> None:
    """An endpoint changed (call after its commit): every webhooks process reloads its view."""
    redisdb.client().set(VERSION_KEY, secrets.token_hex(8))


@dataclass
class ActiveEndpoints:
    """Every active endpoint by customer, as the webhooks process keeps them between changes.

    `current()` asks Redis (one GET) whether the registry changed since the last load, and
    reloads it (one query) if so: the process matches most events without touching the
    database, and skips those nobody can want unread (`may_want`).
    """

    by_customer: dict[str, list[WebhookEndpoint]] = field(default_factory=dict)
    event_types: frozenset[str] = frozenset()
    """Every event type some endpoint takes (by its name or its legacy name)."""
    any_type: bool = False
    """Some endpoint takes every event (`*`)."""
    version: str | None = None
    loaded: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def current(self) -> ActiveEndpoints:
        version = redisdb.client().get(VERSION_KEY)
        with self._lock:
            if self.loaded and version == self.version:
                return self
            self._load(version)
        return self

    def forget(self) -> None:
        """Reload on the next `current()` (e.g. a delivery found an endpoint deleted)."""
        with self._lock:
            self.loaded = False

    def _load(self, version: str | None) -> None:
        with db.transaction() as session:
            rows = list(
                session.scalars(select(WebhookEndpoint).where(WebhookEndpoint.active.is_(True)))
            )
            session.expunge_all()
        by_customer: dict[str, list[WebhookEndpoint]] = {}
        types: set[str] = set()
        for row in rows:
            by_customer.setdefault(row.customer_id, []).append(row)
            types.update(row.events)
        self.by_customer = by_customer
        self.any_type = "*" in types
        self.event_types = frozenset(
            {str(t) for t in EventType if t in types or legacy_name(t) in types}
        )
        self.version = version
        self.loaded = True

    def may_want(self, event_type: str) -> bool:
        """Whether any active endpoint takes this event type at all."""
        return self.any_type or event_type in self.event_types


# --- matching ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """One place an event goes: a registered endpoint, or a resource's own webhook_url."""

    key: str
    url: str
    endpoint_id: str | None
    legacy: bool


def _endpoint_wants(
    endpoint: WebhookEndpoint, envelope: dict[str, Any], service: str | None
) -> bool:
    event_type = envelope["type"]
    names = {event_type, legacy_name(event_type)} - {None}
    if "*" not in endpoint.events and not names & set(endpoint.events):
        return False
    if envelope["timestamp"] < endpoint.created_at.timestamp() * 1000:
        return False  # registered after the event happened
    services = endpoint.filters.get("services")
    if services and service not in services:
        return False
    workflow_ids = endpoint.filters.get("workflow_ids")
    return not (workflow_ids and envelope.get("workflow_id") not in workflow_ids)


@dataclass(frozen=True)
class Lookup:
    """What matching a batch of events needs: the steps' and workflows' own webhook
    settings (rows with `id`, `webhook_url`, `webhook_events`, and a step's `service`),
    and each customer's active endpoints."""

    steps: dict[str, Any]
    workflows: dict[str, Any]
    endpoints: dict[str, list[WebhookEndpoint]]

    @classmethod
    def read(
        cls,
        session: Session,
        envelopes: list[dict[str, Any]],
        active: ActiveEndpoints | None = None,
    ) -> Lookup:
        """At most three queries for the whole batch (two with the `active` endpoints)."""
        step_ids = {e["step_id"] for e in envelopes if e.get("step_id")}
        workflow_ids = {e["workflow_id"] for e in envelopes if e.get("workflow_id")}
        customers = {e["customer_id"] for e in envelopes if e.get("customer_id")}
        steps = (
            {
                row.id: row
                for row in session.execute(
                    select(
                        Step.id,
                        Step.service,
                        Step.webhook_url,
                        Step.webhook_events,
                        Step.status,
                        Step.attempts,
                    ).where(Step.id.in_(step_ids))
                )
            }
            if step_ids
            else {}
        )
        workflows = (
            {
                row.id: row
                for row in session.execute(
                    select(Workflow.id, Workflow.webhook_url, Workflow.webhook_events).where(
                        Workflow.id.in_(workflow_ids)
                    )
                )
            }
            if workflow_ids
            else {}
        )
        endpoints: dict[str, list[WebhookEndpoint]] = {c: [] for c in customers}
        if active is not None:
            endpoints = {c: active.by_customer.get(c, []) for c in customers}
        elif customers:
            for endpoint in session.scalars(
                select(WebhookEndpoint).where(
                    WebhookEndpoint.customer_id.in_(customers),
                    WebhookEndpoint.active.is_(True),
                )
            ):
                endpoints[endpoint.customer_id].append(endpoint)
        return cls(steps, workflows, endpoints)


def _current(step: Any, progress: dict[str, Any]) -> bool:
    """Whether a progress report is of the step's running attempt (the step is its row)."""
    attempt = (progress.get("data") or {}).get("attempt")
    return step.status == StepStatus.RUNNING and step.attempts == attempt


def own_webhook_wants(
    url: str | None, events: list[str] | None, event_type: str, defaults: tuple[str, ...]
) -> bool:
    """Whether a step's or workflow's own `webhook_url` receives this event type: its
    `webhook_events`, or the terminal events by default."""
    return bool(url) and event_type in (events or defaults)


def own_webhook_wants_sql(url: str, events: str, event_type: str, defaults: tuple[str, ...]) -> str:
    """`own_webhook_wants` as a SQL condition on columns or expressions (`url` varchar,
    `events` a jsonb list, `event_type` text), for a statement that records its events
    from the rows it changes."""
    quoted = ", ".join("'" + name.replace("'", "''") + "'" for name in defaults)
    return (
        f"(coalesce({url}, '') <> '' AND CASE"
        f" WHEN jsonb_typeof({events}) = 'array' AND jsonb_array_length({events}) > 0"
        f" THEN {events} ? {event_type} ELSE {event_type} IN ({quoted}) END)"
    )


def targets_for(lookup: Lookup, envelope: dict[str, Any]) -> list[Target]:
    """Every target that must receive this event."""
    found: list[Target] = []
    service = None
    step_id, workflow_id = envelope.get("step_id"), envelope.get("workflow_id")
    if step_id:
        step = lookup.steps.get(step_id)
        if (
            step is not None
            and envelope["type"] == EventType.STEP_PROGRESS
            and not _current(step, envelope)
        ):
            return []  # a late report of an attempt that is over, or of a finished step
        if step is not None:
            service = step.service
            if own_webhook_wants(
                step.webhook_url, step.webhook_events, envelope["type"], TERMINAL_STEP_EVENTS
            ):
                found.append(Target(f"url:{step.webhook_url}", step.webhook_url, None, False))
    elif workflow_id and envelope["type"].startswith("workflow_"):
        workflow = lookup.workflows.get(workflow_id)
        if workflow is not None and own_webhook_wants(
            workflow.webhook_url,
            workflow.webhook_events,
            envelope["type"],
            TERMINAL_WORKFLOW_EVENTS,
        ):
            key = f"url:{workflow.webhook_url}"
            found.append(Target(key, workflow.webhook_url, None, False))
    for endpoint in lookup.endpoints.get(envelope.get("customer_id") or "", []):
        if _endpoint_wants(endpoint, envelope, service):
            found.append(
                Target(
                    f"endpoint:{endpoint.id}",
                    endpoint.url,
                    endpoint.id,
                    endpoint.legacy_event_names,
                )
            )
    return found


def body_for(envelope: dict[str, Any], legacy: bool) -> dict[str, Any]:
    """The Standard Webhooks body `{id, type, timestamp, data}` for one target."""
    data = dict(envelope.get("data") or {})
    for key in (
        "step_id",
        "workflow_id",
        "machine_id",
        "worker_id",
        "customer_id",
        "correlation_id",
    ):
        if envelope.get(key) is not None:
            data.setdefault(key, envelope[key])
    event_type = envelope["type"]
    if legacy and legacy_name(event_type):
        event_type = legacy_name(event_type)
        if envelope.get("step_id"):
            data["job_id"] = envelope["step_id"]
    timestamp = datetime.fromtimestamp(envelope["timestamp"] / 1000, UTC)
    return {
        "id": envelope["id"],
        "type": event_type,
        "timestamp": timestamp.isoformat().replace("+00:00", "Z"),
        "data": data,
    }
