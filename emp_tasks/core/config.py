"""Configuration: every setting of every process, read from the environment only.

The README's configuration table lists the same names; `Settings.from_env()` is the
one place that parses them, so a typo in a value fails at start-up, not mid-run.
"""

from __future__ import annotations

import json
import math
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A configuration value that cannot be used."""


def _int(env: dict[str, str], name: str, default: int, minimum: int = 0) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError as exc:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from exc
    if value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value}")
    return value


def _float(env: dict[str, str], name: str, default: float, *, above_zero: bool = False) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError as exc:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from exc
    if math.isnan(value) or value < 0 or (above_zero and value == 0):
        raise ConfigError(f"{name} must be {'> 0' if above_zero else '>= 0'}, got {value}")
    return value


def _bool(env: dict[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in {"1", "true", "yes", "on"}:
        return True
    if raw in {"0", "false", "no", "off"}:
        return False
    raise ConfigError(f"{name} must be true or false, got {raw!r}")


DEFAULT_WEBHOOK_SCHEDULE = (5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0)


def _schedule(raw: str) -> tuple[float, ...]:
    """EMP_WEBHOOK_RETRY_SCHEDULE: seconds before each retry, comma-separated."""
    if not raw.strip():
        return DEFAULT_WEBHOOK_SCHEDULE
    try:
        delays = tuple(float(part) for part in raw.split(",") if part.strip())
    except ValueError as exc:
        raise ConfigError(f"EMP_WEBHOOK_RETRY_SCHEDULE must be seconds, got {raw!r}") from exc
    if any(delay < 0 for delay in delays):
        raise ConfigError("EMP_WEBHOOK_RETRY_SCHEDULE delays must be >= 0")
    return delays


@dataclass(frozen=True)
class ConnectorConfig:
    """One service's connector from EMP_CONNECTORS: its kind and the kind's options."""

    service: str
    kind: str
    options_json: str = "{}"

    @property
    def options(self) -> dict[str, Any]:
        return json.loads(self.options_json)


def _connectors(raw: str) -> tuple[ConnectorConfig, ...]:
    """EMP_CONNECTORS: JSON mapping a service to a connector kind, or to the kind's options.

    `{"sdxl-fast": "simulation", "sdxl": {"kind": "comfyui", "url": "http://127.0.0.1:8188"}}`
    """
    if not raw.strip():
        return ()
    try:
        mapping = json.loads(raw)
    except ValueError as exc:
        raise ConfigError(f"EMP_CONNECTORS is not JSON: {exc}") from exc
    if not isinstance(mapping, dict):
        raise ConfigError('EMP_CONNECTORS must be a JSON object: {"service": "kind" or {...}}')
    configs = []
    for service, value in sorted(mapping.items()):
        if isinstance(value, str):
            configs.append(ConnectorConfig(service, value))
        elif isinstance(value, dict) and isinstance(value.get("kind"), str):
            options = {k: v for k, v in value.items() if k != "kind"}
            configs.append(ConnectorConfig(service, value["kind"], json.dumps(options)))
        else:
            raise ConfigError(
                f"EMP_CONNECTORS[{service!r}] must be a connector kind or an object with a 'kind'"
            )
    return tuple(configs)


@dataclass(frozen=True)
class ApiKeySpec:
    """One key from EMP_API_KEYS: `key`, `key:customer_id` or `key:customer_id:admin`."""

    key: str
    customer_id: str
    admin: bool


def parse_api_keys(raw: str) -> tuple[ApiKeySpec, ...]:
    specs = []
    for item in raw.split(","):
        item = item.strip()
        if not item:
            continue
        parts = item.split(":")
        if len(parts) > 3 or not parts[0]:
            raise ConfigError(f"EMP_API_KEYS entry {item!r} is not key[:customer_id[:admin]]")
        customer = parts[1] if len(parts) > 1 and parts[1] else "default"
        if len(parts) == 3 and parts[2] != "admin":
            raise ConfigError(f"EMP_API_KEYS entry {item!r}: third part must be 'admin'")
        specs.append(ApiKeySpec(key=parts[0], customer_id=customer, admin=len(parts) == 3))
    return tuple(specs)


def default_web_workers(cores: int | None) -> int:
    """gunicorn processes: one per core, at most 4. Measured on 2 cores (make bench, 16
    clients): 2 processes spent 5.5-6.0 ms of web CPU per step against 7.3-7.8 ms with 4 (each
    process has its own event publisher, and fewer publishers publish bigger batches), with
    the same single-client submit latency (12.9-13.2 ms at p50 against 13.7 ms); capped at 4
    so that each process's database pool stays affordable."""
    return min(4, cores or 1)


DEFAULT_WEB_WORKERS = default_web_workers(os.cpu_count())


@dataclass(frozen=True)
class Settings:
    redis_url: str | None
    database_url: str | None
    broker_url: str | None
    api_keys: tuple[ApiKeySpec, ...] = ()
    data_dir: Path = Path(".emp")
    port: int = 8000
    embedded_redis_port: int = 6390
    events_maxlen: int = 100_000
    events_fast_path: bool = True
    relay_interval_s: float = 1.0
    broker_poll_s: float = 1.0
    progress_write_interval_s: float = 1.0
    max_body_bytes: int = 5 * 1024 * 1024
    rate_limit_per_minute: int = 6000
    max_workflow_steps: int = 1000
    lease_timeout_s: int = 60
    reconcile_interval_s: float = 5.0
    stranded_after_s: float = 30.0
    step_log_lines: int = 1000
    affinity: bool = True
    affinity_wait_ms: int = 500
    sim_model_load_s: float = 0.0
    connectors: tuple[ConnectorConfig, ...] = ()
    retry_base_s: float = 2.0
    retry_max_s: float = 300.0
    webhook_secret: str | None = None
    webhook_allow_private: bool = False
    webhook_retry_schedule: tuple[float, ...] = DEFAULT_WEBHOOK_SCHEDULE
    webhook_timeout_s: float = 10.0
    webhook_concurrency: int = 16
    webhook_per_target: int = 4
    worker_id: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    machine_id: str = field(default_factory=socket.gethostname)
    worker_concurrency: int = 1
    web_workers: int = DEFAULT_WEB_WORKERS
    web_threads: int = 32
    ws_ping_interval_s: float = 25.0
    ws_max_per_key: int = 16
    ws_max_per_process: int | None = None  # None: derived from web_threads
    metrics_token: str | None = None
    metrics_public: bool = False
    metrics_max_services: int = 50
    auth_failures_per_minute: int = 20
    trusted_proxy_hops: int = 0
    log_level: str = "INFO"
    storage_url: str | None = None  # None: file:// under data_dir (see storage_location)
    storage_endpoint_url: str | None = None
    storage_public_url: str | None = None
    storage_url_ttl_s: int = 604_800
    output_retention_days: float | None = None
    public_url: str | None = None  # None: http://127.0.0.1:<port>
    fetch_allow_private: bool = False
    emprops_api_url: str | None = None
    emprops_api_key: str | None = None
    emprops_timeout_s: float = 10.0
    emprops_retry_base_s: float = 1.0
    emprops_retry_max_s: float = 300.0

    @property
    def storage_location(self) -> str:
        """EMP_STORAGE_URL, or the `outputs` folder under the data folder as a file URL."""
        if self.storage_url and self.storage_url.rstrip("/") != "file:":
            return self.storage_url
        return (self.data_dir / "outputs").resolve().as_uri()

    @property
    def api_base_url(self) -> str:
        """Where clients reach the web process (EMP_PUBLIC_URL): the base of output links."""
        return (self.public_url or f"http://127.0.0.1:{self.port}").rstrip("/")

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Settings:
        env = dict(os.environ if env is None else env)
        redis_url = env.get("REDIS_URL") or None
        defaults = cls(redis_url=None, database_url=None, broker_url=None)
        return cls(
            redis_url=redis_url,
            database_url=env.get("DATABASE_URL") or None,
            broker_url=env.get("EMP_BROKER_URL") or redis_url,
            api_keys=parse_api_keys(env.get("EMP_API_KEYS", "")),
            data_dir=Path(env.get("EMP_DATA_DIR") or ".emp"),
            port=_int(env, "PORT", 8000, 1),
            embedded_redis_port=_int(env, "EMP_EMBEDDED_REDIS_PORT", 6390, 1),
            events_maxlen=_int(env, "EMP_EVENTS_MAXLEN", 100_000, 1),
            events_fast_path=_bool(env, "EMP_EVENTS_FAST_PATH", True),
            relay_interval_s=_float(env, "EMP_RELAY_INTERVAL_S", 1.0),
            # A BRPOP of 0 s would wait for ever (and never stop).
            broker_poll_s=_float(env, "EMP_BROKER_POLL_S", 1.0, above_zero=True),
            progress_write_interval_s=_float(env, "EMP_PROGRESS_WRITE_INTERVAL_S", 1.0),
            max_body_bytes=_int(env, "EMP_MAX_BODY_BYTES", 5 * 1024 * 1024, 1024),
            rate_limit_per_minute=_int(env, "EMP_RATE_LIMIT_PER_MINUTE", 6000),
            max_workflow_steps=_int(env, "EMP_MAX_WORKFLOW_STEPS", 1000, 1),
            lease_timeout_s=_int(env, "EMP_LEASE_TIMEOUT_S", 60, 1),
            reconcile_interval_s=_float(env, "EMP_RECONCILE_INTERVAL_S", 5.0),
            stranded_after_s=_float(env, "EMP_STRANDED_AFTER_S", 30.0),
            step_log_lines=_int(env, "EMP_STEP_LOG_LINES", 1000),
            affinity=_bool(env, "EMP_AFFINITY", True),
            affinity_wait_ms=_int(env, "EMP_AFFINITY_WAIT_MS", 500),
            sim_model_load_s=_float(env, "EMP_SIM_MODEL_LOAD_S", 0.0),
            connectors=_connectors(env.get("EMP_CONNECTORS", "")),
            retry_base_s=_float(env, "EMP_RETRY_BASE_S", 2.0),
            retry_max_s=_float(env, "EMP_RETRY_MAX_S", 300.0),
            webhook_secret=env.get("EMP_WEBHOOK_SECRET") or None,
            webhook_allow_private=_bool(env, "EMP_WEBHOOK_ALLOW_PRIVATE", False),
            webhook_retry_schedule=_schedule(env.get("EMP_WEBHOOK_RETRY_SCHEDULE", "")),
            webhook_timeout_s=_float(env, "EMP_WEBHOOK_TIMEOUT_S", 10.0),
            webhook_concurrency=_int(env, "EMP_WEBHOOK_CONCURRENCY", 16, 1),
            webhook_per_target=_int(env, "EMP_WEBHOOK_PER_TARGET", 4, 1),
            worker_id=env.get("EMP_WORKER_ID") or defaults.worker_id,
            machine_id=env.get("EMP_MACHINE_ID") or defaults.machine_id,
            worker_concurrency=_int(env, "EMP_WORKER_CONCURRENCY", 1, 1),
            web_workers=_int(env, "EMP_WEB_WORKERS", DEFAULT_WEB_WORKERS, 1),
            web_threads=_int(env, "EMP_WEB_THREADS", 32, 1),
            ws_ping_interval_s=_float(env, "EMP_WS_PING_INTERVAL_S", 25.0),
            ws_max_per_key=_int(env, "EMP_WS_MAX_PER_KEY", 16, 1),
            ws_max_per_process=(
                _int(env, "EMP_WS_MAX_PER_PROCESS", 0, 1)
                if env.get("EMP_WS_MAX_PER_PROCESS", "").strip()
                else None
            ),
            metrics_token=(env.get("EMP_METRICS_TOKEN") or "").strip() or None,
            metrics_public=_bool(env, "EMP_METRICS_PUBLIC", False),
            metrics_max_services=_int(env, "EMP_METRICS_MAX_SERVICES", 50, 1),
            auth_failures_per_minute=_int(env, "EMP_AUTH_FAILURES_PER_MINUTE", 20),
            trusted_proxy_hops=_int(env, "EMP_TRUSTED_PROXY_HOPS", 0),
            log_level=(env.get("EMP_LOG_LEVEL") or "INFO").upper(),
            storage_url=(env.get("EMP_STORAGE_URL") or "").strip() or None,
            storage_endpoint_url=(env.get("EMP_STORAGE_ENDPOINT_URL") or "").strip() or None,
            storage_public_url=(env.get("EMP_STORAGE_PUBLIC_URL") or "").strip() or None,
            storage_url_ttl_s=_int(env, "EMP_STORAGE_URL_TTL_S", 604_800, 1),
            output_retention_days=(
                _float(env, "EMP_OUTPUT_RETENTION_DAYS", 0.0)
                if (env.get("EMP_OUTPUT_RETENTION_DAYS") or "").strip()
                else None
            ),
            public_url=(env.get("EMP_PUBLIC_URL") or "").strip() or None,
            fetch_allow_private=_bool(env, "EMP_FETCH_ALLOW_PRIVATE", False),
            emprops_api_url=(env.get("EMPROPS_API_URL") or "").strip().rstrip("/") or None,
            emprops_api_key=(env.get("EMPROPS_API_KEY") or "").strip() or None,
            emprops_timeout_s=_float(env, "EMPROPS_TIMEOUT_S", 10.0) or 10.0,
            emprops_retry_base_s=_float(env, "EMPROPS_RETRY_BASE_S", 1.0),
            emprops_retry_max_s=_float(env, "EMPROPS_RETRY_MAX_S", 300.0),
        )

    @property
    def ws_sockets_per_process(self) -> int:
        """WebSockets one web process serves at once; the rest of its threads stay for REST.

        Each socket holds a web thread for its whole life, so at least one thread, and by
        default max(8, web_threads // 8), is never given to a socket.
        """
        reserve = max(8, self.web_threads // 8)
        derived = max(0, self.web_threads - reserve)
        wanted = derived if self.ws_max_per_process is None else self.ws_max_per_process
        return max(0, min(wanted, self.web_threads - 1))

    @property
    def embedded(self) -> bool:
        """True when either service URL is missing and the embedded one stands in."""
        return self.redis_url is None or self.database_url is None

    def with_urls(self, redis_url: str, database_url: str) -> Settings:
        return replace(
            self,
            redis_url=redis_url,
            database_url=database_url,
            broker_url=self.broker_url or redis_url,
        )


_settings: Settings | None = None
_scoped: ContextVar[Settings | None] = ContextVar("emp_scoped_settings", default=None)


def get_settings() -> Settings:
    """The settings in force: those of `scoped()` around this code, else the process's.

    The process's settings are parsed from the environment once and never start
    anything: a missing REDIS_URL / DATABASE_URL stays None here. Processes that
    need the embedded servers call `emp_tasks.embedded.bootstrap()` first.
    """
    global _settings
    scoped_settings = _scoped.get()
    if scoped_settings is not None:
        return scoped_settings
    if _settings is None:
        _settings = Settings.from_env()
    return _settings


@contextmanager
def scoped(settings: Settings) -> Iterator[Settings]:
    """`get_settings()` answers `settings` inside this block, in this thread's context only
    (an app created with its own settings wraps each of its requests in one)."""
    token = _scoped.set(settings)
    try:
        yield settings
    finally:
        _scoped.reset(token)


def reset_settings() -> None:
    """Forget cached settings (tests change the environment between app instances)."""
    global _settings
    _settings = None
