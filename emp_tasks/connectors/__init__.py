"""Connector registry: which connector serves which service."""

from __future__ import annotations

from emp_tasks.connectors.base import Connector
from emp_tasks.connectors.simulation import SimulationConnector

_BUILT_IN: dict[str, type] = {"simulation": SimulationConnector}
_instances: dict[str, Connector] = {}


def get(service: str) -> Connector | None:
    """The connector for `service`, or None when this worker has none for it."""
    if service not in _instances and service in _BUILT_IN:
        _instances[service] = _BUILT_IN[service]()
    return _instances.get(service)
