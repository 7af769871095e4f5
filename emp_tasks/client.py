"""The Python client of the EMP Tasks API: what Python callers (and the `emp` CLI) use.

    from emp_tasks.client import Client

    api = Client("http://127.0.0.1:8000", api_key="emp_...")
    step = api.submit("simulation", {"duration_s": 1})
    done = api.wait(step["id"], timeout=60)       # the step once it is terminal
    for event in api.stream(step_id=step["id"]):  # its events, as they happen
        print(event.type, event.data.get("progress"))

Every call raises a typed `ApiError` subclass for an error answer (`Invalid` 400,
`Unauthorized` 401, `Forbidden` 403, `NotFound` 404, `Conflict` 409, `RateLimited`
429 with `retry_after`, `Unavailable` 5xx), carrying the API's `code`, `message` and
`details`, and `Unreachable` when there is no answer. `wait` follows the step's
Server-Sent Events (`GET /api/steps/{id}/stream`), resuming with `Last-Event-ID` when
the connection drops, so it waits without polling. `EMP_API_URL` and `EMP_API_KEY`
are the defaults of `Client()`.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import requests

from emp_tasks.core.status import TERMINAL_STEP_STATUSES

DEFAULT_URL = "http://127.0.0.1:8000"


class ApiError(Exception):
    """An error answer: its HTTP status and the API's error object."""

    def __init__(
        self, status: int, code: str, message: str, details: list[Any] | None = None
    ) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.details = details or []


class Invalid(ApiError):
    """400: the request was refused as it is (the details name each bad field)."""


class Unauthorized(ApiError):
    """401: no valid API key."""


class Forbidden(ApiError):
    """403: the key may not do this."""


class NotFound(ApiError):
    """404: no such step or workflow (or not this key's)."""


class Conflict(ApiError):
    """409: not in a state that allows it (e.g. cancelling a finished step)."""


class RateLimited(ApiError):
    """429: too many requests; `retry_after` seconds."""

    retry_after: float | None = None


class Unavailable(ApiError):
    """5xx: the service could not answer now."""


class Unreachable(ApiError):
    """No answer at all (connection refused, timed out)."""


_BY_STATUS: dict[int, type[ApiError]] = {
    400: Invalid,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    413: Invalid,
    415: Invalid,
    429: RateLimited,
}


@dataclass(frozen=True)
class Event:
    """One Server-Sent Event: the stream id, the event type, the envelope."""

    id: str | None
    type: str
    data: dict[str, Any] = field(default_factory=dict)


def parse_sse(lines: Iterator[str], comments: bool = False) -> Iterator[Event]:
    """Events from the lines of a `text/event-stream` body; with `comments`, each comment
    line (the server's heartbeats) as an Event of type `comment`, else skipped."""
    event_id: str | None = None
    kind = "message"
    data: list[str] = []
    for line in lines:
        if line == "":
            if data:
                try:
                    parsed = json.loads("\n".join(data))
                except ValueError:
                    parsed = {"raw": "\n".join(data)}
                yield Event(
                    event_id, kind, parsed if isinstance(parsed, dict) else {"value": parsed}
                )
            kind, data = "message", []
            continue
        if line.startswith(":"):
            if comments:
                yield Event(None, "comment", {"text": line[1:].strip()})
            continue
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "id":
            event_id = value
        elif name == "event":
            kind = value
        elif name == "data":
            data.append(value)


class Client:
    def __init__(
        self, base_url: str | None = None, api_key: str | None = None, timeout_s: float = 30.0
    ) -> None:
        self.base_url = (base_url or os.environ.get("EMP_API_URL") or DEFAULT_URL).rstrip("/")
        self.api_key = api_key or os.environ.get("EMP_API_KEY")
        self.timeout_s = timeout_s
        self.session = requests.Session()

    # --- calls -----------------------------------------------------------------------------

    def _headers(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        return {**headers, **(extra or {})}

    def request(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        *,
        params: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
        timeout_s: float | None = None,
    ) -> dict[str, Any]:
        """One call; the answer's JSON object, or the ApiError subclass of its error."""
        try:
            response = self.session.request(
                method,
                self.base_url + path,
                json=body,
                params=params,
                headers=self._headers(headers),
                timeout=timeout_s or self.timeout_s,
            )
        except requests.RequestException as exc:
            raise Unreachable(0, "UNREACHABLE", f"{self.base_url}: {exc}") from exc
        return _answer(response)

    def submit(
        self, service: str, payload: dict[str, Any] | None = None, **fields: Any
    ) -> dict[str, Any]:
        """`POST /api/steps`: the step (other step fields as keywords)."""
        body = {"service": service, "payload": payload or {}, **fields}
        return self.request("POST", "/api/steps", body)["step"]

    def get(self, step_id: str) -> dict[str, Any]:
        return self.request("GET", f"/api/steps/{step_id}")["step"]

    def cancel(self, step_id: str, reason: str | None = None) -> dict[str, Any]:
        body = {"reason": reason} if reason else {}
        return self.request("POST", f"/api/steps/{step_id}/cancel", body)["step"]

    def logs(self, step_id: str, attempt: int | None = None) -> list[dict[str, Any]]:
        params = {"attempt": attempt} if attempt is not None else None
        return self.request("GET", f"/api/steps/{step_id}/logs", params=params)["logs"]

    def workflow(self, steps: list[dict[str, Any]], name: str, **fields: Any) -> dict[str, Any]:
        """`POST /api/workflows`: the workflow object (with `step_ids`)."""
        answer = self.request("POST", "/api/workflows", {"name": name, "steps": steps, **fields})
        return {**answer["workflow"], "step_ids": answer["step_ids"]}

    def get_workflow(self, workflow_id: str) -> dict[str, Any]:
        answer = self.request("GET", f"/api/workflows/{workflow_id}")
        return {**answer["workflow"], "steps": answer["steps"]}

    # --- following -------------------------------------------------------------------------

    def stream(
        self,
        step_id: str | None = None,
        workflow_id: str | None = None,
        last_event_id: str | None = None,
        *,
        comments: bool = False,
    ) -> Iterator[Event]:
        """The step's (or workflow's) events until its terminal one, resuming after
        `last_event_id`; a dropped connection is resumed from the last event received.
        `comments`: also the server's heartbeats (type `comment`, every 15 s)."""
        if (step_id is None) == (workflow_id is None):
            raise ValueError("name one of step_id or workflow_id")
        path = f"/api/steps/{step_id}/stream" if step_id else f"/api/workflows/{workflow_id}/stream"
        last = last_event_id
        while True:
            headers = {"Accept": "text/event-stream"}
            if last:
                headers["Last-Event-ID"] = last
            try:
                with self.session.get(
                    self.base_url + path,
                    headers=self._headers(headers),
                    stream=True,
                    timeout=(self.timeout_s, 60.0),  # heartbeats come every 15 s
                ) as response:
                    if response.status_code >= 400:
                        _answer(response)
                    lines = response.iter_lines(decode_unicode=True)
                    for event in parse_sse(lines, comments):
                        last = event.id or last
                        yield event
                    return  # the server ended the stream: the terminal event was sent
            except (
                requests.ConnectionError,
                requests.Timeout,
                requests.exceptions.ChunkedEncodingError,
            ):
                time.sleep(0.5)  # resume after `last`

    def wait(self, step_id: str, timeout_s: float | None = None) -> dict[str, Any]:
        """The step once it is terminal, or as it is once `timeout_s` ran out (checked at
        each event and heartbeat, so within 15 s of it)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        step = self.get(step_id)
        if step["status"] in TERMINAL_STEP_STATUSES:
            return step
        for _ in self.stream(step_id=step_id, comments=True):
            if deadline is not None and time.monotonic() > deadline:
                break
        return self.get(step_id)


def _answer(response: requests.Response) -> dict[str, Any]:
    try:
        data = response.json()
    except ValueError:
        data = {}
    if response.status_code < 400:
        return data
    error = (data or {}).get("error") or {}
    kind = _BY_STATUS.get(response.status_code)
    if kind is None:
        kind = Unavailable if response.status_code >= 500 else ApiError
    raised = kind(
        response.status_code,
        error.get("code", "ERROR"),
        error.get("message", response.reason or ""),
        error.get("details"),
    )
    if isinstance(raised, RateLimited):
        retry = response.headers.get("Retry-After")
        raised.retry_after = float(retry) if retry and retry.isdigit() else None
    raise raised
