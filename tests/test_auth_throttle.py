"""Failed authentication is throttled per client address; key lookups stay bounded.

Every request here comes from a documentation address of its own (203.0.113.0/24),
so the failures counted never touch 127.0.0.1, which the rest of the suite uses.
"""

from __future__ import annotations

import itertools
import time

import pytest

from emp_tasks import auth
from emp_tasks.store import ratelimit
from tests.conftest import KEYS, headers, wait_for
from tests.test_steps_api import assert_error

LIMIT = 20

_addresses = (f"203.0.113.{number}" for number in itertools.count(1))


@pytest.fixture
def address() -> str:
    """A client address no other test uses."""
    return next(_addresses)


@pytest.fixture
def throttled(override_settings) -> None:
    """The failed-authentication limit on (the suite's environment may turn it off), in a
    window with time left, so that a test's failures all count against the same minute."""
    override_settings(auth_failures_per_minute=LIMIT)
    wait_for(lambda: time.time() % ratelimit.WINDOW_S < ratelimit.WINDOW_S - 5, timeout_s=10)


def from_address(client, address: str, path: str, **request_headers: str):
    return client.get(path, headers=request_headers, environ_base={"REMOTE_ADDR": address})


def fail(client, address: str, times: int, path: str = "/api/steps") -> None:
    for number in range(times):
        response = from_address(client, address, path, Authorization=f"Bearer wrong-{number}")
        assert_error(response, 401, "UNAUTHORIZED")


def assert_throttled(response) -> None:
    assert_error(response, 429, "RATE_LIMITED")
    assert 1 <= int(response.headers["Retry-After"]) <= ratelimit.WINDOW_S


def test_an_address_that_failed_too_often_gets_429_even_with_a_valid_key(
    client, throttled, address
):
    fail(client, address, LIMIT)
    assert_throttled(from_address(client, address, "/api/steps", Authorization="Bearer wrong"))
    assert_throttled(from_address(client, address, "/api/steps", **headers()))


def test_other_addresses_are_not_throttled(client, throttled, address):
    fail(client, address, LIMIT)
    other = next(_addresses)
    assert from_address(client, other, "/api/steps", **headers()).status_code == 200


def test_requests_without_a_key_are_not_counted_as_failures(client, throttled, address):
    for _ in range(LIMIT + 5):
        assert_error(from_address(client, address, "/api/steps"), 401, "UNAUTHORIZED")
    assert from_address(client, address, "/api/steps", **headers()).status_code == 200


def test_x_forwarded_for_is_not_believed_by_default(client, throttled, address):
    for number in range(LIMIT):
        response = client.get(
            "/api/steps",
            headers={"Authorization": "Bearer wrong", "X-Forwarded-For": f"198.51.100.{number}"},
            environ_base={"REMOTE_ADDR": address},
        )
        assert_error(response, 401, "UNAUTHORIZED")
    assert_throttled(
        client.get(
            "/api/steps",
            headers={**headers(), "X-Forwarded-For": "198.51.100.250"},
            environ_base={"REMOTE_ADDR": address},
        )
    )


def test_trusted_proxy_hops_count_the_forwarded_client(client, override_settings, address):
    override_settings(auth_failures_per_minute=LIMIT, trusted_proxy_hops=1)
    wait_for(lambda: time.time() % ratelimit.WINDOW_S < ratelimit.WINDOW_S - 5, timeout_s=10)
    guesser, proxy = next(_addresses), address
    for number in range(LIMIT):
        response = client.get(
            "/api/steps",
            headers={"Authorization": f"Bearer wrong-{number}", "X-Forwarded-For": guesser},
            environ_base={"REMOTE_ADDR": proxy},
        )
        assert_error(response, 401, "UNAUTHORIZED")
    blocked = client.get(
        "/api/steps",
        headers={**headers(), "X-Forwarded-For": f"spoofed, {guesser}"},
        environ_base={"REMOTE_ADDR": proxy},
    )
    assert_throttled(blocked)
    behind_the_same_proxy = client.get(
        "/api/steps",
        headers={**headers(), "X-Forwarded-For": next(_addresses)},
        environ_base={"REMOTE_ADDR": proxy},
    )
    assert behind_the_same_proxy.status_code == 200


def test_wrong_metrics_tokens_are_throttled(client, override_settings, address):
    override_settings(auth_failures_per_minute=LIMIT, metrics_token="scrape-secret")
    wait_for(lambda: time.time() % ratelimit.WINDOW_S < ratelimit.WINDOW_S - 5, timeout_s=10)
    fail(client, address, LIMIT, path="/metrics")
    assert_throttled(
        from_address(client, address, "/metrics", Authorization="Bearer scrape-secret")
    )


def test_websocket_authentication_shares_the_throttle(client, throttled, address):
    fail(client, address, LIMIT - 1)
    assert_error(from_address(client, address, "/ws?token=wrong"), 401, "UNAUTHORIZED")
    assert_throttled(from_address(client, address, f"/ws?token={KEYS['alice']}"))


def test_ten_thousand_unknown_keys_leave_the_cache_at_its_bound(services, monkeypatch):
    raw, _ = auth.create_key("alice", name="cache-bound")
    auth.known_keys.clear()
    auth.unknown_keys.clear()
    assert auth.authenticate(raw) is not None
    looked_up: list[str] = []

    def lookup(digest: str) -> None:
        looked_up.append(digest)  # stands in for the database: every key here is unknown

    monkeypatch.setattr(auth, "_lookup", lookup)
    for number in range(10_000):
        assert auth.authenticate(f"unknown-{number}") is None

    assert len(looked_up) == 10_000
    assert len(auth.unknown_keys) == auth.unknown_keys.max_entries
    assert len(auth.known_keys) == 1
    assert auth.authenticate(raw) is not None  # the flood did not push the real key out
