"""The benchmark's printed output: the comparison table and one summary line per system."""

from __future__ import annotations

import math
from collections.abc import Sequence
from urllib.parse import urlsplit, urlunsplit

from bench import affinity_rows, emprops_rows, position_rows, stranded_rows
from bench.affinity_rows import AffinityResult
from bench.cpu import CLIENT, POSTGRES, REDIS
from bench.live_rows import LiveRow
from bench.position_rows import PositionResult
from bench.socket_rows import SocketPhase, SocketResult
from bench.stats import (
    DASH,
    LiveResult,
    Result,
    WebhookResult,
    WorkflowResult,
    percentile,
)
from bench.stranded_rows import StrandedResult
from bench.webhook_rows import WebhookRow
from bench.workflows import Shape


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


def _p50_of(values: list[float]) -> float | None:
    return percentile(values, 50) if values else None


CPU_ORDER = ("web", "worker", "relay", "webhooks", "emprops", POSTGRES, REDIS, CLIENT)


def _cpu_rows(ours: Result, baselines: list[Result], label: str = "") -> list[list[str]]:
    """CPU ms per step of each process group, then the total without the bench's clients."""
    groups = [g for g in CPU_ORDER if any(g in r.cpu_s for r in (ours, *baselines))]
    groups += sorted({g for r in (ours, *baselines) for g in r.cpu_s} - set(groups))
    rows = []
    for group in groups:
        cells = [f"{label}CPU per step: {group} (ms)", _number(ours.cpu_ms_per_step(group), 2)]
        for baseline in baselines:
            cells += [_number(baseline.cpu_ms_per_step(group), 2), ""]
        rows.append(cells)
    if groups:
        total = [
            f"{label}CPU per step: all but the bench's clients (ms)",
            _number(ours.cpu_ms_per_step(), 2),
        ]
        for baseline in baselines:
            theirs = baseline.cpu_ms_per_step()
            total += [_number(theirs, 2), _ratio(theirs, ours.cpu_ms_per_step())]
        rows.append(total)
    return rows


def _progress_rows(ours: Result, baselines: list[Result]) -> list[list[str]]:
    """The no-op measure again with progress reports: throughput and total CPU per step."""
    if ours.progress is None:
        return []
    mine = ours.progress
    label = "with 4 progress reports per step: "
    throughput = [f"{label}end-to-end throughput (steps/s)", _number(mine.throughput)]
    cpu = [f"{label}CPU per step, all but the clients (ms)", _number(mine.cpu_ms_per_step(), 2)]
    for baseline in baselines:
        theirs = baseline.progress
        if theirs is None:
            throughput += [DASH, ""]
            cpu += [DASH, ""]
            continue
        throughput += [_number(theirs.throughput), _ratio(mine.throughput, theirs.throughput)]
        cpu += [
            _number(theirs.cpu_ms_per_step(), 2),
            _ratio(theirs.cpu_ms_per_step(), mine.cpu_ms_per_step()),
        ]
    return [throughput, cpu]


def _single_submit_row(ours: Result, baselines: list[Result]) -> list[list[str]]:
    if not ours.single_submit_ms:
        return []
    cells = ["single-client submit latency p50 / p99 (ms)", _latency(ours.single_submit_ms)]
    for baseline in baselines:
        peer = baseline.single_submit_ms
        cells += [
            _latency(peer) if peer else DASH,
            _ratio(_p50_of(peer), _p50_of(ours.single_submit_ms)) if peer else "",
        ]
    return [cells]


def _output_rows(ours: Result, baselines: list[Result]) -> list[list[str]]:
    """A step with one 1 MB output beside the same step with none (EMP Tasks only)."""
    if not ours.output_ms:
        return []
    rows = []
    for label, values in (
        ("one step at a time, no output: created to completed p50 / p99 (ms)", ours.no_output_ms),
        (
            "one step at a time, one 1 MB output: created to completed p50 / p99 (ms)",
            ours.output_ms,
        ),
    ):
        cells = [label, _latency(values)]
        for _ in baselines:
            cells += [DASH, ""]
        rows.append(cells)
    return rows


def _workflow_rows(ours: Result, baselines: list[Result], shape: Shape) -> list[list[str]]:
    """steps/s (with ratios), seconds, and for a chain ms per hop, of one workflow shape."""

    def of(result: Result) -> WorkflowResult | None:
        return result.workflows.get(shape.key)

    def cell(workflow: WorkflowResult | None, value: str) -> str:
        return DASH if workflow is None else value

    mine = of(ours)
    throughput = [f"{shape.label}: steps/s", cell(mine, _number(mine and mine.throughput))]
    elapsed = [
        f"{shape.label}: submit to completed (s)",
        cell(mine, _number(mine and mine.elapsed_s, 2)),
    ]
    per_hop = [f"{shape.label}: per hop (ms)", cell(mine, _number(mine and mine.per_hop_ms))]
    for baseline in baselines:
        theirs = of(baseline)
        ratio = _ratio(mine and mine.throughput, theirs and theirs.throughput)
        throughput += [cell(theirs, _number(theirs and theirs.throughput)), ratio]
        elapsed += [cell(theirs, _number(theirs and theirs.elapsed_s, 2)), ""]
        per_hop += [
            cell(theirs, _number(theirs and theirs.per_hop_ms)),
            _ratio(theirs and theirs.per_hop_ms, mine and mine.per_hop_ms),
        ]
    return [throughput, elapsed, per_hop] if shape.hops else [throughput, elapsed]


def _webhook_row(ours: Result, baselines: list[Result], row: WebhookRow) -> list[str]:
    """p50 / p99 of one webhook configuration; EMP Tasks only, so a dash for every baseline."""
    hook = ours.webhooks.get(row.key)
    cells = [f"{row.label}: completed to received p50 / p99 (ms)"]
    cells.append(_latency(hook.latencies_ms) if hook is not None and hook.ok else DASH)
    for _ in baselines:
        cells += [DASH, ""]
    return cells


def _live_row(ours: Result, baselines: list[Result], row: LiveRow) -> list[str]:
    """p50 / p99 of one live configuration; EMP Tasks only, so a dash for every baseline."""
    live = ours.live.get(row.key)
    cells = [f"{row.label}: recorded to received p50 / p99 (ms)"]
    cells.append(_latency(live.latencies_ms) if live is not None and live.ok else DASH)
    for _ in baselines:
        cells += [DASH, ""]
    return cells


def _emprops_rows(ours: Result, baselines: list[Result]) -> list[list[str]]:
    """p50 / p99 of the EmProps row; EMP Tasks only, so a dash for every baseline."""
    if ours.emprops is None:
        return []
    ok = ours.emprops.ok
    cells = [emprops_rows.LABEL, _latency(ours.emprops.latencies_ms) if ok else DASH]
    for _ in baselines:
        cells += [DASH, ""]
    return [cells]


def _phase_label(phase: SocketPhase) -> str:
    if "Prefer" in phase.label:
        return f"REST p50 / p99 beside {phase.label}, {phase.waiting} granted a wait (ms)"
    held = f", {phase.accepted} open" if phase.attempted else ""
    return f"REST p50 / p99 beside idle WebSockets: {phase.label}{held} (ms)"


def _socket_rows(sockets: SocketResult | None, baselines: list[Result]) -> list[list[str]]:
    """REST p50 / p99 per idle-socket phase; EMP Tasks only, so a dash for every baseline."""
    rows = []
    for phase in sockets.phases if sockets is not None else ():
        cells = [_phase_label(phase), _latency(phase.rest_ms) if phase.ok else DASH]
        for _ in baselines:
            cells += [DASH, ""]
        rows.append(cells)
    return rows


def table(
    ours: Result,
    baselines: list[Result],
    shapes: Sequence[Shape] = (),
    webhooks: Sequence[WebhookRow] = (),
    live: Sequence[LiveRow] = (),
    sockets: SocketResult | None = None,
    stranded: StrandedResult | None = None,
    positions: PositionResult | None = None,
    warm: AffinityResult | None = None,
) -> str:
    """A Markdown table: ours, then each baseline with the ratio ours / baseline (in steps/s).

    The steps rows come first, then each workflow shape's rows, each webhook row, each live
    row, and each idle-socket phase.
    """
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
    rows += _single_submit_row(ours, baselines)
    rows += _cpu_rows(ours, baselines)
    rows += _progress_rows(ours, baselines)
    rows += _output_rows(ours, baselines)
    for shape in shapes:
        rows += _workflow_rows(ours, baselines, shape)
    rows += [_webhook_row(ours, baselines, row) for row in webhooks]
    rows += [_live_row(ours, baselines, row) for row in live]
    rows += _emprops_rows(ours, baselines)
    rows += _socket_rows(sockets, baselines)
    rows += stranded_rows.rows(stranded, len(baselines))
    rows += position_rows.rows(positions, len(baselines))
    rows += affinity_rows.rows(warm, len(baselines))
    return _markdown(rows)


def socket_table(sockets: SocketResult) -> str:
    """The idle-socket rows alone (`python -m bench --only-sockets`)."""
    return _markdown([["measure", "EMP Tasks"], *_socket_rows(sockets, [])])


def _markdown(rows: list[list[str]]) -> str:
    """The first row as the header, first column left-aligned, the others right-aligned."""
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]

    def line(cells: list[str]) -> str:
        padded = [
            cell.ljust(width) if index == 0 else cell.rjust(width)
            for index, (cell, width) in enumerate(zip(cells, widths, strict=True))
        ]
        return "| " + " | ".join(padded) + " |"

    separator = "|" + "|".join("-" * (width + 2) for width in widths) + "|"
    return "\n".join([line(rows[0]), separator, *(line(row) for row in rows[1:])])


def _workflow_summary(name: str, shape: Shape, workflow: WorkflowResult) -> str:
    """`name, label: completed in S s (submit M ms, ...)` or its first errors."""
    if workflow.ok:
        text = f"{name}, {shape.label}: completed in {_number(workflow.elapsed_s, 2)} s"
        detail = [f"submit call {_number(workflow.submit_ms)} ms"]
        if workflow.server_s is not None:
            detail.append(f"created_at to completed_at {_number(workflow.server_s, 2)} s")
        return f"{text} ({', '.join(detail)})"
    text = f"{name}, {shape.label}: not completed"
    for error in workflow.errors[:3]:
        text += f"\n  error: {error}"
    return text


def _p50(values: list[float]) -> str:
    return _number(percentile(values, 50)) if values else DASH


def _webhook_summary(name: str, row: WebhookRow, hook: WebhookResult) -> str:
    """`name, label: R of E webhooks received (...)`, the latencies, and the first errors."""
    plural = "" if row.endpoints == 1 else "s"
    text = (
        f"{name}, {row.label}: {hook.received} of {hook.expected} webhooks received "
        f"({hook.submitted} of {row.steps} steps submitted at {row.rate:g}/s, "
        f"{hook.completed} completed, × {row.endpoints} endpoint{plural}; "
        f"{hook.duplicates} received twice)"
    )
    if hook.latencies_ms:
        text += (
            f"\n  completed to received p50 / p99 {_latency(hook.latencies_ms)} ms "
            f"(completed_at to the delivery row's created_at, its recording transaction's "
            f"start, p50 {_p50(hook.recorded_ms)} ms; created_at to received p50 "
            f"{_p50(hook.sent_ms)} ms; "
            f"max {_number(max(hook.latencies_ms))} ms)"
        )
    for error in hook.errors[:3]:
        text += f"\n  error: {error}"
    return text


def _live_summary(name: str, row: LiveRow, live: LiveResult) -> str:
    """`name, label: R of E deliveries received, M missing (...)`, latencies, first errors."""
    plural = "" if row.clients == 1 else "s"
    text = (
        f"{name}, {row.label}: {live.received} of {live.expected} deliveries received, "
        f"{live.missing} missing ({live.events} events of {live.submitted} of {row.steps} "
        f"steps submitted at {row.rate:g}/s, {live.completed} completed, × {row.clients} "
        f"client{plural}; {live.duplicates} received twice)"
    )
    if live.latencies_ms:
        text += (
            f"\n  recorded to received p50 / p99 {_latency(live.latencies_ms)} ms "
            f"(max {_number(max(live.latencies_ms))} ms)"
        )
    for error in live.errors[:3]:
        text += f"\n  error: {error}"
    return text


def summary(
    result: Result,
    shapes: Sequence[Shape] = (),
    webhooks: Sequence[WebhookRow] = (),
    live: Sequence[LiveRow] = (),
) -> str:
    """`name: completed C of S submitted (N requested)` plus the first errors, if any.

    Then one line per workflow shape the system ran, per webhook row and per live row.
    """
    text = (
        f"{result.name}: {result.completed} completed of {result.submitted} submitted "
        f"({result.requested} requested)"
    )
    if result.failed:
        text += f", {result.failed} not completed"
    for error in result.errors[:3]:
        text += f"\n  error: {error}"
    for shape in shapes:
        workflow = result.workflows.get(shape.key)
        if workflow is not None:
            text += "\n" + _workflow_summary(result.name, shape, workflow)
    for row in webhooks:
        hook = result.webhooks.get(row.key)
        if hook is not None:
            text += "\n" + _webhook_summary(result.name, row, hook)
    for row in live:
        outcome = result.live.get(row.key)
        if outcome is not None:
            text += "\n" + _live_summary(result.name, row, outcome)
    if result.emprops is not None:
        text += "\n" + emprops_rows.summary(result.name, result.emprops)
    return text


def socket_summary(sockets: SocketResult) -> str:
    """The idle-socket rows' caps, and per phase the sockets accepted and refused, and errors."""
    text = (
        f"EMP Tasks, WebSocket caps (EMP_WEB_THREADS={sockets.web_threads}, 1 worker): "
        f"{sockets.per_key} per key, {sockets.per_process} per process"
    )
    for error in sockets.errors[:3]:
        text += f"\n  error: {error}"
    for phase in sockets.phases:
        refused = ", ".join(f"{n} with {status}" for status, n in sorted(phase.refused.items()))
        text += f"\n  {phase.label}: {phase.accepted} of {phase.attempted} sockets open"
        if phase.attempted:
            text += f" from {phase.keys} key{'' if phase.keys == 1 else 's'}"
        if refused:
            text += f", refused {refused}"
        text += f"; REST {len(phase.rest_ms)} answered, p50 / p99 {_latency(phase.rest_ms)} ms"
        for error in phase.errors[:3]:
            text += f"\n    error: {error}"
    return text
