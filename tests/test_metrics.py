"""`GET /metrics`: Prometheus text read from PostgreSQL and Redis, shared by every process."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from sqlalchemy import func, select

from emp_tasks import metrics
from emp_tasks.store import db, redisdb
from emp_tasks.store.models import Attempt, Step
from tests import test_webhooks
from tests.conftest import (
    ARTIFACTS,
    RunningSystem,
    headers,
    process_env,
    wait_for,
    wait_for_status,
    worker_status,
)
from tests.test_steps_api import assert_error

SERVICE = "metrics-sim"
"""Run only by this module's worker, so its series count exactly this module's steps."""
UNSERVED = "metrics-nobody"
"""No worker runs it: its steps stay pending."""

# The webhook tests' receiver and `webhooks` process fixtures, used here too.
receiver = test_webhooks.receiver
start_webhooks = test_webhooks.start_webhooks


class Scrape:
    """One `/metrics` answer, parsed with prometheus_client's own parser."""

    def __init__(self, text: str) -> None:
        self.families = {family.name: family for family in text_string_to_metric_families(text)}
        self.samples: list[Sample] = [s for f in self.families.values() for s in f.samples]

    def matching(self, name: str, **labels: str) -> list[Sample]:
        return [
            s
            for s in self.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        ]

    def value(self, name: str, **labels: str) -> float:
        """The sum of the matching samples (0 when there is none)."""
        return sum(s.value for s in self.matching(name, **labels))


def scrape(client, **request_headers: str) -> Scrape:
    """Scrape as an operator (the admin key) unless other credentials are given."""
    response = client.get("/metrics", headers=request_headers or headers("admin"))
    assert response.status_code == 200, response.get_data(as_text=True)
    return Scrape(response.get_data(as_text=True))


def submit(client, service: str, payload: dict | None = None) -> str:
    body = {"service": service, "payload": payload or {}, "max_retries": 0}
    response = client.post("/api/steps", json=body, headers=headers())
    assert response.status_code == 201, response.get_json()
    return response.get_json()["step_id"]


def durations(found: Scrape, outcome: str) -> float:
    return found.value("emp_step_duration_seconds_count", service=SERVICE, outcome=outcome)


@dataclass
class Ran:
    before: Scrape
    after: Scrape
    step_ids: list[str]


@pytest.fixture(scope="module")
def ran(services, system) -> Iterator[Ran]:
    """A worker for SERVICE runs one step that completes and one that fails."""
    from web import create_app

    env = process_env(
        services,
        EMP_WORKER_SERVICES=SERVICE,
        EMP_CONNECTORS=json.dumps({SERVICE: "simulation"}),
        EMP_WORKER_ID="metrics-worker",
        EMP_MACHINE_ID="metrics-machine",
    )
    worker = RunningSystem(["worker"], env, ARTIFACTS / "worker-metrics.log")
    try:
        wait_for(lambda: worker_status("metrics-worker") == "online", timeout_s=60)
        client = create_app().test_client()
        before = scrape(client)
        step_ids = [
            submit(client, SERVICE, {"duration_s": 0.1}),
            submit(client, SERVICE, {"fail": "fatal"}),
        ]
        for step_id in step_ids:
            wait_for_status(client, step_id, {"completed", "failed"})
        # The worker records an attempt's duration after the step's row is committed.
        after = wait_for(
            lambda: (
                (now := scrape(client))
                and durations(now, "completed") > durations(before, "completed")
                and durations(now, "failed") > durations(before, "failed")
                and now
            )
        )
        yield Ran(before, after, step_ids)
    finally:
        worker.stop()


def test_step_duration_histogram_counts_each_attempt_by_outcome(ran):
    for outcome in ("completed", "failed"):
        assert durations(ran.after, outcome) == durations(ran.before, outcome) + 1
    assert ran.after.value(
        "emp_step_duration_seconds_sum", service=SERVICE, outcome="completed"
    ) > ran.before.value("emp_step_duration_seconds_sum", service=SERVICE, outcome="completed")


def test_queue_wait_histogram_counts_each_started_attempt(ran):
    name = "emp_step_queue_wait_seconds_count"
    assert ran.after.value(name, service=SERVICE) == ran.before.value(name, service=SERVICE) + 2


def test_histogram_buckets_are_cumulative_and_inf_is_the_count(ran):
    for family in ran.after.families.values():
        if family.type != "histogram":
            continue
        series = {
            tuple(sorted((k, v) for k, v in s.labels.items() if k != "le")) for s in family.samples
        }
        for labels in series:
            matching = [s for s in family.samples if s.labels.items() >= set(labels)]
            buckets = [s for s in matching if s.name.endswith("_bucket")]
            counts = [s.value for s in sorted(buckets, key=lambda s: float(s.labels["le"]))]
            assert counts == sorted(counts), (family.name, labels)
            assert buckets[-1].labels["le"] == "+Inf"
            count = [s.value for s in matching if s.name.endswith("_count")]
            assert count == [counts[-1]], (family.name, labels)
    assert "emp_step_duration_seconds" in ran.after.families


def _counted_steps() -> dict[tuple[str, str], float]:
    """Steps by (status, service label), services that are not admitted counted as other."""
    labels = metrics.ScrapeLabels()
    with db.transaction() as session:
        rows = session.execute(
            select(Step.status, Step.service, func.count()).group_by(Step.status, Step.service)
        ).all()
    counted: dict[tuple[str, str], float] = {}
    for status, service, count in rows:
        key = (status, labels.service(service))
        counted[key] = counted.get(key, 0.0) + count
    return counted


def test_steps_gauge_matches_a_direct_count(client, ran):
    def scraped() -> dict[tuple[str, str], float]:
        return {
            (s.labels["status"], s.labels["service"]): s.value
            for s in scrape(client).matching("emp_steps")
            if s.value
        }

    # Other steps may change state between the two reads: compare until one pair agrees.
    wait_for(lambda: scraped() == _counted_steps())
    found = scrape(client)
    assert found.value("emp_steps", service=SERVICE, status="completed") == 1
    assert found.value("emp_steps", service=SERVICE, status="failed") == 1
    assert found.value("emp_steps", service=SERVICE, status="running") == 0


def test_queue_depth_shows_steps_no_worker_serves(client, system):
    submit(client, UNSERVED)
    submit(client, UNSERVED)
    with db.transaction() as session:
        pending = session.scalar(
            select(func.count()).where(Step.service == UNSERVED, Step.status == "pending")
        )
    # A service no worker serves is a tenant's choice of name: it is counted as "other".
    found = wait_for(
        lambda: (
            (now := scrape(client))
            and now.value("emp_queue_broker_depth", service=metrics.OTHER) >= pending
            and now
        )
    )
    assert not found.matching("emp_queue_depth", service=UNSERVED)
    assert found.value("emp_queue_depth", service=metrics.OTHER) >= pending >= 2
    assert found.value("emp_queue_consumers", service=metrics.OTHER) == 0
    assert found.value("emp_queue_oldest_pending_seconds", service=metrics.OTHER) > 0
    assert found.value("emp_steps", service=metrics.OTHER, status="pending") >= pending


def test_workers_online_are_counted(client, system):
    assert scrape(client).value("emp_workers", status="online") >= 1


def test_event_publish_lag_is_a_non_negative_number(client):
    found = scrape(client)
    (lag,) = found.matching("emp_event_publish_lag_seconds")
    assert lag.value >= 0
    assert found.value("emp_events_unpublished") >= 0


def test_every_source_is_read(client):
    up = {s.labels["source"]: s.value for s in scrape(client).matching("emp_metrics_source_up")}
    assert up == {"database": 1, "queues": 1, "recorded": 1}


def test_webhook_attempts_are_counted_by_outcome(client, system, receiver, start_webhooks):
    start_webhooks()
    test_webhooks.register(client, receiver.url, events=["step_completed"])
    before = scrape(client)
    receiver.answer(503)
    step_id = submit(client, "simulation")
    wait_for_status(client, step_id, {"completed"})
    wait_for(lambda: len(receiver.received) >= 2)

    def grew(found: Scrape, name: str, **labels: str) -> float:
        return found.value(name, **labels) - before.value(name, **labels)

    attempts = "emp_webhook_delivery_attempts_total"
    after = wait_for(
        lambda: (
            (now := scrape(client))
            and grew(now, attempts, outcome="success") >= 1
            and grew(now, attempts, outcome="5xx") >= 1
            and now
        )
    )
    assert grew(after, "emp_webhook_delivery_latency_seconds_count") >= 1
    assert grew(after, "emp_webhook_delivery_latency_seconds_sum") > 0
    assert after.value("emp_webhook_deliveries", status="succeeded") >= 1


def test_anonymous_scrape_is_refused_by_default(client, settings):
    assert not settings.metrics_public
    response = client.get("/metrics")
    assert_error(response, 401, "UNAUTHORIZED")
    assert response.headers["WWW-Authenticate"] == "Bearer"
    assert_error(
        client.get("/metrics", headers={"Authorization": "Bearer wrong"}), 401, "UNAUTHORIZED"
    )


def test_admin_key_may_scrape(client):
    assert scrape(client, **headers("admin")).matching("emp_workers")


def test_tenant_key_may_not_scrape(client):
    assert_error(client.get("/metrics", headers=headers("alice")), 403, "FORBIDDEN")


def test_metrics_token_or_admin_key_may_scrape_when_a_token_is_set(client, override_settings):
    override_settings(metrics_token="scrape-secret")
    assert_error(client.get("/metrics"), 401, "UNAUTHORIZED")
    assert_error(
        client.get("/metrics", headers={"Authorization": "Bearer wrong"}), 401, "UNAUTHORIZED"
    )
    assert_error(client.get("/metrics", headers=headers("bob")), 403, "FORBIDDEN")
    assert scrape(client, Authorization="Bearer scrape-secret").matching("emp_workers")
    assert scrape(client, **headers("admin")).matching("emp_workers")


def test_metrics_public_opens_the_scrape_to_anyone(client, override_settings):
    override_settings(metrics_public=True, metrics_token="scrape-secret")
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.content_type.startswith("text/plain")
    assert "# HELP emp_steps " in response.get_data(as_text=True)


def service_labels(found: Scrape) -> set[str]:
    return {s.labels["service"] for s in found.samples if "service" in s.labels}


def test_tenant_chosen_service_names_do_not_become_series(client, system):
    cap = metrics.get_settings().metrics_max_services
    names = [f"tenant-made-{number}" for number in range(200)]
    for name in names:
        submit(client, name)
    found = scrape(client)
    assert not service_labels(found) & set(names)
    assert len(service_labels(found)) <= cap + 1
    assert found.value("emp_steps", service=metrics.OTHER, status="pending") >= len(names)
    queues = {s.labels["queue"] for s in found.matching("emp_queue_depth")}
    assert len(queues) <= cap + 1
    assert found.value("emp_queue_depth", queue=metrics.OTHER) >= len(names)


def test_recorded_service_labels_stop_at_the_cap(services, override_settings):
    from emp_tasks.connectors.base import StepRun

    client = redisdb.client()
    metrics.ScrapeLabels().services()  # the workers' services are in before the cap is cut
    admitted_before = client.smembers(metrics.SERVICES_KEY)
    cap = len(admitted_before) + 5
    override_settings(metrics_max_services=cap)
    names = [f"recorded-{number}" for number in range(200)]
    try:
        for name in names:
            metrics.AttemptTimer(StepRun("s", name, 1, {}, {}, 0.5, "alice")).finished("completed")
        metrics.flush()  # this process's observations, written now rather than within a second
        fields = client.hkeys(metrics.STEP_DURATION.key)
        recorded = {json.loads(field.rpartition("|")[0])[0] for field in fields}
        assert len(recorded) <= cap + 1
        assert len(recorded & set(names)) == 5
        assert metrics.OTHER in recorded
        assert len(client.smembers(metrics.SERVICES_KEY)) == cap
    finally:
        client.srem(metrics.SERVICES_KEY, *names)
        metrics._recording_services.difference_update(names)


def test_openmetrics_is_served_to_scrapers_that_ask_for_it(client):
    response = client.get(
        "/metrics", headers={"Accept": "application/openmetrics-text", **headers("admin")}
    )
    assert response.status_code == 200
    assert response.content_type.startswith("application/openmetrics-text")
    assert response.get_data(as_text=True).endswith("# EOF\n")


def test_recording_without_redis_drops_the_observation_quietly(services, override_settings):
    from emp_tasks.connectors.base import StepRun

    override_settings(redis_url="redis://127.0.0.1:1/0")
    try:
        run = StepRun("s", SERVICE, 1, {}, {}, 1.0, "alice")
        assert metrics.AttemptTimer(run).finished("completed") == "completed"
        metrics.webhook_attempted({"timestamp": "2026-01-01T00:00:00Z"}, 200)
        metrics.flush()
    finally:
        redisdb._clients.pop("redis://127.0.0.1:1/0", None)


def test_scrape_without_redis_still_reports_the_database(services, override_settings):
    from web import create_app

    override_settings(redis_url="redis://127.0.0.1:1/0", broker_url="redis://127.0.0.1:1/0")
    try:
        found = scrape(create_app().test_client())
        up = {s.labels["source"]: s.value for s in found.matching("emp_metrics_source_up")}
        assert up == {"database": 1, "queues": 0, "recorded": 0}
        assert found.matching("emp_workers")
    finally:
        redisdb._clients.pop("redis://127.0.0.1:1/0", None)


MIX = "metrics-mix"
"""The mixed run's service: its own worker, so its counters count exactly these steps."""


def test_lifecycle_counters_match_a_direct_count_after_a_mixed_run(client, start_worker):
    start_worker(MIX, "metrics-mix-worker", concurrency=2)

    def step(payload: dict, **fields) -> str:
        body = {"service": MIX, "payload": payload, "max_retries": 0, **fields}
        response = client.post("/api/steps", json=body, headers=headers())
        assert response.status_code == 201, response.get_json()
        return response.get_json()["step_id"]

    ids = [
        step({"duration_s": 0.01}),
        step({"duration_s": 0.01}),
        step({"fail": "fatal"}),
        step({"fail": "retryable", "fail_attempts": 1}, max_retries=1),
        step({"duration_s": 5}, timeout_s=0.5),
    ]
    long = step({"duration_s": 30})
    wait_for_status(client, long, {"running"})
    assert client.post(f"/api/steps/{long}/cancel", json={}, headers=headers()).status_code == 200
    for step_id in ids + [long]:
        wait_for_status(client, step_id, {"completed", "failed", "cancelled"})

    with db.transaction() as session:
        by_status = dict(
            session.execute(
                select(Step.status, func.count()).where(Step.service == MIX).group_by(Step.status)
            ).all()
        )
        failures: dict[tuple[str, str], int] = {}
        for error in session.scalars(
            select(Attempt.error)
            .join(Step, Step.id == Attempt.step_id)
            .where(Step.service == MIX, Attempt.outcome.in_(["failed", "lost"]))
        ):
            key = (error["type"], error["code"])
            failures[key] = failures.get(key, 0) + 1
    assert sum(by_status.values()) == 6 and sum(failures.values()) == 3

    def counted() -> bool:
        found = scrape(client)
        finished = {
            s.labels["outcome"]: s.value
            for s in found.matching("emp_steps_finished_total", service=MIX)
        }
        failed = {
            (s.labels["type"], s.labels["code"]): s.value
            for s in found.matching("emp_step_failures_total", service=MIX)
        }
        return (
            found.value("emp_steps_submitted_total", service=MIX) == 6
            and finished == {str(status): float(n) for status, n in by_status.items()}
            and failed == {key: float(n) for key, n in failures.items()}
        )

    wait_for(counted, timeout_s=10, interval_s=0.5)
    found = scrape(client)
    assert found.value("emp_worker_capacity", worker="metrics-mix-worker") == 2
    assert found.value("emp_worker_busy", worker="metrics-mix-worker") == 0
    assert 0 <= found.value("emp_worker_heartbeat_age_seconds", worker="metrics-mix-worker") < 30
