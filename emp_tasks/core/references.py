"""References between workflow steps: `{{ steps.<i>.<path> }}` in a step's payload.

A string that is exactly one reference takes the referenced value with its JSON type;
references inside longer text are interpolated as text (strings as they are, anything
else as JSON). `<path>` is dot-separated object keys and list indices. A reference
names one of the step's dependencies (checked at submission, `find`); it is resolved
when the step is released, against its dependencies' results (`resolve`), and a path
that the result does not have is a `ReferenceNotFound`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

REFERENCE = re.compile(r"\{\{\s*steps\.(\d+)((?:\.[^\s.{}]+)*)\s*\}\}")
"""One reference; group 1 the step index, group 2 the path with its leading dots."""
LOOSE = re.compile(r"\{\{\s*steps\b[^}]*\}\}")
"""Anything written like a reference, well-formed or not (to refuse the malformed ones)."""


@dataclass(frozen=True)
class Reference:
    step_index: int
    path: tuple[str, ...]
    where: tuple[str | int, ...]
    """Where in the payload the reference sits (keys and list indices)."""

    @property
    def text(self) -> str:
        return "steps." + ".".join([str(self.step_index), *self.path])


class MalformedReference(ValueError):
    def __init__(self, text: str, where: tuple[str | int, ...]) -> None:
        super().__init__(f"{text!r} is not a reference of the form {{{{ steps.<i>.<path> }}}}")
        self.where = where


class ReferenceNotFound(LookupError):
    def __init__(self, reference: Reference, reason: str) -> None:
        super().__init__(f"{{{{ {reference.text} }}}}: {reason}")
        self.reference = reference


def _strings(value: Any, where: tuple[str | int, ...] = ()) -> Iterator[tuple[str, tuple]]:
    if isinstance(value, str):
        yield value, where
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from _strings(item, (*where, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _strings(item, (*where, index))


def find(payload: Any) -> list[Reference]:
    """Every reference in `payload`, in document order; raises MalformedReference for text
    written like a reference that is not one (`{{ steps.x }}`, `{{ steps }}`)."""
    found = []
    for text, where in _strings(payload):
        if "{{" not in text:
            continue
        for loose in LOOSE.finditer(text):
            match = REFERENCE.fullmatch(loose.group(0))
            if match is None:
                raise MalformedReference(loose.group(0), where)
            path = tuple(part for part in match.group(2).split(".") if part)
            found.append(Reference(int(match.group(1)), path, where))
    return found


def has_any(payload: Any) -> bool:
    """Whether `payload` holds a reference (cheap: strings without `{{` are skipped)."""
    return any("{{" in text and REFERENCE.search(text) for text, _ in _strings(payload))


def lookup(result: Any, reference: Reference) -> Any:
    """The value at the reference's path in its step's result."""
    value = result
    for depth, part in enumerate(reference.path):
        walked = ".".join(reference.path[:depth]) or "the result"
        if isinstance(value, Mapping):
            if part not in value:
                raise ReferenceNotFound(reference, f"{walked} has no key {part!r}")
            value = value[part]
        elif isinstance(value, list):
            if not part.isdigit() or int(part) >= len(value):
                raise ReferenceNotFound(
                    reference, f"{walked} is a list of {len(value)}, no index {part!r}"
                )
            value = value[int(part)]
        else:
            raise ReferenceNotFound(reference, f"{walked} is {_kind(value)}, not an object")
    return value


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {str: "a string", bool: "a boolean", int: "a number", float: "a number"}.get(
        type(value), type(value).__name__
    )


def _as_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


def resolve(payload: Any, results: Mapping[int, Any]) -> Any:
    """`payload` with every reference replaced from `results` (step index -> result).

    Raises ReferenceNotFound for a path a result lacks, or a step with no result."""

    def one(match: re.Match[str]) -> Any:
        reference = Reference(
            int(match.group(1)), tuple(p for p in match.group(2).split(".") if p), ()
        )
        if reference.step_index not in results:
            raise ReferenceNotFound(reference, f"step {reference.step_index} has no result")
        return lookup(results[reference.step_index], reference)

    def walk(value: Any) -> Any:
        if isinstance(value, str):
            if "{{" not in value:
                return value
            whole = REFERENCE.fullmatch(value.strip())
            if whole is not None:
                return one(whole)
            return REFERENCE.sub(lambda match: _as_text(one(match)), value)
        if isinstance(value, Mapping):
            return {key: walk(item) for key, item in value.items()}
        if isinstance(value, list):
            return [walk(item) for item in value]
        return value

    return walk(payload)
