"""Webhooks cannot be turned against the server's own network (issue 11).

Registration (`POST /api/webhooks`, `PATCH`, a step's or a workflow's `webhook_url`)
refuses every URL two parsers could read differently and every internal address,
changing nothing; the sender vets the URL again before each attempt and connects
only to the address it vetted.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from sqlalchemy import delete, select, text

from emp_tasks.core import targets
from emp_tasks.core.status import DeliveryStatus
from emp_tasks.store import db
from emp_tasks.store.models import WebhookEndpoint
from emp_tasks.webhooks import delivery
from tests.conftest import WEBHOOK_SECRET, free_port, headers
from tests.receiver import Receiver
from tests.test_steps_api import assert_error
from tests.unit.test_targets import (
    PUBLIC_IP,
    SYNTAX_CLASSES,
    FakeDNS,
    embedded_ipv4_urls,
)

CLASSES = {**SYNTAX_CLASSES, "IPv6 embedding": embedded_ipv4_urls()}
THROUGH_THE_API = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
TABLES = ("webhook_endpoints", "steps", "workflows", "webhook_deliveries")


@pytest.fixture(autouse=True)
def forget_endpoints(services) -> Iterator[None]:
    """Remove the endpoints a test registered (and, by cascade, their deliveries).

    They name hosts only this process's fake resolver knows: a `webhooks` process
    started by a later test would look them up for every event it delivers.
    """
    with db.transaction() as session:
        before = set(session.scalars(select(WebhookEndpoint.id)))
    yield
    with db.transaction() as session:
        session.execute(delete(WebhookEndpoint).where(WebhookEndpoint.id.not_in(before)))


@pytest.fixture
def dns(monkeypatch) -> FakeDNS:
    """Names resolve only as a test says (the `webhooks` process is not involved)."""
    fake = FakeDNS()
    monkeypatch.setattr(targets, "resolve", fake.resolve)
    return fake


@pytest.fixture
def strict(override_settings, dns) -> FakeDNS:
    """EMP_WEBHOOK_ALLOW_PRIVATE=false, as in production; every other name looks public."""
    override_settings(webhook_allow_private=False)
    dns.answers["hooks.example.test"] = [PUBLIC_IP]
    return dns


@pytest.fixture
def endpoint(client, strict) -> dict:
    response = client.post(
        "/api/webhooks", json={"url": "https://hooks.example.test/hook"}, headers=headers()
    )
    assert response.status_code == 201, response.get_json()
    return response.get_json()["webhook"]


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """A real socket listening on 127.0.0.1: whatever connects to it is a leak."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        yield server


def assert_nothing_connected(server: socket.socket) -> None:
    server.settimeout(1.0)
    with pytest.raises(TimeoutError):
        connection, _ = server.accept()
        connection.close()


def row_counts() -> dict[str, int]:
    with db.transaction() as session:
        return {table: session.scalar(text(f"SELECT count(*) FROM {table}")) for table in TABLES}


def register_everywhere(client, url: str, endpoint_id: str) -> list[tuple[object, str]]:
    """Offer `url` at every place a webhook URL is registered; (response, field) pairs."""
    step = {"service": "simulation", "payload": {}}
    return [
        (client.post("/api/webhooks", json={"url": url}, headers=headers()), "url"),
        (
            client.patch(f"/api/webhooks/{endpoint_id}", json={"url": url}, headers=headers()),
            "url",
        ),
        (
            client.post("/api/steps", json={**step, "webhook_url": url}, headers=headers()),
            "webhook_url",
        ),
        (
            client.post(
                "/api/workflows",
                json={"name": "w", "steps": [step], "webhook_url": url},
                headers=headers(),
            ),
            "webhook_url",
        ),
        (
            client.post(
                "/api/workflows",
                json={"name": "w", "steps": [{**step, "webhook_url": url}]},
                headers=headers(),
            ),
            "steps.0.webhook_url",
        ),
    ]


def assert_refused(response, field: str) -> dict:
    error = assert_error(response, 400, "VALIDATION_FAILED")
    fields = {detail["field"] for detail in error["details"]}
    assert any(name == field or name.startswith(f"{field}.") for name in fields), error
    return error


# --- registration --------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_every_ambiguous_or_internal_url_is_refused_everywhere_and_changes_nothing(
    client, endpoint, name
):
    before = row_counts()
    offered: set[str] = set()

    @THROUGH_THE_API
    @given(url=CLASSES[name])
    def offer(url: str) -> None:
        offered.add(url)
        for response, field in register_everywhere(client, url, endpoint["id"]):
            assert_refused(response, field)

    offer()
    assert len(offered) >= 100  # distinct URLs, each offered at all five places
    assert row_counts() == before
    shown = client.get(f"/api/webhooks/{endpoint['id']}", headers=headers()).get_json()
    assert shown["webhook"]["url"] == "https://hooks.example.test/hook"


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:18999\\@8.8.8.8/x",
        "http://169.254.169.254\\@8.8.8.8/",
        "http://example.com:99999/",
        "http://example.com:-1/",
        "http://[::1/",
        "http://]",
        "http://xn--.com/",
        "http://ex\u00e4mple\u3002com/",
        "http://" + "a" * 64 + ".example/",
        "http://100.64.0.1/",
        "http://[2002:7f00:1::]/",
        "http://[::ffff:127.0.0.1]/",
        "http://[64:ff9b::7f00:1]/",
    ],
)
def test_known_bypasses_and_broken_urls_are_a_400_naming_the_field(client, endpoint, url):
    before = row_counts()
    for response, field in register_everywhere(client, url, endpoint["id"]):
        assert_refused(response, field)
    assert row_counts() == before


def test_metadata_address_is_refused_even_when_private_targets_are_allowed(
    client, override_settings
):
    override_settings(webhook_allow_private=True)
    for url in ("http://169.254.169.254/latest", "http://[::ffff:169.254.169.254]/"):
        response = client.post("/api/webhooks", json={"url": url}, headers=headers())
        assert "metadata" in assert_refused(response, "url")["message"]


def test_refusal_does_not_reveal_the_internal_address_a_name_resolves_to(client, strict):
    strict.answers["internal.example.test"] = ["10.11.12.13"]
    strict.answers["meta.example.test"] = ["169.254.169.254"]
    for name in ("internal", "meta"):
        response = client.post(
            "/api/webhooks", json={"url": f"http://{name}.example.test/x"}, headers=headers()
        )
        assert_refused(response, "url")
        body = response.get_data(as_text=True)
        assert "10.11.12.13" not in body and "169.254.169.254" not in body


def test_patching_another_customers_webhook_is_404_before_any_lookup(client, strict):
    theirs = client.post(
        "/api/webhooks", json={"url": "https://hooks.example.test/bob"}, headers=headers("bob")
    ).get_json()["webhook"]
    strict.calls.clear()
    response = client.patch(
        f"/api/webhooks/{theirs['id']}",
        json={"url": "http://probe.example.test/"},
        headers=headers("alice"),
    )
    assert_error(response, 404, "WEBHOOK_NOT_FOUND")
    assert strict.calls == []


@pytest.mark.parametrize(
    "bad",
    [
        {"X-Evil": "a\r\nInjected: yes"},
        {"X-Evil": "a\nb"},
        {"X-Evil": "nul\x00"},
        {"X-Evil\r\nInjected": "yes"},
        {"X Evil": "yes"},
        {"X-Evil:": "yes"},
        {"": "empty name"},
        {"x" * 101: "long name"},
        {"X-Long": "v" * 2001},
        {"Transfer-Encoding": "chunked"},
        {"content-length": "0"},
        {"Host": "internal"},
        {"Connection": "close"},
        {"Keep-Alive": "1"},
        {"TE": "trailers"},
        {"Trailer": "x"},
        {"Upgrade": "h2c"},
        {"Proxy-Authorization": "Basic x"},
        {"webhook-id": "x"},
        {"Webhook-Anything": "x"},
        {"Content-Type": "text/plain"},
    ],
)
def test_unsafe_webhook_headers_are_a_400_naming_headers(client, endpoint, bad):
    created = client.post(
        "/api/webhooks",
        json={"url": "https://hooks.example.test/x", "headers": bad},
        headers=headers(),
    )
    assert_refused(created, "headers")
    patched = client.patch(
        f"/api/webhooks/{endpoint['id']}", json={"headers": bad}, headers=headers()
    )
    assert_refused(patched, "headers")


def test_ordinary_webhook_headers_are_kept(client, strict):
    wanted = {"Authorization": "Bearer abc.def", "X-Tenant": "t-1 \t ok"}
    created = client.post(
        "/api/webhooks",
        json={"url": "https://hooks.example.test/x", "headers": wanted},
        headers=headers(),
    )
    assert created.status_code == 201, created.get_json()
    assert created.get_json()["webhook"]["headers"] == wanted


# --- sending -------------------------------------------------------------------------------


def claimed(url: str, endpoint_id: str | None = None) -> delivery.Claimed:
    return delivery.Claimed(
        id="not-recorded",
        url=url,
        event_id=f"evt-{time.time_ns()}",
        body={"id": "evt", "type": "webhook_test", "timestamp": "2026-01-01T00:00:00Z", "data": {}},
        attempt=1,
        endpoint_id=endpoint_id,
        secret=WEBHOOK_SECRET,
        headers={},
    )


def test_name_rebound_to_loopback_after_registration_is_refused_and_never_connected(
    client, strict, listener
):
    port = listener.getsockname()[1]
    url = f"http://rebind.example.test:{port}/hook"
    strict.answers["rebind.example.test"] = [PUBLIC_IP]
    registered = client.post("/api/webhooks", json={"url": url}, headers=headers())
    assert registered.status_code == 201, registered.get_json()
    endpoint_id = registered.get_json()["webhook"]["id"]
    test = client.post(f"/api/webhooks/{endpoint_id}/test", headers=headers()).get_json()

    strict.answers["rebind.example.test"] = ["127.0.0.1"]
    item = claimed(url, endpoint_id)
    item = delivery.Claimed(**{**item.__dict__, "id": test["delivery"]["id"]})
    response = delivery.post(item)

    assert response.status_code is None and response.error.startswith("target refused")
    assert "127.0.0.1" not in response.error
    assert_nothing_connected(listener)
    assert delivery.finish(item, response) == DeliveryStatus.FAILED
    assert strict.calls[-1] == "rebind.example.test"


@pytest.mark.parametrize(
    "template",
    [
        "http://127.0.0.1:{port}\\@8.8.8.8/x",
        "http://user@127.0.0.1:{port}/x",
        "http://0x7f.1:{port}/x",
        "http://2130706433:{port}/x",
        "http://[::ffff:127.0.0.1]:{port}/x",
        "http://127.0.0.1:{port}/x",
    ],
)
def test_url_stored_before_the_rules_is_refused_at_send_time(strict, listener, template):
    url = template.format(port=listener.getsockname()[1])
    response = delivery.post(claimed(url))
    assert response.error.startswith("target refused")
    assert_nothing_connected(listener)


def test_sender_connects_to_the_vetted_address_without_resolving_again(
    override_settings, dns, monkeypatch
):
    override_settings(webhook_allow_private=True)
    receiver = Receiver(free_port()).start()
    try:
        dns.answers["hooks.example.test"] = ["127.0.0.1"]
        real_getaddrinfo = socket.getaddrinfo

        def literals_only(host, *args, **kwargs):
            assert host != "hooks.example.test", "the sender resolved the name again"
            return real_getaddrinfo(host, *args, **kwargs)

        monkeypatch.setattr(socket, "getaddrinfo", literals_only)
        response = delivery.post(claimed(f"http://hooks.example.test:{receiver.port}/hook"))
    finally:
        receiver.stop()
    assert response.status_code == 200, response.error
    assert dns.calls == ["hooks.example.test"]
    [request] = receiver.received
    assert request.headers["host"] == f"hooks.example.test:{receiver.port}"
    assert request.path == "/hook"
    assert "webhook-signature" in request.headers


def test_each_attempt_vets_the_target_again(override_settings, dns):
    override_settings(webhook_allow_private=True)
    receiver = Receiver(free_port()).start()
    try:
        dns.answers["hooks.example.test"] = ["127.0.0.1"]
        url = f"http://hooks.example.test:{receiver.port}/hook"
        assert delivery.post(claimed(url)).status_code == 200
        dns.answers["hooks.example.test"] = ["169.254.169.254"]
        refused = delivery.post(claimed(url))
    finally:
        receiver.stop()
    assert refused.error.startswith("target refused") and "169.254" not in refused.error
    assert len(receiver.received) == 1
    assert dns.calls == ["hooks.example.test", "hooks.example.test"]
