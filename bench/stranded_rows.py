"""The stranded-step scan rows (EMP Tasks only): what one scan costs with 100,000 pending steps.

After the other measurements, on the same scratch database and Redis index (the Procfile
processes are stopped by then), `pending` pending steps are made in one queue (copies of
one submitted step, by SQL) with their tasks pushed onto the queue's list, as the
outbox publisher would. Then `emp_tasks.steps.stranded.Watch.scan` is timed in this
process, wall and CPU (this process; PostgreSQL and Redis CPU are not included), in two
cases: every task present (the scan compares counts only: the relay's every pass), and
one task removed (the queue is read whole and its pending steps compared by id).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from bench.stats import median_text, only_ours
from emp_tasks.specs import StepCreate
from emp_tasks.steps import stranded, transitions
from emp_tasks.store import census, db, dispatch, publishing
from emp_tasks.store.broker import queue_list, task_message

SCANS = 5
PUSH_CHUNK = 5000


@dataclass
class StrandedResult:
    pending: int
    counted_ms: list[float] = field(default_factory=list)  # wall ms, every task present
    counted_cpu_ms: list[float] = field(default_factory=list)
    read_ms: list[float] = field(default_factory=list)  # wall ms, one task missing
    read_cpu_ms: list[float] = field(default_factory=list)
    resent: int = 0  # steps the second missing scan sent again (must be 1)
    queue: str | None = None  # the queue its pending steps are in (the position rows use it)
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors and self.resent == 1


def _make_pending(count: int) -> tuple[str, list[str]]:
    """`count` pending steps in one queue (one inserted, the rest copied); queue and ids."""
    spec = StepCreate.model_validate({"service": "bench-stranded", "payload": {}})
    with db.tx() as tx:
        (template,) = transitions.insert(tx, [transitions.new_step(spec, "bench", None)])
        columns = [
            row.column_name
            for row in tx.all(
                "SELECT column_name FROM information_schema.columns"
                " WHERE table_name = 'steps' AND column_name <> 'id' ORDER BY ordinal_position"
            )
        ]
        listed = ", ".join(columns)
        tx.execute(
            f"INSERT INTO steps (id, {listed}) SELECT gen_random_uuid()::text, {listed}"
            " FROM steps, generate_series(2, %s) WHERE id = %s",
            [count, template.id],
        )
        tx.execute(
            "UPDATE steps SET queued_at = now() - interval '1 hour' WHERE queue = %s",
            [template.queue],
        )
        ids = [row.id for row in tx.all("SELECT id FROM steps WHERE queue = %s", [template.queue])]
    publishing.flush()  # the template's own task, sent with its event
    copies = [step_id for step_id in ids if step_id != template.id]
    for start in range(0, len(copies), PUSH_CHUNK):
        dispatch.push(
            [task_message(i, template.queue, 0, i) for i in copies[start : start + PUSH_CHUNK]]
        )
    return template.queue, ids


def _timed_scan(watch: stranded.Watch) -> tuple[float, float, stranded.Scan]:
    wall, cpu = time.perf_counter(), time.process_time()
    scan = watch.scan(after_s=1.0)
    return (time.perf_counter() - wall) * 1000, (time.process_time() - cpu) * 1000, scan


def run(pending: int) -> StrandedResult:
    outcome = StrandedResult(pending=pending)
    try:
        queue, _ = _make_pending(pending)
        outcome.queue = queue
        depth = census.depths([queue])[queue]
        if depth != pending:
            outcome.errors.append(f"{depth} tasks pushed for {pending} steps")
            return outcome
        watch = stranded.Watch()
        for _ in range(SCANS):
            wall, cpu, scan = _timed_scan(watch)
            if scan.read or scan.resent:
                outcome.errors.append(f"a scan with every task present read {scan.read} queue")
            outcome.counted_ms.append(wall)
            outcome.counted_cpu_ms.append(cpu)
        dispatch.broker_client().rpop(queue_list(queue, 0))  # one task lost
        for _ in range(2):  # suspect, then sent again
            wall, cpu, scan = _timed_scan(watch)
            outcome.read_ms.append(wall)
            outcome.read_cpu_ms.append(cpu)
            outcome.resent += len(scan.resent)
        publishing.flush()  # the re-sent step's event, before the scratch database goes
    except Exception as exc:  # the row reports it; the other rows still print
        outcome.errors.append(f"{type(exc).__name__}: {exc}")
    return outcome


def rows(result: StrandedResult | None, baselines: int) -> list[list[str]]:
    if result is None:
        return []
    label = f"stranded-step scan, {result.pending:,} pending"

    out = []
    for what, wall, cpu in (
        ("every task present: wall / CPU (ms)", result.counted_ms, result.counted_cpu_ms),
        ("one task missing: wall / CPU (ms)", result.read_ms, result.read_cpu_ms),
    ):
        cells = f"{median_text(wall, result.ok)} / {median_text(cpu, result.ok)}"
        out.append(only_ours(f"{label}, {what}", cells, baselines))
    return out


def summary(result: StrandedResult) -> str:
    text = (
        f"EMP Tasks, stranded-step scan: {result.pending} pending steps, "
        f"{result.resent} sent again after one task was removed (expected 1)"
    )
    for error in result.errors[:3]:
        text += f"\n  error: {error}"
    return text


NOTE = (
    "Stranded-scan rows (EMP Tasks only): after the other rows, N pending steps in one queue "
    "with their tasks on its list; one stranded.Watch.scan timed in the bench process, "
    f"median of {SCANS} with every task present (counts compared only), and of the 2 scans "
    "after one task was removed (the queue read whole; the second sends the step again). "
    "CPU is the bench process's; PostgreSQL's and Redis' work is in the wall time."
)
