"""The `emp` command: run the system or one of its processes, and talk to it."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from typing import Any

import click

from emp_tasks import auth, client, embedded
from emp_tasks import relay as outbox_relay
from emp_tasks.core import signing
from emp_tasks.core.config import ConfigError, Settings
from emp_tasks.core.events import STREAM
from emp_tasks.core.status import TERMINAL_STEP_STATUSES
from emp_tasks.emprops import process as emprops_process
from emp_tasks.routes import capabilities
from emp_tasks.store import db as database
from emp_tasks.store import logs, redisdb
from emp_tasks.supervisor import ProcessGroup
from emp_tasks.webhooks import delivery
from emp_tasks.worker import launcher, presence
from emp_tasks.worker import tasks as worker_tasks
from emp_tasks.worker import threads as worker_threads

DEV_KEY = "emp-dev-key"
DEV_KEYS = f"{DEV_KEY}:local:admin"


def _setup_logging() -> None:

    logs.configure(os.environ.get("EMP_LOG_LEVEL", "INFO").upper())


@click.group()
def main() -> None:
    """EMP Tasks: steps and workflows of AI generation on GPU fleets."""


# --- processes -----------------------------------------------------------------------------


@main.command()
@click.option("--keep-services", is_flag=True, help="Leave embedded Redis/PostgreSQL running.")
def run(keep_services: bool) -> None:
    """Run everything in the Procfile (API, worker, relay) on embedded defaults."""

    _setup_logging()
    started_embedded = Settings.from_env().embedded
    # Starts embedded services (and migrates them) when needed, and exports their URLs
    # so that every child process below finds them instead of starting its own.
    settings = embedded.bootstrap()
    if not started_embedded:
        database.upgrade(settings.database_url)
    env = dict(os.environ)
    if not env.get("EMP_WEBHOOK_SECRET"):
        env["EMP_WEBHOOK_SECRET"] = signing.new_secret()
        click.echo("No EMP_WEBHOOK_SECRET set: per-resource webhooks are signed with")
        click.echo(f"  {env['EMP_WEBHOOK_SECRET']}")
    if not env.get("EMP_API_KEYS"):
        env["EMP_API_KEYS"] = DEV_KEYS
        env.setdefault("EMP_BIND", "127.0.0.1")
        click.echo(f"No EMP_API_KEYS set: using the local admin key {DEV_KEY!r}.")
    env.setdefault("PORT", str(settings.port))
    click.echo(f"API on http://127.0.0.1:{env['PORT']}  (Ctrl-C stops everything)")
    group = ProcessGroup(env).start()
    stopping = False

    def _stop(*_: Any) -> None:
        nonlocal stopping
        if stopping:
            return
        stopping = True
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    code = 0
    try:
        name, code = group.wait_any()
        click.echo(f"process {name} exited with {code}; stopping the others", err=True)
    except KeyboardInterrupt:
        stopping = True
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        group.stop()
        if started_embedded and not keep_services:
            embedded.stop_services(settings.data_dir)
    sys.exit(0 if stopping else code or 1)


@main.command()
def api() -> None:
    """Serve the web app (REST API) on $PORT with gunicorn."""
    from gunicorn.app.base import BaseApplication

    _setup_logging()
    settings = embedded.bootstrap()
    bind = f"{os.environ.get('EMP_BIND', '0.0.0.0')}:{settings.port}"

    class _Server(BaseApplication):
        def load_config(self) -> None:
            self.cfg.set("bind", bind)
            self.cfg.set("workers", settings.web_workers)
            self.cfg.set("threads", settings.web_threads)
            self.cfg.set("worker_class", "web.server.ApiThreadWorker")
            self.cfg.set("timeout", 120)
            self.cfg.set("graceful_timeout", 20)
            self.cfg.set("accesslog", None)

        def load(self):
            # The web layer (Flask and every route) is loaded only by the process serving it.
            from web import create_app

            return create_app(settings)

    _Server().run()


@main.command()
@click.option(
    "--pool",
    default="threads",
    type=click.Choice(["threads", "solo", "prefork"]),
    help="Celery pool; threads keeps the worker responsive while a step runs.",
)
@click.option(
    "--concurrency",
    "-c",
    type=int,
    default=None,
    help="Steps run at once (default EMP_WORKER_CONCURRENCY, 1).",
)
@click.option("--services", default=None, help="Comma-separated services (EMP_WORKER_SERVICES).")
@click.option(
    "--gpus",
    default=None,
    help="One worker process per GPU: comma-separated indices, or 'all'.",
)
def worker(pool: str, concurrency: int | None, services: str | None, gpus: str | None) -> None:
    """Run a Celery worker that executes steps through connectors."""

    if services:
        os.environ["EMP_WORKER_SERVICES"] = services
    _setup_logging()
    settings = embedded.bootstrap()
    if gpus is not None:
        if pool == "prefork":
            raise click.UsageError("--gpus runs the threads pool: CUDA does not survive fork")
        try:
            indices = launcher.parse_gpus(gpus)
        except ConfigError as exc:
            raise click.UsageError(str(exc)) from exc
        click.echo(f"Starting one worker per GPU: {', '.join(indices)}")
        sys.exit(launcher.Launcher(indices).run())
    try:
        caps = capabilities.discover(connector_models=presence.connector_models)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from exc
    if pool == "prefork" and caps.gpu_count:
        raise click.UsageError(
            "the prefork pool forks after CUDA may be initialised: use threads or solo,"
            " or `--gpus` for one process per GPU"
        )
    workers_at_once = concurrency or settings.worker_concurrency
    presence.install(caps, pool, workers_at_once)
    if pool == "threads":  # Celery's threads pool, answering `revoke --terminate`
        worker_tasks.app.conf.worker_pool = worker_threads.NAME

    worker_tasks.app.worker_main(
        [
            "worker",
            "--queues",
            presence.own_queue(settings.worker_id),
            *([] if pool == "threads" else ["--pool", pool]),
            "--concurrency",
            str(workers_at_once),
            "--hostname",
            f"{settings.worker_id}@{settings.machine_id}",
            "--loglevel",
            settings.log_level,
            "--without-mingle",
            "--without-gossip",
        ]
    )


@main.command()
def emprops() -> None:
    """Tell EmProps how each of its workflows ended, exactly once (idle without EMPROPS_API_URL)."""

    _setup_logging()
    embedded.bootstrap()
    emprops_process.run_forever()


@main.command(context_settings={"ignore_unknown_options": True})
@click.option("--address", default="127.0.0.1", show_default=True, help="address to listen on")
@click.option("--port", default=5555, show_default=True, type=int)
@click.option("--db", "db_path", default=None, help="state file (<EMP_DATA_DIR>/flower.db)")
@click.argument("flower_args", nargs=-1, type=click.UNPROCESSED)
def flower(address: str, port: int, db_path: str | None, flower_args: tuple[str, ...]) -> None:
    """Flower on our broker: persistent, local by default; other options go to Flower."""

    try:
        import flower as _flower  # noqa: F401 - an optional dependency
    except ImportError as exc:
        raise click.UsageError(
            "Flower is not installed: pip install 'emp-tasks[flower]' (flower==2.2.0)"
        ) from exc
    _setup_logging()
    embedded.bootstrap()
    settings = Settings.from_env()
    state = db_path or str((settings.data_dir / "flower.db").resolve())
    worker_tasks.app.start(
        [
            "flower",
            f"--address={address}",
            f"--port={port}",
            "--persistent=True",
            f"--db={state}",
            *flower_args,
        ]
    )


@main.command()
def relay() -> None:
    """Publish outbox events the fast path missed (the crash path), forever."""

    _setup_logging()
    embedded.bootstrap()
    outbox_relay.run_forever()


@main.command()
def webhooks() -> None:
    """Deliver webhooks: consume the event stream, send, retry (run one or more)."""

    _setup_logging()
    embedded.bootstrap()
    delivery.run_forever()


# --- administration ------------------------------------------------------------------------


@main.group()
def db() -> None:
    """Database schema."""


@db.command("upgrade")
@click.argument("revision", default="head")
def db_upgrade(revision: str) -> None:
    """Apply migrations up to REVISION (default: head)."""

    database.upgrade(embedded.bootstrap().database_url, revision)
    click.echo(f"database at {revision}")


@main.group()
def keys() -> None:
    """API keys stored in the database."""


@keys.command("create")
@click.option("--customer", required=True, help="Customer the key acts for.")
@click.option("--admin", is_flag=True, help="May see every customer and act for any.")
@click.option("--name", default=None, help="A label for the key.")
def keys_create(customer: str, admin: bool, name: str | None) -> None:
    """Create a key; it is printed once and only its hash is stored."""

    embedded.bootstrap()
    raw, row = auth.create_key(customer, admin=admin, name=name)
    click.echo(raw)
    click.echo(f"id={row.id} customer={customer} admin={admin}", err=True)


# --- client --------------------------------------------------------------------------------


def _api_url() -> str:
    return os.environ.get("EMP_API_URL") or f"http://127.0.0.1:{os.environ.get('PORT', '8000')}"


def _api_key() -> str:
    if os.environ.get("EMP_API_KEY"):
        return os.environ["EMP_API_KEY"]
    configured = Settings.from_env().api_keys
    return configured[0].key if configured else DEV_KEY


def _api() -> client.Client:
    return client.Client(_api_url(), _api_key())


def _call(method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    try:
        return _api().request(method, path, body)
    except client.Unreachable as exc:
        raise click.ClickException(f"cannot reach the API at {_api_url()}: {exc.message}") from exc
    except client.ApiError as exc:
        error = {"code": exc.code, "message": exc.message, "details": exc.details}
        click.echo(json.dumps({"success": False, "error": error}, indent=2), err=True)
        raise SystemExit(1) from exc


@main.command()
@click.option("--service", default="simulation", show_default=True)
@click.option("--payload", default="{}", help="JSON object.")
@click.option("--priority", type=int, default=50, show_default=True)
@click.option("--wait", is_flag=True, help="Poll until the step finishes.")
def submit(service: str, payload: str, priority: int, wait: bool) -> None:
    """Submit a step over the API and print it."""
    try:
        body = {"service": service, "payload": json.loads(payload), "priority": priority}
    except ValueError as exc:
        raise click.BadParameter(f"--payload is not JSON: {exc}") from exc
    step = _call("POST", "/api/steps", body)["step"]
    while wait and step["status"] not in TERMINAL_STEP_STATUSES:
        time.sleep(0.2)
        step = _call("GET", f"/api/steps/{step['id']}")["step"]
    click.echo(json.dumps(step, indent=2))


@main.command()
@click.argument("step_id")
@click.option(
    "--follow", is_flag=True, help="Print each event (one JSON line) until the step ends."
)
def status(step_id: str, follow: bool) -> None:
    """Print a step (with --follow: its events as they happen, from its stream, first)."""
    step = _call("GET", f"/api/steps/{step_id}")["step"]
    if follow:
        try:
            for event in _api().stream(step_id=step_id):
                click.echo(json.dumps({"stream_id": event.id, **event.data}))
        except client.ApiError as exc:
            raise click.ClickException(exc.message) from exc
        step = _call("GET", f"/api/steps/{step_id}")["step"]
    click.echo(json.dumps(step, indent=2))


@main.group()
def events() -> None:
    """The `emp:events` stream."""


@events.command("tail")
@click.option("--from-start", is_flag=True, help="Begin at the oldest retained event.")
@click.option("--step", "step_id", default=None, help="Only this step's events.")
@click.option("--count", type=int, default=0, help="Stop after this many events (0: never).")
def events_tail(from_start: bool, step_id: str | None, count: int) -> None:
    """Print events as they are published, one JSON envelope a line."""

    client = redisdb.client(embedded.bootstrap().redis_url)
    last = "0-0" if from_start else "$"
    shown = 0
    while True:
        for _, entries in client.xread({STREAM: last}, block=5000, count=100) or []:
            for stream_id, fields in entries:
                last = stream_id
                envelope = json.loads(fields["event"])
                if step_id and envelope.get("step_id") != step_id:
                    continue
                click.echo(json.dumps({"stream_id": stream_id, **envelope}))
                shown += 1
                if count and shown >= count:
                    return


if __name__ == "__main__":
    main()
