"""The webhook latency rows (EMP Tasks only): a step's completion to the receipt of its webhook.

Each configuration registers `endpoints` webhook endpoints (distinct URLs: one
path each on one local receiver), all subscribed to `step_completed`, submits
`steps` no-op steps at a steady `rate`, and times, for every (endpoint, step), the
step row's `completed_at` (PostgreSQL) to the moment the receiver got the
webhook whose `data.step_id` names the step. The receiver is a
ThreadingHTTPServer on 127.0.0.1 in this process; both times are this host's
wall clock.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from bench.stats import WebhookResult

EVENT = "step_completed"
PATH_PREFIX = "/hook/"


@dataclass(frozen=True)
class WebhookRow:
    """`steps` steps submitted at `rate` steps/s, each delivered to `endpoints` endpoints."""

    endpoints: int
    steps: int
    rate: float

    @property
    def key(self) -> str:
        return f"webhooks-{self.endpoints}"

    @property
    def label(self) -> str:
        plural = "" if self.endpoints == 1 else "s"
        return f"webhook latency, {self.endpoints} endpoint{plural}"

    @property
    def expected(self) -> int:
        return self.steps * self.endpoints

    def empty_result(self) -> WebhookResult:
        return WebhookResult(
            key=self.key, endpoints=self.endpoints, steps=self.steps, rate=self.rate
        )


ENDPOINT_COUNTS = (1, 50)


def configs(steps_one: int, steps_many: int, rate_one: float, rate_many: float) -> list[WebhookRow]:
    """The two configurations: 1 endpoint and 50 endpoints."""
    return [
        WebhookRow(ENDPOINT_COUNTS[0], steps_one, rate_one),
        WebhookRow(ENDPOINT_COUNTS[1], steps_many, rate_many),
    ]


class QuietServer(ThreadingHTTPServer):
    """The bench's local HTTP receivers: daemon threads, a deep listen backlog."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 512  # the default 5 would drop connects under a burst of deliveries


class Receiver:
    """Records the first receipt time of each (endpoint index, step id) it is sent.

    Endpoint `n` is `http://127.0.0.1:{port}/hook/{n}`. Anything else (another path,
    another event type, a body without `data.step_id`) is counted in `unexpected`.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_step: dict[str, dict[int, float]] = {}
        self.duplicates = 0
        self.unexpected: list[str] = []
        self._server: QuietServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.server_address[1]

    def url(self, index: int) -> str:
        return f"http://127.0.0.1:{self.port}{PATH_PREFIX}{index}"

    def start(self) -> Receiver:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                at = time.time()
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()
                owner._record(self.path, body, at)

            def log_message(self, *args: object) -> None:
                pass

        self._server = QuietServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="bench-receiver", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def _record(self, path: str, raw: bytes, at: float) -> None:
        try:
            if not path.startswith(PATH_PREFIX):
                raise ValueError(f"path {path}")
            index = int(path[len(PATH_PREFIX) :])
            body = json.loads(raw)
            if body.get("type") != EVENT:
                raise ValueError(f"type {body.get('type')!r}")
            step_id = body["data"]["step_id"]
        except (ValueError, KeyError, TypeError) as exc:
            with self._lock:
                if len(self.unexpected) < 10:
                    self.unexpected.append(f"{path}: {exc}"[:200])
            return
        with self._lock:
            seen = self._by_step.setdefault(step_id, {})
            if index in seen:
                self.duplicates += 1
            else:
                seen[index] = at

    def count(self, step_ids: list[str]) -> int:
        """How many distinct (endpoint, step) webhooks of these steps have arrived."""
        with self._lock:
            return sum(len(self._by_step.get(step_id, ())) for step_id in step_ids)

    def receipts(self, step_id: str) -> dict[int, float]:
        """Endpoint index to first receipt time (epoch seconds) for one step."""
        with self._lock:
            return dict(self._by_step.get(step_id, {}))
