"""The step retry delay: EMP_RETRY_BASE_S × 2^(attempt−1), capped at EMP_RETRY_MAX_S,
with 50–100 % jitter (README, "Failures, retries and recovery")."""

from __future__ import annotations

import random

import pytest

from emp_tasks.core import config
from emp_tasks.steps.attempts import retry_delay_s


@pytest.fixture
def retry_settings():
    settings = config.Settings.from_env({"EMP_RETRY_BASE_S": "2", "EMP_RETRY_MAX_S": "300"})
    with config.scoped(settings):
        yield settings


@pytest.fixture
def no_jitter(monkeypatch):
    """The jitter draws its largest factor: the delay is the un-jittered ceiling."""
    monkeypatch.setattr(random, "uniform", lambda low, high: high)


@pytest.mark.usefixtures("retry_settings", "no_jitter")
def test_retry_delay_doubles_with_each_attempt_from_the_base():
    assert [retry_delay_s(attempt) for attempt in (1, 2, 3, 4, 5)] == [2, 4, 8, 16, 32]


@pytest.mark.usefixtures("retry_settings", "no_jitter")
def test_retry_delay_is_capped_at_the_maximum():
    assert retry_delay_s(8) == 256
    assert retry_delay_s(9) == 300
    assert retry_delay_s(40) == 300


@pytest.mark.usefixtures("retry_settings")
def test_retry_delay_jitter_keeps_half_to_all_of_the_ceiling(monkeypatch):
    drawn: list[tuple[float, float]] = []

    def lowest(low: float, high: float) -> float:
        drawn.append((low, high))
        return low

    monkeypatch.setattr(random, "uniform", lowest)
    assert retry_delay_s(3) == 4
    assert retry_delay_s(20) == 150
    assert drawn == [(0.5, 1.0), (0.5, 1.0)]


@pytest.mark.usefixtures("retry_settings")
def test_retry_delays_spread_within_the_jitter_bounds():
    delays = [retry_delay_s(3) for _ in range(500)]
    assert all(4 <= delay <= 8 for delay in delays)
    assert max(delays) - min(delays) > 1  # jittered, not one fixed delay


def test_retry_delay_follows_the_configured_base_and_maximum(no_jitter):
    settings = config.Settings.from_env({"EMP_RETRY_BASE_S": "0.5", "EMP_RETRY_MAX_S": "3"})
    with config.scoped(settings):
        assert [retry_delay_s(attempt) for attempt in (1, 2, 3, 4)] == [0.5, 1, 2, 3]
