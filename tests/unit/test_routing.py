"""The routing rule: one queue per (service, requirements, customer), spelled one way,
and `unmet` — what a worker lacks to take a route's steps (emp_tasks/routes/routing.py)."""

from __future__ import annotations

import pytest

from emp_tasks.routes import routing
from emp_tasks.routes.capabilities import Capabilities

# --- the queue of a route ------------------------------------------------------------------


def test_queue_names_never_change_between_releases():
    # Recorded in the routes table and consumed by workers of every version: a new
    # digest would leave queued tasks on a queue nobody reads.
    assert routing.route_for("sdxl", {}, None).queue == "emp.sdxl.07c96b2de73c"
    assert routing.route_for("sdxl", {}, "acme").queue == "emp.sdxl.2ad46ff5eda0"
    assert (
        routing.route_for("sdxl", {"models": ["a", "b"], "gpu_memory_gb": 16}, "acme").queue
        == "emp.sdxl.aa0072ea7008"
    )


def test_equivalent_requirements_share_one_queue():
    spellings = [
        {"gpu_memory_gb": 16, "models": ["a", "b"]},
        {"models": ["b", "a", "a"], "gpu_memory_gb": 16.0},
        {"gpu_memory_gb": 16, "models": ["a", "b"], "region": None},
    ]
    assert len({routing.route_for("sdxl", r, "acme").queue for r in spellings}) == 1


def test_no_requirements_and_empty_requirements_share_one_queue():
    empty = routing.route_for("sdxl", {}, "acme")
    assert routing.route_for("sdxl", None, "acme") == empty
    assert routing.route_for("sdxl", {"models": [], "gpu_memory_gb": 0}, "acme") == empty


@pytest.mark.parametrize(
    ("other_service", "other_requirements", "other_customer"),
    [
        ("flux", {}, "acme"),
        ("sdxl", {"gpu_memory_gb": 24}, "acme"),
        ("sdxl", {"region": "eu"}, "acme"),
        ("sdxl", {}, "globex"),
        ("sdxl", {}, None),
    ],
)
def test_service_requirements_and_customer_each_make_a_route(
    other_service, other_requirements, other_customer
):
    base = routing.route_for("sdxl", {}, "acme")
    other = routing.route_for(other_service, other_requirements, other_customer)
    assert other.queue != base.queue
    assert other.queue.startswith(f"emp.{other_service}.")


def test_a_route_carries_its_service_customer_and_canonical_requirements():
    route = routing.route_for("sdxl", {"models": ["b", "a"], "gpu_memory_gb": 8.0}, "acme")
    assert (route.service, route.customer_id) == ("sdxl", "acme")
    assert route.requirements == {"gpu_memory_gb": 8, "models": ["a", "b"]}


# --- canonical requirements ----------------------------------------------------------------


def test_canonical_requirements_drop_nulls_and_empty_builtins():
    assert routing.canonical({"region": None, "models": [], "gpu_memory_gb": 0}) == {}
    assert routing.canonical(None) == {}


def test_canonical_models_are_sorted_once():
    assert routing.canonical({"models": ["b", "a", "b"]}) == {"models": ["a", "b"]}


def test_canonical_vram_is_a_whole_number_when_it_is_one():
    whole = routing.canonical({"gpu_memory_gb": 16.0})["gpu_memory_gb"]
    assert whole == 16 and isinstance(whole, int)
    assert routing.canonical({"gpu_memory_gb": 12.5}) == {"gpu_memory_gb": 12.5}


def test_canonical_keys_are_sorted_and_labels_kept_as_given():
    canonical = routing.canonical({"tier": ["gold"], "region": "eu", "gpu_memory_gb": 8})
    assert list(canonical) == ["gpu_memory_gb", "region", "tier"]
    assert canonical["tier"] == ["gold"]


def test_canonical_leaves_the_given_requirements_alone():
    given = {"models": ["b", "a"], "gpu_memory_gb": 16.0, "region": None}
    routing.canonical(given)
    assert given == {"models": ["b", "a"], "gpu_memory_gb": 16.0, "region": None}


# --- what a worker lacks -------------------------------------------------------------------


def unmet(caps: Capabilities, requirements=None, customer="acme", service="sdxl") -> list[str]:
    return routing.unmet(caps, routing.route_for(service, requirements, customer))


def test_a_worker_with_everything_required_lacks_nothing():
    caps = Capabilities(
        services=["sdxl"],
        gpu_memory_gb=16,
        models={"sdxl": ["base", "refiner"]},
        labels={"region": "eu"},
    )
    required = {"gpu_memory_gb": 16, "models": ["refiner", "base"], "region": "eu"}
    assert unmet(caps, required) == []


def test_a_worker_without_the_service_lacks_it():
    assert unmet(Capabilities(services=["flux"])) == ["service 'sdxl'"]


def test_vram_must_be_at_least_the_requirement():
    assert unmet(Capabilities(services=["sdxl"], gpu_memory_gb=24), {"gpu_memory_gb": 16}) == []
    assert unmet(Capabilities(services=["sdxl"], gpu_memory_gb=8), {"gpu_memory_gb": 16}) == [
        "gpu_memory_gb >= 16"
    ]
    assert unmet(Capabilities(services=["sdxl"]), {"gpu_memory_gb": 12.5}) == [
        "gpu_memory_gb >= 12.5"
    ]


def test_models_must_all_be_present_for_the_steps_service():
    caps = Capabilities(services=["sdxl", "flux"], models={"sdxl": ["base"], "flux": ["lora"]})
    assert unmet(caps, {"models": ["base"]}) == []
    assert unmet(caps, {"models": ["lora"]}) == ["models lora"]
    assert unmet(caps, {"models": ["base", "zeta", "alpha"]}) == ["models alpha, zeta"]


def test_a_label_must_equal_the_requirement_or_contain_it():
    caps = Capabilities(services=["sdxl"], labels={"region": "eu", "tier": ["gold", "silver"]})
    assert unmet(caps, {"region": "eu", "tier": "silver"}) == []
    assert unmet(caps, {"region": "us"}) == ['label region="us"']
    assert unmet(caps, {"tier": "bronze"}) == ['label tier="bronze"']
    assert unmet(caps, {"rack": 7}) == ["label rack=7"]


def test_strict_isolation_needs_a_strict_worker_serving_the_customer():
    loose = Capabilities(services=["sdxl"])
    strict = Capabilities(services=["sdxl"], isolation="strict", allowed_customers=["acme"])
    assert unmet(loose, {"customer_isolation": "strict"}) == ["customer_isolation strict"]
    assert unmet(strict, {"customer_isolation": "strict"}) == []
    assert unmet(strict, {"customer_isolation": "strict"}, customer="globex") == [
        "customer 'globex' (worker isolation)"
    ]


def test_a_strict_worker_serves_only_its_customers_even_without_the_requirement():
    strict = Capabilities(services=["sdxl"], isolation="strict", allowed_customers=["acme"])
    assert unmet(strict) == []
    assert unmet(strict, customer="globex") == ["customer 'globex' (worker isolation)"]
    assert unmet(strict, customer=None) == ["customer None (worker isolation)"]


def test_allowed_and_denied_customers_limit_a_loose_worker():
    allowing = Capabilities(services=["sdxl"], allowed_customers=["acme"])
    denying = Capabilities(services=["sdxl"], denied_customers=["globex"])
    assert unmet(allowing) == []
    assert unmet(allowing, customer="globex") == ["customer 'globex' (worker isolation)"]
    assert unmet(denying) == []
    assert unmet(denying, customer="globex") == ["customer 'globex' (worker isolation)"]


def test_everything_a_worker_lacks_is_named_in_one_answer():
    caps = Capabilities(services=["flux"], gpu_memory_gb=8, labels={"region": "eu"})
    required = {
        "gpu_memory_gb": 16,
        "models": ["base"],
        "customer_isolation": "strict",
        "region": "us",
    }
    assert unmet(caps, required) == [
        "service 'sdxl'",
        "gpu_memory_gb >= 16",
        "models base",
        "customer_isolation strict",
        'label region="us"',
    ]
