"""What an attempt loaded, and what the worker's backends hold now (warm placement).

A connector reports each model it had to load (`StepRun.model_loaded`) and each it found
loaded (`StepRun.model_ready`); the attempt is then recorded `cold_start: true` with the
load time in `model_load_ms` when it loaded any, `false` when it used models (or its step
names some in `requirements.models`) and loaded none, and null otherwise;
`emp_model_loads_total{service,model}` counts each load.
After the attempt the worker asks its connectors what they hold (`loaded_models()`) and
writes it on its registry row when it changed, for placement (emp_tasks.routes.placement)
and the dashboard.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from emp_tasks import connectors, metrics, workers
from emp_tasks.connectors.base import StepRun
from emp_tasks.routes import placement
from emp_tasks.steps import attempts

logger = logging.getLogger(__name__)


class AttemptLoads:
    """The models an attempt used: those it loaded (with the time) and those ready."""

    def __init__(self) -> None:
        self.loads: list[tuple[str, int]] = []
        self.ready: list[str] = []
        self._lock = threading.Lock()

    def __call__(self, model: str, load_ms: int | None) -> None:
        with self._lock:
            if load_ms is None:
                self.ready.append(str(model))
            else:
                self.loads.append((str(model), max(0, int(load_ms))))


_written: dict[str, Any] = {}
_written_lock = threading.Lock()


def loaded_now(services: list[str]) -> dict[str, list[str]]:
    """Per service, what its connector says its backend holds (those that can tell)."""
    held: dict[str, list[str]] = {}
    for service in services:
        report = getattr(connectors.get(service), "loaded_models", None)
        if report is None:
            continue
        try:
            held[service] = sorted(set(report()))
        except Exception:
            logger.warning("Connector did not say what it has loaded", exc_info=True)
    return held


def after_attempt(run: StepRun, worker_id: str, services: list[str], models: dict) -> None:
    """Record the attempt's loads, count them, and publish what is loaded now if changed."""
    sink = run.load_sink
    loads = sink.loads if isinstance(sink, AttemptLoads) else []
    ready = sink.ready if isinstance(sink, AttemptLoads) else []
    named = bool((run.requirements or {}).get("models")) or bool(ready)
    try:
        if loads or named:
            attempts.record_load(
                run.step_id, run.attempt, bool(loads), sum(ms for _, ms in loads) if loads else 0
            )
        for model, load_ms in loads:
            known = model in (models.get(run.service) or [])
            metrics.model_loaded(run.service, model if known else metrics.OTHER)
            if known:
                placement.record_load_time(run.service, model, load_ms)
        held = loaded_now(services)
        with _written_lock:
            changed = held != _written.get(worker_id)
            if changed:
                _written[worker_id] = held
        if changed:
            workers.set_loaded_models(worker_id, held)
            placement.loaded_reported(worker_id)
    except Exception:
        logger.warning(
            "Model loads not recorded",
            exc_info=True,
            extra={"action": "model_loads_failed", "step_id": run.step_id},
        )
