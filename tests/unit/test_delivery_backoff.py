"""When a failed webhook delivery is tried again: EMP_WEBHOOK_RETRY_SCHEDULE with ±20 %
jitter, at least Retry-After (capped at a day), and `dead` after the last attempt
(emp_tasks/webhooks/delivery.py; README, "Webhooks")."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest

from emp_tasks.core import config
from emp_tasks.webhooks import delivery
from emp_tasks.webhooks.delivery import MAX_RETRY_AFTER_S, _next_delay, _retry_after


@pytest.fixture
def schedule():
    settings = config.Settings.from_env({"EMP_WEBHOOK_RETRY_SCHEDULE": "5,60,600"})
    with config.scoped(settings):
        yield settings.webhook_retry_schedule


@pytest.fixture
def no_jitter(monkeypatch):
    monkeypatch.setattr(random, "uniform", lambda low, high: 1.0)


# --- the schedule --------------------------------------------------------------------------


@pytest.mark.usefixtures("no_jitter")
def test_each_failed_attempt_waits_its_place_in_the_schedule(schedule):
    assert schedule == (5, 60, 600)
    assert [_next_delay(attempt, None) for attempt in (1, 2, 3)] == [5, 60, 600]


@pytest.mark.usefixtures("schedule", "no_jitter")
def test_after_the_last_scheduled_retry_no_attempt_is_left():
    assert _next_delay(4, None) is None
    assert _next_delay(4, 30) is None  # Retry-After does not buy another attempt


@pytest.mark.usefixtures("no_jitter")
def test_the_default_schedule_retries_seven_times_over_about_a_day():
    with config.scoped(config.Settings.from_env({})):
        delays = [_next_delay(attempt, None) for attempt in range(1, 9)]
    assert delays[-1] is None
    assert 20 * 3600 < sum(delays[:-1]) < 30 * 3600


# --- jitter --------------------------------------------------------------------------------


@pytest.mark.usefixtures("schedule")
def test_jitter_is_twenty_percent_either_way(monkeypatch):
    drawn: list[tuple[float, float]] = []

    def record(low: float, high: float) -> float:
        drawn.append((low, high))
        return low

    monkeypatch.setattr(random, "uniform", record)
    assert _next_delay(2, None) == pytest.approx(48)
    assert drawn == [(0.8, 1.2)]


@pytest.mark.usefixtures("schedule")
def test_jittered_delays_spread_within_the_bounds():
    delays = [_next_delay(2, None) for _ in range(500)]
    assert all(48 <= delay <= 72 for delay in delays)
    assert max(delays) - min(delays) > 5


# --- Retry-After ---------------------------------------------------------------------------


@pytest.mark.usefixtures("schedule", "no_jitter")
def test_retry_after_longer_than_the_schedule_is_waited():
    assert _next_delay(1, 120) == 120


@pytest.mark.usefixtures("schedule", "no_jitter")
def test_retry_after_shorter_than_the_schedule_changes_nothing():
    assert _next_delay(2, 10) == 60


@pytest.mark.usefixtures("schedule", "no_jitter")
def test_retry_after_is_honoured_for_at_most_a_day():
    assert MAX_RETRY_AFTER_S == 24 * 3600
    assert _next_delay(1, 30 * 24 * 3600) == 24 * 3600


def test_retry_after_in_seconds():
    assert _retry_after("120") == 120
    assert _retry_after("1.5") == 1.5
    assert _retry_after("-5") == 0


def test_retry_after_as_an_http_date(monkeypatch):
    now = datetime(2025, 6, 1, 12, 0, 0, tzinfo=UTC)
    monkeypatch.setattr(delivery, "_now", lambda: now)
    assert _retry_after(format_datetime(now + timedelta(minutes=5), usegmt=True)) == 300
    assert _retry_after(format_datetime(now - timedelta(minutes=5), usegmt=True)) == 0


@pytest.mark.parametrize("value", [None, "", "soon", "Someday, 99 Foo 2025"])
def test_a_missing_or_unreadable_retry_after_is_ignored(value):
    assert _retry_after(value) is None
