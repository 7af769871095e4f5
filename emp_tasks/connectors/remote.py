"""Talking to a remote generation backend: what its HTTP answers mean, and waiting on it
while honouring cancellation.

`status_failure` and `transport_failure` map HTTP statuses and request errors to
failure types (whose fault, worth a retry?); `call_until_cancelled` and
`sleep_until_cancelled` wait without missing a cancel; `ProgressThrottle` keeps
progress reports (one database transaction each) to a sensible rate.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import TypeVar

import requests

from emp_tasks.connectors.base import FailureType, ProgressReporter, StepFailure, StepInterrupted

CANCEL_POLL_S = 0.2
PROGRESS_INTERVAL_S = 0.25
PROGRESS_JUMP = 5.0

T = TypeVar("T")


# --- classification ------------------------------------------------------------------------


def status_failure(status: int, detail: str, *, source: str, code_prefix: str) -> StepFailure:
    """The failure an HTTP error status stands for: whose fault it is and whether to retry."""
    text = f"{source} answered {status}" + (f": {detail}" if detail else "")
    if status in (401, 403):
        return StepFailure(
            text, type=FailureType.AUTH, code=f"{code_prefix}_UNAUTHORIZED", retryable=False
        )
    if status in (408, 429):
        return StepFailure(text, type=FailureType.RESOURCE, code=f"{code_prefix}_BUSY")
    if 400 <= status < 500:
        return StepFailure(
            text, type=FailureType.VALIDATION, code=f"{code_prefix}_REJECTED", retryable=False
        )
    return StepFailure(text, type=FailureType.SERVICE, code=f"{code_prefix}_ERROR")


def transport_failure(
    exc: requests.RequestException, *, source: str, code_prefix: str
) -> StepFailure:
    """The failure a request that got no answer stands for (all are worth another attempt)."""
    # ConnectTimeout is both a ConnectionError and a Timeout: nothing was sent, so NETWORK.
    if isinstance(exc, requests.ConnectionError):
        return StepFailure(
            f"{source} is unreachable: {exc}",
            type=FailureType.NETWORK,
            code=f"{code_prefix}_UNREACHABLE",
        )
    if isinstance(exc, requests.Timeout):
        return StepFailure(
            f"{source} did not answer in time: {exc}",
            type=FailureType.TIMEOUT,
            code=f"{code_prefix}_TIMEOUT",
        )
    return StepFailure(
        f"request to {source} failed: {exc}",
        type=FailureType.NETWORK,
        code=f"{code_prefix}_UNREACHABLE",
    )


def error_detail(response: requests.Response, limit: int = 300) -> str:
    """The error text of an answer: its JSON `error`/`message`/`detail`, else its body."""
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:limit]
    if isinstance(body, dict):
        for key in ("error", "message", "detail"):
            value = body.get(key)
            if isinstance(value, dict):
                value = value.get("message") or value.get("type") or value
            if value:
                return str(value)[:limit]
    return str(body)[:limit]


# --- waiting while honouring cancellation --------------------------------------------------


def call_until_cancelled(
    call: Callable[[], T],
    cancel_requested: Callable[[], bool],
    *,
    timeout_s: float | None = None,
) -> T:
    """Run a blocking `call` on a daemon thread; raise StepInterrupted as soon as cancelled.

    A cancelled call is abandoned, not stopped: its thread ends when the call returns.
    Raises TimeoutError when `timeout_s` passes first.
    """
    future: Future[T] = Future()

    def target() -> None:
        try:
            future.set_result(call())
        except BaseException as exc:  # handed to the waiting thread, which re-raises it
            future.set_exception(exc)

    threading.Thread(target=target, name="emp-connector-call", daemon=True).start()
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        try:
            return future.result(timeout=CANCEL_POLL_S)
        except TimeoutError:
            if cancel_requested():
                raise StepInterrupted() from None
            if deadline is not None and time.monotonic() > deadline:
                raise


class ProgressThrottle:
    """Passes progress reports on at most every PROGRESS_INTERVAL_S, or sooner on a big move.

    Each report is a database transaction and an event, so a backend that ticks many
    times a second must not turn every tick into one. A held-back report goes out on
    the next `flush()` once the interval has passed.
    """

    def __init__(self, report: ProgressReporter) -> None:
        self._report = report
        self._sent: tuple[float, str | None, str | None] | None = None
        self._sent_at = float("-inf")
        self._held: tuple[float, str | None, str | None] | None = None

    def __call__(self, percent: float, stage: str | None, message: str | None) -> None:
        self._held = (round(percent, 2), stage, message)
        sent_percent = self._sent[0] if self._sent else float("-inf")
        if percent - sent_percent >= PROGRESS_JUMP:
            self._send()
        else:
            self.flush()

    def flush(self) -> None:
        if self._held is not None and time.monotonic() - self._sent_at >= PROGRESS_INTERVAL_S:
            self._send()

    def _send(self) -> None:
        report, self._held = self._held, None
        if report is None or report == self._sent:
            return
        self._sent, self._sent_at = report, time.monotonic()
        percent, stage, message = report
        self._report(percent, stage=stage, message=message)


def sleep_until_cancelled(seconds: float, cancel_requested: Callable[[], bool]) -> None:
    """Wait `seconds`, checking `cancel_requested()` every CANCEL_POLL_S."""
    deadline = time.monotonic() + seconds
    while True:
        if cancel_requested():
            raise StepInterrupted()
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        time.sleep(min(CANCEL_POLL_S, remaining))
