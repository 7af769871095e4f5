"""The benchmark's printed output: the comparison table and one summary line per system."""

from __future__ import annotations

import math
from urllib.parse import urlsplit, urlunsplit

from bench.stats import Result, percentile

DASH = "—"


def redact(url: str) -> str:
    """The URL without its password, for printing."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    netloc = f"{parts.username}:***@{host}" if parts.username else host
    return urlunsplit(parts._replace(netloc=netloc))


def _number(value: float | None, digits: int = 1) -> str:
    if value is None or math.isnan(value):
        return DASH
    return f"{value:.{digits}f}"


def _latency(values: list[float]) -> str:
    if not values:
        return DASH
    return f"{percentile(values, 50):.1f} / {percentile(values, 99):.1f}"


def _ratio(ours: float | None, theirs: float | None) -> str:
    if ours is None or not theirs:
        return ""
    return f"{ours / theirs:.2f}"


def table(ours: Result, baselines: list[Result]) -> str:
    """A Markdown table: ours, then each baseline with the ratio ours / baseline."""
    header = ["measure", ours.name]
    for baseline in baselines:
        header += [baseline.name, "ratio"]
    throughput = ["end-to-end throughput (steps/s)", _number(ours.throughput)]
    submit_rate = ["HTTP submit rate (steps/s)", _number(ours.submit_rate)]
    submit = ["HTTP submit latency p50 / p99 (ms)", _latency(ours.submit_ms)]
    status = ["HTTP status latency p50 / p99 (ms)", _latency(ours.status_ms)]
    elapsed = ["first submit to all completed (s)", _number(ours.elapsed_s, 2)]
    for baseline in baselines:
        throughput += [_number(baseline.throughput), _ratio(ours.throughput, baseline.throughput)]
        elapsed += [_number(baseline.elapsed_s, 2), ""]
        for row in (submit_rate, submit, status):
            row += [DASH, ""]
    rows = [header, throughput, elapsed, submit_rate, submit, status]
    widths = [max(len(row[column]) for row in rows) for column in range(len(header))]

    def line(cells: list[str]) -> str:
        padded = [
            cell.ljust(width) if index == 0 else cell.rjust(width)
            for index, (cell, width) in enumerate(zip(cells, widths, strict=True))
        ]
        return "| " + " | ".join(padded) + " |"

    separator = "|" + "|".join("-" * (width + 2) for width in widths) + "|"
    return "\n".join([line(header), separator, *(line(row) for row in rows[1:])])


def summary(result: Result) -> str:
    """`name: completed C of S submitted (N requested)` plus the first errors, if any."""
    text = (
        f"{result.name}: {result.completed} completed of {result.submitted} submitted "
        f"({result.requested} requested)"
    )
    if result.failed:
        text += f", {result.failed} not completed"
    for error in result.errors[:3]:
        text += f"\n  error: {error}"
    return text
