"""What the API refuses at the door: hostile and careless input, read as a list.

Every case here is answered with a 4xx in the API's error format, and a count of
every table's rows taken before and after shows that nothing changed. Each class
is generated (Hypothesis, at least 100 cases) rather than written out, so that a
sibling of a known bad input is refused too. Related lists: `test_ssrf.py`
(webhook URLs), `test_ws.py` (WebSocket frames), `test_auth_throttle.py` (failed
authentication), `test_fuzz_openapi.py` (every route, from the OpenAPI document).

- JSON text PostgreSQL cannot store: a NUL character or a lone UTF-16 surrogate,
  in any key or value of any body, path or query string;
- numbers that are not finite: NaN, Infinity, -Infinity and overflowing exponents;
- JSON nested deeper than `web.inbound.MAX_JSON_DEPTH` levels;
- a body not declared as JSON (415), a body over EMP_MAX_BODY_BYTES (413, also
  when it is sent chunked), a method a route does not have (405 with `Allow`);
- over-long names where a field has a cap (models, labels, filters, headers);
- what gunicorn refuses before the application sees it (414, 431, 400).
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import text

from emp_tasks.store import db
from tests.conftest import headers, wait_for_status
from web.inbound import MAX_JSON_DEPTH

GENERATED = settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
TABLES = (
    "steps",
    "workflows",
    "step_attempts",
    "events",
    "idempotency_keys",
    "webhook_endpoints",
    "webhook_deliveries",
    "routes",
)
POISON = "__poison__"
UNSERVED = "hostile-unserved"


def row_counts() -> dict[str, int]:
    with db.engine().connect() as connection:
        return {
            table: connection.execute(text(f"SELECT count(*) FROM {table}")).scalar_one()
            for table in TABLES
        }


@pytest.fixture
def unchanged(client):
    """Fails the test if any table gained or lost a row while it ran."""
    before = row_counts()
    yield
    assert row_counts() == before


def assert_refused(response, status: int = 400, code: str = "VALIDATION_FAILED") -> dict:
    assert response.status_code == status, response.get_data(as_text=True)[:500]
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert body["success"] is False
    assert body["error"]["code"] == code
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]


# --- where poison can go ----------------------------------------------------------------------

BODIES = {
    "/api/steps": lambda p: {"service": UNSERVED, "payload": {"prompt": p}},
    "/submit-step": lambda p: {"service": UNSERVED, "metadata": {"tag": p}},
    "/api/workflows": lambda p: {
        "name": "w",
        "steps": [{"service": UNSERVED}, {"service": UNSERVED, "payload": {"x": [p]}}],
    },
    "/api/webhooks": lambda p: {
        "url": "https://hooks.example.com/in",
        "description": p,
    },
}
PLACES = [
    lambda p: {"service": UNSERVED, "payload": {"a": {"b": p}}},
    lambda p: {"service": UNSERVED, "metadata": {"list": [1, p]}},
    lambda p: {"service": UNSERVED, "requirements": {"region": p}},
    lambda p: {"service": UNSERVED, "customer_id": p},
    lambda p: {"service": UNSERVED, "webhook_url": p},
]
routes_and_bodies = st.one_of(
    st.sampled_from(sorted(BODIES.items())),
    st.sampled_from(PLACES).map(lambda place: ("/api/steps", place)),
)


def send_raw(client, route: str, raw: str, who: str = "alice"):
    return client.post(
        route, data=raw.encode(), headers=headers(who), content_type="application/json"
    )


def with_token(build, token: str) -> str:
    """The JSON text of a body with `token` (raw JSON text) where the poison goes."""
    return json.dumps(build(POISON)).replace(json.dumps(POISON), token)


# --- text PostgreSQL cannot store ----------------------------------------------------------

nul_text = st.tuples(st.text(max_size=12), st.text(max_size=12)).map(lambda t: f"{t[0]}\x00{t[1]}")
storable = st.text(st.characters(exclude_characters="\x00"), max_size=12)
surrogate_text = st.tuples(storable, st.integers(0xD800, 0xDFFF), storable).map(
    lambda t: f"{t[0]}{chr(t[1])}{t[2]}"
)


@GENERATED
@given(target=routes_and_bodies, poison=nul_text, as_key=st.booleans())
def test_nul_character_in_any_string_is_refused(client, unchanged, target, poison, as_key):
    route, build = target
    body = build({poison: 1} if as_key else poison)
    error = assert_refused(send_raw(client, route, json.dumps(body)))
    assert "NUL" in error["message"]


@GENERATED
@given(target=routes_and_bodies, poison=surrogate_text, as_key=st.booleans())
def test_lone_surrogate_in_any_string_is_refused(client, unchanged, target, poison, as_key):
    route, build = target
    body = build({poison: 1} if as_key else poison)
    error = assert_refused(send_raw(client, route, json.dumps(body)))
    assert "surrogate" in error["message"]


def test_refused_text_names_the_field(client, unchanged):
    body = {"service": UNSERVED, "payload": {"a": {"b": ["ok", "bad\x00"]}}}
    error = assert_refused(send_raw(client, "/api/steps", json.dumps(body)))
    assert error["details"][0]["field"] == "payload.a.b.1"


@GENERATED
@given(
    where=st.sampled_from(
        ["/api/steps/{}", "/api/workflows/{}", "/api/webhooks/{}", "/api/steps/{}/events"]
    ),
    poison=nul_text.map(lambda t: quote(t, safe="")),
)
def test_nul_character_in_a_path_is_refused(client, unchanged, where, poison):
    assert_refused(client.get(where.format(poison), headers=headers()))


@GENERATED
@given(
    route=st.sampled_from(["/api/steps", "/api/workflows", "/api/steps/stats", "/api/workers"]),
    name=st.sampled_from(["service", "cursor", "status", "workflow_id", "timeframe", "x"]),
    poison=nul_text.map(lambda t: quote(t, safe="")),
)
def test_nul_character_in_a_query_string_is_refused(client, unchanged, route, name, poison):
    assert_refused(client.get(f"{route}?{name}={poison}", headers=headers()))


def test_nul_character_in_the_idempotency_key_is_refused(client, unchanged):
    response = client.post(
        "/api/steps",
        json={"service": UNSERVED},
        headers=headers(**{"Idempotency-Key": "key\x00one"}),
    )
    error = assert_refused(response)
    assert error["details"][0]["field"] == "Idempotency-Key"


# --- numbers that are not finite -----------------------------------------------------------

non_finite = st.one_of(
    st.sampled_from(["NaN", "Infinity", "-Infinity"]),
    st.builds(
        lambda sign, mantissa, exponent, letter: f"{sign}{mantissa}{letter}{exponent}",
        st.sampled_from(["", "-"]),
        st.sampled_from(["1", "9.5", "1.7976931348623157", "123456"]),
        st.integers(309, 100_000).map(str) | st.integers(309, 999).map(lambda e: f"+{e}"),
        st.sampled_from(["e", "E"]),
    ),
)


@GENERATED
@given(target=routes_and_bodies, token=non_finite)
def test_non_finite_numbers_are_refused(client, unchanged, target, token):
    route, build = target
    error = assert_refused(send_raw(client, route, with_token(build, token)))
    assert error["details"][0]["type"] == "number_not_finite"


@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity", "1e400"])
@pytest.mark.parametrize("field", ["payload", "metadata", "requirements"])
def test_non_finite_number_in_each_free_form_field_is_refused(client, unchanged, token, field):
    raw = json.dumps({"service": UNSERVED, field: {"value": POISON}})
    assert_refused(send_raw(client, "/api/steps", raw.replace(json.dumps(POISON), token)))


# --- depth ---------------------------------------------------------------------------------


def nested(depth: int, kind: str) -> str:
    """JSON text `depth` levels deep (arrays, objects, or both in turn)."""
    opening, closing = [], []
    for level in range(depth):
        as_object = kind == "object" or (kind == "mixed" and level % 2)
        opening.append('{"k":' if as_object else "[")
        closing.append("}" if as_object else "]")
    return "".join(opening) + "1" + "".join(reversed(closing))


@GENERATED
@given(
    target=routes_and_bodies,
    depth=st.one_of(st.integers(MAX_JSON_DEPTH, MAX_JSON_DEPTH + 20), st.integers(65, 5000)),
    kind=st.sampled_from(["array", "object", "mixed"]),
)
def test_json_nested_beyond_the_limit_is_refused(client, unchanged, target, depth, kind):
    route, build = target
    error = assert_refused(send_raw(client, route, with_token(build, nested(depth, kind))))
    assert error["details"][0]["type"] == "json_too_deep"


def test_json_nested_far_beyond_the_parser_is_refused(client, unchanged):
    raw = '{"service": "x", "payload": ' + nested(200_000, "array") + "}"
    error = assert_refused(send_raw(client, "/api/steps", raw))
    assert error["details"][0]["type"] == "json_too_deep"


def test_step_at_the_depth_limit_is_accepted_and_completes(client, system):
    # body (1) > payload (2) > "deep" (3) ... the innermost array is level MAX_JSON_DEPTH.
    raw = '{"service": "simulation", "payload": {"deep": ' + nested(MAX_JSON_DEPTH - 2, "mixed")
    response = send_raw(client, "/api/steps", raw + "}}")
    assert response.status_code == 201, response.get_json()
    step = wait_for_status(client, response.get_json()["step_id"], {"completed", "failed"})
    assert step["status"] == "completed"
    assert step["attempts"] == 1


# --- media type, size, method --------------------------------------------------------------

not_json_types = st.one_of(
    st.sampled_from(
        [
            "text/plain",
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=x",
            "application/xml",
            "text/json",
            "application/jsonp",
        ]
    ),
    st.from_regex(r"\A(text|image|audio|video)/[a-z]{1,10}\Z"),
)


@GENERATED
@given(route=st.sampled_from(sorted(BODIES)), content_type=not_json_types)
def test_body_not_declared_as_json_is_415(client, unchanged, route, content_type):
    response = client.post(
        route,
        data=json.dumps(BODIES[route]("fine")).encode(),
        headers=headers(),
        content_type=content_type,
    )
    error = assert_refused(response, 415, "UNSUPPORTED_MEDIA_TYPE")
    assert "application/json" in error["message"]


def test_body_without_a_content_type_is_415(client, unchanged):
    response = client.post(
        "/api/steps", data=json.dumps({"service": UNSERVED}).encode(), headers=headers()
    )
    assert_refused(response, 415, "UNSUPPORTED_MEDIA_TYPE")


def test_json_with_a_charset_or_a_json_suffix_type_is_accepted(client):
    for content_type in ("application/json; charset=utf-8", "application/merge-patch+json"):
        response = client.post(
            "/api/steps",
            data=json.dumps({"service": UNSERVED}).encode(),
            headers=headers(),
            content_type=content_type,
        )
        assert response.status_code == 201, response.get_json()


def test_body_over_the_size_limit_is_413(client, settings, unchanged):
    raw = json.dumps({"service": UNSERVED, "payload": {"x": "a" * settings.max_body_bytes}})
    assert_refused(send_raw(client, "/api/steps", raw), 413, "PAYLOAD_TOO_LARGE")


def test_a_method_a_route_lacks_is_405_with_allow(app, client):
    checked = 0
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        path = re.sub(r"<(?:[a-z]+:)?([a-z_]+)>", r"\1", rule.rule)
        allowed = set(rule.methods or ())
        for other in app.url_map.iter_rules():
            if re.sub(r"<(?:[a-z]+:)?([a-z_]+)>", r"\1", other.rule) == path:
                allowed |= set(other.methods or ())
        method = next(m for m in ("PUT", "DELETE", "PATCH", "POST") if m not in allowed)
        response = client.open(path, method=method, headers=headers())
        assert_refused(response, 405, "METHOD_NOT_ALLOWED")
        assert allowed - {"OPTIONS"} <= set(response.headers["Allow"].replace(" ", "").split(","))
        checked += 1
    assert checked > 30


# --- capped fields -------------------------------------------------------------------------

too_long = st.integers(201, 2000).map(lambda n: "m" * n)


@GENERATED
@given(
    build=st.sampled_from(
        [
            lambda s: ("/api/steps", {"service": UNSERVED, "requirements": {"models": [s]}}),
            lambda s: ("/api/steps", {"service": UNSERVED, "requirements": {"region": s}}),
            lambda s: ("/api/steps", {"service": UNSERVED, "requirements": {s: "x"}}),
            lambda s: ("/api/steps", {"service": s}),
            lambda s: ("/api/steps", {"service": UNSERVED, "customer_id": s}),
            lambda s: ("/api/workflows", {"name": "w" * 501 + s, "steps": [{"service": "x"}]}),
            lambda s: (
                "/api/webhooks",
                {"url": "https://hooks.example.com/", "filters": {"services": [s]}},
            ),
            lambda s: (
                "/api/webhooks",
                {"url": "https://hooks.example.com/", "filters": {"workflow_ids": [s]}},
            ),
        ]
    ),
    value=too_long,
)
def test_over_long_names_are_refused(client, unchanged, build, value):
    route, body = build(value)
    assert_refused(client.post(route, json=body, headers=headers()))


def test_label_values_are_short_scalars(client, unchanged):
    for label in ({"a": 1}, [1, 2]):
        body = {"service": UNSERVED, "requirements": {"region": label}}
        error = assert_refused(client.post("/api/steps", json=body, headers=headers()))
        assert error["details"][0]["field"] == "requirements"
    many = {f"label{n}": "x" for n in range(51)}
    body = {"service": UNSERVED, "requirements": many}
    assert_refused(client.post("/api/steps", json=body, headers=headers()))


# --- over the wire: what gunicorn refuses, chunked bodies --------------------------------


def raw_exchange(base: str, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes to the live web process; return status, headers and body."""
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as conn:
        # The server may answer and close before reading all of it.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            conn.sendall(request)
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    fields = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    fields = {name.lower(): value for name, value in fields.items()}
    if fields.get("transfer-encoding") == "chunked":
        body = dechunk(body)
    return int(lines[0].split()[1]), fields, body


def dechunk(body: bytes) -> bytes:
    out = b""
    while body:
        size_line, _, body = body.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out, body = out + body[:size], body[size + 2 :]
    return out


def assert_json_error(status: int, fields: dict[str, str], body: bytes, code: str) -> None:
    assert fields["content-type"].startswith("application/json"), (status, body[:300])
    error = json.loads(body)
    assert error["success"] is False
    assert error["error"]["code"] == code


def test_request_line_over_gunicorns_limit_is_414_in_our_format(live_api):
    path = "/api/steps?service=" + "a" * 5000
    status, fields, body = raw_exchange(
        live_api, f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    )
    assert status == 414
    assert_json_error(status, fields, body, "URI_TOO_LONG")


def test_header_over_gunicorns_limit_is_431_in_our_format(live_api):
    request = f"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: {'b' * 9000}\r\n\r\n"
    status, fields, body = raw_exchange(live_api, request.encode())
    assert status == 431
    assert_json_error(status, fields, body, "HEADERS_TOO_LARGE")


def test_too_many_headers_are_431_in_our_format(live_api):
    many = "".join(f"X-H{n}: v\r\n" for n in range(150))
    status, fields, body = raw_exchange(
        live_api, f"GET /health HTTP/1.1\r\nHost: x\r\n{many}\r\n".encode()
    )
    assert status == 431
    assert_json_error(status, fields, body, "HEADERS_TOO_LARGE")


def test_malformed_request_line_is_400_in_our_format(live_api):
    status, fields, body = raw_exchange(live_api, b"GET /health HTTP/1.1 extra\r\nHost: x\r\n\r\n")
    assert status == 400
    assert_json_error(status, fields, body, "VALIDATION_FAILED")


def test_chunked_body_over_the_size_limit_is_413_not_cut(live_api, settings):
    key = headers()["Authorization"]
    piece = b"a" * 65536
    chunks = b"".join(
        b"%x\r\n%s\r\n" % (len(piece), piece)
        for _ in range(settings.max_body_bytes // len(piece) + 2)
    )
    body = b'{"service": "x", "payload": {"x": "' + b"a" * 10 + b'"}}'
    # A valid JSON object as the body's first bytes: cutting the body at the limit
    # must not turn it into something that parses.
    request = (
        b"POST /api/steps HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Connection: close\r\nAuthorization: " + key.encode() + b"\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
        + b"%x\r\n%s\r\n" % (len(body), body)
        + chunks
        + b"0\r\n\r\n"
    )
    status, fields, answer = raw_exchange(live_api, request)
    assert status == 413, answer[:300]
    assert_json_error(status, fields, answer, "PAYLOAD_TOO_LARGE")


def test_chunked_body_within_the_limit_is_read_whole(live_api):
    key = headers()["Authorization"]
    body = json.dumps({"service": UNSERVED, "payload": {"x": "y" * 200_000}}).encode()
    parts = [body[i : i + 10_000] for i in range(0, len(body), 10_000)]
    request = (
        b"POST /api/steps HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Connection: close\r\nAuthorization: " + key.encode() + b"\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
        + b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts)
        + b"0\r\n\r\n"
    )
    status, _, answer = raw_exchange(live_api, request)
    assert status == 201, answer[:300]
    assert json.loads(answer)["step"]["payload"]["x"] == "y" * 200_000
