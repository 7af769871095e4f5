"""The `simulation` service: configurable fake work for tests, demos and benchmarks."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from emp_tasks.connectors.base import (
    FailureType,
    ProgressReporter,
    StepFailure,
    StepInterrupted,
    StepRun,
)

POLL_S = 0.05


class SimulationConnector:
    name = "simulation"

    def __init__(self, service: str = "simulation", options: dict[str, Any] | None = None) -> None:
        self.service = service

    def run(
        self,
        step: StepRun,
        inputs: dict[str, Any],
        report_progress: ProgressReporter,
        cancel_requested: Callable[[], bool],
    ) -> Any:
        payload = step.payload
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
            return payload["result"]
        return {"ok": True, "echo": payload, "inputs": inputs}

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
