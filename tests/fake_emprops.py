"""A fake EmProps API on 127.0.0.1: records every call, answers by script.

`POST /jobs/<job_id>/complete|fail` and `POST /api/collections`, like the EmProps API
the product reports to. `answer(*statuses)` scripts the next answers;
`delay_s` holds every answer (a slow EmProps); `successes(job_id)` lists the calls
answered 2xx.
"""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from flask import Flask, Response, jsonify, request
from werkzeug.serving import make_server


@dataclass
class Call:
    path: str
    headers: dict[str, str]
    body: Any
    status: int
    at: float


@dataclass
class FakeEmprops:
    delay_s: float = 0.0
    calls: list[Call] = field(default_factory=list)
    collections: dict[str, dict[str, Any]] = field(default_factory=dict)
    default_status: int = 200

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._script: list[int] = []
        self._server: Any = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_port}"

    def start(self) -> FakeEmprops:
        self._server = make_server("127.0.0.1", 0, self._app(), threaded=True)
        threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def answer(self, *statuses: int) -> None:
        """Answer the next job notifications with these statuses, then the default."""
        with self._lock:
            self._script = list(statuses)

    def of_job(self, job_id: str) -> list[Call]:
        return [c for c in self.calls if c.path.startswith(f"/jobs/{job_id}/")]

    def successes(self, job_id: str) -> list[Call]:
        return [c for c in self.of_job(job_id) if 200 <= c.status < 300]

    def _status(self) -> int:
        with self._lock:
            return self._script.pop(0) if self._script else self.default_status

    def _app(self) -> Flask:
        app = Flask("fake_emprops")

        def record(status: int) -> None:
            self.calls.append(
                Call(
                    request.path,
                    {k.lower(): v for k, v in request.headers.items()},
                    request.get_json(silent=True),
                    status,
                    time.time(),
                )
            )

        @app.post("/jobs/<job_id>/<outcome>")
        def job(job_id: str, outcome: str) -> tuple[Response, int]:
            if self.delay_s:
                time.sleep(self.delay_s)
            status = self._status() if outcome in ("complete", "fail") else 404
            record(status)
            return jsonify({"ok": 200 <= status < 300, "job_id": job_id}), status

        @app.post("/api/collections")
        def create_collection() -> tuple[Response, int]:
            status = self._status()
            record(status)
            if status >= 300:
                return jsonify({"error": f"injected {status}"}), status
            collection = {"id": f"col-{uuid.uuid4().hex[:8]}", **(request.get_json() or {})}
            self.collections[collection["id"]] = collection
            return jsonify(collection), 201

        return app
