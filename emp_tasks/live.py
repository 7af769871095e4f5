"""Live events for WebSocket clients: one Redis subscription per web process, fanned out.

The hub (one per process) subscribes to the `emp:events` channel once and hands
each event to every subscriber whose filter takes it. A subscriber sees only
what its key may see: its customer's events, or everything for an admin key
(fleet events carry no customer, so only admins see them).

Progress. Reports of an attempt that is no longer running are not delivered, live or
on resume (emp_tasks.core.events.ProgressFence).

Resume. A subscriber that names a stream id gets every event after it from the
`emp:events` stream, then the live ones, with no gap and no duplicate: it
registers with the hub first (live events queue up), reads the stream after the
id, and then skips queued live events at or before the last one it sent.
If the hub's own subscription drops, it reads what it missed from the stream
when it reconnects, so live subscribers see no gap either.
"""

from __future__ import annotations

import collections
import json
import logging
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from emp_tasks.auth import Principal
from emp_tasks.core.events import CHANNEL, STREAM, ProgressFence
from emp_tasks.store import redisdb

logger = logging.getLogger(__name__)

STREAM_ID = re.compile(r"^\d{1,20}-\d{1,20}$", re.ASCII)  # Redis takes ASCII digits only
MAX_STREAM_PART = 2**64 - 1
MAX_QUEUED = 10_000
"""Events a subscriber may have waiting; a client this far behind is disconnected."""
RESUME_PAGE = 500
SEEN_IDS = 2_000


def stream_key(stream_id: str) -> tuple[int, int]:
    milliseconds, _, sequence = stream_id.partition("-")
    return int(milliseconds), int(sequence or 0)


def valid_stream_id(value: Any) -> bool:
    """`<ms>-<seq>` with both parts within Redis's unsigned 64-bit range."""
    if not isinstance(value, str) or not STREAM_ID.match(value):
        return False
    return max(stream_key(value)) <= MAX_STREAM_PART


def stream_after(after: str) -> Iterator[dict[str, Any]]:
    """Every event on the `emp:events` stream after the stream id, oldest first, in pages."""
    client = redisdb.client()
    start = "(" + after
    while True:
        entries = client.xrange(STREAM, min=start, max="+", count=RESUME_PAGE)
        for stream_id, fields in entries:
            yield {"stream_id": stream_id, **json.loads(fields["event"])}
        if len(entries) < RESUME_PAGE:
            return
        start = "(" + entries[-1][0]


@dataclass
class Filter:
    """What a subscriber asked for (on top of what its key may see)."""

    all: bool = False
    step_ids: set[str] = field(default_factory=set)
    workflow_ids: set[str] = field(default_factory=set)
    machine_ids: set[str] = field(default_factory=set)

    def wants(self, event: dict[str, Any]) -> bool:
        return (
            self.all
            or event.get("step_id") in self.step_ids
            or event.get("workflow_id") in self.workflow_ids
            or event.get("machine_id") in self.machine_ids
        )


class Subscriber:
    """One client's view of the event stream; the hub fills it, the socket drains it."""

    def __init__(self, principal: Principal, wake: Callable[[], None]) -> None:
        self.principal = principal
        self.filter = Filter()
        self._wake = wake
        self._queue: collections.deque[dict[str, Any]] = collections.deque()
        self._lock = threading.Lock()
        self.overflowed = False
        self.last_sent: tuple[int, int] = (0, 0)
        self._seen: collections.OrderedDict[str, None] = collections.OrderedDict()

    def may_see(self, event: dict[str, Any]) -> bool:
        if self.principal.admin:
            return True
        return event.get("customer_id") == self.principal.customer_id

    def offer(self, event: dict[str, Any]) -> None:
        """Called by the hub for every live event."""
        if not self.may_see(event) or not self.filter.wants(event):
            return
        with self._lock:
            if len(self._queue) >= MAX_QUEUED:
                self.overflowed = True
            else:
                self._queue.append(event)
        self._wake()

    def take(self) -> list[dict[str, Any]]:
        """Queued events not yet sent, each once, in stream order."""
        with self._lock:
            events = list(self._queue)
            self._queue.clear()
        return [event for event in events if self._first_time(event)]

    def _first_time(self, event: dict[str, Any]) -> bool:
        stream_id = event.get("stream_id")
        if stream_id and stream_key(stream_id) <= self.last_sent:
            return False
        if event.get("id") in self._seen:  # the relay published it twice (crash path)
            return False
        if stream_id:
            self.last_sent = stream_key(stream_id)
        self._seen[event.get("id")] = None
        if len(self._seen) > SEEN_IDS:
            self._seen.popitem(last=False)
        return True

    def history(self, after: str) -> Iterator[dict[str, Any]]:
        """Events on the stream after `after` that this subscriber wants, oldest first
        (stale progress reports left out, see ProgressFence)."""
        fence = ProgressFence()
        for event in stream_after(after):
            if not fence.admits(event):
                continue
            if self.may_see(event) and self.filter.wants(event) and self._first_time(event):
                yield event

    def oldest_retained(self) -> str | None:
        first = redisdb.client().xrange(STREAM, count=1)
        return first[0][0] if first else None


class Hub:
    """The process's one subscription to `emp:events`, shared by all its sockets."""

    def __init__(self) -> None:
        self._subscribers: set[Subscriber] = set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._last: str | None = None
        self._fence = ProgressFence()
        self.ready = threading.Event()
        self._stopping = threading.Event()

    def add(self, subscriber: Subscriber) -> None:
        with self._lock:
            self._subscribers.add(subscriber)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="emp-live-hub", daemon=True)
                self._thread.start()
        self.ready.wait(5.0)

    def stop(self, timeout_s: float) -> None:
        """End the subscription and its thread (within a poll, at most `timeout_s`)."""
        self._stopping.set()
        with self._lock:
            thread = self._thread
        if thread is not None:
            thread.join(timeout_s)

    def remove(self, subscriber: Subscriber) -> None:
        with self._lock:
            self._subscribers.discard(subscriber)

    def count(self) -> int:
        with self._lock:
            return len(self._subscribers)

    def _deliver(self, event: dict[str, Any]) -> None:
        stream_id = event.get("stream_id")
        if stream_id:
            if self._last and stream_key(stream_id) <= stream_key(self._last):
                return
            self._last = stream_id
        if not self._fence.admits(event):
            return  # a report of an attempt that is over (a superseded worker, late)
        with self._lock:
            subscribers = list(self._subscribers)
        for subscriber in subscribers:
            subscriber.offer(event)

    def _catch_up(self) -> None:
        """After a reconnect: deliver what was published while the subscription was down."""
        if self._last is None:
            return
        for event in stream_after(self._last):
            self._deliver(event)

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                self._follow()
            except Exception:
                self.ready.clear()
                logger.warning(
                    "Live event subscription lost; reconnecting",
                    exc_info=True,
                    extra={"action": "live_hub_reconnect"},
                )
                self._stopping.wait(1.0)

    def _follow(self) -> None:
        own_db = redisdb.database_index()
        pubsub = redisdb.client().pubsub(ignore_subscribe_messages=True)
        try:
            pubsub.subscribe(CHANNEL)
            pubsub.get_message(timeout=1.0)  # the subscribe confirmation
            self._catch_up()
            self.ready.set()
            while not self._stopping.is_set():
                # Short polls: the client's socket timeout never fires on a quiet channel.
                message = pubsub.get_message(timeout=1.0)
                if message is None or message.get("type") != "message":
                    continue
                try:
                    event = json.loads(message["data"])
                except ValueError:
                    continue
                if event.pop("db", own_db) != own_db:
                    continue  # another deployment on the same Redis server
                self._deliver(event)
        finally:
            pubsub.close()


_hub: Hub | None = None
_hub_lock = threading.Lock()


def hub() -> Hub:
    global _hub
    with _hub_lock:
        if _hub is None:
            _hub = Hub()
        return _hub


def stop(timeout_s: float = 3.0) -> None:
    """Stop the process's hub, if it runs (before Redis clients are closed, and at exit:
    a thread frozen mid-command by interpreter shutdown would hold its pool's lock)."""
    global _hub
    with _hub_lock:
        current, _hub = _hub, None
    if current is not None:
        current.stop(timeout_s)
