"""The live event WebSocket at `/ws` (API.md, "WebSocket `GET /ws`").

Authenticated before the upgrade (`?token=<key>` or the usual headers; 401 in
the API's error format otherwise). Then the client subscribes and unsubscribes
(`subscribe` / `unsubscribe` with `step_ids`, `workflow_ids`, `machine_ids`,
`all`, and the seed forms `subscribe_job`, `subscribe_step`, ...), resumes from
a stream id (`resume`, or `?after=` on connect), asks for a `snapshot` (admin),
and receives each event it may see. The server pings every
EMP_WS_PING_INTERVAL_S; a client that stops answering is dropped, and so is
one that falls MAX_QUEUED events behind.

Each socket holds one web thread (gunicorn's gthread worker): EMP_WEB_THREADS
bounds the sockets one web process serves.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from flask import Blueprint, g, request
from flask_sock import Sock
from simple_websocket import ConnectionClosed

from emp_tasks import auth, live, queues, steps, workers
from emp_tasks.config import get_settings
from web.endpoints import ROUTES, Route, presented_key
from web.errors import ApiError, error_response

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
MAX_IDS = 1000


@bp.before_app_request
def _authenticate_socket() -> Any:
    if request.path != "/ws":
        return None
    key = request.args.get("token") or presented_key()
    principal = auth.authenticate(key)
    if principal is None:
        return error_response(
            ApiError(401, "UNAUTHORIZED", "a valid API key is required (?token=<key>)")
        )
    g.ws_principal = principal
    return None


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
        try:
            message = json.loads(raw)
        except (TypeError, ValueError):
            self.error("VALIDATION_FAILED", "messages must be JSON objects")
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
            if len(values) > MAX_IDS:
                self.error("VALIDATION_FAILED", f"`{name}`: at most {MAX_IDS} ids at once")
                return
        everything = message.get("all", False)
        if everything and not self.principal.admin:
            self.error("FORBIDDEN", "`all` needs an admin key")
            return
        for name in LISTS:
            ids: set[str] = getattr(wanted, name)
            if kind == "subscribe":
                ids.update(message.get(name, []))
            else:
                ids.difference_update(message.get(name, []))
        if everything is True:
            wanted.all = kind == "subscribe"
        self.send({"type": "subscribed", **wanted.describe()})

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
        for event in self.subscriber.history(after):
            self.ws.send(event_message(event))
        self.send({"type": "resumed", "after": after})

    def snapshot(self) -> None:
        if not self.principal.admin:
            self.error("FORBIDDEN", "a snapshot needs an admin key")
            return
        self.send(
            {
                "type": "snapshot",
                "machines": workers.list_machines(),
                "workers": workers.list_workers(),
                "queues": queues.list_queues(self.principal),
                "counts": steps.stats(self.principal, "day"),
                "subscribers": live.hub().count(),
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


def configure(app: Any) -> None:
    """Socket settings: server pings keep connections honest (and find dead ones)."""
    app.config.setdefault(
        "SOCK_SERVER_OPTIONS", {"ping_interval": get_settings().ws_ping_interval_s}
    )
