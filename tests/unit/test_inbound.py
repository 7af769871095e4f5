"""Raw request data: the pure rules of web.inbound (no services)."""

from __future__ import annotations

import json

import pytest

from web.inbound import (
    MAX_JSON_DEPTH,
    InboundRefused,
    check_url_text,
    decode_json,
    is_json_media_type,
    valid_idempotency_key,
)


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def test_json_at_the_depth_limit_decodes_and_one_level_more_is_refused():
    assert decode_json(nested(MAX_JSON_DEPTH).encode())
    with pytest.raises(InboundRefused) as refused:
        decode_json(nested(MAX_JSON_DEPTH + 1).encode())
    assert refused.value.kind == "json_too_deep"


def test_json_deeper_than_the_parser_can_go_is_refused_as_too_deep():
    with pytest.raises(InboundRefused) as refused:
        decode_json(nested(100_000).encode())
    assert refused.value.kind == "json_too_deep"


@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity", "1e400", "-2.5E+999"])
def test_non_finite_numbers_are_refused(token):
    with pytest.raises(InboundRefused) as refused:
        decode_json(f'{{"a": [1, {token}]}}'.encode())
    assert refused.value.kind == "number_not_finite"


def test_large_finite_numbers_are_kept():
    assert decode_json(b'{"a": 1e308, "b": -1.5e-300, "c": 12345678901234567890}')["c"] > 0


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ('{"a": {"b": ["ok", "x\\u0000"]}}', "a.b.1"),
        ('{"a": {"k\\u0000": 1}}', "a"),
        ('{"a": "\\ud800"}', "a"),
        ('{"a": ["\\udfff tail"]}', "a.0"),
    ],
)
def test_text_postgresql_cannot_store_is_refused_naming_the_field(text, field):
    with pytest.raises(InboundRefused) as refused:
        decode_json(text.encode())
    assert refused.value.field == field
    assert refused.value.kind == "text_invalid"


def test_surrogate_pairs_are_ordinary_characters():
    assert decode_json(json.dumps({"a": "\U0001f600"}).encode()) == {"a": "\U0001f600"}


def test_invalid_utf8_is_invalid_json():
    with pytest.raises(InboundRefused) as refused:
        decode_json(b'{"a": "\xff"}')
    assert refused.value.kind == "json_invalid"


@pytest.mark.parametrize(
    ("mimetype", "accepted"),
    [
        ("application/json", True),
        ("APPLICATION/JSON", True),
        ("application/merge-patch+json", True),
        ("text/json", False),
        ("text/plain", False),
        ("application/x-www-form-urlencoded", False),
        ("", False),
    ],
)
def test_json_media_types(mimetype, accepted):
    assert is_json_media_type(mimetype) is accepted


def test_nul_in_a_path_or_query_is_refused_naming_where():
    with pytest.raises(InboundRefused) as refused:
        check_url_text("/api/steps/a\x00b", {})
    assert refused.value.field == "path"
    with pytest.raises(InboundRefused) as refused:
        check_url_text("/api/steps", {"service": ["ok", "x\x00"]})
    assert refused.value.field == "service"
    check_url_text("/api/steps", {"service": ["plain"]})


@pytest.mark.parametrize(
    ("key", "valid"),
    [
        ("idem-1", True),
        ("order 42 / retry", True),
        ("k" * 255, True),
        ("k" * 256, False),
        ("", False),
        (" leading", False),
        ("nul\x00", False),
        ("caf\xe9", False),
    ],
)
def test_idempotency_keys_are_visible_ascii(key, valid):
    assert valid_idempotency_key(key) is valid
