"""Where a step's Celery task goes, which workers may take it, and how urgently.

Routes. A step's route is its service, its requirements and its customer; each
route is one Celery queue, `emp.<service>.<digest>`, recorded in the `routes`
table. A worker consumes every queue whose route it satisfies (`unmet` is
empty) and no other, and `steps.attempts.begin` checks the same rule again from
PostgreSQL before a step starts, so a step never runs on a worker that lacks
its service, VRAM or models, or on a worker that does not serve its customer.
The customer is part of every route so that a strict-isolation worker can
consume exactly its customers' queues; a side effect is that equal-priority
work of different customers is served round-robin.

Requirements (API.md): `gpu_memory_gb` (the worker's VRAM must be at least
this), `models` (all present on the worker for the step's service),
`customer_isolation` (`strict`: only a strict-isolation worker serving the
customer), and any other key is a worker label that must be equal (or, when
the worker's label is a list, contained in it).

How urgently a step's task is taken (priority levels, the continuation rule) is
emp_tasks.core.priority.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from emp_tasks.routes.capabilities import STRICT, Capabilities

QUEUE_PREFIX = "emp"


def worker_queue(worker_id: str) -> str:
    """A worker's own queue: it always consumes it; warm placement sends steps there."""
    return f"{QUEUE_PREFIX}.worker.{worker_id}"


BUILTIN_REQUIREMENTS = ("gpu_memory_gb", "models", "customer_isolation")


@dataclass(frozen=True)
class Route:
    queue: str
    service: str
    customer_id: str | None
    requirements: dict[str, Any] = field(default_factory=dict, hash=False)


def canonical(requirements: dict[str, Any] | None) -> dict[str, Any]:
    """Requirements in one spelling: no nulls, models sorted once, whole numbers as ints."""
    result: dict[str, Any] = {}
    for key, value in sorted((requirements or {}).items()):
        if value is None:
            continue
        if key == "models":
            value = sorted(set(value))
            if not value:
                continue
        elif key == "gpu_memory_gb":
            value = float(value)
            value = int(value) if value.is_integer() else value
            if value == 0:
                continue
        result[key] = value
    return result


def route_for(service: str, requirements: dict[str, Any] | None, customer_id: str | None) -> Route:
    required = canonical(requirements)
    key = json.dumps(
        {"customer": customer_id, "requirements": required},
        sort_keys=True,
        separators=(",", ":"),
    )
    digest = hashlib.sha1(key.encode()).hexdigest()[:12]
    return Route(f"{QUEUE_PREFIX}.{service}.{digest}", service, customer_id, required)


def unmet(caps: Capabilities, route: Route) -> list[str]:
    """What the worker lacks to run the route's steps, one phrase each; [] when it can."""
    required = route.requirements
    missing: list[str] = []
    if route.service not in caps.services:
        missing.append(f"service {route.service!r}")
    memory = required.get("gpu_memory_gb")
    if memory and (caps.gpu_memory_gb or 0) < memory:
        missing.append(f"gpu_memory_gb >= {memory:g}")
    wanted = required.get("models") or []
    have = set(caps.models.get(route.service, []))
    absent = [name for name in wanted if name not in have]
    if absent:
        missing.append("models " + ", ".join(absent))
    if required.get("customer_isolation") == STRICT and caps.isolation != STRICT:
        missing.append("customer_isolation strict")
    if not caps.serves_customer(route.customer_id):
        missing.append(f"customer {route.customer_id!r} (worker isolation)")
    for key, value in required.items():
        if key in BUILTIN_REQUIREMENTS:
            continue
        label = caps.labels.get(key)
        matches = value in label if isinstance(label, list) else label == value
        if not matches:
            missing.append(f"label {key}={json.dumps(value)}")
    return missing
