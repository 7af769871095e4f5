"""What each low-level module loads: recording or sending never pulls in the worker.

Each check imports one module in a fresh interpreter and reads `sys.modules`, so
nothing imported by another test can hide an import. No services are needed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Reading celeryconfig reads the settings; with both URLs set nothing embedded starts.
SERVICE_URLS = {
    "REDIS_URL": "redis://127.0.0.1:1/0",
    "DATABASE_URL": "postgresql://unused@127.0.0.1:1/unused",
}

WORKER_CODE = {
    "emp_tasks.worker.tasks",
    "emp_tasks.worker.execution",
    "emp_tasks.steps.attempts",
    "emp_tasks.steps.client",
    "emp_tasks.steps.recovery",
    "emp_tasks.steps.queries",
    "emp_tasks.worker.presence",
    "emp_tasks.worker.leases",
}


def modules_loaded_by(statement: str) -> set[str]:
    """The `emp_tasks` modules in `sys.modules` after `statement`, in a fresh interpreter."""
    script = (
        f"import json, sys\n{statement}\n"
        "print(json.dumps(sorted(n for n in sys.modules if n.split('.')[0] == 'emp_tasks')))"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env={**SERVICE_URLS, **os.environ},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return set(json.loads(done.stdout.splitlines()[-1]))


def test_event_names_and_envelope_load_no_store_relay_or_worker():
    loaded = modules_loaded_by("import emp_tasks.core.events")
    store_and_processes = WORKER_CODE | {
        "emp_tasks.store.outbox",
        "emp_tasks.store.publishing",
        "emp_tasks.relay",
        "emp_tasks.store.dispatch",
        "emp_tasks.store.broker",
        "emp_tasks.store.db",
        "emp_tasks.store.models",
        "emp_tasks.store.redisdb",
    }
    assert not loaded & store_and_processes, sorted(loaded & store_and_processes)


@pytest.mark.parametrize(
    "module",
    [
        "emp_tasks.store.outbox",
        "emp_tasks.store.publishing",
        "emp_tasks.store.dispatch",
        "emp_tasks.store.broker",
    ],
)
def test_recording_publishing_and_sending_load_no_worker_code(module):
    loaded = modules_loaded_by(f"import {module}")
    assert module in loaded
    assert not loaded & WORKER_CODE, sorted(loaded & WORKER_CODE)
    assert "emp_tasks.relay" not in loaded


def test_broker_is_a_leaf():
    assert modules_loaded_by("import emp_tasks.store.broker") == {
        "emp_tasks",
        "emp_tasks.store",
        "emp_tasks.store.broker",
    }


def test_the_worker_task_module_registers_the_step_task_on_the_broker_app():
    loaded = modules_loaded_by(
        "import emp_tasks.worker.tasks\n"
        "from emp_tasks.store.broker import RUN_STEP, app\n"
        "assert RUN_STEP in app.tasks, sorted(app.tasks)"
    )
    assert "emp_tasks.worker.tasks" in loaded


def test_every_worker_of_the_broker_app_includes_the_task_module():
    modules_loaded_by(
        "from emp_tasks.store.broker import app\n"
        "assert 'emp_tasks.worker.tasks' in app.conf.include, app.conf.include"
    )
