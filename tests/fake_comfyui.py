"""A small ComfyUI for tests: its HTTP and WebSocket API on 127.0.0.1, prompts run in a thread.

It validates graphs the way ComfyUI does (400 with `error` and `node_errors`), runs
queued prompts one at a time in topological order, and sends the same WebSocket
messages a real server sends to the prompt's client: `execution_start`,
`execution_cached`, `executing`, `progress` (one per sampler step, each followed by a
binary preview frame), `executed`, `execution_success` then the history entry, then
`executing` with no node. Nodes with a `steps` input tick `tick_s` per step.

Failure modes: a `FailNode` raises `exception_type` (default RuntimeError) with
`message`; `fail_next_prompts(status)` answers /prompt with an error status;
`drop_sockets_at_step` closes every WebSocket at that sampler step; `websockets=False`
refuses WebSocket connections; `silent=True` accepts them but sends nothing. Every
request is recorded in `received`.
"""

from __future__ import annotations

import contextlib
import json
import struct
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from flask import Flask, Response, jsonify, request
from flask_sock import Sock
from simple_websocket import ConnectionClosed, Server
from werkzeug.serving import make_server

OUTPUT_NODES = frozenset({"SaveImage", "PreviewImage"})


def png_bytes(rgb: tuple[int, int, int] = (200, 40, 90)) -> bytes:
    """A valid 1x1 PNG image."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)
    pixels = zlib.compress(b"\x00" + bytes(rgb))
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    )


PNG = png_bytes()


def txt2img(
    ckpt: str = "sd_xl_base_1.0.safetensors", steps: int = 20, batch_size: int = 1
) -> dict[str, Any]:
    """The classic seven-node text-to-image graph in ComfyUI's API format."""
    return {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "5": {
            "class_type": "EmptyLatentImage",
            "inputs": {"width": 512, "height": 512, "batch_size": batch_size},
        },
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red fox", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["4", 1]}},
        "3": {
            "class_type": "KSampler",
            "inputs": {
                "seed": 42,
                "steps": steps,
                "cfg": 7.0,
                "sampler_name": "euler",
                "scheduler": "normal",
                "denoise": 1.0,
                "model": ["4", 0],
                "positive": ["6", 0],
                "negative": ["7", 0],
                "latent_image": ["5", 0],
            },
        },
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "emp", "images": ["8", 0]}},
    }


def upscale(image: str, scale_by: float = 2.0) -> dict[str, Any]:
    """An upscale graph in ComfyUI's API format: load an image, scale it, save it."""
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": image}},
        "2": {"class_type": "ImageScaleBy", "inputs": {"image": ["1", 0], "scale_by": scale_by}},
        "3": {"class_type": "SaveImage", "inputs": {"filename_prefix": "up", "images": ["2", 0]}},
    }


@dataclass
class Received:
    method: str
    path: str
    body: Any
    at: float


@dataclass
class _Prompt:
    number: int
    prompt_id: str
    graph: dict[str, Any]
    client_id: str | None
    interrupted: bool = False


class _Interrupted(Exception):
    pass


class _NodeError(Exception):
    def __init__(self, exception_type: str, message: str) -> None:
        super().__init__(message)
        self.exception_type = exception_type
        self.message = message


@dataclass
class FakeComfyUI:
    checkpoints: list[str] = field(
        default_factory=lambda: ["sd_xl_base_1.0.safetensors", "v1-5-pruned-emaonly.ckpt"]
    )
    loras: list[str] = field(default_factory=lambda: ["detail_tweaker.safetensors"])
    vaes: list[str] = field(default_factory=lambda: ["sdxl_vae.safetensors"])
    upscalers: list[str] = field(default_factory=lambda: ["4x-UltraSharp.pth"])
    tick_s: float = 0.01
    drop_sockets_at_step: int | None = None
    websockets: bool = True
    silent: bool = False
    register_after_s: float = 0.0
    """How long a new WebSocket goes unregistered (and ungreeted) after its handshake,
    the window in which a real ComfyUI does not yet know where a client's messages go."""
    received: list[Received] = field(default_factory=list)
    history: dict[str, dict[str, Any]] = field(default_factory=dict)
    uploads: dict[str, bytes] = field(default_factory=dict)
    """Input images received by `POST /upload/image`, by the name it answered."""

    def __post_init__(self) -> None:
        self._lock = threading.Condition()
        self._queue: list[_Prompt] = []
        self._running: _Prompt | None = None
        self._sockets: dict[str, list[tuple[Server, threading.Lock]]] = {}
        self._files: set[str] = set()
        self._counter = 0
        self._number = 0
        self._failures: list[int] = []
        self._stopping = False
        self._server: Any = None

    # --- control ---------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_port}"

    def start(self) -> FakeComfyUI:
        self._server = make_server("127.0.0.1", 0, self._app(), threaded=True)
        threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()
        threading.Thread(target=self._execute_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            if self._running is not None:
                self._running.interrupted = True
            self._lock.notify_all()
        self.drop_sockets()
        self._server.shutdown()
        self._server.server_close()

    def fail_next_prompts(self, status: int, count: int = 1) -> None:
        """Answer the next `count` POST /prompt with `status` instead of queueing."""
        self._failures.extend([status] * count)

    def drop_sockets(self) -> None:
        """Close every WebSocket from the server side, as a restarting proxy would."""
        with self._lock:
            sockets = [entry for entries in self._sockets.values() for entry in entries]
            self._sockets.clear()
        for ws, _ in sockets:
            with contextlib.suppress(ConnectionClosed):
                ws.close()

    def calls(self, method: str, path: str) -> list[Received]:
        return [r for r in self.received if r.method == method and r.path == path]

    @property
    def running_prompt_id(self) -> str | None:
        with self._lock:
            return self._running.prompt_id if self._running else None

    # --- the HTTP and WebSocket API --------------------------------------------------------

    def _app(self) -> Flask:
        app = Flask("fake_comfyui")
        sock = Sock(app)

        @app.before_request
        def record() -> Response | None:
            body = request.get_json(silent=True) if request.method == "POST" else None
            self.received.append(Received(request.method, request.path, body, time.time()))
            if request.path == "/ws" and not self.websockets:
                return Response(status=404)
            return None

        @app.post("/prompt")
        def post_prompt() -> tuple[Response, int] | Response:
            if self._failures:
                status = self._failures.pop(0)
                error = {"type": "server_error", "message": f"injected {status}"}
                return jsonify({"error": error, "node_errors": {}}), status
            body = request.get_json(silent=True) or {}
            graph = body.get("prompt")
            problem = self._validate(graph)
            if problem is not None:
                return jsonify(problem), 400
            with self._lock:
                self._number += 1
                prompt = _Prompt(self._number, uuid.uuid4().hex, graph, body.get("client_id"))
                self._queue.append(prompt)
                self._lock.notify_all()
            return jsonify(
                {"prompt_id": prompt.prompt_id, "number": prompt.number, "node_errors": {}}
            )

        @app.get("/queue")
        def get_queue() -> Response:
            with self._lock:
                running = [self._queue_item(self._running)] if self._running else []
                pending = [self._queue_item(p) for p in self._queue]
            return jsonify({"queue_running": running, "queue_pending": pending})

        @app.post("/queue")
        def post_queue() -> Response:
            body = request.get_json(silent=True) or {}
            with self._lock:
                if body.get("clear"):
                    self._queue.clear()
                doomed = set(body.get("delete") or [])
                self._queue = [p for p in self._queue if p.prompt_id not in doomed]
            return Response(status=200)

        @app.post("/interrupt")
        def post_interrupt() -> Response:
            body = request.get_json(silent=True) or {}
            with self._lock:
                target = body.get("prompt_id")
                if self._running is not None and target in (None, self._running.prompt_id):
                    self._running.interrupted = True
            return Response(status=200)

        @app.get("/history")
        def get_all_history() -> Response:
            return jsonify(self.history)

        @app.get("/history/<prompt_id>")
        def get_history(prompt_id: str) -> Response:
            entry = self.history.get(prompt_id)
            return jsonify({prompt_id: entry} if entry else {})

        @app.get("/view")
        def view() -> Response:
            name = request.args.get("filename")
            if request.args.get("type") == "input" and name in self.uploads:
                return Response(self.uploads[name], content_type="image/png")
            if name not in self._files:
                return Response(status=404)
            return Response(PNG, content_type="image/png")

        @app.post("/upload/image")
        def upload_image() -> tuple[Response, int] | Response:
            image = request.files.get("image")
            if image is None or not image.filename:
                return Response("no image", status=400), 400
            name = image.filename
            data = image.read()
            if name in self.uploads and request.form.get("overwrite") != "true":
                stem, _, ext = name.rpartition(".")
                name = f"{stem} (1).{ext}"
            self.uploads[name] = data
            return jsonify({"name": name, "subfolder": "", "type": "input"})

        @app.get("/system_stats")
        def system_stats() -> Response:
            return jsonify(
                {
                    "system": {
                        "os": "posix",
                        "comfyui_version": "0.3.0-fake",
                        "python_version": "3.11",
                        "ram_total": 64 * 2**30,
                        "ram_free": 48 * 2**30,
                    },
                    "devices": [
                        {
                            "name": "cuda:0 Fake RTX 4090",
                            "type": "cuda",
                            "index": 0,
                            "vram_total": 24 * 2**30,
                            "vram_free": 20 * 2**30,
                        }
                    ],
                }
            )

        @app.get("/object_info")
        def object_info() -> Response:
            return jsonify(self._object_info())

        @sock.route("/ws")
        def websocket(ws: Server) -> None:
            client_id = request.args.get("clientId") or uuid.uuid4().hex
            entry = (ws, threading.Lock())
            time.sleep(self.register_after_s)
            with self._lock:
                self._sockets.setdefault(client_id, []).append(entry)
                remaining = len(self._queue) + (1 if self._running else 0)
            if not self.silent:
                self._send_to(
                    entry,
                    "status",
                    {"status": {"exec_info": {"queue_remaining": remaining}}, "sid": client_id},
                )
            try:
                while not self._stopping and ws.connected:
                    ws.receive(timeout=0.5)
            finally:
                with self._lock:
                    entries = self._sockets.get(client_id, [])
                    if entry in entries:
                        entries.remove(entry)

        return app

    def _validate(self, graph: Any) -> dict[str, Any] | None:
        """ComfyUI's answer to a graph it will not queue, or None."""

        def invalid(kind: str, message: str, details: str = "") -> dict[str, Any]:
            error = {"type": kind, "message": message, "details": details, "extra_info": {}}
            return {"error": error, "node_errors": {}}

        if not isinstance(graph, dict):
            return invalid("invalid_prompt", "No prompt provided")
        known = self._object_info()
        for node_id, node in graph.items():
            if not isinstance(node, dict) or "class_type" not in node:
                return invalid(
                    "invalid_prompt",
                    "Cannot execute because a node is missing the class_type property.",
                    f"Node ID '#{node_id}'",
                )
            if node["class_type"] not in known:
                return invalid(
                    "invalid_prompt",
                    f"Cannot execute because node {node['class_type']} does not exist.",
                    f"Node ID '#{node_id}'",
                )
        outputs = [nid for nid, node in graph.items() if node["class_type"] in OUTPUT_NODES]
        if not outputs:
            return invalid("prompt_no_outputs", "Prompt has no outputs")
        node_errors = {}
        for node_id, node in graph.items():
            image = node.get("inputs", {}).get("image")
            if node["class_type"] == "LoadImage" and image not in self.uploads:
                node_errors[node_id] = {
                    "errors": [
                        {
                            "type": "custom_validation_failed",
                            "message": "Failed to validate prompt for output",
                            "details": f"Invalid image file: {image}",
                            "extra_info": {},
                        }
                    ],
                    "dependent_outputs": outputs,
                    "class_type": node["class_type"],
                }
                continue
            ckpt = node.get("inputs", {}).get("ckpt_name")
            if node["class_type"] == "CheckpointLoaderSimple" and ckpt not in self.checkpoints:
                node_errors[node_id] = {
                    "errors": [
                        {
                            "type": "value_not_in_list",
                            "message": "Value not in list",
                            "details": f"ckpt_name: '{ckpt}' not in {self.checkpoints}",
                            "extra_info": {"input_name": "ckpt_name", "received_value": ckpt},
                        }
                    ],
                    "dependent_outputs": outputs,
                    "class_type": node["class_type"],
                }
        if node_errors:
            problem = invalid(
                "prompt_outputs_failed_validation", "Prompt outputs failed validation"
            )
            problem["node_errors"] = node_errors
            return problem
        return None

    def _object_info(self) -> dict[str, Any]:
        def node(name: str, required: dict[str, Any], output: list[str], out: bool = False):
            return {
                "input": {"required": required},
                "input_order": {"required": list(required)},
                "output": output,
                "output_name": output,
                "name": name,
                "display_name": name,
                "description": "",
                "category": "fake",
                "output_node": out,
            }

        int_spec = ["INT", {"default": 20, "min": 1, "max": 10000}]
        return {
            "CheckpointLoaderSimple": node(
                "CheckpointLoaderSimple",
                {"ckpt_name": [self.checkpoints, {"tooltip": "checkpoint"}]},
                ["MODEL", "CLIP", "VAE"],
            ),
            "LoraLoader": node(
                "LoraLoader",
                {"model": ["MODEL"], "clip": ["CLIP"], "lora_name": [self.loras]},
                ["MODEL", "CLIP"],
            ),
            "VAELoader": node("VAELoader", {"vae_name": [self.vaes]}, ["VAE"]),
            "UpscaleModelLoader": node(
                "UpscaleModelLoader",
                {"model_name": ["COMBO", {"options": self.upscalers}]},
                ["UPSCALE_MODEL"],
            ),
            "CLIPTextEncode": node(
                "CLIPTextEncode", {"text": ["STRING", {}], "clip": ["CLIP"]}, ["CONDITIONING"]
            ),
            "EmptyLatentImage": node(
                "EmptyLatentImage", {"width": int_spec, "height": int_spec}, ["LATENT"]
            ),
            "KSampler": node(
                "KSampler",
                {
                    "model": ["MODEL"],
                    "steps": int_spec,
                    "sampler_name": [["euler", "euler_ancestral", "dpmpp_2m"]],
                    "scheduler": [["normal", "karras"]],
                },
                ["LATENT"],
            ),
            "VAEDecode": node("VAEDecode", {"samples": ["LATENT"], "vae": ["VAE"]}, ["IMAGE"]),
            "SaveImage": node("SaveImage", {"images": ["IMAGE"]}, [], out=True),
            "PreviewImage": node("PreviewImage", {"images": ["IMAGE"]}, [], out=True),
            "LoadImage": node("LoadImage", {"image": [sorted(self.uploads)]}, ["IMAGE", "MASK"]),
            "ImageScaleBy": node(
                "ImageScaleBy", {"image": ["IMAGE"], "scale_by": ["FLOAT", {}]}, ["IMAGE"]
            ),
            "FailNode": node("FailNode", {"exception_type": ["STRING", {}]}, ["IMAGE"]),
        }

    @staticmethod
    def _queue_item(prompt: _Prompt) -> list[Any]:
        extra = {"client_id": prompt.client_id}
        return [prompt.number, prompt.prompt_id, prompt.graph, extra, []]

    # --- execution -------------------------------------------------------------------------

    def _execute_forever(self) -> None:
        last_graph: dict[str, Any] = {}
        while True:
            with self._lock:
                while not self._queue and not self._stopping:
                    self._lock.wait()
                if self._stopping:
                    return
                self._running = self._queue.pop(0)
                prompt = self._running
            try:
                self._execute(prompt, last_graph)
                last_graph = prompt.graph
            finally:
                with self._lock:
                    self._running = None

    def _execute(self, prompt: _Prompt, last_graph: dict[str, Any]) -> None:
        pid = prompt.prompt_id
        messages: list[list[Any]] = []

        def emit(kind: str, data: dict[str, Any], keep: bool = False) -> None:
            data = {**data, "prompt_id": pid}
            if keep:
                messages.append([kind, {**data, "timestamp": int(time.time() * 1000)}])
            self._send(prompt.client_id, kind, data)

        emit("execution_start", {}, keep=True)
        cached = self._cached(prompt.graph, last_graph)
        emit("execution_cached", {"nodes": cached}, keep=True)
        outputs: dict[str, Any] = {}
        executed = list(cached)
        current: str | None = None
        try:
            for node_id in self._order(prompt.graph):
                if node_id in cached:
                    continue
                current = node_id
                self._check(prompt)
                emit("executing", {"node": node_id, "display_node": node_id})
                output = self._run_node(prompt, node_id, emit)
                executed.append(node_id)
                if output is not None:
                    outputs[node_id] = output
                    emit("executed", {"node": node_id, "display_node": node_id, "output": output})
        except _Interrupted:
            node = prompt.graph.get(current or "", {})
            emit(
                "execution_interrupted",
                {"node_id": current, "node_type": node.get("class_type"), "executed": executed},
                keep=True,
            )
            status = "error"
        except _NodeError as failure:
            node = prompt.graph[current or ""]
            emit(
                "execution_error",
                {
                    "node_id": current,
                    "node_type": node["class_type"],
                    "executed": executed,
                    "exception_message": failure.message,
                    "exception_type": failure.exception_type,
                    "traceback": ['  File "nodes.py", line 1, in fail\n'],
                    "current_inputs": {},
                    "current_outputs": {},
                },
                keep=True,
            )
            status = "error"
        else:
            emit("execution_success", {}, keep=True)
            status = "success"
        self.history[pid] = {
            "prompt": self._queue_item(prompt),
            "outputs": outputs,
            "status": {
                "status_str": status,
                "completed": status == "success",
                "messages": messages,
            },
            "meta": {nid: {"node_id": nid, "display_node": nid} for nid in outputs},
        }
        emit("executing", {"node": None})
        with self._lock:
            remaining = len(self._queue)
        self._send(None, "status", {"status": {"exec_info": {"queue_remaining": remaining}}})

    def _cached(self, graph: dict[str, Any], last_graph: dict[str, Any]) -> list[str]:
        """Like ComfyUI: a node unchanged since the last prompt, fed by cached nodes only."""
        cached: list[str] = []
        for node_id in self._order(graph):
            node = graph[node_id]
            upstream = [
                str(v[0]) for v in node.get("inputs", {}).values() if self._is_link(v, graph)
            ]
            if (
                node["class_type"] not in OUTPUT_NODES
                and last_graph.get(node_id) == node
                and all(u in cached for u in upstream)
            ):
                cached.append(node_id)
        return cached

    @staticmethod
    def _is_link(value: Any, graph: dict[str, Any]) -> bool:
        return isinstance(value, list) and len(value) == 2 and str(value[0]) in graph

    def _run_node(
        self, prompt: _Prompt, node_id: str, emit: Callable[..., None]
    ) -> dict[str, Any] | None:
        node = prompt.graph[node_id]
        kind, inputs = node["class_type"], node.get("inputs", {})
        if kind == "FailNode":
            raise _NodeError(
                str(inputs.get("exception_type", "RuntimeError")),
                str(inputs.get("message", "FailNode failed on purpose")),
            )
        steps = inputs.get("steps")
        if isinstance(steps, int):
            for value in range(1, steps + 1):
                self._sleep(prompt, self.tick_s)
                emit("progress", {"value": value, "max": steps, "node": node_id})
                self._send_preview(prompt.client_id)
                if value == self.drop_sockets_at_step:
                    self.drop_sockets()
        if kind in OUTPUT_NODES:
            latents = [n for n in prompt.graph.values() if n["class_type"] == "EmptyLatentImage"]
            batch = max([int(n["inputs"].get("batch_size", 1)) for n in latents] or [1])
            folder = "output" if kind == "SaveImage" else "temp"
            images = []
            for _ in range(batch):
                with self._lock:
                    self._counter += 1
                    name = f"{inputs.get('filename_prefix', 'ComfyUI')}_{self._counter:05d}_.png"
                self._files.add(name)
                images.append({"filename": name, "subfolder": "", "type": folder})
            return {"images": images}
        return None

    def _check(self, prompt: _Prompt) -> None:
        if prompt.interrupted:
            raise _Interrupted()

    def _sleep(self, prompt: _Prompt, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while True:
            self._check(prompt)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            time.sleep(min(0.01, remaining))

    @staticmethod
    def _order(graph: dict[str, Any]) -> Iterator[str]:
        """Node ids in an order where every node follows the nodes it takes inputs from."""
        done: set[str] = set()

        def visit(node_id: str) -> Iterator[str]:
            if node_id in done:
                return
            done.add(node_id)
            for value in graph[node_id].get("inputs", {}).values():
                if FakeComfyUI._is_link(value, graph):
                    yield from visit(str(value[0]))
            yield node_id

        for node_id in graph:
            yield from visit(node_id)

    # --- WebSocket sends -------------------------------------------------------------------

    def _send(self, client_id: str | None, kind: str, data: dict[str, Any]) -> None:
        """To the prompt's client like ComfyUI; `None` broadcasts (status messages)."""
        if self.silent:
            return
        with self._lock:
            if client_id is None:
                targets = [e for entries in self._sockets.values() for e in entries]
            else:
                targets = list(self._sockets.get(client_id, []))
        for entry in targets:
            self._send_to(entry, kind, data)

    def _send_preview(self, client_id: str | None) -> None:
        if self.silent:
            return
        with self._lock:
            targets = list(self._sockets.get(client_id or "", []))
        frame = struct.pack(">II", 1, 2) + PNG
        for ws, lock in targets:
            with lock, contextlib.suppress(ConnectionClosed, OSError):
                ws.send(frame)

    @staticmethod
    def _send_to(entry: tuple[Server, threading.Lock], kind: str, data: dict[str, Any]) -> None:
        ws, lock = entry
        with lock, contextlib.suppress(ConnectionClosed, OSError):
            ws.send(json.dumps({"type": kind, "data": data}))
