"""Domain errors. Services raise these; the web layer turns them into API errors."""

from __future__ import annotations


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
