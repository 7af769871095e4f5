"""Connector registry: which connector serves which service.

A service is served by the built-in connector of the same name, or by the
connector EMP_CONNECTORS names for it, with that connector's options:
`{"sdxl-fast": "simulation", "sdxl": {"kind": "comfyui", "url": "http://gpu-box:8188"}}`.
"""

from __future__ import annotations

import threading

from emp_tasks.connectors.base import Connector
from emp_tasks.connectors.comfyui import ComfyUIConnector
from emp_tasks.connectors.http import HttpConnector
from emp_tasks.connectors.simulation import SimulationConnector
from emp_tasks.core.config import ConnectorConfig, get_settings

KINDS: dict[str, type] = {
    "simulation": SimulationConnector,
    "comfyui": ComfyUIConnector,
    "http": HttpConnector,
}
"""Connector kinds by name; each is built as `Kind(service, options)`."""

_instances: dict[str, Connector] = {}
_lock = threading.Lock()


def config_for(service: str) -> ConnectorConfig | None:
    """The service's connector configuration, or None when no known kind serves it."""
    for config in get_settings().connectors:
        if config.service == service:
            return config if config.kind in KINDS else None
    return ConnectorConfig(service, service) if service in KINDS else None


def get(service: str) -> Connector | None:
    """The connector for `service` (one instance per service), or None if there is none."""
    with _lock:
        if service not in _instances:
            config = config_for(service)
            if config is None:
                return None
            _instances[service] = KINDS[config.kind](service, config.options)
        return _instances[service]


def reset() -> None:
    """Forget built connectors (tests that change EMP_CONNECTORS in-process)."""
    with _lock:
        _instances.clear()
