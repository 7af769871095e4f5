"""The example Grafana dashboard asks only for metrics `/metrics` serves, with their labels."""

from __future__ import annotations

import json
import re
from pathlib import Path

from emp_tasks import metrics

DASHBOARD = Path(__file__).resolve().parents[2] / "ops" / "grafana" / "emp-tasks.json"

SCRAPED = {
    # read from PostgreSQL and Redis at each scrape (emp_tasks.metrics), with their labels
    "emp_steps": {"status", "service"},
    "emp_queue_depth": {"queue", "service"},
    "emp_queue_oldest_pending_seconds": {"queue", "service"},
    "emp_worker_busy": {"worker"},
    "emp_worker_capacity": {"worker"},
    "emp_worker_heartbeat_age_seconds": {"worker"},
    "emp_events_unpublished": set(),
    "emp_event_publish_lag_seconds": set(),
}


def served() -> dict[str, set[str]]:
    names = dict(SCRAPED)
    for metric in metrics.RECORDED:
        labels = set(metric.labels)
        if isinstance(metric, metrics.Histogram):
            names[metric.name + "_bucket"] = labels | {"le"}
        else:
            names[metric.name] = labels
    return names


def expressions() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


def test_every_panel_queries_a_served_metric_by_its_own_labels():
    known = served()
    for expr in expressions():
        names = set(re.findall(r"\bemp_[a-z_]+\b", expr))
        assert names, expr
        for name in names:
            assert name in known, f"{name} is not served: {expr}"
            for label in re.findall(r"\b([a-z_]+)=~?\"", expr):
                assert label in known[name], f"{name} has no label {label}: {expr}"
            for group in re.findall(r"by \(([a-z_, ]+)\)", expr):
                for label in (g.strip() for g in group.split(",")):
                    assert label in known[name], f"{name} has no label {label}: {expr}"


def test_the_lifecycle_counters_are_on_the_dashboard():
    text = " ".join(expressions())
    for name in (
        "emp_steps_submitted_total",
        "emp_steps_finished_total",
        "emp_step_failures_total",
        "emp_attempts_recovered_total",
        "emp_worker_busy",
    ):
        assert name in text
