"""The redaction rule of emp_tasks.store.logs: what a log line may not carry."""

from __future__ import annotations

import logging
import sys

import pytest

from emp_tasks.core import config
from emp_tasks.store import logs

STORED_KEY = "emp_" + "Zq3xV9kLmP2rT8wYb4nC6dF1gH5jK7sA0eUiOo-_Rt"


@pytest.fixture(autouse=True)
def no_loaded_settings(monkeypatch):
    """Only what each test configures counts as a configured secret."""
    monkeypatch.setattr(config, "_settings", None)
    for name in ("EMP_API_KEYS", "EMP_WEBHOOK_SECRET", "EMP_METRICS_TOKEN"):
        monkeypatch.delenv(name, raising=False)


def test_webhook_secrets_are_masked():
    line = logs.redact("secret=whsec_dGVzdC1zZWNyZXQ+/= next")
    assert "dGVzdC1zZWNyZXQ" not in line
    assert line == "secret=whsec_[redacted] next"


def test_stored_api_keys_are_masked_but_emp_identifiers_are_not():
    line = logs.redact(f"key {STORED_KEY} in emp_tasks.auth, metric emp_step_duration_seconds")
    assert STORED_KEY[4:] not in line
    assert "emp_tasks.auth" in line
    assert "emp_step_duration_seconds" in line


@pytest.mark.parametrize(
    "text",
    [
        "Authorization: Bearer abc.def-123",
        "{'Authorization': 'bearer abc.def-123'}",
        "X-API-Key: abc.def-123",
        "{'x-api-key': 'abc.def-123'}",
        "GET /ws?token=abc.def-123&step_id=s1",
    ],
)
def test_presented_credentials_are_masked(text):
    line = logs.redact(text)
    assert "abc.def-123" not in line
    assert logs.MASK in line


def test_configured_secret_values_are_masked(monkeypatch):
    monkeypatch.setenv("EMP_API_KEYS", "plain-key-1:alice,admin-key-2:ops:admin")
    monkeypatch.setenv("EMP_METRICS_TOKEN", "scrape-token-3")
    monkeypatch.setenv("EMP_WEBHOOK_SECRET", "not-prefixed-secret-4")
    line = logs.redact(
        "keys plain-key-1 admin-key-2 token scrape-token-3 secret not-prefixed-secret-4"
    )
    for secret in ("plain-key-1", "admin-key-2", "scrape-token-3", "not-prefixed-secret-4"):
        assert secret not in line
    assert line.startswith("keys [redacted] [redacted] token")


def test_secrets_of_the_loaded_settings_are_masked(monkeypatch):
    loaded = config.Settings(
        redis_url=None, database_url=None, broker_url=None, metrics_token="loaded-token-5"
    )
    monkeypatch.setattr(config, "_settings", loaded)
    assert "loaded-token-5" not in logs.redact("token loaded-token-5")


def test_short_configured_values_are_left_alone(monkeypatch):
    monkeypatch.setenv("EMP_API_KEYS", "ab:alice")
    assert logs.redact("table ab, cab") == "table ab, cab"


def test_rows_postgresql_echoes_are_masked():
    message = (
        'null value in column "customer_id" violates not-null constraint\n'
        'DETAIL:  Failing row contains (id1, null, {"prompt": "private"}).\n'
        "[SQL: INSERT INTO steps ...]"
    )
    line = logs.redact(message)
    assert "private" not in line
    assert "not-null constraint" in line
    assert "[SQL: INSERT INTO steps ...]" in line


def test_rows_in_a_one_line_repr_are_masked_up_to_the_next_part():
    line = logs.redact(
        "UniqueViolation('duplicate key\\nDETAIL:  Key (name)=(private) already exists.\\nmore')"
    )
    assert "private" not in line
    assert "\\nmore" in line


def test_json_context_and_quoted_bad_values_are_masked():
    line = logs.redact(
        'invalid input syntax for type integer: "private-1"\n'
        'CONTEXT:  JSON data, line 1: {"prompt":"private-2"...'
    )
    assert "private" not in line
    assert "invalid input syntax for type integer" in line


def test_formatter_masks_message_traceback_and_extra_fields():
    formatter = logs.KeyValueFormatter("%(levelname)s %(message)s")
    try:
        raise ValueError("rejected whsec_aW5zaWRlLXRyYWNlYmFjaw==")
    except ValueError:
        record = logging.getLogger("test").makeRecord(
            "test",
            logging.ERROR,
            __file__,
            1,
            "presented %s",
            ("Bearer in-the-args",),
            exc_info=sys.exc_info(),
            extra={"action": "x", "header": "X-API-Key: in-an-extra"},
        )
    line = formatter.format(record)
    for secret in ("aW5zaWRlLXRyYWNlYmFjaw", "in-the-args", "in-an-extra"):
        assert secret not in line
    assert "ValueError" in line and "action=x" in line
