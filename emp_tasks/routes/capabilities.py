"""What a worker can do: services, GPU, models, customer isolation and labels.

Read from the environment (API.md, "Worker configuration"); a YAML file named by
EMP_WORKER_CONFIG may hold the same keys, under their environment names or in
lower case without the `EMP_WORKER_` prefix (`services`, `gpu_memory_gb`, ...).
The environment wins over the file. GPU facts that neither sets are discovered
from `nvidia-smi`, or from torch when it is installed, for the GPUs this process
sees (CUDA_VISIBLE_DEVICES); with neither, the worker advertises no GPU memory.
Models a connector reports (ComfyUI's `/object_info`) fill services for which
EMP_WORKER_MODELS names none.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from emp_tasks.core.config import ConfigError

logger = logging.getLogger(__name__)

LOOSE = "loose"
STRICT = "strict"
NVIDIA_SMI_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Gpu:
    index: str
    name: str
    memory_gb: float


@dataclass
class Capabilities:
    services: list[str] = field(default_factory=lambda: ["simulation"])
    gpu_model: str | None = None
    gpu_memory_gb: float | None = None
    gpu_count: int = 0
    models: dict[str, list[str]] = field(default_factory=dict)
    isolation: str = LOOSE
    allowed_customers: list[str] = field(default_factory=list)
    denied_customers: list[str] = field(default_factory=list)
    labels: dict[str, Any] = field(default_factory=dict)
    cuda_visible_devices: str | None = None
    discovered: list[str] = field(default_factory=list)
    """Which facts came from discovery rather than configuration (for operators)."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Capabilities:
        known = {name: data[name] for name in cls.__dataclass_fields__ if name in data}
        return cls(**known)

    def serves_customer(self, customer_id: str | None) -> bool:
        if customer_id is not None and customer_id in self.denied_customers:
            return False
        if self.isolation == STRICT or self.allowed_customers:
            return customer_id is not None and customer_id in self.allowed_customers
        return True


# --- reading the configuration -------------------------------------------------------------

_KEYS = (
    "services",
    "gpu_memory_gb",
    "gpu_model",
    "models",
    "labels",
    "isolation",
    "allowed_customers",
    "denied_customers",
)


def _file_values(path: str) -> dict[str, Any]:
    try:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as exc:
        raise ConfigError(f"EMP_WORKER_CONFIG {path!r} cannot be read: {exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"EMP_WORKER_CONFIG {path!r} is not YAML: {exc}") from exc
    if not isinstance(loaded, dict):
        raise ConfigError(f"EMP_WORKER_CONFIG {path!r} must hold a mapping of settings")
    values: dict[str, Any] = {}
    for key, value in loaded.items():
        name = str(key).lower().removeprefix("emp_worker_")
        if name not in _KEYS:
            raise ConfigError(f"EMP_WORKER_CONFIG {path!r}: unknown key {key!r}")
        values[name] = value
    return values


def _env_values(env: dict[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name in _KEYS:
        raw = env.get(f"EMP_WORKER_{name.upper()}", "").strip()
        if not raw:
            continue
        if name in ("models", "labels"):
            try:
                values[name] = json.loads(raw)
            except ValueError as exc:
                raise ConfigError(f"EMP_WORKER_{name.upper()} is not JSON: {exc}") from exc
        else:
            values[name] = raw
    return values


def _names(name: str, value: Any) -> list[str]:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    if isinstance(value, list) and all(isinstance(each, str) for each in value):
        return list(value)
    raise ConfigError(f"{name} must be a comma-separated string or a list of names")


def _validated(values: dict[str, Any]) -> Capabilities:
    caps = Capabilities()
    if "services" in values:
        caps.services = _names("services", values["services"]) or ["simulation"]
    if values.get("gpu_memory_gb") not in (None, ""):
        try:
            caps.gpu_memory_gb = float(values["gpu_memory_gb"])
        except (TypeError, ValueError) as exc:
            raise ConfigError("EMP_WORKER_GPU_MEMORY_GB must be a number") from exc
        if caps.gpu_memory_gb < 0:
            raise ConfigError("EMP_WORKER_GPU_MEMORY_GB must be >= 0")
    if values.get("gpu_model"):
        caps.gpu_model = str(values["gpu_model"])
    models = values.get("models", {})
    if not isinstance(models, dict) or not all(
        isinstance(v, list) and all(isinstance(m, str) for m in v) for v in models.values()
    ):
        raise ConfigError('EMP_WORKER_MODELS must map services to model lists: {"sdxl": ["a"]}')
    caps.models = {str(service): sorted(set(names)) for service, names in models.items()}
    labels = values.get("labels", {})
    if not isinstance(labels, dict):
        raise ConfigError('EMP_WORKER_LABELS must be a JSON object: {"region": "eu"}')
    caps.labels = labels
    caps.isolation = str(values.get("isolation", LOOSE)).lower()
    if caps.isolation not in (LOOSE, STRICT):
        raise ConfigError("EMP_WORKER_ISOLATION must be 'loose' or 'strict'")
    caps.allowed_customers = _names("allowed_customers", values.get("allowed_customers", []))
    caps.denied_customers = _names("denied_customers", values.get("denied_customers", []))
    if caps.isolation == STRICT and not caps.allowed_customers:
        raise ConfigError("a strict-isolation worker needs EMP_WORKER_ALLOWED_CUSTOMERS")
    return caps


def configured(env: dict[str, str] | None = None) -> Capabilities:
    """Capabilities from EMP_WORKER_CONFIG and the environment, before discovery."""
    env = dict(os.environ if env is None else env)
    values: dict[str, Any] = {}
    if env.get("EMP_WORKER_CONFIG"):
        values.update(_file_values(env["EMP_WORKER_CONFIG"]))
    values.update(_env_values(env))
    caps = _validated(values)
    caps.cuda_visible_devices = env.get("CUDA_VISIBLE_DEVICES")
    return caps


# --- discovery -----------------------------------------------------------------------------


def visible_gpus(env: dict[str, str] | None = None) -> list[Gpu]:
    """GPUs this process may use: all that nvidia-smi (or torch) lists, narrowed to
    CUDA_VISIBLE_DEVICES when it is set."""
    env = dict(os.environ if env is None else env)
    gpus = _nvidia_smi(env) or _torch()
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is None or not gpus:
        return gpus
    wanted = [part.strip() for part in visible.split(",") if part.strip()]
    return [gpu for gpu in gpus if gpu.index in wanted]


def _nvidia_smi(env: dict[str, str]) -> list[Gpu]:
    binary = shutil.which("nvidia-smi", path=env.get("PATH"))
    if binary is None:
        return []
    # nvidia-smi lists physical GPUs whatever CUDA_VISIBLE_DEVICES says; narrowing is ours.
    env = {k: v for k, v in env.items() if k != "CUDA_VISIBLE_DEVICES"}
    try:
        completed = subprocess.run(
            [binary, "--query-gpu=index,name,memory.total", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=NVIDIA_SMI_TIMEOUT_S,
            env=env,
            check=True,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        logger.warning("nvidia-smi failed: %s", exc, extra={"action": "gpu_discovery_failed"})
        return []
    gpus = []
    for line in completed.stdout.splitlines():
        parts = [part.strip() for part in line.split(",")]
        if len(parts) < 3:
            continue
        try:
            memory_gb = round(float(parts[2]) / 1024, 1)  # MiB
        except ValueError:
            continue
        gpus.append(Gpu(index=parts[0], name=parts[1], memory_gb=memory_gb))
    return gpus


def _torch() -> list[Gpu]:
    try:
        import torch  # type: ignore[import-not-found]
    except ImportError:
        return []
    try:
        if not torch.cuda.is_available():
            return []
        return [
            Gpu(
                index=str(i),
                name=torch.cuda.get_device_name(i),
                memory_gb=round(torch.cuda.get_device_properties(i).total_memory / 2**30, 1),
            )
            for i in range(torch.cuda.device_count())
        ]
    except Exception as exc:  # a broken driver must not stop the worker
        logger.warning("torch GPU query failed: %s", exc, extra={"action": "gpu_discovery_failed"})
        return []


def discover(env: dict[str, str] | None = None, connector_models=None) -> Capabilities:
    """The worker's capabilities: configuration, with discovered facts filling the gaps.

    `connector_models(service) -> list[str] | None` asks a service's connector which
    models it has (used only for services EMP_WORKER_MODELS leaves out).
    """
    caps = configured(env)
    gpus = visible_gpus(env)
    caps.gpu_count = len(gpus)
    if gpus:
        if caps.gpu_memory_gb is None:
            # One worker per GPU is the rule; a worker that sees several can place a
            # step only on one of them, so it advertises the smallest.
            caps.gpu_memory_gb = min(gpu.memory_gb for gpu in gpus)
            caps.discovered.append("gpu_memory_gb")
        if caps.gpu_model is None:
            caps.gpu_model = gpus[0].name
            caps.discovered.append("gpu_model")
    if connector_models is not None:
        for service in caps.services:
            if service in caps.models:
                continue
            found = connector_models(service)
            if found:
                caps.models[service] = sorted(set(found))
                caps.discovered.append(f"models.{service}")
    return caps
