"""The live event latency rows (EMP Tasks only): an event's recording to its arrival over `/ws`.

Each configuration connects `clients` WebSocket clients with admin keys (as many
as EMP_WS_MAX_PER_KEY needs), each subscribed to `all`, submits `steps` no-op steps
at a steady `rate`, and times, for every (client, event of those steps), the
envelope's `timestamp` (whole ms, taken when the event is recorded in its committing
transaction) to the moment the frame arrived at the client. Every client must receive
every event of the steps in the outbox. The clients run in this process, each on its
socket's own reading thread; both times are this host's wall clock.
"""

from __future__ import annotations

import contextlib
import json
import math
import threading
import time
from collections.abc import Callable, Collection
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import simple_websocket

from bench.stats import BenchError, Deadline, LiveResult
from emp_tasks import auth
from emp_tasks.core import config

CLIENT_COUNTS = (1, 200)
CONNECT_THREADS = 16  # clients connecting at once
MAX_EVENTS = 10_000  # step events kept per client; more are counted as an error
WAIT_INTERVAL_S = 0.02


@dataclass(frozen=True)
class LiveRow:
    """`steps` steps submitted at `rate` steps/s, each event delivered to `clients` clients."""

    clients: int
    steps: int
    rate: float

    @property
    def key(self) -> str:
        return f"live-{self.clients}"

    @property
    def label(self) -> str:
        plural = "" if self.clients == 1 else "s"
        return f"WebSocket event latency, {self.clients} client{plural}"

    def empty_result(self) -> LiveResult:
        return LiveResult(key=self.key, clients=self.clients, steps=self.steps, rate=self.rate)


def configs(steps: int, rate: float) -> list[LiveRow]:
    """The two configurations: 1 client and 200 clients, the same steps at the same rate."""
    return [LiveRow(count, steps, rate) for count in CLIENT_COUNTS]


class _ReaderThread(threading.Thread):
    """A socket's reading thread; a daemon, so a socket left open never holds up the exit."""

    def __init__(self, target: Callable[[], None]) -> None:
        super().__init__(target=target, name="bench-live-client", daemon=True)


class Socket(simple_websocket.Client):
    """A client socket that hands each message, with its arrival time, to `on_message`.

    simple-websocket (pinned) parses what its reading thread received in
    `_handle_events`; the time is taken there, before parsing, and the messages are
    taken off the input buffer on that same thread, so `receive()` is never used.
    """

    def __init__(self, url: str, on_message: Callable[[str, float], None], timeout_s: float):
        self._on_message = on_message
        self._handshake_timeout_s = timeout_s
        super().__init__(url, thread_class=_ReaderThread)

    def handshake(self) -> None:
        self.sock.settimeout(self._handshake_timeout_s)
        try:
            super().handshake()
        except BaseException:
            self.sock.close()
            raise
        self.sock.settimeout(None)

    def _handle_events(self) -> bool:
        arrived_ms = time.time() * 1000
        keep_going = super()._handle_events()
        while self.input_buffer:
            self._on_message(self.input_buffer.pop(0), arrived_ms)
        return keep_going


class Listener:
    """One client subscribed to `all`: the first arrival of each step event, by event id."""

    def __init__(self, url: str, timeout_s: float) -> None:
        self._lock = threading.Lock()
        self._arrivals: dict[str, tuple[float, float]] = {}  # id: (timestamp, arrival) in ms
        self.duplicates = 0
        self.dropped = 0  # step events beyond MAX_EVENTS
        self.errors: list[str] = []
        self.subscribed = threading.Event()
        self._socket = Socket(url, self._record, timeout_s)

    def subscribe_all(self) -> None:
        self._socket.send(json.dumps({"type": "subscribe", "all": True}))

    def close(self) -> None:
        with contextlib.suppress(simple_websocket.ConnectionClosed, OSError):
            self._socket.close()

    def _record(self, raw: str, arrived_ms: float) -> None:
        try:
            message = json.loads(raw)
            if "stream_id" in message:
                event_id, step_id = message["id"], message.get("step_id")
                stamp = float(message["timestamp"])
            elif message.get("type") == "subscribed" and message.get("all"):
                self.subscribed.set()
                return
            elif message.get("type") == "error":
                raise ValueError("an error from the server")
            else:
                return
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            with self._lock:
                if len(self.errors) < 10:
                    self.errors.append(f"{exc}: {str(raw)[:200]}")
            return
        if not step_id:
            return  # fleet events: no step
        with self._lock:
            if event_id in self._arrivals:
                self.duplicates += 1
            elif len(self._arrivals) >= MAX_EVENTS:
                self.dropped += 1
            else:
                self._arrivals[event_id] = (stamp, arrived_ms)

    def count(self, event_ids: Collection[str]) -> int:
        """How many of these events have arrived."""
        with self._lock:
            return sum(1 for event_id in event_ids if event_id in self._arrivals)

    def latencies_ms(self, event_ids: Collection[str]) -> list[float]:
        """Envelope timestamp to arrival, per event of these that arrived."""
        with self._lock:
            pairs = [
                self._arrivals[event_id] for event_id in event_ids if event_id in self._arrivals
            ]
        return [arrived - stamp for stamp, arrived in pairs]


def socket_keys(count: int, first: str | None = None, admin: bool = True) -> list[str]:
    """Keys enough for `count` sockets within EMP_WS_MAX_PER_KEY each: `first`, then new ones.

    The new keys are stored in the database (customer `bench`), like `emp keys create`.
    """
    needed = math.ceil(count / config.get_settings().ws_max_per_key)
    keys = [first] if first else []
    while len(keys) < needed:
        keys.append(auth.create_key("bench", admin=admin, name="bench-sockets")[0])
    return keys


class Audience:
    """`count` listeners on `/ws` with admin keys, connected in parallel, all subscribed.

    The clients are spread over `key` and as many more admin keys as EMP_WS_MAX_PER_KEY
    needs, so that no key is refused for its socket cap.
    """

    def __init__(self, base_url: str, key: str) -> None:
        self.base_url = base_url.replace("http://", "ws://", 1)
        self.key = key
        self.listeners: list[Listener] = []
        self._lock = threading.Lock()

    def connect(self, count: int, deadline: Deadline) -> None:
        """Connect and subscribe `count` clients; BenchError unless all are subscribed in time."""
        keys = socket_keys(count, self.key)

        def one(index: int) -> str | None:
            url = f"{self.base_url}/ws?token={keys[index % len(keys)]}"
            try:
                listener = Listener(url, max(0.1, deadline.remaining()))
            except (simple_websocket.ConnectionError, OSError) as exc:
                return f"connect: {type(exc).__name__}: {exc}"
            with self._lock:
                self.listeners.append(listener)
            try:
                listener.subscribe_all()
            except (simple_websocket.ConnectionClosed, OSError) as exc:
                return f"subscribe: {type(exc).__name__}: {exc}"
            if not listener.subscribed.wait(deadline.remaining()):
                return f"no `subscribed` reply; {(listener.errors or ['no error'])[0]}"
            return None

        with ThreadPoolExecutor(min(CONNECT_THREADS, count), "bench-live-connect") as pool:
            failures = [error for error in pool.map(one, range(count)) if error is not None]
        if failures:
            raise BenchError(
                f"{len(failures)} of {count} WebSocket clients not subscribed within "
                f"{deadline.seconds:g} s, first: {failures[0]}"
            )

    def received(self, event_ids: Collection[str]) -> int:
        """Distinct (client, event) deliveries of these events so far."""
        return sum(listener.count(event_ids) for listener in self.listeners)

    def wait(
        self, event_ids: Collection[str], deadline: Deadline, check_alive: Callable[[], None]
    ) -> int:
        """Until every client has every one of these events, or the deadline; return how many."""
        expected = len(event_ids) * len(self.listeners)
        while True:
            received = self.received(event_ids)
            if received >= expected or deadline.expired:
                return received
            check_alive()
            time.sleep(WAIT_INTERVAL_S)

    def fill(self, event_ids: Collection[str], outcome: LiveResult) -> None:
        """The deliveries, latencies, duplicates and client errors of these events."""
        outcome.events = len(event_ids)
        outcome.expected = len(event_ids) * outcome.clients
        outcome.received = self.received(event_ids)
        for listener in self.listeners:
            outcome.latencies_ms.extend(listener.latencies_ms(event_ids))
            outcome.duplicates += listener.duplicates
        dropped = sum(listener.dropped for listener in self.listeners)
        if dropped:
            outcome.errors.append(f"{dropped} step events past the clients' cap of {MAX_EVENTS}")
        errors = [error for listener in self.listeners for error in listener.errors]
        if errors:
            outcome.errors.append(f"{len(errors)} client errors, first: {errors[0]}")

    def close(self) -> None:
        for listener in self.listeners:
            listener.close()
