"""The live event WebSocket at `/ws` (API.md, "WebSocket `GET /ws`").

Authenticated before the upgrade (`?token=<key>` or the usual headers; 401 in
the API's error format otherwise). Then the client subscribes and unsubscribes
(`subscribe` / `unsubscribe` with `step_ids`, `workflow_ids`, `machine_ids`,
`all`, and the seed forms `subscribe_job`, `subscribe_step`, ...), resumes from
a stream id (`resume`, or `?after=` on connect), asks for a `snapshot` (admin),
and receives each event it may see. The server pings every
EMP_WS_PING_INTERVAL_S; a client that stops answering is dropped, and so is
one that falls MAX_QUEUED events behind.

Limits. Each socket holds one web thread (gunicorn's gthread worker) for its whole
life, plus simple-websocket's own reading thread (outside the pool). So a web
process serves at most `Settings.ws_sockets_per_process` sockets (EMP_WS_MAX_PER_PROCESS,
by default EMP_WEB_THREADS minus max(8, EMP_WEB_THREADS // 8), never the last thread)
and at most EMP_WS_MAX_PER_KEY (16) per key; the threads left always answer REST.
Both are counted per web process, in memory, so a process that dies frees its slots.
An upgrade over a cap is refused before it is accepted, in the API's error format:
429 RATE_LIMITED (the key's cap) or 503 UNAVAILABLE (the process's cap), with
Retry-After; a browser sees a failed connection and backs off.

A session survives bad input: a message over MAX_MESSAGE_BYTES (dropped as it
arrives), one request bodies would refuse (web.inbound: JSON nested past 64 levels,
NUL characters, non-finite numbers), more than MAX_SUBSCRIPTIONS ids on one socket,
or a resume id Redis refuses each get an `error` and the session goes on.
"""

from __future__ import annotations

import collections
import json
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

import redis
from flask import Blueprint, Flask, current_app, g, request
from flask_sock import Sock
from simple_websocket import ConnectionClosed
from wsproto.events import BytesMessage, Event, TextMessage

from emp_tasks import auth, live, workers
from emp_tasks.core.config import get_settings
from emp_tasks.routes import queues
from emp_tasks.steps import queries
from web import inbound
from web.endpoints import ROUTES, Route, presented_key, throttled_authenticate
from web.errors import ApiError, error_response
from web.presenters import machine_object, worker_object

logger = logging.getLogger(__name__)

bp = Blueprint("ws", __name__)
sock = Sock()

ROUTES.append(
    Route(
        rule="/ws",
        methods=("GET",),
        summary="Live events over a WebSocket: subscribe, resume from a stream id, snapshot",
        tags=("live",),
        body=None,
        query=None,
        status=101,
        authenticated=True,
        admin=False,
        deprecated=False,
        produces=None,
    )
)

SEED_FORMS = {
    "subscribe_job": ("subscribe", "step_ids", "job_id"),
    "unsubscribe_job": ("unsubscribe", "step_ids", "job_id"),
    "subscribe_step": ("subscribe", "step_ids", "step_id"),
    "unsubscribe_step": ("unsubscribe", "step_ids", "step_id"),
    "subscribe_workflow": ("subscribe", "workflow_ids", "workflow_id"),
    "unsubscribe_workflow": ("unsubscribe", "workflow_ids", "workflow_id"),
    "subscribe_machine": ("subscribe", "machine_ids", "machine_id"),
    "unsubscribe_machine": ("unsubscribe", "machine_ids", "machine_id"),
}
LISTS = ("step_ids", "workflow_ids", "machine_ids")
MAX_SUBSCRIPTIONS = 1000
"""Ids one socket may follow, across step_ids, workflow_ids and machine_ids together."""
ECHO_IDS = 100
"""`subscribed` names a list's ids only while it holds at most this many; counts always."""
MAX_MESSAGE_BYTES = 64 * 1024
RETRY_AFTER_S = 5
SLOTS = "emp_ws_slots"  # the app extension holding the process's SocketSlots


class SocketSlots:
    """The sockets this web process holds, in total and by key, within their caps.

    In memory on purpose: a slot lives exactly as long as the request holding its
    thread, so nothing outlives a crashed process, and the threads being protected are
    this process's own.
    """

    def __init__(self, per_key: int, per_process: int) -> None:
        self.per_key = per_key
        self.per_process = per_process
        self._lock = threading.Lock()
        self._by_key: collections.Counter[str] = collections.Counter()

    def acquire(self, key_id: str) -> str | None:
        """Take a slot for the key; None when taken, else the setting that refused it."""
        with self._lock:
            if self._by_key[key_id] >= self.per_key:
                return "EMP_WS_MAX_PER_KEY"
            if self._by_key.total() >= self.per_process:
                return "EMP_WS_MAX_PER_PROCESS"
            self._by_key[key_id] += 1
            return None

    def release(self, key_id: str) -> None:
        with self._lock:
            self._by_key[key_id] -= 1
            if self._by_key[key_id] <= 0:
                del self._by_key[key_id]

    def open(self) -> int:
        with self._lock:
            return self._by_key.total()


def _socket_counts() -> dict[str, int]:
    """This web process's open sockets and its caps, for the admin snapshot."""
    slots: SocketSlots = current_app.extensions[SLOTS]
    return {"open": slots.open(), "max_per_key": slots.per_key, "max": slots.per_process}


def refusal(limit: str, slots: SocketSlots) -> ApiError:
    """Why a socket (or an event stream) over a cap is refused: 429 per key, 503 per process."""
    retry = {"Retry-After": str(RETRY_AFTER_S)}
    if limit == "EMP_WS_MAX_PER_KEY":
        message = f"this key already has {slots.per_key} WebSockets open on this web process"
        detail = {"limit": limit, "max": slots.per_key}
        return ApiError(429, "RATE_LIMITED", message, [detail], retry)
    message = f"this web process already serves {slots.per_process} WebSockets"
    detail = {"limit": limit, "max": slots.per_process}
    return ApiError(503, "UNAVAILABLE", message, [detail], retry)


@bp.before_app_request
def _authenticate_socket() -> Any:
    if request.path != "/ws":
        return None
    key = request.args.get("token") or presented_key()
    principal = throttled_authenticate(key)  # 429 for an address that failed too often
    if principal is None:
        return error_response(
            ApiError(401, "UNAUTHORIZED", "a valid API key is required (?token=<key>)")
        )
    # Refused before the upgrade: an over-cap socket never holds a thread past this request.
    slots: SocketSlots = current_app.extensions[SLOTS]
    limit = slots.acquire(principal.key_id)
    if limit is not None:
        logger.info(
            "WebSocket refused",
            extra={"action": "ws_refused", "limit": limit, "key_id": principal.key_id},
        )
        return error_response(refusal(limit, slots))
    g.ws_slot = principal.key_id
    g.ws_principal = principal
    return None


@bp.teardown_app_request
def _release_socket_slot(_: BaseException | None) -> None:
    # Teardown runs after the session returns, and also when the handshake fails.
    key_id = g.pop("ws_slot", None)
    if key_id is not None:
        current_app.extensions[SLOTS].release(key_id)


class OversizedMessage(str):
    """Stands in for a client message over MAX_MESSAGE_BYTES, which was dropped unread."""


class BoundedMessages:
    """A socket's wsproto connection that hands on whole messages of at most `limit` bytes.

    A larger message is dropped fragment by fragment as it arrives, so memory stays
    bounded, and handed on as one OversizedMessage: the session answers it with an
    error and stays open (simple-websocket's own max_message_size closes the socket).
    """

    def __init__(self, connection: Any, limit: int) -> None:
        self._connection = connection
        self._limit = limit
        self._parts: list[str | bytes] = []
        self._size = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._connection, name)

    def events(self) -> Iterator[Event]:
        for event in self._connection.events():
            if not isinstance(event, (TextMessage, BytesMessage)):
                yield event
                continue
            if self._size <= self._limit:
                data = event.data
                self._size += len(data.encode()) if isinstance(data, str) else len(data)
                if self._size <= self._limit:
                    self._parts.append(data)
                else:
                    self._parts = []
            if not event.message_finished:
                continue
            if self._size > self._limit:
                whole: str | bytes = OversizedMessage()
            elif isinstance(event, TextMessage):
                whole = "".join(self._parts)  # type: ignore[arg-type]
            else:
                whole = b"".join(self._parts)  # type: ignore[arg-type]
            self._parts, self._size = [], 0
            yield type(event)(data=whole, frame_finished=True, message_finished=True)


class _ReaderThread(threading.Thread):
    """simple-websocket's reading thread for one socket, which first bounds its messages.

    flask-sock builds the server itself; its reading thread is created after the
    handshake and before the first frame is read, the one point where the connection
    can be wrapped without racing that thread.
    """

    def __init__(self, target: Callable[[], None]) -> None:
        server = target.__self__  # type: ignore[attr-defined]
        server.ws = BoundedMessages(server.ws, MAX_MESSAGE_BYTES)
        super().__init__(target=target, name="emp-ws-reader", daemon=True)


def subscription_summary(wanted: live.Filter) -> dict[str, Any]:
    """The `subscribed` reply: `all`, each id list while it is short, and every list's count."""
    summary: dict[str, Any] = {"all": wanted.all}
    counts = {}
    for name in LISTS:
        ids: set[str] = getattr(wanted, name)
        counts[name] = len(ids)
        if len(ids) <= ECHO_IDS:
            summary[name] = sorted(ids)
    summary["counts"] = counts
    summary["max_ids"] = MAX_SUBSCRIPTIONS
    return summary


def event_message(event: dict[str, Any]) -> str:
    """An event as the socket sends it: the envelope with its stream id."""
    return json.dumps(event, separators=(",", ":"))


class Session:
    """One connected client."""

    def __init__(self, ws: Any, principal: auth.Principal) -> None:
        self.ws = ws
        self.principal = principal
        self.subscriber = live.Subscriber(principal, wake=ws.event.set)

    def send(self, message: dict[str, Any]) -> None:
        self.ws.send(json.dumps(message, separators=(",", ":")))

    def error(self, code: str, message: str) -> None:
        self.send({"type": "error", "code": code, "message": message})

    # --- client messages -------------------------------------------------------------------

    def handle(self, raw: Any) -> None:
        if isinstance(raw, OversizedMessage):
            self.error("VALIDATION_FAILED", f"messages are at most {MAX_MESSAGE_BYTES} bytes")
            return
        try:
            # The same door as request bodies: JSON, nested at most 64 levels, storable text.
            message = inbound.decode_json(raw)
        except inbound.InboundRefused as refused:
            self.error("VALIDATION_FAILED", f"messages must be JSON objects: {refused.message}")
            return
        if not isinstance(message, dict) or not isinstance(message.get("type"), str):
            self.error("VALIDATION_FAILED", "a message needs a string `type`")
            return
        kind = message["type"]
        if kind in SEED_FORMS:
            action, name, field = SEED_FORMS[kind]
            value = message.get(field)
            if not isinstance(value, str) or not value:
                self.error("VALIDATION_FAILED", f"{kind} needs `{field}`")
                return
            message = {"type": action, name: [value]}
            kind = action
        if kind in ("subscribe", "unsubscribe"):
            self._subscription(kind, message)
        elif kind == "resume":
            self.resume(message.get("after"))
        elif kind == "snapshot":
            self.snapshot()
        elif kind == "ping":
            self.send({"type": "pong"})
        else:
            self.error("VALIDATION_FAILED", f"unknown message type {kind!r}")

    def _subscription(self, kind: str, message: dict[str, Any]) -> None:
        wanted = self.subscriber.filter
        for name in LISTS:
            values = message.get(name, [])
            if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
                self.error("VALIDATION_FAILED", f"`{name}` must be a list of ids")
                return
            if len(values) > MAX_SUBSCRIPTIONS:
                self.error(
                    "VALIDATION_FAILED", f"`{name}`: at most {MAX_SUBSCRIPTIONS} ids at once"
                )
                return
        everything = message.get("all", False)
        if everything and not self.principal.admin:
            self.error("FORBIDDEN", "`all` needs an admin key")
            return
        if kind == "subscribe":
            following = sum(len(getattr(wanted, name)) for name in LISTS)
            adding = sum(len(set(message.get(name, [])) - getattr(wanted, name)) for name in LISTS)
            if following + adding > MAX_SUBSCRIPTIONS:
                self.error(
                    "VALIDATION_FAILED",
                    f"a socket follows at most {MAX_SUBSCRIPTIONS} ids across step_ids, "
                    f"workflow_ids and machine_ids ({following} now, {adding} more asked); "
                    "nothing was subscribed",
                )
                return
        for name in LISTS:
            ids: set[str] = getattr(wanted, name)
            if kind == "subscribe":
                ids.update(message.get(name, []))
            else:
                ids.difference_update(message.get(name, []))
        if everything is True:
            wanted.all = kind == "subscribe"
        self.send({"type": "subscribed", **subscription_summary(wanted)})

    def resume(self, after: Any) -> None:
        """Every wanted event after the stream id, then live ones: no gap, no duplicate."""
        if not live.valid_stream_id(after):
            self.error("VALIDATION_FAILED", "`after` must be a stream id like 1700000000000-0")
            return
        oldest = self.subscriber.oldest_retained()
        if (
            oldest is not None
            and after != "0-0"
            and live.stream_key(after) < live.stream_key(oldest)
        ):
            self.error(
                "RESUME_TRUNCATED",
                f"events before {oldest} may have been trimmed from the stream",
            )
        try:
            for event in self.subscriber.history(after):
                self.ws.send(event_message(event))
        except redis.ResponseError as exc:
            # Ids that match the pattern can still be out of Redis's range.
            self.error("VALIDATION_FAILED", f"`after`: Redis refused the stream id ({exc})")
            return
        self.send({"type": "resumed", "after": after})

    def snapshot(self) -> None:
        if not self.principal.admin:
            self.error("FORBIDDEN", "a snapshot needs an admin key")
            return
        self.send(
            {
                "type": "snapshot",
                "machines": [machine_object(m) for m in workers.list_machines()],
                "workers": [worker_object(w) for w in workers.list_workers()],
                "queues": queues.list_queues(self.principal),
                "counts": queries.stats(self.principal, "day"),
                "subscribers": live.hub().count(),
                "sockets": _socket_counts(),
            }
        )

    # --- the loop --------------------------------------------------------------------------

    def run(self, after: str | None) -> None:
        hub = live.hub()
        hub.add(self.subscriber)
        try:
            if after is not None:
                # Resuming on connect, before any subscribe: everything the key may see.
                self.subscriber.filter.all = True
                self.resume(after)
            while self.ws.connected:
                self.ws.event.wait(timeout=1.0)
                self.ws.event.clear()
                while (raw := self.ws.receive(timeout=0)) is not None:
                    self.handle(raw)
                if self.subscriber.overflowed:
                    self.ws.close(reason=1008, message="too far behind; resume from last id")
                    return
                for event in self.subscriber.take():
                    self.ws.send(event_message(event))
        finally:
            hub.remove(self.subscriber)


@sock.route("/ws", bp=bp)
def websocket(ws: Any) -> None:
    principal: auth.Principal = g.ws_principal
    after = request.args.get("after")
    session = Session(ws, principal)
    try:
        session.run(after)
    except ConnectionClosed:
        pass
    except Exception:
        logger.exception("WebSocket session failed", extra={"action": "ws_failed"})


def configure(app: Flask) -> None:
    """Socket settings: server pings keep connections honest (and find dead ones); the
    process's socket caps; each socket's messages bounded by its reading thread."""
    settings = get_settings()
    app.config.setdefault(
        "SOCK_SERVER_OPTIONS",
        {"ping_interval": settings.ws_ping_interval_s, "thread_class": _ReaderThread},
    )
    slots = SocketSlots(settings.ws_max_per_key, settings.ws_sockets_per_process)
    app.extensions[SLOTS] = slots
    logger.info(
        "WebSocket caps",
        extra={
            "action": "ws_caps",
            "per_key": slots.per_key,
            "per_process": slots.per_process,
            "web_threads": settings.web_threads,
        },
    )
