"""Connector registry: which connector serves which service.

A service is served by the built-in connector of the same name, or by the
connector kind EMP_CONNECTORS maps it to (`{"sdxl-fast": "simulation"}`).
"""

from __future__ import annotations

from emp_tasks.config import get_settings
from emp_tasks.connectors.base import Connector
from emp_tasks.connectors.simulation import SimulationConnector

KINDS: dict[str, type] = {"simulation": SimulationConnector}
_instances: dict[str, Connector] = {}


def kind_for(service: str) -> str | None:
    configured = dict(get_settings().connectors)
    kind = configured.get(service, service)
    return kind if kind in KINDS else None


def get(service: str) -> Connector | None:
    """The connector for `service`, or None when this worker has none for it."""
    kind = kind_for(service)
    if kind is None:
        return None
    if kind not in _instances:
        _instances[kind] = KINDS[kind]()
    return _instances[kind]
