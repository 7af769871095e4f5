"""Schema fuzzing: every route in `/openapi.json`, generated valid and invalid input.

Schemathesis reads the document the API serves and sends each operation bounded
numbers of generated requests (valid ones, and ones that break the schema on
purpose), as an admin key so that every route is reached. No answer may be a
5xx, and every answer must match what the document says of that route (status,
media type, body schema).

It runs on a database and Redis index of its own: fuzzed steps, workflows and
webhooks never meet the other tests' rows. Webhook host names resolve to a
public documentation address without asking DNS (no traffic leaves the
machine); no webhooks process runs here, so nothing is ever sent to them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import replace

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import allow_header_conformance, positive_data_acceptance

from bench import scratch
from emp_tasks.core import config, targets
from emp_tasks.store import redisdb
from emp_tasks.store.db import ROOT
from tests.conftest import ARTIFACTS, KEYS
from web import (  # noqa: F401 - importing the route modules declares every route
    dashboard,
    emprops,
    fleet,
    health,
    jobs,
    metrics,
    openapi,
    outputs,
    series,
    steps,
    webhooks,
    workflows,
    ws,
)

EXAMPLES_PER_OPERATION = 20
ADMIN = {"Authorization": f"Bearer {KEYS['admin']}"}
PUBLIC_ADDRESS = "93.184.215.14"  # a documentation address: public, and never reached here

CROSS_FIELD_RULES = {"/api/workflows", "/api/workflows/create"}
"""Bodies with a rule JSON Schema cannot say (a step depends on earlier steps only): a
request the schema allows may still be refused there, so only the answers are checked."""

NEEDS_CONFIGURATION = {"/api/emprops/collections"}
"""Routes refused (400) where the deployment does not configure what they forward to;
the fuzzed app configures no EmProps, so only the answers are checked."""

answers: Counter[str] = Counter()


@pytest.fixture(scope="module")
def fuzz_app(services) -> Iterator[object]:
    run = scratch.create("emp_fuzz", ROOT / ".emp" / "test", 0)
    fuzz_settings = replace(
        config.get_settings(),
        redis_url=run.redis_url,
        database_url=run.database_url,
        webhook_allow_private=False,
        # The fuzzer presents wrong keys on purpose; its address is not a guesser's.
        auth_failures_per_minute=0,
    )
    resolve = targets.resolve
    targets.resolve = lambda host, port: [PUBLIC_ADDRESS]
    try:
        from web import create_app

        fuzzed.app = create_app(fuzz_settings)
        yield fuzzed
    finally:
        targets.resolve = resolve
        redisdb.reset_clients()
        run.drop()
        summary = f"schema fuzzing: {sum(answers.values())} requests, by status {dict(answers)}"
        (ARTIFACTS / "fuzz-summary.txt").write_text(summary + "\n")
        print("\n" + summary)


class FuzzedApp:
    """The WSGI app under test, known to the schema before the fixture creates it."""

    app = None

    def __call__(self, environ, start_response):
        return self.app(environ, start_response)


fuzzed = FuzzedApp()
# `/ws` is a protocol upgrade, not a request and response: tests/test_ws.py covers it.
schema = schemathesis.openapi.from_dict(openapi.document()).exclude(path="/ws")
schema.app = fuzzed


@schema.parametrize()
@settings(
    max_examples=EXAMPLES_PER_OPERATION,
    deadline=None,
    # The same cases on every run: CI repeats what passed here, and a failure is
    # reproduced by running the test again.
    derandomize=True,
    suppress_health_check=list(HealthCheck),
)
def test_every_route_answers_within_its_schema_and_never_5xx(case, fuzz_app):
    # Allow-header conformance is left out: the seed routes `/api/jobs/{job_id}` and
    # `/api/workflows/{workflow_id}` also match `/api/jobs/submit` and
    # `/api/workflows/create` for GET, so `Allow` there rightly lists GET, which the
    # document lists under the templated path. test_hostile_input checks every 405.
    excluded = [allow_header_conformance]
    if case.operation.path in CROSS_FIELD_RULES | NEEDS_CONFIGURATION:
        excluded.append(positive_data_acceptance)
    response = case.call_and_validate(app=fuzz_app, headers=ADMIN, excluded_checks=excluded)
    answers[str(response.status_code)] += 1
    assert response.status_code < 500
