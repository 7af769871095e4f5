"""The status rules: each enum's stored values, the step transition table, the named sets."""

from __future__ import annotations

import itertools

import pytest
from sqlalchemy.dialects import postgresql

from emp_tasks.core.errors import InvalidState
from emp_tasks.core.events import EventType
from emp_tasks.core.status import (
    ACTIVE_STEP_STATUSES,
    CLIENT_RETRYABLE_STEP_STATUSES,
    FINISHED_DELIVERY_STATUSES,
    LIVE_WORKER_STATUSES,
    NOT_STARTED_STEP_STATUSES,
    SCHEDULED_DELIVERY_STATUSES,
    STEP_TRANSITIONS,
    TERMINAL_STEP_STATUSES,
    TERMINAL_WORKFLOW_STATUSES,
    UNFINISHED_DELIVERY_STATUSES,
    UNFINISHED_STEP_STATUSES,
    DeliveryStatus,
    StepStatus,
    WorkerStatus,
    WorkflowStatus,
    step_may_become,
)
from emp_tasks.steps import transitions
from emp_tasks.store.models import Step, WebhookDelivery, Worker, Workflow

S = StepStatus

ALLOWED = [
    (S.WAITING, S.PENDING),
    (S.WAITING, S.CANCELLED),
    (S.WAITING, S.SKIPPED),
    (S.PENDING, S.ASSIGNED),
    (S.PENDING, S.CANCELLED),
    (S.PENDING, S.FAILED),
    (S.PENDING, S.SKIPPED),
    (S.ASSIGNED, S.RUNNING),
    (S.ASSIGNED, S.PENDING),
    (S.ASSIGNED, S.COMPLETED),
    (S.ASSIGNED, S.FAILED),
    (S.ASSIGNED, S.CANCELLED),
    (S.RUNNING, S.COMPLETED),
    (S.RUNNING, S.PENDING),
    (S.RUNNING, S.FAILED),
    (S.RUNNING, S.CANCELLED),
    (S.FAILED, S.PENDING),
    (S.CANCELLED, S.PENDING),
]
REFUSED = [pair for pair in itertools.product(StepStatus, repeat=2) if pair not in ALLOWED]


# --- stored values -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("enum", "values"),
    [
        (
            StepStatus,
            [
                "waiting",
                "pending",
                "assigned",
                "running",
                "completed",
                "failed",
                "cancelled",
                "skipped",
            ],
        ),
        (WorkflowStatus, ["pending", "running", "completed", "failed", "cancelled"]),
        (WorkerStatus, ["online", "draining", "offline", "removed"]),
        (DeliveryStatus, ["pending", "delivering", "retrying", "succeeded", "failed", "dead"]),
    ],
)
def test_each_status_enum_keeps_the_values_the_schema_stores(enum, values):
    assert [member.value for member in enum] == values


@pytest.mark.parametrize(
    ("model", "member"),
    [
        (Step, StepStatus.ASSIGNED),
        (Workflow, WorkflowStatus.CANCELLED),
        (Worker, WorkerStatus.DRAINING),
        (WebhookDelivery, DeliveryStatus.RETRYING),
    ],
)
def test_status_columns_store_the_value_in_varchar_20_and_read_back_the_enum(model, member):
    column_type = model.__table__.c.status.type
    dialect = postgresql.dialect()
    assert column_type.compile(dialect=dialect) == "VARCHAR(20)"
    bind = column_type.bind_processor(dialect)
    result = column_type.result_processor(dialect, None)
    stored = bind(member) if bind else member
    assert stored == member.value
    assert (bind(member.value) if bind else member.value) == member.value
    read = result(stored) if result else stored
    assert read is member


# --- the step transition table -------------------------------------------------------------


def test_transition_table_names_every_step_status():
    assert set(STEP_TRANSITIONS) == set(StepStatus)


@pytest.mark.parametrize(("current", "to"), ALLOWED)
def test_allowed_step_transition_is_in_the_table(current, to):
    assert step_may_become(current, to)
    assert step_may_become(current.value, to.value)


@pytest.mark.parametrize(("current", "to"), REFUSED)
def test_step_transition_not_in_the_table_is_refused(current, to):
    assert not step_may_become(current, to)


def test_completed_and_skipped_steps_never_change_again():
    assert STEP_TRANSITIONS[S.COMPLETED] == frozenset()
    assert STEP_TRANSITIONS[S.SKIPPED] == frozenset()


def test_a_finished_step_leaves_its_status_only_for_a_client_retry():
    for status in TERMINAL_STEP_STATUSES:
        expected = {S.PENDING} if status in CLIENT_RETRYABLE_STEP_STATUSES else set()
        assert STEP_TRANSITIONS[status] == expected


def test_refused_transition_raises_invalid_state_and_leaves_the_step_unchanged():
    step = Step(id="step-1", status=S.COMPLETED)
    with pytest.raises(InvalidState, match="step step-1 is completed; it cannot become pending"):
        transitions.apply_one(None, step, S.PENDING, EventType.STEP_RETRYING, {})  # type: ignore[arg-type]
    assert step.status == S.COMPLETED


def test_a_waiting_step_cannot_be_taken_by_a_worker():
    step = Step(id="step-2", status=S.WAITING)
    with pytest.raises(InvalidState):
        transitions.apply_one(None, step, S.ASSIGNED, EventType.STEP_ASSIGNED, {})  # type: ignore[arg-type]


@pytest.mark.parametrize("target", list(StepStatus))
def test_the_statuses_a_transition_updates_from_are_the_tables(target):
    """The UPDATE of a transition moves only rows whose status the table lets become it."""
    expected = {source for source, to in ALLOWED if to == target}
    assert transitions.statuses_into(target) == expected


# --- named sets ----------------------------------------------------------------------------


def test_every_step_status_is_either_terminal_or_unfinished():
    assert set(StepStatus) == TERMINAL_STEP_STATUSES | UNFINISHED_STEP_STATUSES
    assert not TERMINAL_STEP_STATUSES & UNFINISHED_STEP_STATUSES
    assert {S.WAITING, S.PENDING, S.ASSIGNED, S.RUNNING} == UNFINISHED_STEP_STATUSES


def test_unfinished_steps_are_either_not_started_or_active():
    assert NOT_STARTED_STEP_STATUSES | ACTIVE_STEP_STATUSES == UNFINISHED_STEP_STATUSES
    assert not NOT_STARTED_STEP_STATUSES & ACTIVE_STEP_STATUSES
    assert {S.ASSIGNED, S.RUNNING} == ACTIVE_STEP_STATUSES


def test_every_unfinished_step_may_be_cancelled():
    for status in UNFINISHED_STEP_STATUSES:
        assert S.CANCELLED in STEP_TRANSITIONS[status]


def test_only_failed_or_cancelled_steps_are_retried_by_a_client():
    assert {S.FAILED, S.CANCELLED} == CLIENT_RETRYABLE_STEP_STATUSES


def test_terminal_workflow_statuses():
    assert {
        WorkflowStatus.COMPLETED,
        WorkflowStatus.FAILED,
        WorkflowStatus.CANCELLED,
    } == TERMINAL_WORKFLOW_STATUSES


def test_live_workers_are_online_or_draining():
    assert {WorkerStatus.ONLINE, WorkerStatus.DRAINING} == LIVE_WORKER_STATUSES


def test_every_delivery_status_is_either_finished_or_unfinished():
    assert set(DeliveryStatus) == FINISHED_DELIVERY_STATUSES | UNFINISHED_DELIVERY_STATUSES
    assert not FINISHED_DELIVERY_STATUSES & UNFINISHED_DELIVERY_STATUSES
    assert {
        DeliveryStatus.SUCCEEDED,
        DeliveryStatus.FAILED,
        DeliveryStatus.DEAD,
    } == FINISHED_DELIVERY_STATUSES


def test_a_scheduled_delivery_is_unfinished_and_not_in_flight():
    assert {DeliveryStatus.PENDING, DeliveryStatus.RETRYING} == SCHEDULED_DELIVERY_STATUSES
    assert SCHEDULED_DELIVERY_STATUSES < UNFINISHED_DELIVERY_STATUSES
    assert DeliveryStatus.DELIVERING in UNFINISHED_DELIVERY_STATUSES - SCHEDULED_DELIVERY_STATUSES
