"""The `comfyui` connector: a step's node graph run on a ComfyUI server.

One attempt: open the WebSocket (`/ws?clientId=`), queue the graph (`POST /prompt`),
follow that prompt's execution messages for progress and outcome, then read its
outputs from `/history/{prompt_id}`. If the WebSocket is unavailable or drops, the
history (and the queue, to notice a prompt the server lost) is polled instead.
Cancelling drops the prompt from the queue and interrupts it if it is running.

Output images are streamed from `/view` into the product's storage before the step
completes (`result.outputs`). An image input (`image`, `mask`: LoadImage and kin) given
as a URL, typically a reference to an earlier step's output, is downloaded and uploaded
to the server (`POST /upload/image`) and the graph names the uploaded file.

Options (EMP_CONNECTORS): `url` (required), `outputs` (`store`, the default; `url`:
links to this ComfyUI's `/view`, which die with the machine; `base64`: the bytes inside
the result, its events and webhooks; neither is fit for production), `public_url`
(base for `url` links), `timeout_s` for each HTTP call (default 30), `headers` (e.g.
auth for a proxy in front of ComfyUI).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import mimetypes
import time
import uuid
from collections.abc import Callable, Iterator
from typing import IO, Any
from urllib.parse import parse_qs, urlencode

import requests
import simple_websocket

from emp_tasks.connectors import fetch
from emp_tasks.connectors.base import (
    FailureType,
    OutputFile,
    ProgressReporter,
    StepFailure,
    StepInterrupted,
    StepRun,
)
from emp_tasks.connectors.remote import (
    CANCEL_POLL_S,
    ProgressThrottle,
    call_until_cancelled,
    error_detail,
    sleep_until_cancelled,
    status_failure,
    transport_failure,
)
from emp_tasks.core.config import ConfigError

logger = logging.getLogger(__name__)

OUTPUT_MODES = ("store", "url", "base64")
IMAGE_INPUTS = ("image", "mask")
"""Node inputs that name an input image (LoadImage, LoadImageMask): given as a URL, the
image is uploaded to the ComfyUI server first."""
HISTORY_POLL_S = 0.5
SILENCE_CHECK_S = 5.0
GREETING_WAIT_S = 2.0
"""How long a new WebSocket waits for ComfyUI's first `status` message before queueing."""
CONTROL_TIMEOUT_S = 5.0
NON_MODEL_INPUTS = frozenset({"sampler_name", "config_name"})
"""Inputs named like model pickers whose options are not model files."""


def workflow_of(payload: dict[str, Any]) -> dict[str, Any]:
    """The node graph a step payload carries (`workflow`, or `prompt` when it is a graph)."""
    graph = payload.get("workflow")
    if graph is None and isinstance(payload.get("prompt"), dict):
        graph = payload["prompt"]
    if not isinstance(graph, dict) or not graph:
        raise StepFailure(
            "payload.workflow must be a ComfyUI graph: {node_id: {class_type, inputs}}",
            type=FailureType.VALIDATION,
            code="INVALID_WORKFLOW",
            retryable=False,
        )
    for node_id, node in graph.items():
        if not isinstance(node, dict) or not isinstance(node.get("class_type"), str):
            raise StepFailure(
                f"workflow node {node_id!r} has no class_type",
                type=FailureType.VALIDATION,
                code="INVALID_WORKFLOW",
                retryable=False,
            )
        if not isinstance(node.get("inputs", {}), dict):
            raise StepFailure(
                f"workflow node {node_id!r}: inputs must be an object",
                type=FailureType.VALIDATION,
                code="INVALID_WORKFLOW",
                retryable=False,
            )
    return graph


def execution_failure(data: dict[str, Any]) -> StepFailure:
    """The failure an `execution_error` stands for: out of memory may pass on another GPU."""
    exception_type = str(data.get("exception_type") or "Exception")
    exception_message = str(data.get("exception_message") or "").strip()
    where = f"node {data.get('node_id')} ({data.get('node_type')})"
    message = f"ComfyUI {where} raised {exception_type}: {exception_message}".rstrip(": ")
    if "outofmemory" in exception_type.lower() or "out of memory" in exception_message.lower():
        return StepFailure(message, type=FailureType.RESOURCE, code="COMFYUI_OUT_OF_MEMORY")
    return StepFailure(
        message, type=FailureType.SERVICE, code="COMFYUI_EXECUTION_ERROR", retryable=False
    )


def interrupted_failure(data: dict[str, Any]) -> StepFailure:
    """A prompt interrupted by someone else (an operator, another client): worth a retry."""
    return StepFailure(
        f"ComfyUI interrupted the prompt at node {data.get('node_id')} ({data.get('node_type')})",
        type=FailureType.SERVICE,
        code="COMFYUI_INTERRUPTED",
    )


def rejection_failure(response: requests.Response) -> StepFailure:
    """A 400 from `POST /prompt`: the graph failed ComfyUI's validation."""
    try:
        body = response.json()
    except ValueError:
        body = {"error": response.text.strip()[:300]}
    error = body.get("error") if isinstance(body, dict) else body
    if isinstance(error, dict):
        parts = [f"{error.get('type', 'error')}: {error.get('message', '')}".rstrip(": ")]
        if error.get("details"):
            parts[0] += f" ({error['details']})"
    else:
        parts = [str(error or "invalid prompt")]
    node_errors = body.get("node_errors") if isinstance(body, dict) else None
    for node_id, info in (node_errors or {}).items() if isinstance(node_errors, dict) else ():
        info = info if isinstance(info, dict) else {}
        reasons = [
            ": ".join(str(e[k]) for k in ("message", "details") if isinstance(e, dict) and e.get(k))
            for e in info.get("errors") or []
        ]
        parts.append(f"node {node_id} ({info.get('class_type', '?')}): {'; '.join(reasons)}")
    return StepFailure(
        "ComfyUI rejected the workflow: " + " | ".join(parts),
        type=FailureType.VALIDATION,
        code="COMFYUI_REJECTED",
        retryable=False,
    )


def model_names(object_info: dict[str, Any]) -> list[str]:
    """Model files offered by `/object_info`: the options of every `*_name` picker input."""
    names: set[str] = set()
    for node in object_info.values():
        inputs = node.get("input") if isinstance(node, dict) else None
        if not isinstance(inputs, dict):
            continue
        for group in ("required", "optional"):
            specs = inputs.get(group)
            for input_name, spec in (specs or {}).items() if isinstance(specs, dict) else ():
                if input_name.endswith("_name") and input_name not in NON_MODEL_INPUTS:
                    names.update(_combo_options(spec))
    return sorted(names)


def _combo_options(spec: Any) -> list[str]:
    """Options of a picker input: `[[options], {...}]`, or `["COMBO", {"options": [...]}]`."""
    if not isinstance(spec, list | tuple) or not spec:
        return []
    options = spec[0]
    if options == "COMBO" and len(spec) > 1 and isinstance(spec[1], dict):
        options = spec[1].get("options")
    if isinstance(options, list) and all(isinstance(o, str) for o in options):
        return list(options)
    return []


LOADER_INPUTS = {
    "CheckpointLoaderSimple": "ckpt_name",
    "CheckpointLoader": "ckpt_name",
    "ImageOnlyCheckpointLoader": "ckpt_name",
    "UNETLoader": "unet_name",
    "LoraLoader": "lora_name",
    "LoraLoaderModelOnly": "lora_name",
    "VAELoader": "vae_name",
}
"""Loader nodes and the input naming the model each loads."""


def graph_loaders(graph: dict[str, Any]) -> list[tuple[str, str]]:
    """(node id, model) of each loader node in an API-format graph."""
    found = []
    for node, entry in graph.items():
        if not isinstance(entry, dict):
            continue
        name = LOADER_INPUTS.get(str(entry.get("class_type")))
        value = (entry.get("inputs") or {}).get(name) if name else None
        if isinstance(value, str) and value:
            found.append((str(node), value))
    return found


def graph_models(graph: dict[str, Any]) -> list[str]:
    return sorted({model for _, model in graph_loaders(graph)})


class _Execution:
    """What one prompt's WebSocket messages said so far, turned into progress reports.

    Overall percent: nodes done (cached or executed) plus the running node's own
    value/max, over the graph's node count; held below 100 until the step completes.
    """

    def __init__(
        self,
        prompt_id: str,
        graph: dict[str, Any],
        report: ProgressReporter,
        log: Callable[[str, str], None] | None = None,
    ) -> None:
        self.prompt_id = prompt_id
        self.graph = graph
        self._log = log or (lambda message, level="info": None)
        self.node_ms: dict[str, int] = {}  # time each node took, as the messages tell
        self._entered_at = time.monotonic()
        self.started = False
        self.succeeded = False
        self._done: set[str] = set()
        self._current: str | None = None
        self._fraction = 0.0
        self._percent = 0.0
        self._progress = ProgressThrottle(report)

    def handle(self, message: dict[str, Any]) -> bool:
        """Apply one message; True once the prompt finished (its history is then written)."""
        kind = message.get("type")
        data = message.get("data")
        if not isinstance(data, dict):
            return False
        prompt_id = data.get("prompt_id")
        if prompt_id is None:
            # Older servers send `progress` without a prompt id; it is ours while ours runs.
            if kind != "progress" or not self.started:
                return False
        elif prompt_id != self.prompt_id:
            return False
        if kind == "execution_start":
            self.started = True
            self._log(f"execution started (prompt {self.prompt_id})", "info")
        elif kind == "execution_cached":
            self.started = True
            cached = [str(node) for node in data.get("nodes") or []]
            if cached:
                self._done.update(cached)
                self._log(f"cached nodes: {', '.join(cached)}", "info")
                self._report(None)
        elif kind == "executing":
            if data.get("node") is None:
                return True
            node = str(data["node"])
            if node != self._current:
                self._log(f"executing node {node} ({self._class_of(node)})", "info")
            self._enter(node)
        elif kind == "progress":
            self._progress_tick(data)
        elif kind == "executed":
            self._done.add(str(data.get("node")))
        elif kind == "execution_success":
            # Sent just before the server writes history; `executing` with no node follows.
            self.succeeded = True
            self._log("execution succeeded", "info")
        elif kind == "execution_error":
            failure = execution_failure(data)
            self._log(f"execution error: {failure}", "error")
            raise failure
        elif kind == "execution_interrupted":
            raise interrupted_failure(data)
        return False

    def flush(self) -> None:
        self._progress.flush()

    def _class_of(self, node: str) -> str:
        entry = self.graph.get(node)
        return str(entry.get("class_type", "?")) if isinstance(entry, dict) else "?"

    def _enter(self, node: str) -> None:
        self.started = True
        moment = time.monotonic()
        if self._current is not None and self._current != node:
            self._done.add(self._current)
            self.node_ms[self._current] = int((moment - self._entered_at) * 1000)
        if self._current != node:
            self._entered_at = moment
        self._current = node
        self._fraction = 0.0
        self._report(self._class_of(node))

    def _progress_tick(self, data: dict[str, Any]) -> None:
        node = data.get("node")
        if node is not None and str(node) != self._current:
            self._enter(str(node))
        value, maximum = data.get("value"), data.get("max")
        if not isinstance(value, int | float) or not isinstance(maximum, int | float):
            return
        if maximum <= 0:
            return
        self._fraction = max(0.0, min(1.0, value / maximum))
        stage = self._class_of(self._current)
        self._report(f"{stage} {value:g}/{maximum:g}", stage)

    def _report(self, message: str | None, stage: str | None = None) -> None:
        done = len(self._done - {self._current})
        fraction = self._fraction if self._current is not None else 0.0
        percent = min(99.0, 100.0 * (done + fraction) / max(1, len(self.graph)))
        self._percent = max(self._percent, percent)
        stage = stage or (self._class_of(self._current) if self._current else None)
        self._progress(self._percent, stage, message)

    def _class_of(self, node: str | None) -> str:
        spec = self.graph.get(node or "")
        return spec.get("class_type", str(node)) if isinstance(spec, dict) else str(node)


class ComfyUIConnector:
    """Runs a step's ComfyUI graph on one ComfyUI server."""

    name = "comfyui"

    def __init__(self, service: str, options: dict[str, Any] | None = None) -> None:
        options = dict(options or {})
        url = options.get("url")
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ConfigError(f"comfyui connector for {service!r} needs an http(s) 'url' option")
        self.service = service
        self.url = url.rstrip("/")
        self.public_url = str(options.get("public_url") or self.url).rstrip("/")
        self.outputs = options.get("outputs", "store")
        if self.outputs not in OUTPUT_MODES:
            raise ConfigError(
                f"comfyui connector for {service!r}: outputs must be store, url or base64"
            )
        try:
            self.timeout_s = float(options.get("timeout_s", 30))
        except (TypeError, ValueError) as exc:
            raise ConfigError(
                f"comfyui connector for {service!r}: timeout_s must be a number"
            ) from exc
        self.headers = {str(k): str(v) for k, v in dict(options.get("headers") or {}).items()}
        self._loaded: list[str] = []

    def loaded_models(self) -> list[str]:
        """The checkpoints, UNets, LoRAs and VAEs the loader nodes of the last graph named:
        what this ComfyUI holds in memory now (it keeps the last graph's models)."""
        return list(self._loaded)

    # --- the connector interface -----------------------------------------------------------

    def run(
        self,
        step: StepRun,
        inputs: dict[str, Any],
        report_progress: ProgressReporter,
        cancel_requested: Callable[[], bool],
    ) -> Any:
        graph = workflow_of(step.payload)
        needed = graph_models(graph)
        for model in needed:
            if model not in self._loaded:
                step.log(f"model {model} is not loaded yet: this attempt loads it")
        client_id = uuid.uuid4().hex
        log = {"step_id": step.step_id, "attempt": step.attempt, "service": self.service}
        with requests.Session() as http:
            http.headers.update(self.headers)
            socket = self._open_socket(client_id, cancel_requested, log)
            try:
                if cancel_requested():
                    raise StepInterrupted()
                graph = self._upload_input_images(http, graph, log)
                prompt_id = self._submit(http, graph, client_id)
                logger.info(
                    "ComfyUI prompt queued",
                    extra={"action": "comfyui_queued", "prompt_id": prompt_id, **log},
                )
                execution = _Execution(prompt_id, graph, report_progress, step.log)
                try:
                    if socket is not None:
                        self._follow(
                            socket,
                            execution,
                            cancel_requested,
                            lambda: self._history(http, prompt_id) is not None,
                            log,
                        )
                    entry = self._await_history(http, prompt_id, cancel_requested)
                except StepInterrupted:
                    self._stop(http, prompt_id, execution.started, log)
                    raise
            finally:
                if socket is not None:
                    _close(socket)
            result = self._result(http, prompt_id, entry)
            self._loaded_by(step, graph, execution)
            return result

    def _loaded_by(self, step: StepRun, graph: dict[str, Any], execution: _Execution) -> None:
        """The graph ran: its models are the loaded ones; report those it had to load, each
        with the time its loader node took."""
        loaded = set(self._loaded)
        for node, model in graph_loaders(graph):
            if model in loaded:
                step.model_ready(model)
            else:
                step.model_loaded(model, execution.node_ms.get(node, 0))
        self._loaded = graph_models(graph)

    def health(self) -> dict[str, Any]:
        """`/system_stats` when the server answers; never raises."""
        try:
            response = requests.get(
                f"{self.url}/system_stats", headers=self.headers, timeout=self.timeout_s
            )
            response.raise_for_status()
            stats = response.json()
        except (requests.RequestException, ValueError) as exc:
            return {"ok": False, "error": str(exc)}
        if not isinstance(stats, dict):
            return {"ok": False, "error": "/system_stats did not answer an object"}
        return {"ok": True, "system": stats.get("system"), "devices": stats.get("devices")}

    def models(self) -> list[str]:
        """Model files the server can load (checkpoints, LoRAs, VAEs, ...); [] if unknown."""
        try:
            response = requests.get(
                f"{self.url}/object_info", headers=self.headers, timeout=self.timeout_s
            )
            response.raise_for_status()
            info = response.json()
        except (requests.RequestException, ValueError) as exc:
            logger.warning(
                "Could not list ComfyUI models",
                extra={"action": "comfyui_models", "service": self.service, "error": str(exc)},
            )
            return []
        return model_names(info) if isinstance(info, dict) else []

    # --- one attempt -----------------------------------------------------------------------

    def _open_socket(
        self, client_id: str, cancel_requested: Callable[[], bool], log: dict[str, Any]
    ) -> simple_websocket.Client | None:
        """The prompt's WebSocket, opened before queueing so no message is missed.

        Without one the attempt still runs, followed by polling the history.
        """
        ws_url = "ws" + self.url.removeprefix("http") + f"/ws?clientId={client_id}"
        try:
            socket = call_until_cancelled(
                lambda: simple_websocket.Client.connect(ws_url, headers=self.headers),
                cancel_requested,
                timeout_s=self.timeout_s,
            )
        except (OSError, simple_websocket.ConnectionError) as exc:
            logger.warning(
                "ComfyUI WebSocket unavailable; polling history instead",
                extra={"action": "comfyui_ws_unavailable", "error": repr(exc), **log},
            )
            return None
        return socket if _greeted(socket, log) else None

    def _submit(self, http: requests.Session, graph: dict[str, Any], client_id: str) -> str:
        response = self._request(
            http,
            "POST",
            "/prompt",
            json={"prompt": graph, "client_id": client_id},
            rejectable=True,
        )
        if response.status_code == 400:
            raise rejection_failure(response)
        return _text_field(self._json(response), "prompt_id", "queued the prompt")

    def _follow(
        self,
        socket: simple_websocket.Client,
        execution: _Execution,
        cancel_requested: Callable[[], bool],
        in_history: Callable[[], bool],
        log: dict[str, Any],
    ) -> None:
        """Read the prompt's messages until it finished; return early if the socket drops.

        After SILENCE_CHECK_S without a message the history is checked, so a final
        message that never arrives cannot hold the step until its timeout.
        """
        heard_at = time.monotonic()
        while True:
            if cancel_requested():
                raise StepInterrupted()
            try:
                frame = socket.receive(timeout=CANCEL_POLL_S)
            except simple_websocket.ConnectionClosed:
                logger.warning(
                    "ComfyUI WebSocket dropped; polling history instead",
                    extra={"action": "comfyui_ws_dropped", "prompt_id": execution.prompt_id, **log},
                )
                return
            execution.flush()
            if frame is None:
                if execution.succeeded:
                    return
                if time.monotonic() - heard_at >= SILENCE_CHECK_S:
                    heard_at = time.monotonic()
                    if in_history():
                        return
                continue
            heard_at = time.monotonic()
            if not isinstance(frame, str):
                continue  # a binary preview image
            try:
                message = json.loads(frame)
            except ValueError:
                continue
            if isinstance(message, dict) and execution.handle(message):
                return

    def _await_history(
        self, http: requests.Session, prompt_id: str, cancel_requested: Callable[[], bool]
    ) -> dict[str, Any]:
        """The prompt's history entry, once there; raises for a prompt that failed or vanished.

        ComfyUI writes history when a prompt ends, shortly after `execution_success`.
        """
        while True:
            entry = self._history(http, prompt_id)
            if entry is None and self._queue_state(http, prompt_id) == "absent":
                entry = self._history(http, prompt_id)
                if entry is None:
                    raise StepFailure(
                        f"ComfyUI lost prompt {prompt_id}: neither queued nor in history",
                        type=FailureType.SERVICE,
                        code="COMFYUI_PROMPT_LOST",
                    )
            if entry is not None:
                _raise_for_status(entry)
                return entry
            sleep_until_cancelled(HISTORY_POLL_S, cancel_requested)

    def _stop(
        self, http: requests.Session, prompt_id: str, started: bool, log: dict[str, Any]
    ) -> None:
        """Drop the prompt from the queue; interrupt it only if it is the one running.

        Older servers ignore the prompt id on /interrupt and stop whatever runs, so
        interrupting a prompt that is merely queued would stop someone else's.
        """
        try:
            self._request(
                http, "POST", "/queue", json={"delete": [prompt_id]}, timeout=CONTROL_TIMEOUT_S
            )
            state = self._queue_state(http, prompt_id)
            if state == "running" or (state is None and started):
                self._request(
                    http,
                    "POST",
                    "/interrupt",
                    json={"prompt_id": prompt_id},
                    timeout=CONTROL_TIMEOUT_S,
                )
        except StepFailure as failure:
            logger.warning(
                "Could not stop the ComfyUI prompt",
                extra={"action": "comfyui_stop_failed", "error": failure.message, **log},
            )
        logger.info(
            "ComfyUI prompt stopped",
            extra={"action": "comfyui_stopped", "prompt_id": prompt_id, **log},
        )

    def _result(
        self, http: requests.Session, prompt_id: str, entry: dict[str, Any]
    ) -> dict[str, Any]:
        node_outputs = entry.get("outputs") or {}
        images = []
        files = []
        for node_id, output in node_outputs.items():
            for image in (output or {}).get("images") or []:
                if not isinstance(image, dict) or "filename" not in image:
                    continue
                item = {
                    "node_id": node_id,
                    "filename": image["filename"],
                    "subfolder": image.get("subfolder", ""),
                    "type": image.get("type", "output"),
                }
                query = urlencode({k: item[k] for k in ("filename", "subfolder", "type")})
                if self.outputs == "base64":
                    item.update(self._download(http, query))
                elif self.outputs == "url":
                    item["url"] = f"{self.public_url}/view?{query}"
                else:
                    files.append(self._view(query, node_id))
                images.append(item)
        result: dict[str, Any] = {
            "prompt_id": prompt_id,
            "images": images,
            "node_outputs": node_outputs,
        }
        if self.outputs == "store":
            result["outputs"] = files
        return result

    def _view(self, query: str, node_id: str) -> OutputFile:
        """An output image as a file the worker streams from `/view` into storage."""

        @contextlib.contextmanager
        def open_view() -> Iterator[IO[bytes]]:
            with requests.Session() as http:
                http.headers.update(self.headers)
                with self._fetch_view(http, query, stream=True) as response:
                    response.raw.decode_content = True
                    yield response.raw

        content_type = mimetypes.guess_type(parse_qs(query).get("filename", [""])[0])[0]
        return OutputFile(open_view, content_type or "image/png", node_id=node_id)

    # --- images given by URL ---------------------------------------------------------------

    def _upload_input_images(
        self, http: requests.Session, graph: dict[str, Any], log: dict[str, Any]
    ) -> dict[str, Any]:
        """The graph with every image input given as a URL uploaded to this ComfyUI
        (`POST /upload/image`) and replaced by the name it answers."""
        uploaded: dict[str, str] = {}
        changed = {}
        for node_id, node in graph.items():
            inputs = node.get("inputs") or {}
            for name in IMAGE_INPUTS:
                value = inputs.get(name)
                if not isinstance(value, str) or not value.startswith(("http://", "https://")):
                    continue
                if value not in uploaded:
                    uploaded[value] = self._upload_image(http, value, f"{node_id}.{name}")
                    logger.info(
                        "Input image uploaded to ComfyUI",
                        extra={"action": "comfyui_image_uploaded", "node_id": node_id, **log},
                    )
                changed.setdefault(node_id, dict(inputs))[name] = uploaded[value]
        return {
            nid: {**node, "inputs": changed[nid]} if nid in changed else node
            for nid, node in graph.items()
        }

    def _upload_image(self, http: requests.Session, url: str, where: str) -> str:
        data, content_type = fetch.read(url, what=f"the image of {where}")
        ext = (mimetypes.guess_extension(content_type) or ".png").lstrip(".")
        name = f"emp-{hashlib.sha256(data).hexdigest()[:24]}.{ext}"
        try:
            response = http.post(
                self.url + "/upload/image",
                files={"image": (name, data, content_type)},
                data={"overwrite": "true", "type": "input"},
                timeout=self.timeout_s,
            )
        except requests.RequestException as exc:
            raise transport_failure(exc, source="ComfyUI", code_prefix="COMFYUI") from exc
        if not response.ok:
            raise status_failure(
                response.status_code,
                error_detail(response),
                source="ComfyUI POST /upload/image",
                code_prefix="COMFYUI",
            )
        body = self._json(response)
        stored = _text_field(body, "name", "answered /upload/image")
        subfolder = body.get("subfolder") or ""
        return f"{subfolder}/{stored}" if subfolder else stored

    # --- HTTP ------------------------------------------------------------------------------

    def _request(
        self,
        http: requests.Session,
        method: str,
        path: str,
        *,
        json: Any = None,
        timeout: float | None = None,
        rejectable: bool = False,
        stream: bool = False,
    ) -> requests.Response:
        """One call to the server; an error answer raises a classified failure.

        `rejectable`: a 400 is returned to the caller (it carries ComfyUI's reasons).
        """
        try:
            response = http.request(
                method,
                self.url + path,
                json=json,
                timeout=timeout or self.timeout_s,
                stream=stream,
            )
        except requests.RequestException as exc:
            raise transport_failure(exc, source="ComfyUI", code_prefix="COMFYUI") from exc
        if not response.ok and not (rejectable and response.status_code == 400):
            raise status_failure(
                response.status_code,
                error_detail(response),
                source=f"ComfyUI {method} {path.split('?')[0]}",
                code_prefix="COMFYUI",
            )
        return response

    @staticmethod
    def _json(response: requests.Response) -> Any:
        try:
            return response.json()
        except ValueError as exc:
            raise StepFailure(
                f"ComfyUI answered {response.request.path_url} without JSON",
                type=FailureType.SERVICE,
                code="COMFYUI_INVALID_RESPONSE",
            ) from exc

    def _history(self, http: requests.Session, prompt_id: str) -> dict[str, Any] | None:
        body = self._json(self._request(http, "GET", f"/history/{prompt_id}"))
        entry = body.get(prompt_id) if isinstance(body, dict) else None
        return entry if isinstance(entry, dict) else None

    def _queue_state(self, http: requests.Session, prompt_id: str) -> str | None:
        """`running`, `pending` or `absent` from `GET /queue`; None if the queue is unreadable."""
        try:
            body = self._json(self._request(http, "GET", "/queue", timeout=CONTROL_TIMEOUT_S))
        except StepFailure:
            return None
        if not isinstance(body, dict):
            return None
        for state, key in (("running", "queue_running"), ("pending", "queue_pending")):
            for item in body.get(key) or []:
                if isinstance(item, list | tuple) and len(item) > 1 and item[1] == prompt_id:
                    return state
        return "absent"

    def _fetch_view(
        self, http: requests.Session, query: str, stream: bool = False
    ) -> requests.Response:
        try:
            return self._request(http, "GET", f"/view?{query}", stream=stream)
        except StepFailure as failure:
            if failure.type is not FailureType.VALIDATION:
                raise
            # History named this file, so a missing one is the server's fault, not the step's.
            raise StepFailure(
                f"ComfyUI could not serve an output image ({query}): {failure.message}",
                type=FailureType.SERVICE,
                code="COMFYUI_OUTPUT_UNAVAILABLE",
            ) from failure

    def _download(self, http: requests.Session, query: str) -> dict[str, str]:
        response = self._fetch_view(http, query)
        return {
            "base64": base64.b64encode(response.content).decode("ascii"),
            "content_type": response.headers.get("Content-Type", "application/octet-stream"),
        }


def _text_field(body: Any, name: str, what: str) -> str:
    """A non-empty string ComfyUI's answer must carry; a SERVICE failure when it does not."""
    value = body.get(name) if isinstance(body, dict) else None
    if not isinstance(value, str) or not value:
        raise StepFailure(
            f"ComfyUI {what} without a {name}",
            type=FailureType.SERVICE,
            code="COMFYUI_INVALID_RESPONSE",
        )
    return value


def _raise_for_status(entry: dict[str, Any]) -> None:
    """Raise the failure a finished history entry records, if it did not succeed."""
    status = entry.get("status")
    if not isinstance(status, dict) or status.get("status_str") != "error":
        return
    for message in reversed(status.get("messages") or []):
        if not isinstance(message, list | tuple) or len(message) != 2:
            continue
        name, data = message
        if name == "execution_error" and isinstance(data, dict):
            raise execution_failure(data)
        if name == "execution_interrupted" and isinstance(data, dict):
            raise interrupted_failure(data)
    raise StepFailure(
        "ComfyUI reports the prompt failed without saying why",
        type=FailureType.SERVICE,
        code="COMFYUI_EXECUTION_ERROR",
    )


def _greeted(socket: simple_websocket.Client, log: dict[str, Any]) -> bool:
    """Wait for ComfyUI's greeting (a `status` message with our client id), at most
    GREETING_WAIT_S; False when the socket closed meanwhile.

    ComfyUI files a socket under its client id only after the handshake has been
    answered, and greets it right after: a prompt queued before the greeting can
    start before the server knows where to send its messages, and its first
    messages (`execution_start`, the first nodes) are then lost. A server that
    never greets is still followed; its history is checked after a silence.
    """
    try:
        socket.receive(timeout=GREETING_WAIT_S)
    except simple_websocket.ConnectionClosed:
        logger.warning(
            "ComfyUI WebSocket closed before its greeting; polling history instead",
            extra={"action": "comfyui_ws_dropped", **log},
        )
        _close(socket)
        return False
    return True


def _close(socket: simple_websocket.Client) -> None:
    with contextlib.suppress(simple_websocket.ConnectionClosed, OSError):
        socket.close()
