"""Which events go to which webhook targets, and the body each target receives
(emp_tasks/webhooks/endpoints.py; README, "Webhooks")."""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import pytest

from emp_tasks.store.models import WebhookEndpoint
from emp_tasks.webhooks.endpoints import Lookup, Target, body_for, targets_for

REGISTERED = datetime(2025, 1, 1, tzinfo=UTC)
LATER_MS = int((REGISTERED + timedelta(hours=1)).timestamp() * 1000)


def event(event_type: str, **fields) -> dict:
    """An event as the webhooks process reads it from `emp:events` (a progress report names
    its attempt, the first unless told)."""
    data = {"progress": 50.0, "attempt": 1} if event_type == "step_progress" else {}
    return {
        "id": "evt-1",
        "type": event_type,
        "version": 1,
        "timestamp": LATER_MS,
        "correlation_id": None,
        "step_id": None,
        "workflow_id": None,
        "machine_id": None,
        "worker_id": None,
        "customer_id": "acme",
        "data": data,
        **fields,
    }


def endpoint(endpoint_id: str = "ep-1", events=("*",), **fields) -> WebhookEndpoint:
    values = {
        "customer_id": "acme",
        "url": f"https://hooks.example.com/{endpoint_id}",
        "filters": {},
        "legacy_event_names": False,
        "created_at": REGISTERED,
        **fields,
    }
    return WebhookEndpoint(id=endpoint_id, events=list(events), **values)


def step_row(
    step_id="s-1",
    service="sdxl",
    webhook_url=None,
    webhook_events=None,
    status="running",
    attempts=1,
):
    """A step as Lookup.read selects it."""
    return SimpleNamespace(
        id=step_id,
        service=service,
        webhook_url=webhook_url,
        webhook_events=webhook_events,
        status=status,
        attempts=attempts,
    )


def workflow_row(workflow_id="wf-1", webhook_url=None, webhook_events=None):
    return SimpleNamespace(id=workflow_id, webhook_url=webhook_url, webhook_events=webhook_events)


def lookup(endpoints=(), steps=(), workflows=()) -> Lookup:
    by_customer: dict[str, list[WebhookEndpoint]] = {}
    for registered in endpoints:
        by_customer.setdefault(registered.customer_id, []).append(registered)
    return Lookup(
        steps={row.id: row for row in steps},
        workflows={row.id: row for row in workflows},
        endpoints=by_customer,
    )


def endpoint_ids(found: list[Target]) -> list[str | None]:
    return [target.endpoint_id for target in found]


# --- registered endpoints ------------------------------------------------------------------


def test_an_endpoint_receives_only_the_event_types_it_names():
    registry = lookup([endpoint(events=["step_completed"])], steps=[step_row()])
    assert endpoint_ids(targets_for(registry, event("step_completed", step_id="s-1"))) == ["ep-1"]
    assert targets_for(registry, event("step_failed", step_id="s-1")) == []


def test_a_star_endpoint_receives_every_event():
    registry = lookup([endpoint(events=["*"])], steps=[step_row()])
    assert endpoint_ids(targets_for(registry, event("step_progress", step_id="s-1"))) == ["ep-1"]
    for event_type in ("workflow_failed", "worker_offline", "webhook_test"):
        assert endpoint_ids(targets_for(registry, event(event_type))) == ["ep-1"]


def test_an_endpoint_may_name_events_by_their_legacy_job_names():
    registry = lookup([endpoint(events=["job_completed"])], steps=[step_row()])
    assert endpoint_ids(targets_for(registry, event("step_completed", step_id="s-1"))) == ["ep-1"]
    assert targets_for(registry, event("step_failed", step_id="s-1")) == []


def test_an_endpoint_receives_nothing_that_happened_before_it_was_registered():
    registry = lookup([endpoint()])
    before = int((REGISTERED - timedelta(seconds=1)).timestamp() * 1000)
    assert targets_for(registry, event("worker_offline", timestamp=before)) == []
    at_registration = int(REGISTERED.timestamp() * 1000)
    assert endpoint_ids(targets_for(registry, event("worker_offline", timestamp=at_registration)))


def test_an_endpoint_receives_only_its_own_customers_events():
    registry = lookup([endpoint("ep-acme"), endpoint("ep-globex", customer_id="globex")])
    assert endpoint_ids(targets_for(registry, event("webhook_test"))) == ["ep-acme"]
    assert endpoint_ids(targets_for(registry, event("webhook_test", customer_id="globex"))) == [
        "ep-globex"
    ]
    assert targets_for(registry, event("worker_offline", customer_id=None)) == []


def test_a_services_filter_passes_only_steps_of_those_services():
    registry = lookup(
        [endpoint(filters={"services": ["sdxl"]})],
        steps=[step_row("s-sdxl", "sdxl"), step_row("s-flux", "flux")],
    )
    assert endpoint_ids(targets_for(registry, event("step_completed", step_id="s-sdxl"))) == [
        "ep-1"
    ]
    assert targets_for(registry, event("step_completed", step_id="s-flux")) == []
    # A workflow's own events have no service: a services filter lets none through.
    assert targets_for(registry, event("workflow_completed", workflow_id="wf-1")) == []


def test_a_workflow_filter_passes_only_events_of_those_workflows():
    registry = lookup([endpoint(filters={"workflow_ids": ["wf-1"]})], steps=[step_row()])
    assert endpoint_ids(targets_for(registry, event("workflow_completed", workflow_id="wf-1")))
    assert endpoint_ids(
        targets_for(registry, event("step_completed", step_id="s-1", workflow_id="wf-1"))
    )
    assert targets_for(registry, event("workflow_completed", workflow_id="wf-2")) == []
    assert targets_for(registry, event("step_completed", step_id="s-1")) == []


def test_an_endpoint_target_carries_its_id_url_and_legacy_choice():
    registry = lookup([endpoint("ep-old", legacy_event_names=True), endpoint("ep-new")])
    assert targets_for(registry, event("webhook_test")) == [
        Target("endpoint:ep-old", "https://hooks.example.com/ep-old", "ep-old", True),
        Target("endpoint:ep-new", "https://hooks.example.com/ep-new", "ep-new", False),
    ]


# --- a step's or workflow's own webhook_url -------------------------------------------------


@pytest.mark.parametrize("event_type", ["step_completed", "step_failed", "step_cancelled"])
def test_a_steps_own_url_receives_its_terminal_events_by_default(event_type):
    registry = lookup(steps=[step_row(webhook_url="https://me.example.com/hook")])
    assert targets_for(registry, event(event_type, step_id="s-1")) == [
        Target("url:https://me.example.com/hook", "https://me.example.com/hook", None, False)
    ]


@pytest.mark.parametrize("event_type", ["step_submitted", "step_started", "step_progress"])
def test_a_steps_own_url_receives_no_other_events_by_default(event_type):
    registry = lookup(steps=[step_row(webhook_url="https://me.example.com/hook")])
    assert targets_for(registry, event(event_type, step_id="s-1")) == []


def test_a_steps_webhook_events_choose_what_its_url_receives():
    row = step_row(webhook_url="https://me.example.com/hook", webhook_events=["step_progress"])
    registry = lookup(steps=[row])
    assert len(targets_for(registry, event("step_progress", step_id="s-1"))) == 1
    assert targets_for(registry, event("step_completed", step_id="s-1")) == []


def test_a_workflows_own_url_receives_its_terminal_workflow_events_by_default():
    registry = lookup(workflows=[workflow_row(webhook_url="https://me.example.com/wf")])
    for event_type in ("workflow_completed", "workflow_failed", "workflow_cancelled"):
        assert targets_for(registry, event(event_type, workflow_id="wf-1")) == [
            Target("url:https://me.example.com/wf", "https://me.example.com/wf", None, False)
        ]
    assert targets_for(registry, event("workflow_step_completed", workflow_id="wf-1")) == []


def test_a_workflows_webhook_events_choose_what_its_url_receives():
    row = workflow_row(
        webhook_url="https://me.example.com/wf", webhook_events=["workflow_step_completed"]
    )
    registry = lookup(workflows=[row])
    assert len(targets_for(registry, event("workflow_step_completed", workflow_id="wf-1"))) == 1
    assert targets_for(registry, event("workflow_completed", workflow_id="wf-1")) == []


def test_a_workflows_own_url_receives_no_events_of_its_steps():
    registry = lookup(
        steps=[step_row()],
        workflows=[workflow_row(webhook_url="https://me.example.com/wf", webhook_events=["*"])],
    )
    assert targets_for(registry, event("step_completed", step_id="s-1", workflow_id="wf-1")) == []


def test_the_resources_own_url_comes_before_registered_endpoints():
    registry = lookup([endpoint()], steps=[step_row(webhook_url="https://me.example.com/hook")])
    assert [t.key for t in targets_for(registry, event("step_completed", step_id="s-1"))] == [
        "url:https://me.example.com/hook",
        "endpoint:ep-1",
    ]


# --- the body ------------------------------------------------------------------------------


def test_the_body_is_the_standard_webhooks_shape():
    body = body_for(event("step_completed", timestamp=1_700_000_000_123, data={"n": 1}), False)
    assert body == {
        "id": "evt-1",
        "type": "step_completed",
        "timestamp": "2023-11-14T22:13:20.123000Z",
        "data": {"n": 1, "customer_id": "acme"},
    }


def test_a_whole_second_timestamp_has_no_fraction():
    assert body_for(event("webhook_test", timestamp=1_700_000_000_000), False)["timestamp"] == (
        "2023-11-14T22:13:20Z"
    )


def test_the_events_subjects_are_copied_into_data_when_present():
    subjects = {
        "step_id": "s-1",
        "workflow_id": "wf-1",
        "machine_id": "m-1",
        "worker_id": "w-1",
        "customer_id": "acme",
        "correlation_id": "c-1",
    }
    assert body_for(event("step_completed", **subjects), False)["data"] == subjects
    assert body_for(event("worker_offline", customer_id=None), False)["data"] == {}


def test_data_the_event_carries_wins_over_its_subjects():
    data = {"worker_id": "as-recorded", "result": [1]}
    body = body_for(event("worker_offline", worker_id="w-1", data=data), False)
    assert body["data"] == {"worker_id": "as-recorded", "result": [1], "customer_id": "acme"}


def test_building_a_body_leaves_the_event_alone():
    original = event("step_completed", step_id="s-1", data={"result": {"x": 1}})
    kept = copy.deepcopy(original)
    body_for(original, True)
    assert original == kept


def test_legacy_targets_get_job_names_and_a_job_id():
    body = body_for(event("step_completed", step_id="s-1"), True)
    assert body["type"] == "job_completed"
    assert body["data"]["job_id"] == "s-1" == body["data"]["step_id"]


def test_legacy_targets_get_events_without_a_job_name_unchanged():
    body = body_for(event("workflow_completed", workflow_id="wf-1"), True)
    assert body["type"] == "workflow_completed"
    assert "job_id" not in body["data"]


def test_other_targets_get_step_names_and_no_job_id():
    body = body_for(event("step_completed", step_id="s-1"), False)
    assert body["type"] == "step_completed"
    assert "job_id" not in body["data"]


def progress_event(attempt: int) -> dict:
    return {
        "id": f"ev-progress-{attempt}",
        "type": "step_progress",
        "timestamp": 1_900_000_000_000,
        "step_id": "s-1",
        "customer_id": "alice",
        "data": {"progress": 50.0, "stage": None, "message": None, "attempt": attempt},
    }


def test_progress_of_the_running_attempt_goes_to_its_targets():
    found = lookup(
        steps=[
            step_row(
                webhook_url="https://hooks.example.com/own",
                webhook_events=["step_progress"],
                attempts=2,
            )
        ]
    )
    assert [t.url for t in targets_for(found, progress_event(2))] == [
        "https://hooks.example.com/own"
    ]


def test_progress_of_a_superseded_attempt_goes_nowhere():
    own = step_row(
        webhook_url="https://hooks.example.com/own", webhook_events=["step_progress"], attempts=2
    )
    assert targets_for(lookup(steps=[own]), progress_event(1)) == []


def test_progress_of_a_finished_step_goes_nowhere():
    done = step_row(
        webhook_url="https://hooks.example.com/own",
        webhook_events=["step_progress"],
        status="completed",
    )
    assert targets_for(lookup(steps=[done]), progress_event(1)) == []
