"""The values that cross process boundaries: their JSON shapes, and reading them back."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta, timezone
from types import SimpleNamespace

import pytest

from emp_tasks.connectors.base import FailureType, StepFailure
from emp_tasks.core.dispatch_instruction import DispatchInstruction
from emp_tasks.core.errors import StepError
from emp_tasks.core.events import ENVELOPE_VERSION, Envelope, EventType
from emp_tasks.core.priority import broker_priority

ENVELOPE_KEYS = [
    "id",
    "type",
    "version",
    "timestamp",
    "correlation_id",
    "step_id",
    "workflow_id",
    "machine_id",
    "worker_id",
    "customer_id",
    "data",
]


def a_step_event() -> Envelope:
    return Envelope.new(
        EventType.STEP_RETRYING,
        data={"attempt": 1, "error": {"code": "TIMEOUT"}},
        correlation_id="corr-1",
        step_id="step-1",
        workflow_id="wf-1",
        machine_id="machine-1",
        worker_id="worker-1",
        customer_id="cust-1",
    )


# --- event envelope ------------------------------------------------------------------------


def test_envelope_json_has_every_documented_key_in_order():
    event = a_step_event()
    assert list(event.to_json()) == ENVELOPE_KEYS
    assert event.to_json() == {
        "id": event.id,
        "type": "step_retrying",
        "version": ENVELOPE_VERSION,
        "timestamp": event.timestamp,
        "correlation_id": "corr-1",
        "step_id": "step-1",
        "workflow_id": "wf-1",
        "machine_id": "machine-1",
        "worker_id": "worker-1",
        "customer_id": "cust-1",
        "data": {"attempt": 1, "error": {"code": "TIMEOUT"}},
    }


def test_envelope_subjects_an_event_lacks_are_null_not_missing():
    event = Envelope.new(EventType.WORKER_ONLINE, data={"worker_id": "w"}, worker_id="w")
    assert list(event.to_json()) == ENVELOPE_KEYS
    assert event.step_id is None and event.to_json()["step_id"] is None


def test_new_envelope_has_a_fresh_id_and_the_time_in_milliseconds():
    before = time.time_ns() // 1_000_000
    first, second = a_step_event(), a_step_event()
    after = time.time_ns() // 1_000_000
    assert first.id != second.id
    assert before <= first.timestamp <= after
    assert isinstance(first.timestamp, int)


def test_envelope_round_trips_through_json():
    event = a_step_event()
    assert Envelope.from_json(event.to_json()) == event
    assert Envelope.from_json(json.loads(json.dumps(event.to_json()))) == event


def test_envelope_read_from_the_stream_ignores_what_transit_adds():
    event = a_step_event()
    received = {"stream_id": "1-0", "db": 3, **event.to_json()}
    assert Envelope.from_json(received) == event


def test_envelope_from_an_outbox_row():
    event = a_step_event()
    assert Envelope.from_row(SimpleNamespace(envelope=event.to_json())) == event


# --- dispatch instruction ------------------------------------------------------------------


def test_dispatch_instruction_json_shape():
    at = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    instruction = DispatchInstruction("step-1", "svc:sim", 4, at, "sim", "alice")
    assert instruction.to_json() == {
        "step_id": "step-1",
        "queue": "svc:sim",
        "priority": 4,
        "not_before": "2026-01-02T03:04:05.678901+00:00",
        "service": "sim",
        "customer_id": "alice",
    }


def test_a_dispatch_instruction_stored_before_service_and_customer_reads_back():
    stored = {"step_id": "step-1", "queue": "q", "priority": 2, "not_before": None}
    assert DispatchInstruction.from_json(stored) == DispatchInstruction("step-1", "q", 2)


def test_dispatch_instruction_without_a_start_time_sends_null():
    assert DispatchInstruction("step-1", "svc:sim", 4).to_json()["not_before"] is None


@pytest.mark.parametrize(
    "not_before",
    [
        None,
        datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
        datetime(2026, 1, 2, 3, 4, 5, 1, tzinfo=UTC),
        datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone(timedelta(hours=2))),
    ],
)
def test_dispatch_instruction_round_trips_through_json(not_before):
    instruction = DispatchInstruction("step-1", "svc:sim", 7, not_before)
    stored = json.loads(json.dumps(instruction.to_json()))
    assert DispatchInstruction.from_json(stored) == instruction
    assert DispatchInstruction.from_json(stored).to_json() == stored


def test_dispatch_instruction_from_an_outbox_row():
    instruction = DispatchInstruction("step-1", "svc:sim", 0, datetime.now(UTC))
    row = SimpleNamespace(dispatch=instruction.to_json())
    assert DispatchInstruction.from_row(row) == instruction


@pytest.mark.parametrize("continuation", [False, True])
@pytest.mark.parametrize("priority", [0, 50, 95, 100])
def test_dispatch_instruction_for_a_step_carries_the_broker_priority(priority, continuation):
    instruction = DispatchInstruction.for_step("step-1", "q", priority, None, continuation)
    assert instruction.priority == broker_priority(priority, continuation)


# --- step error ----------------------------------------------------------------------------


def test_step_error_json_has_code_message_type_retryable():
    error = StepError(code="TIMEOUT", message="too slow", type="timeout", retryable=True)
    assert error.to_json() == {
        "code": "TIMEOUT",
        "message": "too slow",
        "type": "timeout",
        "retryable": True,
    }
    assert list(error.to_json()) == ["code", "message", "type", "retryable"]


def test_step_error_detail_appears_only_when_there_is_one():
    error = StepError("CONNECTOR_ERROR", "boom", "system", True, detail="Traceback ...")
    assert error.to_json()["detail"] == "Traceback ..."
    assert "detail" not in StepError("X", "m", "system", True).to_json()


@pytest.mark.parametrize(
    "error",
    [
        StepError(code="EXPIRED", message="late", type="timeout", retryable=False),
        StepError(code="CONNECTOR_ERROR", message="x", type="system", retryable=True, detail="t"),
    ],
)
def test_step_error_round_trips_through_json(error):
    assert StepError.from_json(json.loads(json.dumps(error.to_json()))) == error


def test_connector_failure_becomes_the_step_error_it_always_was():
    failure = StepFailure("step exceeded its timeout of 5 s", type=FailureType.TIMEOUT)
    assert failure.as_error().to_json() == {
        "code": "STEP_FAILED",
        "message": "step exceeded its timeout of 5 s",
        "type": "timeout",
        "retryable": True,
    }
    assert failure.as_error("trace").to_json()["detail"] == "trace"
