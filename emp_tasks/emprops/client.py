"""The EmProps HTTP client: every call to EMPROPS_API_URL goes through `call`.

Errors are classified like a connector's: a 4xx is permanent (EmProps refused the
request as such), except 408 and 429; a 5xx, a timeout or no connection is worth
another try. Each call carries `Authorization: Bearer $EMPROPS_API_KEY` and is bounded
by EMPROPS_TIMEOUT_S.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import requests

from emp_tasks.core.config import get_settings

RETRIED_4XX = frozenset({408, 429})


@dataclass(frozen=True)
class Answer:
    status: int
    body: Any


class EmpropsError(Exception):
    """A call that did not get a 2xx: why, whether trying again can help, EmProps' status."""

    def __init__(self, message: str, *, retryable: bool, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retryable = retryable
        self.status = status


def configured() -> bool:
    return get_settings().emprops_api_url is not None


def call(path: str, body: Any, idempotency_key: str | None = None) -> Answer:
    """POST `body` as JSON to EMPROPS_API_URL + `path`; the 2xx answer, or EmpropsError."""
    settings = get_settings()
    if settings.emprops_api_url is None:
        raise EmpropsError("EMPROPS_API_URL is not configured", retryable=False)
    headers = {"Content-Type": "application/json"}
    if settings.emprops_api_key:
        headers["Authorization"] = f"Bearer {settings.emprops_api_key}"
    if idempotency_key:
        headers["Idempotency-Key"] = idempotency_key
    try:
        response = requests.post(
            settings.emprops_api_url + path,
            json=body,
            headers=headers,
            timeout=settings.emprops_timeout_s,
            allow_redirects=False,
        )
    except requests.Timeout as exc:
        raise EmpropsError(
            f"EmProps did not answer within {settings.emprops_timeout_s:g} s", retryable=True
        ) from exc
    except requests.RequestException as exc:
        raise EmpropsError(f"EmProps unreachable: {type(exc).__name__}", retryable=True) from exc
    if not 200 <= response.status_code < 300:
        status = response.status_code
        raise EmpropsError(
            f"EmProps answered {status}: {response.text.strip()[:300]}",
            retryable=status >= 500 or status in RETRIED_4XX,
            status=status,
        )
    try:
        parsed = response.json() if response.content else None
    except ValueError:
        parsed = response.text[:10_000]
    return Answer(response.status_code, parsed)


def create_collection(body: dict[str, Any]) -> Any:
    """`POST /api/collections`: EmProps' answer (the collection)."""
    return call("/api/collections", body).body
