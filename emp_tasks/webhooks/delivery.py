"""Webhook delivery: the `webhooks` process.

Consumer: reads `emp:events` in the consumer group `emp-webhooks` (at least once;
every instance of the process shares the group, and entries a dead instance
left unacknowledged are claimed after a minute), and records one delivery row
per (event, target). The unique (event_id, target) key makes a repeated event or
a second reader harmless.

Sender: claims due deliveries with `FOR UPDATE SKIP LOCKED` (so two processes
never send the same delivery at once), signs them as the Standard Webhooks spec
says, POSTs them without following redirects, and records each attempt. Failures
are retried on EMP_WEBHOOK_RETRY_SCHEDULE with jitter; 429/503 honour
Retry-After; 410 disables the endpoint; after the last attempt a delivery is
`dead` and can be replayed. A per-target cap on requests in flight keeps an
endpoint that hangs from using up the threads that healthy endpoints need.
"""

from __future__ import annotations

import json
import logging
import os
import random
import socket
import threading
import time
from collections import Counter, OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any

import redis
import requests
from sqlalchemy import select, text, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from emp_tasks import metrics
from emp_tasks.auth import Principal
from emp_tasks.core import signing, targets
from emp_tasks.core.config import get_settings
from emp_tasks.core.errors import InvalidState, NotFound
from emp_tasks.core.events import STREAM
from emp_tasks.core.ids import new_id
from emp_tasks.core.status import FINISHED_DELIVERY_STATUSES, DeliveryStatus
from emp_tasks.core.times import iso
from emp_tasks.store import db, redisdb
from emp_tasks.store.models import WebhookAttempt, WebhookDelivery, WebhookEndpoint
from emp_tasks.webhooks import endpoints as webhooks

logger = logging.getLogger(__name__)

GROUP = "emp-webhooks"
CLAIM_IDLE_MS = 60_000
MAX_RETRY_AFTER_S = 24 * 3600
USER_AGENT = "EMP-Tasks-Webhooks/1"

D = DeliveryStatus


def _now() -> datetime:
    return datetime.now(UTC)


# --- recording -----------------------------------------------------------------------------


def record(
    session: Session,
    envelopes: list[dict[str, Any]],
    active: webhooks.ActiveEndpoints | None = None,
) -> int:
    """Create the deliveries these events need (none twice); return how many were new.

    `active`: the registry as this process keeps it (else the endpoints are read here).
    """
    lookup = webhooks.Lookup.read(session, envelopes, active)
    created = 0
    for envelope in envelopes:
        for target in webhooks.targets_for(lookup, envelope):
            created += _insert(
                session, envelope, target, webhooks.body_for(envelope, target.legacy)
            )
    return created


def _insert(
    session: Session, envelope: dict[str, Any], target: webhooks.Target, body: dict[str, Any]
) -> int:
    statement = (
        insert(WebhookDelivery)
        .values(
            id=new_id(),
            endpoint_id=target.endpoint_id,
            target=target.key,
            url=target.url,
            customer_id=envelope.get("customer_id"),
            event_id=envelope["id"],
            event_type=body["type"],
            body=body,
            status=D.PENDING,
            attempts=0,
            next_attempt_at=_now(),
        )
        .on_conflict_do_nothing(constraint="uq_webhook_deliveries_event_target")
        .returning(WebhookDelivery.id)
    )
    return 1 if session.scalar(statement) else 0


# --- the API's view ------------------------------------------------------------------------


@dataclass(frozen=True)
class LoggedDelivery:
    """A delivery and its attempts, oldest first (web.presenters shows them)."""

    delivery: WebhookDelivery
    attempts: list[WebhookAttempt]


def _attempts(session: Session, delivery_ids: list[str]) -> dict[str, list[WebhookAttempt]]:
    grouped: dict[str, list[WebhookAttempt]] = {key: [] for key in delivery_ids}
    rows = session.scalars(
        select(WebhookAttempt)
        .where(WebhookAttempt.delivery_id.in_(delivery_ids))
        .order_by(WebhookAttempt.delivery_id, WebhookAttempt.attempt)
    )
    for row in rows:
        grouped[row.delivery_id].append(row)
    return grouped


def list_deliveries(
    endpoint_id: str, principal: Principal, status: str | None = None, limit: int = 50
) -> list[LoggedDelivery]:
    with db.transaction() as session:
        webhooks.visible(session, endpoint_id, principal)
        query = (
            select(WebhookDelivery)
            .where(WebhookDelivery.endpoint_id == endpoint_id)
            .order_by(WebhookDelivery.id.desc())
            .limit(limit)
        )
        if status:
            query = query.where(WebhookDelivery.status == status)
        rows = list(session.scalars(query))
        logs = _attempts(session, [row.id for row in rows])
        return [LoggedDelivery(row, logs[row.id]) for row in rows]


def send_test(endpoint_id: str, principal: Principal) -> LoggedDelivery:
    """Queue a `webhook_test` event for this endpoint; the webhooks process sends it."""
    with db.transaction() as session:
        endpoint = webhooks.visible(session, endpoint_id, principal)
        envelope = {
            "id": new_id(),
            "type": webhooks.TEST_EVENT,
            "timestamp": time.time_ns() // 1_000_000,
            "customer_id": endpoint.customer_id,
            "data": {"webhook_id": endpoint.id, "message": "test delivery from EMP Tasks"},
        }
        target = webhooks.Target(f"endpoint:{endpoint.id}", endpoint.url, endpoint.id, False)
        _insert(session, envelope, target, webhooks.body_for(envelope, False))
        delivery = session.scalar(
            select(WebhookDelivery).where(WebhookDelivery.event_id == envelope["id"])
        )
        logged = LoggedDelivery(delivery, [])
    wake_senders()
    return logged


def replay(endpoint_id: str, delivery_id: str, principal: Principal) -> LoggedDelivery:
    """Send a finished delivery again (same event id), e.g. a dead one after an outage."""
    with db.transaction() as session:
        webhooks.visible(session, endpoint_id, principal)
        delivery = session.get(WebhookDelivery, delivery_id, with_for_update=True)
        if delivery is None or delivery.endpoint_id != endpoint_id:
            raise NotFound("delivery", delivery_id)
        if delivery.status not in FINISHED_DELIVERY_STATUSES:
            raise InvalidState(f"delivery {delivery_id} is {delivery.status}; it is not finished")
        delivery.status = D.PENDING
        delivery.next_attempt_at = _now()
        delivery.updated_at = _now()
        logged = LoggedDelivery(delivery, _attempts(session, [delivery.id])[delivery.id])
    wake_senders()
    return logged


WAKE_CHANNEL = "emp:webhooks:wake"
"""Pub/sub: a delivery is due now (a test or a replay); idle senders look at once."""


def wake_senders() -> None:
    redisdb.client().publish(WAKE_CHANNEL, "due")


# --- sending -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Claimed:
    id: str
    url: str
    event_id: str
    body: dict[str, Any]
    attempt: int
    endpoint_id: str | None
    secret: str | None
    headers: dict[str, str]


# Statuses are spelled into the SQL, not bound, so the planner matches the partial
# index on unfinished deliveries (ix_webhook_deliveries_due).
_CLAIM = text(
    f"""
    SELECT d.id, d.url, d.event_id, d.body, d.attempts, d.endpoint_id,
           e.secret, e.headers
    FROM webhook_deliveries d LEFT JOIN webhook_endpoints e ON e.id = d.endpoint_id
    WHERE (d.status IN ('{D.PENDING}', '{D.RETRYING}') AND d.next_attempt_at <= now())
       OR (d.status = '{D.DELIVERING}' AND d.claimed_until < now())
    ORDER BY d.next_attempt_at
    LIMIT :limit
    FOR UPDATE OF d SKIP LOCKED
    """
)


def claim(limit: int, in_flight: Counter[str], per_target: int) -> list[Claimed]:
    """Take due deliveries for this process, at most `per_target` in flight per URL."""
    settings = get_settings()
    lease = timedelta(seconds=settings.webhook_timeout_s * 3 + 10)
    chosen: list[Claimed] = []
    with db.engine().begin() as connection:
        for row in connection.execute(_CLAIM, {"limit": limit * 4}):
            if len(chosen) >= limit or in_flight[row.url] >= per_target:
                continue
            in_flight[row.url] += 1
            chosen.append(
                Claimed(
                    id=row.id,
                    url=row.url,
                    event_id=row.event_id,
                    body=row.body,
                    attempt=row.attempts + 1,
                    endpoint_id=row.endpoint_id,
                    secret=row.secret if row.endpoint_id else settings.webhook_secret,
                    headers=row.headers or {},
                )
            )
        if chosen:
            connection.execute(
                update(WebhookDelivery)
                .where(WebhookDelivery.id.in_([c.id for c in chosen]))
                .values(status=D.DELIVERING, claimed_until=_now() + lease, updated_at=_now())
            )
    return chosen


@dataclass(frozen=True)
class Response:
    status_code: int | None
    error: str | None
    retry_after_s: float | None
    duration_ms: int


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            return max(0.0, (parsedate_to_datetime(value) - _now()).total_seconds())
        except (TypeError, ValueError):
            return None


_local = threading.local()
SESSIONS_PER_THREAD = 32


def _http(target: targets.Target) -> requests.Session:
    """A session pinned to `target`'s vetted addresses, kept per sender thread.

    Keyed by the whole Target (addresses included), so a name that now resolves
    elsewhere gets a new, freshly vetted connection; the least recently used
    sessions are closed, so a thread never holds more than a few dozen.
    """
    sessions: OrderedDict[targets.Target, requests.Session] | None = getattr(
        _local, "sessions", None
    )
    if sessions is None:
        sessions = _local.sessions = OrderedDict()
    session = sessions.pop(target, None) or targets.pinned_session(target)
    sessions[target] = session
    while len(sessions) > SESSIONS_PER_THREAD:
        sessions.popitem(last=False)[1].close()
    return session


def post(item: Claimed) -> Response:
    """Sign and POST one delivery; never raises."""
    settings = get_settings()
    started = time.monotonic()

    def done(code: int | None, error: str | None, retry_after: float | None = None) -> Response:
        return Response(code, error, retry_after, int((time.monotonic() - started) * 1000))

    if not item.secret:
        return done(None, "no signing secret: set EMP_WEBHOOK_SECRET for per-resource webhooks")
    try:
        # Vetted again on every attempt, and sent to the addresses vetted now: a name
        # that resolved to a public address at registration may not have since.
        target = targets.vet(item.url, settings.webhook_allow_private)
    except targets.TargetRefused as exc:
        return done(None, f"target refused: {exc}")
    body = json.dumps(item.body, separators=(",", ":"), ensure_ascii=False)
    timestamp = int(time.time())
    headers = {
        **item.headers,
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        "webhook-id": item.event_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signing.sign(item.secret, item.event_id, timestamp, body),
    }
    try:
        response = _http(target).post(
            target.url,
            data=body.encode(),
            headers=headers,
            timeout=(min(5.0, settings.webhook_timeout_s), settings.webhook_timeout_s),
            allow_redirects=False,
        )
    except (requests.RequestException, ValueError) as exc:
        # ValueError: a header stored before headers were validated that HTTP cannot carry.
        return done(None, f"{type(exc).__name__}: {exc}"[:500])
    error = None if 200 <= response.status_code < 300 else f"HTTP {response.status_code}"
    retry_after = (
        _retry_after(response.headers.get("Retry-After"))
        if response.status_code in (429, 503)
        else None
    )
    return done(response.status_code, error, retry_after)


def _next_delay(attempt: int, retry_after: float | None) -> float | None:
    """Seconds until the next attempt after `attempt` failed, or None when none is left."""
    schedule = get_settings().webhook_retry_schedule
    if attempt > len(schedule):
        return None
    delay = schedule[attempt - 1] * random.uniform(0.8, 1.2)
    if retry_after is not None:
        delay = max(delay, min(retry_after, MAX_RETRY_AFTER_S))
    return delay


def finish(item: Claimed, response: Response) -> DeliveryStatus:
    """Record the attempt and decide what becomes of the delivery; return its status."""
    status = _finish(item, response)
    if response.status_code == 410 and item.endpoint_id:
        webhooks.changed()  # disabled: no webhooks process matches events to it any more
    return status


def _finish(item: Claimed, response: Response) -> DeliveryStatus:
    now = _now()
    with db.transaction() as session:
        session.add(
            WebhookAttempt(
                delivery_id=item.id,
                attempt=item.attempt,
                status_code=response.status_code,
                error=response.error,
                duration_ms=response.duration_ms,
                attempted_at=now,
            )
        )
        delivery = session.get(WebhookDelivery, item.id, with_for_update=True)
        if delivery is None:
            return D.FAILED
        delivery.attempts = item.attempt
        delivery.last_status_code = response.status_code
        delivery.last_error = response.error
        delivery.claimed_until = None
        delivery.updated_at = now
        code = response.status_code
        if code is not None and 200 <= code < 300:
            delivery.status = D.SUCCEEDED
            delivery.delivered_at = now
        elif code == 410 or (response.error or "").startswith(("target refused", "no signing")):
            delivery.status = D.FAILED
            if code == 410 and item.endpoint_id:
                _disable(session, item.endpoint_id, f"410 Gone at {iso(now)}")
        else:
            delay = _next_delay(item.attempt, response.retry_after_s)
            if delay is None:
                delivery.status = D.DEAD
            else:
                delivery.status = D.RETRYING
                delivery.next_attempt_at = now + timedelta(seconds=delay)
        return delivery.status


def _disable(session: Session, endpoint_id: str, reason: str) -> None:
    endpoint = session.get(WebhookEndpoint, endpoint_id, with_for_update=True)
    if endpoint is not None:
        endpoint.active = False
        endpoint.disabled_reason = reason
        endpoint.updated_at = _now()
        logger.warning(
            "Webhook endpoint disabled",
            extra={"action": "webhook_disabled", "webhook_id": endpoint_id, "reason": reason},
        )


# --- the process ---------------------------------------------------------------------------


def ensure_group(client: redis.Redis) -> None:
    """Create the consumer group at the stream's start (nothing published is skipped)."""
    try:
        client.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


READ_COUNT = 500
"""Stream entries one read takes at most."""
READ_LINGER_S = 0.02
"""After a short read, how long to let events accumulate before the next one."""
IDLE_WAIT_MAX_S = 30.0
"""Longest an idle sender sleeps without a wake-up (a lost wake-up costs at most this)."""
BUSY_WAIT_S = 0.25
MIN_WAIT_S = 0.05

_NEXT_DUE = text(
    f"""
    SELECT min(t) FROM (
      SELECT min(next_attempt_at) AS t FROM webhook_deliveries
      WHERE status IN ('{D.PENDING}', '{D.RETRYING}')
      UNION ALL
      SELECT min(claimed_until) FROM webhook_deliveries WHERE status = '{D.DELIVERING}'
    ) due
    """
)


def seconds_until_due() -> float | None:
    """Until the next delivery is due (0: now), None when nothing is scheduled."""
    with db.engine().begin() as connection:
        due = connection.execute(_NEXT_DUE).scalar()
    return None if due is None else max(0.0, (due - _now()).total_seconds())


class WebhookProcess:
    """Consumer loop in the calling thread, sender loop in another, requests in a pool.

    What it costs when nobody wants an event: the consumer keeps the active endpoints in
    memory (reloaded when the registry's version in Redis changes) and passes over every
    stream entry that no endpoint's event types name and that is not flagged for the
    resource's own webhook, without parsing it or opening a transaction. The sender sleeps
    until the next delivery is due, and is woken when the consumer records deliveries, an
    attempt ends, or a test or replay is queued (the `emp:webhooks:wake` channel).
    """

    def __init__(self) -> None:
        settings = get_settings()
        self.name = f"{socket.gethostname()}-{os.getpid()}"
        self.concurrency = settings.webhook_concurrency
        self.pool = ThreadPoolExecutor(settings.webhook_concurrency, "emp-webhook")
        self.free = threading.Semaphore(settings.webhook_concurrency)
        self.in_flight: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self.endpoints = webhooks.ActiveEndpoints()

    def run(self) -> None:
        threading.Thread(target=self._send_forever, name="emp-webhook-sender", daemon=True).start()
        threading.Thread(target=self._listen, name="emp-webhook-wake", daemon=True).start()
        logger.info("Webhooks started", extra={"action": "webhooks_start", "consumer": self.name})
        last_claim = 0.0
        group_ready = False
        while not self.stopping.is_set():
            try:
                client = redisdb.client()
                if not group_ready:
                    ensure_group(client)
                    group_ready = True
                if time.monotonic() - last_claim > CLAIM_IDLE_MS / 2000:
                    last_claim = time.monotonic()
                    self._consume_abandoned(client)
                batches = client.xreadgroup(
                    GROUP, self.name, {STREAM: ">"}, count=READ_COUNT, block=1000
                )
                read = 0
                for _, entries in batches or []:
                    self._consume(client, entries)
                    read += len(entries)
                if 0 < read < READ_COUNT:
                    # Let the next read take a batch rather than the one event just added.
                    self.stopping.wait(READ_LINGER_S)
            except redis.ResponseError as exc:
                group_ready = False  # NOGROUP: the stream was deleted (Redis flushed)
                if "NOGROUP" not in str(exc):
                    logger.exception(
                        "Webhook consumer failed", extra={"action": "webhooks_consume"}
                    )
                    time.sleep(1)
            except Exception:
                logger.exception("Webhook consumer failed", extra={"action": "webhooks_consume"})
                group_ready = False
                self.endpoints.forget()
                time.sleep(1)

    def _consume_abandoned(self, client: redis.Redis) -> None:
        start = "0-0"
        while True:
            start, entries, *_ = client.xautoclaim(
                STREAM, GROUP, self.name, CLAIM_IDLE_MS, start_id=start, count=100
            )
            if entries:
                self._consume(client, entries)
            if start == "0-0" or not entries:
                return

    def _wanted(self, entries: list) -> list[dict[str, Any]]:
        """The envelopes some target may want: flagged for the resource's own webhook, or of
        a type some active endpoint takes (entries from before the flag: looked at)."""
        active = self.endpoints.current()
        wanted = []
        for _, fields in entries:
            if not fields or "event" not in fields:
                continue
            if fields.get("webhook") == "0" and not active.may_want(fields.get("type", "")):
                continue
            wanted.append(json.loads(fields["event"]))
        return wanted

    def _consume(self, client: redis.Redis, entries: list) -> None:
        ids = [stream_id for stream_id, _ in entries]
        wanted = self._wanted(entries)
        created = 0
        if wanted:
            try:
                with db.transaction() as session:
                    created = record(session, wanted, self.endpoints)
            except IntegrityError:
                # An endpoint deleted since this process last loaded the registry.
                self.endpoints.forget()
                with db.transaction() as session:
                    created = record(session, wanted, self.endpoints.current())
        client.xack(STREAM, GROUP, *ids)
        if created:
            self.wake.set()

    def _listen(self) -> None:
        """Wake the sender when a delivery is queued elsewhere (a test, a replay)."""
        while not self.stopping.is_set():
            try:
                pubsub = redisdb.client().pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(WAKE_CHANNEL)
                self.wake.set()  # anything queued while not subscribed
                while not self.stopping.is_set():
                    if pubsub.get_message(timeout=1.0) is not None:
                        self.wake.set()
            except Exception:
                logger.warning(
                    "Webhook wake-up channel lost; retrying",
                    exc_info=True,
                    extra={"action": "webhooks_wake_failed"},
                )
                self.stopping.wait(1.0)

    def _send_forever(self) -> None:
        settings = get_settings()
        while not self.stopping.is_set():
            wait = IDLE_WAIT_MAX_S
            try:
                self._send_due(settings.webhook_concurrency, settings.webhook_per_target)
                with self.lock:
                    busy = bool(self.in_flight)
                # Busy: look again soon (a target's cap may hold due deliveries back). Idle:
                # sleep until the next one is due, never less than a moment (another process
                # may hold what is due now).
                due = BUSY_WAIT_S if busy else seconds_until_due()
                if due is not None:
                    wait = max(MIN_WAIT_S, min(wait, due))
            except Exception:
                logger.exception("Webhook sender failed", extra={"action": "webhooks_send"})
                wait = 1.0
            self.wake.wait(wait)
            self.wake.clear()

    def _send_due(self, concurrency: int, per_target: int) -> None:
        while True:
            with self.lock:
                room = concurrency - sum(self.in_flight.values())
                if room <= 0:
                    return
                batch = claim(room, self.in_flight, per_target)
            if not batch:
                return
            for item in batch:
                self.pool.submit(self._deliver, item)

    def _deliver(self, item: Claimed) -> None:
        try:
            response = post(item)
            metrics.webhook_attempted(item.body, response.status_code)
            status = finish(item, response)
            logger.info(
                "Webhook attempt",
                extra={
                    "action": "webhook_attempt",
                    "delivery_id": item.id,
                    "url": item.url,
                    "attempt": item.attempt,
                    "status": status,
                },
            )
        except Exception:
            logger.exception(
                "Webhook delivery failed", extra={"action": "webhook_error", "delivery_id": item.id}
            )
        finally:
            with self.lock:
                self.in_flight[item.url] -= 1
                if self.in_flight[item.url] <= 0:
                    del self.in_flight[item.url]
                # Claim again once half the threads are free: one claim per batch, not
                # one per delivery (the sender also looks every 0.25 s).
                half_free = sum(self.in_flight.values()) <= self.concurrency // 2
            if half_free:
                self.wake.set()


def run_forever() -> None:
    WebhookProcess().run()
