"""Secrets and customers' payloads never reach a log line, even when the database fails.

Each test provokes a real PostgreSQL error through the project's engine and reads
what the project's log formatter wrote.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from emp_tasks.core import signing
from emp_tasks.core.ids import new_id
from emp_tasks.store import db, logs
from emp_tasks.store.models import Step, WebhookEndpoint
from tests.conftest import WEBHOOK_SECRET, headers

PAYLOAD = "customer-private-prompt-4f9c1e"
"""Stands for a customer's payload: it must appear in no log line."""

logger = logging.getLogger(__name__)


@pytest.fixture
def log_output() -> Iterator[io.StringIO]:
    """Everything logged during the test, as the project's formatter writes it."""
    output = io.StringIO()
    handler = logging.StreamHandler(output)
    handler.setFormatter(logs.KeyValueFormatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield output
    finally:
        root.removeHandler(handler)


def test_failed_webhook_insert_logs_neither_its_secret_nor_its_headers(
    client, log_output, monkeypatch
):
    secret = signing.new_secret()
    body = {
        "url": "http://127.0.0.1:9/hook",
        "secret": secret,
        "headers": {"X-Customer-Note": PAYLOAD},
        "description": PAYLOAD,
    }
    created = client.post("/api/webhooks", json=body, headers=headers())
    assert created.status_code == 201, created.get_json()
    # The next endpoint gets the same primary key: a UniqueViolation inside the request.
    monkeypatch.setattr(
        "emp_tasks.webhooks.endpoints.new_id", lambda: created.get_json()["webhook"]["id"]
    )

    response = client.post("/api/webhooks", json=body, headers=headers())

    assert response.status_code == 500
    written = log_output.getvalue()
    assert "UniqueViolation" in written
    assert secret not in written
    assert secret.removeprefix("whsec_") not in written
    assert PAYLOAD not in written


def test_row_echoed_by_a_not_null_violation_is_not_logged(services, log_output):
    secret = signing.new_secret()
    row = WebhookEndpoint(
        id=new_id(),
        customer_id=None,  # refused: PostgreSQL's DETAIL then quotes the whole row
        url="http://127.0.0.1:9/hook",
        secret=secret,
        events=["*"],
        headers={"X-Customer-Note": PAYLOAD},
    )
    with pytest.raises(DBAPIError) as failed, db.transaction() as session:
        session.add(row)
    assert "Failing row contains" in str(failed.value)
    logger.error("Unhandled error", exc_info=failed.value, extra={"action": "request_failed"})

    written = log_output.getvalue()
    assert "NotNullViolation" in written
    assert secret.removeprefix("whsec_") not in written
    assert PAYLOAD not in written


def test_payload_of_a_refused_step_is_not_logged(services, log_output):
    step = Step(
        id=new_id(),
        customer_id="alice",
        service="simulation",
        queue=None,  # refused: the failing row carries the payload
        status="pending",
        payload={"prompt": PAYLOAD},
    )
    with pytest.raises(DBAPIError) as failed, db.transaction() as session:
        session.add(step)
    logger.error("Step not stored", exc_info=failed.value, extra={"action": "step_create"})

    written = log_output.getvalue()
    assert "NotNullViolation" in written
    assert PAYLOAD not in written


def test_value_quoted_by_a_data_error_is_not_logged(services, log_output):
    with pytest.raises(DBAPIError) as failed, db.transaction() as session:
        session.execute(text("SELECT CAST(:value AS integer)"), {"value": WEBHOOK_SECRET})
    assert WEBHOOK_SECRET in str(failed.value.orig)  # PostgreSQL quotes the bad value
    logger.error(
        "Query failed", exc_info=failed.value, extra={"action": "query", "error": failed.value}
    )

    written = log_output.getvalue()
    assert "InvalidTextRepresentation" in written
    assert WEBHOOK_SECRET not in written
    assert WEBHOOK_SECRET.removeprefix("whsec_") not in written
