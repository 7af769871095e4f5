"""Worker capabilities (configuration, YAML, GPU discovery) and the routing rule.

`nvidia-smi` is outside the project: a fake one on PATH prints what the real one
prints for `--query-gpu=index,name,memory.total --format=csv,noheader,nounits`.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from emp_tasks.core.config import ConfigError
from emp_tasks.routes import capabilities, routing
from emp_tasks.routes.capabilities import Capabilities
from emp_tasks.routes.queues import warnings_for

FAKE_GPUS = "0, NVIDIA GeForce RTX 4090, 24564\n1, NVIDIA RTX A4000, 16376\n"


def fake_nvidia_smi(directory: Path, output: str = FAKE_GPUS) -> str:
    """A `nvidia-smi` that prints `output`; returns a PATH with it first."""
    script = directory / "nvidia-smi"
    script.write_text(f"#!/bin/sh\ncat <<'EOF'\n{output}EOF\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return f"{directory}{os.pathsep}{os.environ['PATH']}"


@pytest.fixture
def gpu_path(tmp_path) -> str:
    return fake_nvidia_smi(tmp_path)


def test_environment_configures_every_capability():
    caps = capabilities.configured(
        {
            "EMP_WORKER_SERVICES": "sdxl, flux",
            "EMP_WORKER_GPU_MEMORY_GB": "24",
            "EMP_WORKER_GPU_MODEL": "L4",
            "EMP_WORKER_MODELS": '{"sdxl": ["b.safetensors", "a.safetensors"]}',
            "EMP_WORKER_LABELS": '{"region": "eu", "tier": ["gold", "silver"]}',
            "EMP_WORKER_ISOLATION": "strict",
            "EMP_WORKER_ALLOWED_CUSTOMERS": "acme,globex",
            "EMP_WORKER_DENIED_CUSTOMERS": "initech",
        }
    )
    assert caps.services == ["sdxl", "flux"]
    assert caps.gpu_memory_gb == 24.0 and caps.gpu_model == "L4"
    assert caps.models == {"sdxl": ["a.safetensors", "b.safetensors"]}
    assert caps.labels == {"region": "eu", "tier": ["gold", "silver"]}
    assert caps.isolation == "strict" and caps.allowed_customers == ["acme", "globex"]
    assert caps.serves_customer("acme") and not caps.serves_customer("initech")
    assert not caps.serves_customer("other") and not caps.serves_customer(None)


def test_yaml_file_holds_the_same_keys_and_the_environment_wins(tmp_path):
    config = tmp_path / "worker.yaml"
    config.write_text(
        "services: [sdxl]\n"
        "gpu_memory_gb: 16\n"
        "EMP_WORKER_MODELS: {sdxl: [base]}\n"
        "labels: {region: us}\n"
        "denied_customers: [bob]\n"
    )
    caps = capabilities.configured(
        {"EMP_WORKER_CONFIG": str(config), "EMP_WORKER_GPU_MEMORY_GB": "20"}
    )
    assert caps.services == ["sdxl"] and caps.gpu_memory_gb == 20.0
    assert caps.models == {"sdxl": ["base"]} and caps.labels == {"region": "us"}
    assert caps.isolation == "loose" and not caps.serves_customer("bob")
    assert caps.serves_customer("alice")


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"EMP_WORKER_ISOLATION": "strict"}, "EMP_WORKER_ALLOWED_CUSTOMERS"),
        ({"EMP_WORKER_ISOLATION": "sometimes"}, "'loose' or 'strict'"),
        ({"EMP_WORKER_GPU_MEMORY_GB": "lots"}, "must be a number"),
        ({"EMP_WORKER_MODELS": '["a"]'}, "map services to model lists"),
        ({"EMP_WORKER_LABELS": "{nope"}, "is not JSON"),
        ({"EMP_WORKER_CONFIG": "/nonexistent/worker.yaml"}, "cannot be read"),
    ],
)
def test_bad_configuration_fails_at_start_with_the_setting_named(env, message):
    with pytest.raises(ConfigError, match=message):
        capabilities.configured(env)


def test_unknown_yaml_key_is_refused(tmp_path):
    config = tmp_path / "worker.yaml"
    config.write_text("gpu_memroy_gb: 16\n")
    with pytest.raises(ConfigError, match="unknown key 'gpu_memroy_gb'"):
        capabilities.configured({"EMP_WORKER_CONFIG": str(config)})


def test_gpu_facts_are_discovered_for_the_visible_gpu_only(gpu_path):
    caps = capabilities.discover({"PATH": gpu_path, "CUDA_VISIBLE_DEVICES": "1"})
    assert caps.gpu_count == 1
    assert caps.gpu_model == "NVIDIA RTX A4000" and caps.gpu_memory_gb == 16.0
    assert caps.discovered == ["gpu_memory_gb", "gpu_model"]
    assert caps.cuda_visible_devices == "1"
    both = capabilities.discover({"PATH": gpu_path})
    assert both.gpu_count == 2 and both.gpu_memory_gb == 16.0  # the smallest of those it sees


def test_configured_values_win_over_discovery_and_connectors_fill_models(gpu_path):
    caps = capabilities.discover(
        {
            "PATH": gpu_path,
            "EMP_WORKER_GPU_MEMORY_GB": "20",
            "EMP_WORKER_SERVICES": "a,b",
            "EMP_WORKER_MODELS": '{"a": ["configured"]}',
        },
        connector_models=lambda service: ["found-1", "found-0"],
    )
    assert caps.gpu_memory_gb == 20.0 and "gpu_memory_gb" not in caps.discovered
    assert caps.models == {"a": ["configured"], "b": ["found-0", "found-1"]}
    assert "models.b" in caps.discovered


def test_without_nvidia_smi_or_torch_no_gpu_is_advertised(tmp_path):
    caps = capabilities.discover({"PATH": str(tmp_path)})
    assert caps.gpu_count == 0 and caps.gpu_memory_gb is None


# --- routing ------------------------------------------------------------------------------


def test_one_queue_per_route_whatever_the_spelling():
    a = routing.route_for("sdxl", {"models": ["b", "a", "b"], "gpu_memory_gb": 16.0}, "acme")
    b = routing.route_for("sdxl", {"gpu_memory_gb": 16, "models": ["a", "b"], "x": None}, "acme")
    assert a == b and a.queue.startswith("emp.sdxl.")
    assert a.requirements == {"gpu_memory_gb": 16, "models": ["a", "b"]}
    assert (
        routing.route_for("sdxl", {}, "globex").queue != routing.route_for("sdxl", {}, "acme").queue
    )
    assert (
        routing.route_for("flux", {}, "acme").queue != routing.route_for("sdxl", {}, "acme").queue
    )


def test_unmet_names_each_missing_requirement():
    caps = Capabilities(
        services=["sdxl"],
        gpu_memory_gb=8,
        models={"sdxl": ["base"]},
        labels={"region": "eu", "tier": ["gold", "silver"]},
    )

    def unmet(requirements, customer="acme", service="sdxl"):
        return routing.unmet(caps, routing.route_for(service, requirements, customer))

    assert unmet({"gpu_memory_gb": 8, "models": ["base"], "region": "eu", "tier": "gold"}) == []
    assert unmet({}, service="flux") == ["service 'flux'"]
    assert unmet({"gpu_memory_gb": 16}) == ["gpu_memory_gb >= 16"]
    assert unmet({"models": ["base", "refiner", "lora"]}) == ["models lora, refiner"]
    assert unmet({"region": "us"}) == ['label region="us"']
    assert unmet({"tier": "bronze"}) == ['label tier="bronze"']
    assert unmet({"customer_isolation": "strict"}) == ["customer_isolation strict"]
    strict = Capabilities(services=["sdxl"], isolation="strict", allowed_customers=["acme"])
    assert (
        routing.unmet(strict, routing.route_for("sdxl", {"customer_isolation": "strict"}, "acme"))
        == []
    )
    assert routing.unmet(strict, routing.route_for("sdxl", {}, "globex")) == [
        "customer 'globex' (worker isolation)"
    ]


def test_warnings_name_what_no_worker_has():
    route = routing.route_for("sdxl", {"gpu_memory_gb": 16, "models": ["xl"]}, "acme")
    small_with_model = Capabilities(services=["sdxl"], gpu_memory_gb=8, models={"sdxl": ["xl"]})
    large_without = Capabilities(services=["sdxl"], gpu_memory_gb=24)
    large_with = Capabilities(services=["sdxl"], gpu_memory_gb=24, models={"sdxl": ["xl"]})

    assert warnings_for(route, [("online", large_with)]) == []
    none = warnings_for(route, [])
    assert none[0]["message"].startswith("no worker is online")
    shared = warnings_for(
        route, [("online", small_with_model), ("online", Capabilities(services=["sdxl"]))]
    )
    assert shared[0]["unmet"] == ["gpu_memory_gb >= 16"]
    split = warnings_for(route, [("online", small_with_model), ("online", large_without)])
    assert split[0]["unmet"] == ["gpu_memory_gb >= 16", "models xl"]
    assert split[0]["message"].startswith("no single online worker meets all of")
    draining = warnings_for(route, [("draining", large_with), ("online", large_without)])
    assert draining[0]["message"].startswith("every worker that can run this step is draining")
