"""Errors. Services raise the domain errors; the web layer turns them into API errors.

`StepError` is not raised: it is the error a failed step attempt carries, stored on
the step and its attempt, sent in its events and webhooks and shown by the API.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


class DomainError(Exception):
    code = "ERROR"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NotFound(DomainError):
    """The resource does not exist, or the caller may not see it (never say which)."""

    def __init__(self, kind: str, resource_id: str) -> None:
        super().__init__(f"{kind} {resource_id} not found")
        self.kind = kind
        self.resource_id = resource_id


class InvalidState(DomainError):
    """The resource exists but cannot make the requested change from its current state."""


class Forbidden(DomainError):
    """The caller is known but may not do this."""


class InvalidCursor(DomainError):
    """A pagination cursor that this API did not hand out."""


class ValidationFailed(DomainError):
    """A request that passed its schema but breaks a rule that needs configuration or data."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class StepError:
    """Why a step attempt failed: `type` says what kind of failure, `retryable` whether
    another attempt can help; `detail` (a traceback) only when a connector crashed."""

    code: str
    message: str
    type: str
    retryable: bool
    detail: str | None = None

    def to_json(self) -> dict[str, Any]:
        error: dict[str, Any] = {
            "code": self.code,
            "message": self.message,
            "type": self.type,
            "retryable": self.retryable,
        }
        if self.detail is not None:
            error["detail"] = self.detail
        return error

    @classmethod
    def from_json(cls, error: dict[str, Any]) -> StepError:
        return cls(
            code=error["code"],
            message=error["message"],
            type=error["type"],
            retryable=error["retryable"],
            detail=error.get("detail"),
        )
