"""Step lifecycle guarantees under failure: retries, timeouts, deadlines, cancellation,
priorities, worker crashes and Redis loss, with real worker processes and real kills.

Each test that needs a quiet worker starts its own, on a service of its own (mapped
to the simulation connector with EMP_CONNECTORS), so other tests' steps never
interleave with its queue.
"""

from __future__ import annotations

import json
from datetime import datetime

from sqlalchemy import select

from bench import scratch
from emp_tasks.core.dispatch_instruction import DispatchInstruction
from emp_tasks.core.priority import broker_priority
from emp_tasks.store import db, dispatch, redisdb
from emp_tasks.store.models import Attempt, Step
from tests.conftest import (
    headers,
    kill_9,
    stream_events,
    wait_for,
    wait_for_status,
)


def submit(client, service: str, payload: dict | None = None, **fields) -> str:
    body = {"service": service, "payload": payload or {}, **fields}
    response = client.post("/api/steps", json=body, headers=headers())
    assert response.status_code == 201, response.get_json()
    return response.get_json()["step_id"]


def attempts_of(step_id: str) -> list[Attempt]:
    with db.transaction() as session:
        return list(
            session.scalars(
                select(Attempt).where(Attempt.step_id == step_id).order_by(Attempt.attempt)
            )
        )


def types(step_id: str) -> list[str]:
    return [event["type"] for event in stream_events(step_id)]


# --- retries -------------------------------------------------------------------------------


def test_step_failing_twice_retryably_completes_on_the_third_attempt(client, system):
    step_id = submit(client, "simulation", {"fail": "retryable", "fail_attempts": 2})
    step = wait_for_status(client, step_id, {"completed", "failed"})
    assert step["status"] == "completed"
    assert step["attempts"] == 3
    wait_for(lambda: "step_completed" in types(step_id))
    seen = types(step_id)
    assert seen.count("step_retrying") == 2
    assert seen.count("step_completed") == 1
    assert "step_failed" not in seen
    retrying = [e for e in stream_events(step_id) if e["type"] == "step_retrying"]
    assert [e["data"]["attempt"] for e in retrying] == [1, 2]
    assert all(e["data"]["error"]["retryable"] for e in retrying)
    assert all(e["data"]["retry_at"] for e in retrying)
    rows = attempts_of(step_id)
    assert [(r.attempt, r.outcome) for r in rows] == [
        (1, "failed"),
        (2, "failed"),
        (3, "completed"),
    ]
    assert all(r.worker_id and r.machine_id and r.started_at and r.finished_at for r in rows)
    assert rows[0].error["type"] == "service"
    listed = client.get(f"/api/steps/{step_id}/attempts", headers=headers()).get_json()
    assert [(a["attempt"], a["outcome"]) for a in listed["attempts"]] == [
        (1, "failed"),
        (2, "failed"),
        (3, "completed"),
    ]
    assert listed["attempts"][0]["error"]["code"] == "SIMULATED_FAILURE"
    history = client.get(f"/api/steps/{step_id}/events", headers=headers()).get_json()
    assert [e["type"] for e in history["events"]] == types(step_id)
    assert client.get(f"/api/steps/{step_id}/attempts", headers=headers("bob")).status_code == 404


def test_fatal_failure_fails_at_once_without_retry(client, system):
    step_id = submit(client, "simulation", {"fail": "fatal"}, max_retries=5)
    step = wait_for_status(client, step_id, {"completed", "failed"})
    assert step["status"] == "failed"
    assert step["attempts"] == 1
    assert step["error"]["retryable"] is False
    assert step["error"]["type"] == "validation"
    wait_for(lambda: "step_failed" in types(step_id))
    failed = [e for e in stream_events(step_id) if e["type"] == "step_failed"]
    assert failed[0]["data"]["error"] == step["error"]
    assert failed[0]["data"]["attempts"] == 1
    assert "step_retrying" not in types(step_id)


def test_retries_stop_after_max_retries(client, system):
    step_id = submit(client, "simulation", {"fail": "retryable"}, max_retries=1)
    step = wait_for_status(client, step_id, {"completed", "failed"})
    assert step["status"] == "failed"
    assert step["attempts"] == 2
    wait_for(lambda: "step_failed" in types(step_id))
    assert types(step_id).count("step_retrying") == 1


# --- timeouts and deadlines ----------------------------------------------------------------


def test_timed_out_step_fails_as_timeout_and_is_retried(client, system):
    step_id = submit(client, "simulation", {"duration_s": 30}, timeout_s=0.5, max_retries=1)
    step = wait_for_status(client, step_id, {"completed", "failed"})
    assert step["status"] == "failed"
    assert step["attempts"] == 2
    assert step["error"]["code"] == "TIMEOUT"
    assert step["error"]["type"] == "timeout"
    assert step["error"]["retryable"] is True
    assert [r.error["type"] for r in attempts_of(step_id)] == ["timeout", "timeout"]
    wait_for(lambda: "step_failed" in types(step_id))
    assert types(step_id).count("step_retrying") == 1


def test_timed_out_worker_is_free_for_the_next_step(client, start_worker):
    start_worker("timeout-sim", "timeout-1")
    slow = submit(client, "timeout-sim", {"duration_s": 30}, timeout_s=0.3, max_retries=0)
    quick = submit(client, "timeout-sim")
    assert wait_for_status(client, slow, {"failed"})["error"]["code"] == "TIMEOUT"
    assert wait_for_status(client, quick, {"completed"})["worker_id"] == "timeout-1"


def test_step_past_its_queue_deadline_never_starts(client, start_worker):
    start_worker("deadline-sim", "deadline-1")
    blocker = submit(client, "deadline-sim", {"duration_s": 1.5})
    wait_for_status(client, blocker, {"running"})
    late = submit(client, "deadline-sim", expires_in_s=0.3)
    step = wait_for_status(client, late, {"failed", "completed"})
    assert step["status"] == "failed"
    assert step["error"]["code"] == "EXPIRED"
    assert step["error"]["retryable"] is False
    assert step["attempts"] == 0 and step["started_at"] is None
    assert "step_started" not in types(late)
    assert attempts_of(late) == []


def test_unserved_step_past_its_deadline_is_failed_by_the_reconciler(client, system):
    step_id = submit(client, "nobody-serves-this", expires_in_s=0.2)
    step = wait_for_status(client, step_id, {"failed"}, timeout_s=15)
    assert step["error"]["code"] == "EXPIRED"


# --- cancellation --------------------------------------------------------------------------


def test_cancelled_pending_step_never_starts(client, start_worker):
    start_worker("cancel-pending-sim", "cancel-pending-1")
    blocker = submit(client, "cancel-pending-sim", {"duration_s": 1})
    wait_for_status(client, blocker, {"running"})
    queued = submit(client, "cancel-pending-sim")
    assert client.post(f"/api/steps/{queued}/cancel", headers=headers()).status_code == 200
    after = submit(client, "cancel-pending-sim")
    wait_for_status(client, after, {"completed"})
    step = client.get(f"/api/steps/{queued}", headers=headers()).get_json()["step"]
    assert step["status"] == "cancelled"
    assert step["attempts"] == 0 and step["started_at"] is None
    assert attempts_of(queued) == []


def test_running_step_stops_within_two_seconds_and_frees_its_worker(client, start_worker):
    start_worker("cancel-running-sim", "cancel-running-1")
    running = submit(client, "cancel-running-sim", {"duration_s": 60})
    wait_for_status(client, running, {"running"})
    queued = submit(client, "cancel-running-sim")
    response = client.post(
        f"/api/steps/{running}/cancel", json={"reason": "user"}, headers=headers()
    )
    cancelled = response.get_json()["step"]
    assert cancelled["status"] == "cancelled"
    nxt = wait_for_status(client, queued, {"completed"})
    # The worker (concurrency 1) only takes the next step once the cancelled one stopped.
    stopped_by = datetime.fromisoformat(cancelled["completed_at"])
    freed_at = datetime.fromisoformat(nxt["started_at"])
    assert (freed_at - stopped_by).total_seconds() < 2
    assert [r.outcome for r in attempts_of(running)] == ["cancelled"]
    wait_for(lambda: "step_cancelled" in types(running))
    assert "step_completed" not in types(running)


# --- priorities ----------------------------------------------------------------------------


def test_broker_priority_mapping_inverts_and_spans_ten_levels():
    assert broker_priority(100) == 0
    assert broker_priority(0) == 9
    assert broker_priority(90) < broker_priority(50) < broker_priority(10)
    assert sorted({broker_priority(p) for p in range(101)}) == list(range(10))


def test_workflow_continuation_is_queued_one_level_above_its_priority():
    for priority in (0, 10, 50, 89):
        plain = broker_priority(priority)
        assert broker_priority(priority, continuation=True) == plain - 1
    assert broker_priority(100, continuation=True) == 0


def test_higher_priority_runs_first_over_a_backlog(client, start_worker):
    start_worker("prio-sim", "prio-1")
    blocker = submit(client, "prio-sim", {"duration_s": 2})
    wait_for_status(client, blocker, {"running"})
    backlog = [submit(client, "prio-sim", priority=p) for p in [10, 50, 30, 70, 20] * 4]
    urgent = submit(client, "prio-sim", priority=90)
    for step_id in [*backlog, urgent]:
        wait_for_status(client, step_id, {"completed"})
    with db.transaction() as session:
        rows = session.execute(
            select(Step.id, Step.priority, Step.started_at)
            .where(Step.id.in_([*backlog, urgent]))
            .order_by(Step.started_at)
        ).all()
    order = [row.priority for row in rows]
    assert rows[0].id == urgent
    assert order == sorted(order, reverse=True), order


# --- crashes and redelivery ----------------------------------------------------------------


def test_killed_worker_step_completes_on_another_worker_exactly_once(client, start_worker):
    doomed = start_worker("crash-sim", "crash-doomed")
    step_id = submit(client, "crash-sim", {"duration_s": 2})
    assert wait_for_status(client, step_id, {"running"})["worker_id"] == "crash-doomed"
    kill_9(doomed)
    start_worker("crash-sim", "crash-survivor")
    step = wait_for_status(client, step_id, {"completed", "failed"}, timeout_s=60)
    assert step["status"] == "completed"
    assert step["attempts"] == 2
    assert step["worker_id"] == "crash-survivor"
    wait_for(lambda: "step_completed" in types(step_id))
    seen = types(step_id)
    assert seen.count("step_completed") == 1
    assert seen.count("step_retrying") == 1
    lost = [e for e in stream_events(step_id) if e["type"] == "step_retrying"][0]
    assert lost["data"]["error"]["code"] == "WORKER_LOST"
    assert [(r.attempt, r.outcome, r.worker_id) for r in attempts_of(step_id)] == [
        (1, "lost", "crash-doomed"),
        (2, "completed", "crash-survivor"),
    ]


def test_late_result_of_a_superseded_attempt_is_ignored(client, start_worker):
    from emp_tasks.core.errors import StepError
    from emp_tasks.steps import attempts

    doomed = start_worker("late-sim", "late-doomed")
    step_id = submit(client, "late-sim", {"duration_s": 30})
    wait_for_status(client, step_id, {"running"})
    kill_9(doomed)
    start_worker("late-sim", "late-survivor")
    wait_for(lambda: (a := attempts_of(step_id)) and len(a) == 2 and a)
    assert attempts.complete(step_id, 1, {"stale": True}, 1) is False
    assert attempts.report_progress(step_id, 1, 99.0) is False
    late = StepError(code="X", message="late failure", type="system", retryable=True)
    assert attempts.fail(step_id, 1, late).status is None
    step = client.get(f"/api/steps/{step_id}", headers=headers()).get_json()["step"]
    assert step["result"] is None and step["attempts"] == 2 and step["status"] == "running"
    client.post(f"/api/steps/{step_id}/cancel", headers=headers())


def test_a_step_outside_a_workflow_completes_in_one_statement_with_its_event(client):
    """The fast completion (a worker's, with its run's subjects) is one autocommitted
    statement: the fenced UPDATE, the attempt's close and the event together, or none."""
    import pytest

    from emp_tasks.steps import attempts
    from emp_tasks.store import outbox, publishing

    step_id = submit(client, "one-statement-sim")
    run = attempts.begin(step_id, "one-statement-worker", "one-statement-machine")
    assert run is not None and run.workflow_id is None and run.subjects is not None
    stale = {"workflow_id": None, "subjects": run.subjects}
    assert attempts.complete(step_id, run.attempt + 1, {"stale": True}, 1, **stale) is False
    with db.tx() as tx:
        recorded = [event["type"] for event in outbox.for_step(tx, step_id)]
    assert recorded == ["step_submitted", "step_assigned", "step_started"]

    assert attempts.complete(step_id, run.attempt, {"image": "x.png"}, 12, **stale) is True
    assert publishing.flush(5.0)
    with db.tx() as tx:
        rows = outbox.for_step(tx, step_id)
        step = tx.one(
            "SELECT status, result, progress, lease_expires_at FROM steps WHERE id = %s", [step_id]
        )
    assert [event["type"] for event in rows] == recorded + ["step_completed"]
    completed = rows[-1]
    assert completed["data"] == {"result": {"image": "x.png"}, "duration_ms": 12, "attempt": 1}
    assert completed["worker_id"] == "one-statement-worker"
    assert completed["stream_id"] is not None
    assert step.status == "completed" and step.result == {"image": "x.png"}
    assert step.progress == 100.0 and step.lease_expires_at is None
    published = [e for e in stream_events(step_id) if e["type"] == "step_completed"]
    assert [e["id"] for e in published] == [completed["id"]]
    assert [(r.attempt, r.outcome) for r in attempts_of(step_id)] == [(1, "completed")]
    # and a second completion of the same attempt changes nothing
    assert attempts.complete(step_id, run.attempt, {"again": True}, 1, **stale) is False
    with db.tx() as tx:
        assert len(outbox.for_step(tx, step_id)) == 4

    with pytest.raises(RuntimeError, match="one statement"), db.tx(single=True) as tx:
        tx.one("SELECT 1")
        tx.one("SELECT 2")


def test_a_begin_in_one_statement_records_its_events_as_the_row_completes_them(client):
    """Without capabilities to check, `begin` is one autocommitted statement: the
    envelopes it stores are completed from the row (subjects, attempt, the step's own
    webhook), and what is published is what is stored."""
    from emp_tasks.steps import attempts
    from emp_tasks.store import outbox, publishing

    body = {
        "service": "begin-at-once-sim",
        "webhook_url": "http://127.0.0.1:9/hook",
        "webhook_events": ["step_started", "step_completed"],
    }
    response = client.post(
        "/api/steps", json=body, headers=headers(**{"X-Correlation-ID": "corr-at-once"})
    )
    assert response.status_code == 201, response.get_json()
    step_id = response.get_json()["step_id"]
    run = attempts.begin(step_id, "at-once-worker", "at-once-machine")
    assert run is not None and run.attempt == 1 and run.subjects.correlation_id == "corr-at-once"
    assert publishing.flush(5.0)
    with db.tx() as tx:
        stored = {e["type"]: e for e in outbox.for_step(tx, step_id)}
        flags = dict(tx.all("SELECT type, webhook FROM events WHERE step_id = %s", [step_id]))
    submitted, assigned, started = (
        stored["step_submitted"],
        stored["step_assigned"],
        stored["step_started"],
    )
    for event in (assigned, started):
        assert event["correlation_id"] == "corr-at-once"
        assert event["customer_id"] == submitted["customer_id"] is not None
        assert event["workflow_id"] is None and event["step_id"] == step_id
        assert event["worker_id"] == "at-once-worker"
        assert event["machine_id"] == "at-once-machine"
    assert assigned["data"] == {
        "worker_id": "at-once-worker",
        "machine_id": "at-once-machine",
        "attempt": 1,
    }
    assert started["data"] == {"attempt": 1}
    assert flags == {"step_submitted": False, "step_assigned": False, "step_started": True}
    entries = {
        fields["type"]: (stream_id, fields)
        for stream_id, fields in redisdb.client().xrange("emp:events", "-", "+")
        if f'"{step_id}"' in fields["event"]
    }
    for event in (assigned, started):
        stream_id, fields = entries[event["type"]]
        assert event["stream_id"] == stream_id
        assert {**json.loads(fields["event"]), "stream_id": stream_id} == event
    assert entries["step_started"][1]["webhook"] == "1"
    assert entries["step_assigned"][1]["webhook"] == "0"
    # a second begin (a redelivered task) changes nothing and records nothing
    assert attempts.begin(step_id, "at-once-worker", "at-once-machine") is None
    with db.tx() as tx:
        assert len(outbox.for_step(tx, step_id)) == 3


def test_a_workflow_step_begun_in_one_statement_starts_its_workflow(client):
    from emp_tasks.steps import attempts

    body = {"name": "at once", "steps": [{"service": "begin-at-once-flow"}]}
    response = client.post("/api/workflows", json=body, headers=headers())
    assert response.status_code == 201, response.get_json()
    workflow_id = response.get_json()["workflow_id"]
    with db.tx() as tx:
        step_id = tx.one("SELECT id FROM steps WHERE workflow_id = %s", [workflow_id]).id
        assert tx.one("SELECT status FROM workflows WHERE id = %s", [workflow_id]).status == (
            "pending"
        )
    run = attempts.begin(step_id, "at-once-worker", "at-once-machine")
    assert run is not None and run.workflow_id == workflow_id
    with db.tx() as tx:
        workflow = tx.one("SELECT status, started_at FROM workflows WHERE id = %s", [workflow_id])
    assert workflow.status == "running" and workflow.started_at is not None


def test_a_worker_begins_at_once_only_in_queues_it_was_found_to_serve(client):
    """With capabilities, the first step of a queue is checked the long way; later steps
    of that queue begin in one statement, and a step needing more is still refused."""
    import pytest

    from emp_tasks.routes.capabilities import Capabilities
    from emp_tasks.steps import attempts

    caps = Capabilities(services=["caps-at-once"], gpu_memory_gb=8)
    first, second = (submit(client, "caps-at-once") for _ in range(2))
    needy = submit(client, "caps-at-once", requirements={"gpu_memory_gb": 24})
    with db.tx() as tx:
        queue_of = dict(tx.all("SELECT id, queue FROM steps WHERE id = ANY(%s)", [[first, needy]]))
    assert attempts.begin(first, "caps-worker", "caps-machine", caps=caps) is not None
    assert attempts._servable_queues[id(caps)] == {queue_of[first]}
    assert attempts.begin(second, "caps-worker", "caps-machine", caps=caps).attempt == 1
    with pytest.raises(attempts.NotServable):
        attempts.begin(needy, "caps-worker", "caps-machine", caps=caps)
    with db.tx() as tx:
        rows = tx.all(
            "SELECT id, status, attempts FROM steps WHERE id = ANY(%s)", [[first, second, needy]]
        )
        needy_events = tx.all("SELECT type FROM events WHERE step_id = %s", [needy])
    assert {row.id: (row.status, row.attempts) for row in rows} == {
        first: ("running", 1),
        second: ("running", 1),
        needy: ("pending", 0),
    }
    assert [row.type for row in needy_events] == ["step_submitted"]
    assert attempts._servable_queues[id(caps)] == {queue_of[first]}


def test_a_steps_own_webhook_rule_reads_the_same_in_sql():
    """`own_webhook_wants_sql`, used by statements that record events from their rows,
    answers as `own_webhook_wants` does."""
    from psycopg.types.json import Jsonb

    from emp_tasks.webhooks import endpoints as webhooks

    defaults = webhooks.TERMINAL_STEP_EVENTS
    sql = webhooks.own_webhook_wants_sql(
        "%(url)s::varchar", "%(events)s::jsonb", "%(type)s", defaults
    )
    cases = [
        (url, events, event_type)
        for url in (None, "", "https://example.com/hook")
        for events in (None, [], ["step_started"], ["step_completed", "step_progress"])
        for event_type in ("step_started", "step_completed", "step_assigned")
    ]
    with db.tx() as tx:
        for url, events, event_type in cases:
            params = {"url": url, "events": Jsonb(events), "type": event_type}
            answer = tx.one(f"SELECT {sql} AS wants", params).wants
            assert answer is webhooks.own_webhook_wants(url, events, event_type, defaults), (
                url,
                events,
                event_type,
            )


def test_redelivered_task_does_not_run_the_step_twice(client, start_worker):
    start_worker("redeliver-sim", "redeliver-1", concurrency=2)
    step_id = submit(client, "redeliver-sim", {"duration_s": 1})
    running = wait_for_status(client, step_id, {"running"})
    spec = DispatchInstruction.for_step(step_id, running["queue"], 50)
    dispatch.send(spec)  # what Redis' visibility timeout would do: the same task again
    step = wait_for_status(client, step_id, {"completed"})
    dispatch.send(spec)  # and once more after completion
    after = submit(client, "redeliver-sim")
    wait_for_status(client, after, {"completed"})
    assert client.get(f"/api/steps/{step_id}", headers=headers()).get_json()["step"] == step
    assert step["attempts"] == 1
    assert types(step_id).count("step_started") == 1
    assert types(step_id).count("step_completed") == 1


# --- Redis loss ----------------------------------------------------------------------------


def test_flushing_redis_mid_run_loses_no_accepted_step(client, start_worker):
    start_worker("flush-sim", "flush-1", concurrency=2)
    step_ids = [submit(client, "flush-sim", {"duration_s": 0.3}) for _ in range(12)]
    wait_for(
        lambda: any(
            client.get(f"/api/steps/{s}", headers=headers()).get_json()["step"]["status"]
            == "completed"
            for s in step_ids
        )
    )
    client_ = redisdb.client()
    claim = client_.get(scratch.REDIS_LOCK)  # this run's hold on its Redis database
    client_.flushdb()  # queued tasks, the event stream, heartbeats: all gone
    client_.set(scratch.REDIS_LOCK, claim, ex=scratch.LOCK_TTL_S)
    for step_id in step_ids:
        step = wait_for_status(client, step_id, {"completed", "failed"}, timeout_s=60)
        assert step["status"] == "completed"
    assert redisdb.client().exists(dispatch.EPOCH_KEY)
