"""What raw request data the API accepts, before any model sees it.

A body is JSON (declared as such), no deeper than MAX_JSON_DEPTH, with finite
numbers only and text that PostgreSQL can store (no NUL character, no lone
UTF-16 surrogate); a path or query string carries no NUL either. Checking this
at the door is what makes "nothing accepted can fail later" hold: a value that
PostgreSQL, the event stream or a worker could not store or serialise again is
refused here with a 400 naming the field, instead of failing a step after it
was accepted.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

MAX_JSON_DEPTH = 64
"""Deepest nesting of objects and arrays in a request body (the body itself is level 1)."""

JSON_MEDIA_TYPES = ("application/json",)

MAX_IDEMPOTENCY_KEY = 255
IDEMPOTENCY_KEY_PATTERN = r"^[!-~](?:[ -~]{0,253}[!-~])?$"
"""1 to 255 visible ASCII characters, spaces inside only."""


class InboundRefused(ValueError):
    """Raw input the API does not take; `field` names where, `kind` what was wrong."""

    def __init__(self, field: str, message: str, kind: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message
        self.kind = kind


def is_json_media_type(mimetype: str) -> bool:
    """`application/json` or a structured `+json` type (parameters such as charset aside)."""
    mimetype = mimetype.lower()
    return mimetype in JSON_MEDIA_TYPES or (
        mimetype.startswith("application/") and mimetype.endswith("+json")
    )


def _no_constants(name: str) -> Any:
    raise InboundRefused("body", f"{name} is not a JSON number", "number_not_finite")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise InboundRefused("body", f"{text} is out of the range of a number", "number_not_finite")
    return value


def decode_json(raw: bytes) -> Any:
    """Parse a request body; raise InboundRefused for anything we could not keep safely."""
    try:
        data = json.loads(raw, parse_constant=_no_constants, parse_float=_finite)
    except RecursionError as exc:
        raise _too_deep("body") from exc
    except InboundRefused:
        raise
    except (ValueError, UnicodeDecodeError) as exc:
        raise InboundRefused(
            "body", f"request body is not valid JSON: {exc}", "json_invalid"
        ) from exc
    check_value(data)
    return data


def _too_deep(field: str) -> InboundRefused:
    return InboundRefused(
        field, f"JSON is nested deeper than {MAX_JSON_DEPTH} levels", "json_too_deep"
    )


STORABLE_TEXT_PATTERN = "^[^\\x00]*$"
"""What `text_problem` allows, as a JSON Schema pattern for the OpenAPI document. Lone
UTF-16 surrogates are refused too; a regular expression cannot name them (they are not
characters), so the document's descriptions say so."""


def text_problem(text: str) -> str | None:
    """Why PostgreSQL could not store this text, or None when it can."""
    if "\x00" in text:
        return "must not contain the NUL character (\\u0000)"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "must not contain a lone UTF-16 surrogate"
    return None


def _path(parts: tuple[str | int, ...]) -> str:
    return ".".join(str(part) for part in parts) or "body"


def check_value(value: Any) -> None:
    """Walk a decoded JSON value: depth, text and numbers, naming the first bad field."""
    stack: list[tuple[Any, tuple[str | int, ...], int]] = [(value, (), 1)]
    while stack:
        item, where, depth = stack.pop()
        if isinstance(item, dict | list) and depth > MAX_JSON_DEPTH:
            raise _too_deep(_path(where))
        if isinstance(item, dict):
            for key, child in item.items():
                problem = text_problem(key)
                if problem:
                    raise InboundRefused(_path(where), f"a key {problem}", "text_invalid")
                stack.append((child, (*where, key), depth + 1))
        elif isinstance(item, list):
            stack.extend((child, (*where, index), depth + 1) for index, child in enumerate(item))
        elif isinstance(item, str):
            problem = text_problem(item)
            if problem:
                raise InboundRefused(_path(where), problem, "text_invalid")
        elif isinstance(item, float) and not math.isfinite(item):
            raise InboundRefused(_path(where), "must be a finite number", "number_not_finite")


def valid_idempotency_key(key: str) -> bool:
    return re.fullmatch(IDEMPOTENCY_KEY_PATTERN, key) is not None


def check_url_text(path: str, query: dict[str, list[str]]) -> None:
    """A path segment or query parameter that PostgreSQL could not compare is refused."""
    problem = text_problem(path)
    if problem:
        raise InboundRefused("path", problem, "text_invalid")
    for name, values in query.items():
        problem = text_problem(name)
        if problem:
            raise InboundRefused("query", f"a parameter name {problem}", "text_invalid")
        for value in values:
            problem = text_problem(value)
            if problem:
                raise InboundRefused(name, problem, "text_invalid")
