"""Recording a histogram observation: one bucket, the count and the sum, made cumulative at
scrape time; observations add up in the process until they are flushed."""

from __future__ import annotations

import threading

from emp_tasks import metrics


def observed(values: list[float]) -> dict[str, str]:
    metrics._pending.take()
    for value in values:
        metrics._observe(metrics.WEBHOOK_LATENCY, (), value)
    fields = metrics._pending.take()
    assert {key for key, _ in fields} == {metrics.WEBHOOK_LATENCY.key}
    return {field: str(amount) for (_, field), amount in fields.items()}


def test_an_observation_writes_its_own_bucket_the_count_and_the_sum():
    fields = observed([0.3])
    assert fields == {"[]|0.5": "1", "[]|count": "1", "[]|sum": "0.3"}


def test_observations_add_up_before_a_flush():
    fields = observed([0.3, 0.4, 7.0, 10**9])
    assert fields["[]|0.5"] == "2"
    assert fields["[]|10.0"] == "1"
    assert fields["[]|+Inf"] == "1"
    assert fields["[]|count"] == "4"


def test_the_scrape_shows_cumulative_buckets_and_the_count_as_inf():
    fields = observed([0.03, 0.3, 0.4, 7.0, 10**9])
    family = metrics._histogram_family(metrics.WEBHOOK_LATENCY, fields, metrics.ScrapeLabels())
    buckets = {s.labels["le"]: s.value for s in family.samples if s.name.endswith("_bucket")}
    assert buckets["0.05"] == 1
    assert buckets["0.5"] == 3
    assert buckets["10.0"] == 4
    assert buckets["86400.0"] == 4
    assert buckets["+Inf"] == 5
    values = list(buckets.values())
    assert values == sorted(values)


def test_stopping_the_flusher_ends_its_thread_and_a_later_observation_starts_another():
    def flushers() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name == "emp-metrics-flush" and t.is_alive()]

    metrics._pending.add("emp:test", "x", 1)
    assert flushers()
    metrics._pending.stop(3.0)
    assert not flushers()
    assert metrics._pending.take() == {("emp:test", "x"): 1}  # kept for the last flush
    metrics._pending.add("emp:test", "x", 1)
    assert len(flushers()) == 1
    metrics._pending.stop(3.0)
    metrics._pending.take()
