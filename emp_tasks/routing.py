"""Queue choice and priority mapping: where a step's Celery task goes and how urgently.

Priority is 0-100, higher first. Celery's Redis transport keeps one list per
priority step and serves the lowest number first, so our priority is mapped
onto ten broker levels with the order inverted: 91-100 -> 0, ..., 0-10 -> 9.
"""

from __future__ import annotations

from typing import Any

BROKER_PRIORITY_LEVELS = 10
QUEUE_PREFIX = "emp"


def queue_for(service: str, requirements: dict[str, Any] | None = None) -> str:
    """The Celery queue for a step; every worker that serves `service` consumes it."""
    return f"{QUEUE_PREFIX}.{service}"


def queues_for_services(services: tuple[str, ...] | list[str]) -> list[str]:
    return [queue_for(service) for service in services]


def broker_priority(priority: int) -> int:
    """Map 0-100 (higher first) onto the broker's 0-9 (lower first)."""
    level = min(BROKER_PRIORITY_LEVELS - 1, max(0, priority) * BROKER_PRIORITY_LEVELS // 101)
    return BROKER_PRIORITY_LEVELS - 1 - level
