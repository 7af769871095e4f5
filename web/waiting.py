"""`Prefer: wait=<seconds>`: hold an answer until the step or workflow is terminal.

On `POST /api/steps`, `POST /api/workflows` and their GETs, a client may ask to wait (1
to 60 s; more is taken as 60) for the terminal state instead of polling. The request
subscribes to the process's live event hub (emp_tasks.live: one Redis subscription per
web process, no polling of PostgreSQL), then reads the subject once; if it has not
ended it sleeps until its terminal event arrives or the time is up, and the answer is
read again. The answer then carries `Preference-Applied: wait=<seconds>`.

A waiting request holds a web thread, so it takes one of the slots WebSockets and event
streams share (`EMP_WS_MAX_PER_KEY`, `EMP_WS_MAX_PER_PROCESS`, which always leaves
threads for REST). When no slot is free the request is answered at once, without
`Preference-Applied` (RFC 7240: a preference may be ignored).
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable

from flask import current_app, request

from emp_tasks import live
from emp_tasks.auth import Principal
from emp_tasks.core.events import STEP_END_EVENTS, WORKFLOW_END_EVENTS
from web import ws

MAX_WAIT_S = 60
_WAIT = re.compile(r"(?:^|[,;])\s*wait\s*=\s*\"?(\d{1,6})\"?\s*(?=$|[,;])", re.IGNORECASE)


def requested() -> int | None:
    """The seconds a request's `Prefer: wait=N` asks for (1-60), or None."""
    header = request.headers.get("Prefer")
    if not header:
        return None
    found = _WAIT.search(header)
    if found is None:
        return None
    seconds = int(found.group(1))
    return min(seconds, MAX_WAIT_S) if seconds >= 1 else None


def applied(seconds: int) -> dict[str, str]:
    return {"Preference-Applied": f"wait={seconds}"}


def honour(
    principal: Principal,
    ended: Callable[[], bool],
    *,
    step_id: str | None = None,
    workflow_id: str | None = None,
    ended_now: bool = False,
) -> dict[str, str]:
    """Wait as the request's `Prefer: wait=N` asks; the headers to answer with
    (`Preference-Applied` when it was honoured: at once for a subject `ended_now`)."""
    seconds = requested()
    if seconds is None:
        return {}
    if ended_now:
        return applied(seconds)
    granted = wait(principal, seconds, ended, step_id=step_id, workflow_id=workflow_id)
    return applied(seconds) if granted else {}


def wait(
    principal: Principal,
    seconds: int,
    ended: Callable[[], bool],
    *,
    step_id: str | None = None,
    workflow_id: str | None = None,
) -> bool:
    """Sleep until the step (or workflow) ends or `seconds` pass; whether the wait was
    granted (False: no slot free, answered at once)."""
    slots: ws.SocketSlots = current_app.extensions[ws.SLOTS]
    if slots.acquire(principal.key_id) is not None:
        return False
    wake = threading.Event()
    subscriber = live.Subscriber(principal, wake.set)
    if step_id is not None:
        subscriber.filter.step_ids.add(step_id)
    if workflow_id is not None:
        subscriber.filter.workflow_ids.add(workflow_id)
    ends = STEP_END_EVENTS if step_id is not None else WORKFLOW_END_EVENTS
    hub = live.hub()
    try:
        hub.add(subscriber)  # before the read: an end in between is queued, not missed
        if ended():
            return True
        deadline = time.monotonic() + seconds
        while (remaining := deadline - time.monotonic()) > 0:
            wake.wait(remaining)
            wake.clear()
            if any(event["type"] in ends for event in subscriber.take()):
                return True
            if subscriber.overflowed:
                return True
        return True
    finally:
        hub.remove(subscriber)
        slots.release(principal.key_id)
