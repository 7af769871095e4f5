"""Reading the configuration (emp_tasks.core.config) only parses it: no side effects."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import redis

from emp_tasks.core import config
from emp_tasks.core.config import Settings, get_settings
from emp_tasks.store.db import ROOT


@pytest.fixture
def process_settings(monkeypatch) -> Settings:
    """The process's settings as a bare environment parses them."""
    parsed = Settings.from_env({})
    monkeypatch.setattr(config, "_settings", parsed)
    return parsed


def test_missing_service_urls_stay_missing():
    settings = Settings.from_env({})
    assert settings.redis_url is None
    assert settings.database_url is None
    assert settings.broker_url is None
    assert settings.embedded


def test_get_settings_without_urls_starts_nothing_and_imports_no_embedded_module(tmp_path: Path):
    data_dir = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if k not in {"REDIS_URL", "DATABASE_URL"}}
    env["EMP_DATA_DIR"] = str(data_dir)
    script = (
        "import sys\n"
        "import emp_tasks.core.config as c\n"
        "s = c.get_settings()\n"
        "assert s.redis_url is None and s.database_url is None, s\n"
        "assert 'emp_tasks.embedded' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, check=True, timeout=60)
    assert not data_dir.exists()


def test_config_never_imports_the_embedded_servers():
    tree = ast.parse((ROOT / "emp_tasks" / "core" / "config.py").read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported |= {f"{node.module}.{alias.name}" for alias in node.names}
    assert not any("embedded" in name for name in imported), imported


def test_scoped_settings_answer_inside_the_block_only(process_settings):
    own = replace(process_settings, port=9123)
    with config.scoped(own):
        assert get_settings() is own
    assert get_settings() is process_settings


def test_an_app_built_with_settings_serves_its_requests_with_them(process_settings):
    from web import create_app

    own = replace(process_settings, max_body_bytes=4096, port=9123)
    app = create_app(own)
    app.add_url_rule("/probe", "probe", lambda: {"port": get_settings().port})
    assert app.config["MAX_CONTENT_LENGTH"] == 4097
    assert app.test_client().get("/probe").get_json() == {"port": 9123}
    assert get_settings() is process_settings


def test_an_app_built_without_settings_follows_the_process_settings(process_settings, monkeypatch):
    from web import create_app

    app = create_app()
    app.add_url_rule("/probe", "probe", lambda: {"port": get_settings().port})
    monkeypatch.setattr(config, "_settings", replace(process_settings, port=9124))
    assert app.test_client().get("/probe").get_json() == {"port": 9124}


def test_a_workers_broker_wait_lasts_emp_broker_poll_s_and_never_for_ever(monkeypatch):
    from kombu import Connection

    from emp_tasks.worker.transport import Transport

    assert Settings.from_env({}).broker_poll_s == 1.0
    for refused in ("0", "-1", "nan", "soon"):
        with pytest.raises(config.ConfigError, match="EMP_BROKER_POLL_S"):
            Settings.from_env({"EMP_BROKER_POLL_S": refused})
    monkeypatch.setattr(config, "_settings", Settings.from_env({"EMP_BROKER_POLL_S": "0.2"}))
    assert Transport(Connection("redis://127.0.0.1:1/0")).brpop_timeout == 0.2


def test_redis_replies_are_parsed_by_hiredis():
    """redis-py parses replies in C when hiredis is installed: every process's Redis
    client (events, kombu's broker channel) spends a third less CPU per command."""
    assert redis.utils.HIREDIS_AVAILABLE


def test_one_gunicorn_process_per_core_at_most_four():
    assert [config.default_web_workers(cores) for cores in (None, 1, 2, 3, 16)] == [1, 1, 2, 3, 4]
