"""The `simulation` service: configurable fake work for tests, demos and benchmarks."""

from __future__ import annotations

import random
import struct
import threading
import time
import zlib
from collections.abc import Callable
from typing import Any

from emp_tasks.connectors.base import (
    FailureType,
    OutputFile,
    ProgressReporter,
    StepFailure,
    StepInterrupted,
    StepRun,
)
from emp_tasks.core.config import get_settings

POLL_S = 0.05
MAX_IMAGES = 16
MAX_SIDE = 4096


def invalid_payload(message: str) -> StepFailure:
    """The step's payload is not one the simulation can run (never retried)."""
    return StepFailure(
        message, type=FailureType.VALIDATION, code="INVALID_PAYLOAD", retryable=False
    )


class SimulationConnector:
    name = "simulation"

    def __init__(self, service: str = "simulation", options: dict[str, Any] | None = None) -> None:
        self.service = service
        self._loaded: str | None = None  # the simulated backend holds one model at a time
        self._loading = threading.Lock()

    def loaded_models(self) -> list[str]:
        """The model the last step loaded (`payload.model`), if any."""
        return [self._loaded] if self._loaded else []

    def _load(self, step: StepRun, model: Any, cancel_requested: Callable[[], bool]) -> None:
        """Load `payload.model` unless it is the one loaded: EMP_SIM_MODEL_LOAD_S seconds."""
        if model is None:
            return
        if not isinstance(model, str) or not model:
            raise invalid_payload("model must be a non-empty string")
        with self._loading:
            if self._loaded == model:
                step.model_ready(model)
                return
            started = time.monotonic()
            self._wait_until(started + get_settings().sim_model_load_s, cancel_requested)
            self._loaded = model
        step.log(f"loaded model {model}")
        step.model_loaded(model, int((time.monotonic() - started) * 1000))

    def run(
        self,
        step: StepRun,
        inputs: dict[str, Any],
        report_progress: ProgressReporter,
        cancel_requested: Callable[[], bool],
    ) -> Any:
        payload = step.payload
        for line in self._log_lines(payload):
            step.log(line)
        self._load(step, payload.get("model"), cancel_requested)
        duration = max(0.0, float(payload.get("duration_s", 0) or 0))
        progress_steps = max(0, int(payload.get("progress_steps", 0) or 0))
        started = time.monotonic()
        for index in range(1, progress_steps + 1):
            self._wait_until(started + duration * index / (progress_steps + 1), cancel_requested)
            report_progress(
                round(100.0 * index / (progress_steps + 1), 2),
                stage="generating",
                message=f"step {index} of {progress_steps}",
            )
        self._wait_until(started + duration, cancel_requested)
        self._maybe_fail(payload, step.attempt)
        if "result" in payload:
            result = payload["result"]
        else:
            result = {"ok": True, "echo": payload, "inputs": inputs}
        files = self._images(payload)
        if files and isinstance(result, dict):
            result = {**result, "outputs": [*result.get("outputs", []), *files]}
        return result

    @staticmethod
    def _log_lines(payload: dict[str, Any]) -> list[str]:
        lines = payload.get("log_lines", [])
        if not isinstance(lines, list) or not all(isinstance(line, str) for line in lines):
            raise invalid_payload("log_lines must be a list of strings")
        return lines

    @staticmethod
    def _images(payload: dict[str, Any]) -> list[OutputFile]:
        count = int(payload.get("images", 0) or 0)
        width = int(payload.get("width", 64) or 64)
        height = int(payload.get("height", 64) or 64)
        seed = payload.get("seed", 0)
        if not (0 <= count <= MAX_IMAGES and 1 <= width <= MAX_SIDE and 1 <= height <= MAX_SIDE):
            raise invalid_payload(
                f"images must be 0 to {MAX_IMAGES}, width and height 1 to {MAX_SIDE}"
            )
        return [
            OutputFile.of_bytes(
                png(width, height, f"{seed}/{n}"), "image/png", width=width, height=height
            )
            for n in range(count)
        ]

    @staticmethod
    def _wait_until(deadline: float, cancel_requested: Callable[[], bool]) -> None:
        while True:
            if cancel_requested():
                raise StepInterrupted()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            time.sleep(min(POLL_S, remaining))

    @staticmethod
    def _maybe_fail(payload: dict[str, Any], attempt: int) -> None:
        mode = payload.get("fail", False)
        if not mode:
            return
        fail_attempts = payload.get("fail_attempts")
        if fail_attempts is not None and attempt > int(fail_attempts):
            return
        if mode == "fatal":
            raise StepFailure(
                "simulated fatal failure",
                type=FailureType.VALIDATION,
                code="SIMULATED_FATAL",
                retryable=False,
            )
        raise StepFailure(
            "simulated retryable failure",
            type=FailureType.SERVICE,
            code="SIMULATED_FAILURE",
            retryable=True,
        )


def png(width: int, height: int, seed: Any) -> bytes:
    """A `width` x `height` RGB PNG of noise, the same bytes for the same seed (noise does
    not compress, so the file's size follows its pixel count, as a photo's roughly does)."""
    pixels = random.Random(str(seed)).randbytes(width * height * 3)
    row = width * 3
    raw = b"".join(b"\x00" + pixels[y * row : (y + 1) * row] for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw, 1))
        + chunk(b"IEND", b"")
    )
