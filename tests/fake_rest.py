"""A REST generation API for tests, on 127.0.0.1: a synchronous endpoint and polled jobs.

- `POST /v1/generate`: answers `{"id", "images", "echo"}` after `delay_s` (from the body).
- `POST /v1/jobs` -> 202 `{"id", "status": "queued"}`; the job runs in a thread for
  `steps` ticks of `tick_s`, `running` with `progress` (0-100, or 0-1 when the body
  says `"fraction": true`), then `succeeded` with `result`, or `failed` with `error`
  when the body says `"fail": true`.
- `GET /v1/jobs/<id>`, `POST /v1/jobs/<id>/cancel` (-> `cancelled`), `GET /health`.

A body with `"status_code": N` is answered with that status and an error body
instead; with `token` set, requests without `Authorization: Bearer <token>` get 401.
Every request is recorded in `received`.
"""

from __future__ import annotations

import base64
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from flask import Flask, Response, jsonify, request
from werkzeug.serving import make_server

FILE_BYTES = b"\x89PNG\r\n\x1a\n fake render"


@dataclass
class Received:
    method: str
    path: str
    body: Any
    headers: dict[str, str]


@dataclass
class FakeRest:
    token: str | None = None
    tick_s: float = 0.05
    received: list[Received] = field(default_factory=list)
    jobs: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server: Any = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_port}"

    def start(self) -> FakeRest:
        self._server = make_server("127.0.0.1", 0, self._app(), threaded=True)
        threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._server.shutdown()
        self._server.server_close()

    def calls(self, method: str, path: str) -> list[Received]:
        return [r for r in self.received if r.method == method and r.path == path]

    def _app(self) -> Flask:
        app = Flask("fake_rest")

        @app.before_request
        def record_and_authorise() -> tuple[Response, int] | None:
            body = request.get_json(silent=True) if request.method == "POST" else None
            self.received.append(
                Received(request.method, request.path, body, dict(request.headers))
            )
            if self.token and request.headers.get("Authorization") != f"Bearer {self.token}":
                return jsonify({"error": {"message": "missing or wrong API token"}}), 401
            if isinstance(body, dict) and isinstance(body.get("status_code"), int):
                status = body["status_code"]
                return jsonify({"error": {"message": f"scripted {status}"}}), status
            return None

        @app.post("/v1/generate")
        def generate() -> Response:
            body = request.get_json(silent=True) or {}
            self._stopping.wait(float(body.get("delay_s", 0)))
            image_id = uuid.uuid4().hex
            return jsonify(
                {
                    "id": image_id,
                    "images": [{"url": f"{self.url}/files/{image_id}.png"}],
                    "echo": body,
                }
            )

        @app.post("/v1/render")
        def render() -> Response:
            """A backend that answers with files: a PNG body, or JSON naming files."""
            body = request.get_json(silent=True) or {}
            if body.get("answer") == "binary":
                return Response(FILE_BYTES, content_type="image/png")
            return jsonify(
                {
                    "outputs": [
                        f"{self.url}/files/one.png",
                        {
                            "b64_json": base64.b64encode(FILE_BYTES).decode(),
                            "content_type": "image/png",
                        },
                        {"url": f"{self.url}/files/two.png", "content_type": "image/png"},
                    ],
                    "seed": 5,
                }
            )

        @app.get("/files/<name>")
        def files(name: str) -> Response:
            return Response(FILE_BYTES + name.encode(), content_type="image/png")

        @app.post("/v1/jobs")
        def create_job() -> tuple[Response, int]:
            body = request.get_json(silent=True) or {}
            job = {"id": uuid.uuid4().hex, "status": "queued", "progress": 0}
            with self._lock:
                self.jobs[job["id"]] = job
            threading.Thread(target=self._run_job, args=(job["id"], body), daemon=True).start()
            return jsonify(job), 202

        @app.get("/v1/jobs/<job_id>")
        def get_job(job_id: str) -> tuple[Response, int] | Response:
            with self._lock:
                job = self.jobs.get(job_id)
                snapshot = dict(job) if job else None
            if snapshot is None:
                return jsonify({"error": {"message": "no such job"}}), 404
            return jsonify(snapshot)

        @app.post("/v1/jobs/<job_id>/cancel")
        def cancel_job(job_id: str) -> tuple[Response, int] | Response:
            with self._lock:
                job = self.jobs.get(job_id)
                if job is None:
                    return jsonify({"error": {"message": "no such job"}}), 404
                if job["status"] in ("queued", "running"):
                    job["status"] = "cancelled"
                return jsonify(dict(job))

        @app.get("/health")
        def health() -> Response:
            return jsonify({"status": "ok"})

        return app

    def _run_job(self, job_id: str, body: dict[str, Any]) -> None:
        steps = int(body.get("steps", 5))
        for tick in range(1, steps + 1):
            if self._stopping.wait(self.tick_s):
                return
            with self._lock:
                job = self.jobs[job_id]
                if job["status"] == "cancelled":
                    return
                job["status"] = "running"
                job["progress"] = tick / steps if body.get("fraction") else 100 * tick // steps
        with self._lock:
            job = self.jobs[job_id]
            if job["status"] == "cancelled":
                return
            if body.get("fail"):
                job.update(status="failed", error={"message": "the model refused the prompt"})
            else:
                job.update(status="succeeded", result={"images": [f"{job_id}.png"], "echo": body})
            job["finished_at"] = time.time()
