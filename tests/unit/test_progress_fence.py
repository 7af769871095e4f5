"""The ordering rule of progress events: a report of an attempt that is over is stale."""

from __future__ import annotations

from emp_tasks.core.events import ProgressFence


def event(event_type: str, attempt: int | None = None, step_id: str = "s-1") -> dict:
    data = {} if attempt is None else {"attempt": attempt}
    return {"id": f"{event_type}-{attempt}", "type": event_type, "step_id": step_id, "data": data}


def test_reports_of_the_running_attempt_are_admitted():
    fence = ProgressFence()
    assert fence.admits(event("step_assigned", 1))
    assert fence.admits(event("step_started", 1))
    assert fence.admits(event("step_progress", 1))


def test_a_late_report_of_a_superseded_attempt_is_refused():
    fence = ProgressFence()
    for each in ("step_assigned", "step_started"):
        fence.admits(event(each, 1))
    fence.admits(event("step_retrying", 1))
    assert not fence.admits(event("step_progress", 1))
    fence.admits(event("step_assigned", 2))
    assert not fence.admits(event("step_progress", 1))
    assert fence.admits(event("step_progress", 2))


def test_a_report_after_the_step_finished_is_refused():
    fence = ProgressFence()
    fence.admits(event("step_started", 1))
    fence.admits(event("step_completed", 1))
    assert not fence.admits(event("step_progress", 1))


def test_a_reader_that_saw_nothing_of_the_step_admits_its_reports():
    fence = ProgressFence()
    assert fence.admits(event("step_progress", 3))


def test_other_events_and_other_steps_always_pass():
    fence = ProgressFence()
    fence.admits(event("step_completed", 1))
    assert fence.admits(event("step_progress", 1, step_id="s-2"))
    assert fence.admits(event("workflow_completed", step_id=None))


def test_it_remembers_only_its_capacity_of_steps():
    fence = ProgressFence(capacity=2)
    for step_id in ("a", "b", "c"):
        fence.admits(event("step_completed", 1, step_id=step_id))
    assert fence.admits(event("step_progress", 1, step_id="a"))  # forgotten: admitted
    assert not fence.admits(event("step_progress", 1, step_id="c"))
