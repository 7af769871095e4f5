"""The `emprops` process: EmProps hears, exactly once, how each of its workflows ended.

One loop, one thread:
1. read `emp:events` with the consumer group `emp-emprops` (entries other processes left
   unacknowledged for CLAIM_IDLE_MS are claimed first), and for a workflow's terminal
   event make its notification due (notifications.queue: once per workflow, so a
   repeated entry or two readers change nothing); acknowledge after the commit;
2. send what is due (right after one of ours ended, else every DUE_POLL_S): each
   notification is claimed in PostgreSQL (held past the call's timeout), POSTed with
   `Idempotency-Key: <event id>`, and its answer recorded by the holder of that claim
   only; so two processes never both send one notification, and a process killed
   mid-call leaves it to be sent again when the hold runs out;
3. every BACKSTOP_S, notifications still waiting on a workflow whose terminal event is
   in the outbox but was never read from the stream (trimmed while this process was
   away) are made due from the outbox.
Without EMPROPS_API_URL it idles.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from datetime import timedelta

import redis

from emp_tasks.core.config import get_settings
from emp_tasks.core.events import STREAM
from emp_tasks.core.times import now
from emp_tasks.emprops import client, notifications
from emp_tasks.store import db, redisdb

logger = logging.getLogger(__name__)

GROUP = "emp-emprops"
READ_COUNT = 500
CLAIM_IDLE_MS = 30_000
SEND_BATCH = 20
BACKSTOP_S = 30.0
HOLD_MARGIN_S = 5.0
READ_LINGER_S = 0.02
"""After a read shorter than READ_COUNT, wait this long so the next read takes a batch."""
DUE_POLL_S = 0.5
"""How often retries that came due are looked for when no workflow has just ended."""


def ensure_group(redis_client: redis.Redis) -> None:
    try:
        redis_client.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


def consume(redis_client: redis.Redis, entries: list) -> int:
    """Make due the notifications these entries end; acknowledge them; return how many."""
    ended = [
        json.loads(fields["event"])
        for _, fields in entries
        if fields and fields.get("type") in notifications.TERMINAL and "event" in fields
    ]
    queued = 0
    if ended:
        with db.tx() as tx:
            queued = sum(notifications.queue(tx, envelope) for envelope in ended)
    if entries:
        redis_client.xack(STREAM, GROUP, *[stream_id for stream_id, _ in entries])
    return queued


def send_due() -> int:
    """Send every notification that is due; return how many were tried."""
    hold = get_settings().emprops_timeout_s + HOLD_MARGIN_S
    tried = 0
    while True:
        with db.tx() as tx:
            claimed = notifications.claim(tx, SEND_BATCH, hold)
        for row in claimed:
            send(row)
        tried += len(claimed)
        if len(claimed) < SEND_BATCH:
            return tried


def send(row) -> None:
    log = {"workflow_id": row.workflow_id, "job_id": row.job_id, "attempt": row.attempts + 1}
    try:
        client.call(f"/jobs/{row.job_id}/{row.path}", row.body, idempotency_key=row.event_id)
    except client.EmpropsError as failure:
        with db.tx() as tx:
            notifications.record(
                tx,
                row,
                delivered=False,
                error=failure.message,
                status=failure.status,
                retryable=failure.retryable,
            )
        logger.warning(
            "EmProps not notified",
            extra={"action": "emprops_failed", "error": failure.message, **log},
        )
        return
    with db.tx() as tx:
        recorded = notifications.record(tx, row, delivered=True)
    if recorded is None:  # the call outlived its hold: the row is another sender's now
        logger.warning(
            "EmProps notified, but the claim had passed to another sender",
            extra={"action": "emprops_claim_lost", **log},
        )
        return
    logger.info("EmProps notified", extra={"action": "emprops_notified", **log})


def backstop() -> int:
    with db.tx() as tx:
        rows = notifications.unqueued_terminal(tx, now() - timedelta(seconds=BACKSTOP_S))
        return sum(notifications.queue(tx, row.envelope) for row in rows)


def run_forever() -> None:
    settings = get_settings()
    name = f"{socket.gethostname()}-{os.getpid()}"
    if settings.emprops_api_url is None:
        logger.info(
            "EmProps not configured (EMPROPS_API_URL); idle", extra={"action": "emprops_idle"}
        )
        while True:
            time.sleep(3600)
    logger.info("EmProps notifier started", extra={"action": "emprops_start", "consumer": name})
    group_ready = False
    next_claim = next_backstop = next_due = 0.0
    while True:
        try:
            redis_client = redisdb.client()
            if not group_ready:
                ensure_group(redis_client)
                group_ready = True
            if time.monotonic() >= next_claim:
                next_claim = time.monotonic() + CLAIM_IDLE_MS / 2000
                _, abandoned, *_ = redis_client.xautoclaim(
                    STREAM, GROUP, name, CLAIM_IDLE_MS, start_id="0-0", count=READ_COUNT
                )
                consume(redis_client, abandoned)
                next_due = 0.0
            batches = redis_client.xreadgroup(
                GROUP, name, {STREAM: ">"}, count=READ_COUNT, block=int(DUE_POLL_S * 1000)
            )
            # Most entries are other events: PostgreSQL is asked only when one of ours ended
            # or a retry may have come due.
            if sum(consume(redis_client, entries) for _, entries in batches or []):
                next_due = 0.0
            read = sum(len(entries) for _, entries in batches or [])
            if time.monotonic() >= next_due:
                next_due = time.monotonic() + DUE_POLL_S
                send_due()
            if 0 < read < READ_COUNT:
                time.sleep(READ_LINGER_S)
            if time.monotonic() >= next_backstop:
                next_backstop = time.monotonic() + BACKSTOP_S
                backstop()
        except redis.ResponseError as exc:
            group_ready = False  # NOGROUP: the stream was deleted (Redis flushed)
            if "NOGROUP" not in str(exc):
                logger.exception("EmProps notifier failed", extra={"action": "emprops_loop"})
                time.sleep(1)
        except Exception:
            logger.exception("EmProps notifier failed", extra={"action": "emprops_loop"})
            group_ready = False
            time.sleep(1)
