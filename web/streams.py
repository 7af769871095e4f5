"""Server-Sent Events: one step's or one workflow's events, without WebSocket code.

`GET /api/steps/{id}/stream` and `GET /api/workflows/{id}/stream` answer
`text/event-stream`: each event of that step (or workflow and its steps) as
`id: <stream id>`, `event: <type>`, `data: <envelope JSON>`, oldest first, from the
`emp:events` stream (from a little before the step or workflow was created, or after
`Last-Event-ID` when the client resumes), then live from the process's event hub, with
no gap and no duplicate (emp_tasks.live.Subscriber). A comment line is sent every
HEARTBEAT_S so proxies and clients keep the connection, and a dead client is noticed.
The stream ends after the terminal event (and at once when the step or workflow had
ended so long ago that its events left the stream).

Scoping is the WebSocket's: a key sees only its customer's steps (another customer's
is 404). A stream holds a web thread for its life, so it takes one of the WebSocket
slots (`EMP_WS_MAX_PER_KEY`, `EMP_WS_MAX_PER_PROCESS`): over a cap it is refused
(429 / 503 with Retry-After) before it starts.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from typing import Any

from flask import Blueprint, Response, current_app, request, stream_with_context

from emp_tasks import live
from emp_tasks.auth import Principal
from emp_tasks.core.events import STEP_END_EVENTS, WORKFLOW_END_EVENTS, EventType
from emp_tasks.core.status import TERMINAL_STEP_STATUSES, TERMINAL_WORKFLOW_STATUSES
from emp_tasks.steps import queries, workflows
from web import ws
from web.endpoints import endpoint
from web.errors import invalid

bp = Blueprint("streams", __name__)

HEARTBEAT_S = 15.0
REPLAY_MARGIN_MS = 5_000
"""How far before the subject's creation the replay starts (clocks of other hosts)."""

HEADERS = ("Last-Event-ID",)


def sse(event: dict[str, Any]) -> str:
    """One event as SSE: its stream id, its type, its envelope (without transit fields)."""
    envelope = {k: v for k, v in event.items() if k not in ("stream_id", "db")}
    data = json.dumps(envelope, separators=(",", ":"))
    return f"id: {event['stream_id']}\nevent: {event['type']}\ndata: {data}\n\n"


def _resume_from(created_at: Any) -> str:
    """`Last-Event-ID` when valid, else a stream id just before the subject was created."""
    last = request.headers.get("Last-Event-ID")
    if last is not None:
        if not live.valid_stream_id(last):
            raise invalid("Last-Event-ID", "must be a stream id like 1700000000000-0", "header")
        return last
    created_ms = int(created_at.timestamp() * 1000)
    return f"{max(0, created_ms - REPLAY_MARGIN_MS)}-0"


class _Held:
    """A streamed body that gives its slot back when the server closes it (also when it
    was never read: a generator that never started runs no `finally`)."""

    def __init__(self, body: Iterator[str], release: Callable[[], None]) -> None:
        self._body = body
        self._release: Callable[[], None] | None = release

    def __iter__(self) -> Iterator[str]:
        return self._body

    def close(self) -> None:
        try:
            close = getattr(self._body, "close", None)
            if close is not None:
                close()
        finally:
            release, self._release = self._release, None
            if release is not None:
                release()


def _stream(
    principal: Principal,
    wanted: Callable[[live.Filter], None],
    after: str,
    ends: frozenset[EventType],
    ended: Callable[[], bool],
) -> Response:
    slots: ws.SocketSlots = current_app.extensions[ws.SLOTS]
    limit = slots.acquire(principal.key_id)
    if limit is not None:
        raise ws.refusal(limit, slots)
    wake = threading.Event()
    subscriber = live.Subscriber(principal, wake.set)
    wanted(subscriber.filter)

    def events() -> Iterator[str]:
        hub = live.hub()
        hub.add(subscriber)  # first: live events queue up while the history is read
        try:
            yield f"retry: 2000\n: events after {after}\n\n"
            for event in subscriber.history(after):
                yield sse(event)
                if event["type"] in ends:
                    return
            if ended():  # ended before the events still on the stream began
                yield ": ended; its events are no longer on the stream\n\n"
                return
            while True:
                woke = wake.wait(HEARTBEAT_S)
                wake.clear()
                if subscriber.overflowed:
                    yield ": too far behind; reconnect with Last-Event-ID\n\n"
                    return
                if not woke:
                    yield ": heartbeat\n\n"
                for event in subscriber.take():
                    yield sse(event)
                    if event["type"] in ends:
                        return
        finally:
            hub.remove(subscriber)

    try:
        body = _Held(stream_with_context(events()), lambda: slots.release(principal.key_id))
    except BaseException:
        slots.release(principal.key_id)
        raise
    response = Response(body, mimetype="text/event-stream")
    response.headers["Cache-Control"] = "no-cache"
    response.headers["X-Accel-Buffering"] = "no"  # nginx: pass each event on at once
    return response


@endpoint(
    bp,
    "/api/steps/<step_id>/stream",
    tags=("steps",),
    headers=HEADERS,
    produces="text/event-stream",
    summary="A step's events as Server-Sent Events, until its terminal event",
)
def stream_step(principal: Principal, step_id: str) -> Response:
    step = queries.get(step_id, principal)
    after = _resume_from(step.created_at)

    def ended() -> bool:
        return queries.get(step_id, principal).status in TERMINAL_STEP_STATUSES

    return _stream(principal, lambda f: f.step_ids.add(step.id), after, STEP_END_EVENTS, ended)


@endpoint(
    bp,
    "/api/workflows/<workflow_id>/stream",
    tags=("workflows",),
    headers=HEADERS,
    produces="text/event-stream",
    summary="A workflow's events (and its steps') as Server-Sent Events, until it ends",
)
def stream_workflow(principal: Principal, workflow_id: str) -> Response:
    workflow, _ = workflows.status(workflow_id, principal)
    after = _resume_from(workflow.created_at)

    def ended() -> bool:
        return workflows.status(workflow_id, principal)[0].status in TERMINAL_WORKFLOW_STATUSES

    def wanted(filter_: live.Filter) -> None:
        filter_.workflow_ids.add(workflow.id)

    return _stream(principal, wanted, after, WORKFLOW_END_EVENTS, ended)
