"""Reading an input file a step names by URL (an image for ComfyUI, say).

A URL of our own store (an earlier step's output) is read from the store itself, with
no HTTP round trip and no matter where the store is. Any other URL comes from the
client, so it is held to the webhooks' address rules (no internal, loopback or
metadata addresses unless EMP_FETCH_ALLOW_PRIVATE=true) and fetched from the address
that was vetted, no redirects followed.
"""

from __future__ import annotations

import requests

from emp_tasks import storage
from emp_tasks.connectors.base import FailureType, StepFailure
from emp_tasks.connectors.remote import status_failure, transport_failure
from emp_tasks.core import targets
from emp_tasks.core.config import get_settings

MAX_INPUT_BYTES = 100 * 1024 * 1024
TIMEOUT_S = 30


def read(url: str, what: str) -> tuple[bytes, str]:
    """The bytes and content type at `url`; a classified StepFailure when it cannot be read."""
    store = storage.get()
    key = store.key_of(url)
    if key is not None:
        try:
            with store.open(key) as source:
                data = source.read(MAX_INPUT_BYTES + 1)
        except Exception as exc:
            raise StepFailure(
                f"could not read {what} from storage ({key}): {type(exc).__name__}",
                type=FailureType.NETWORK,
                code="INPUT_UNAVAILABLE",
            ) from exc
        return _bounded(data, what), storage.content_type_of(key)
    try:
        target = targets.vet(url, get_settings().fetch_allow_private)
    except targets.TargetRefused as refused:
        raise StepFailure(
            f"{what}: {url[:200]!r} may not be fetched: {refused}",
            type=FailureType.VALIDATION,
            code="INPUT_URL_REFUSED",
            retryable=False,
        ) from refused
    with targets.pinned_session(target) as http:
        try:
            response = http.get(target.url, timeout=TIMEOUT_S, stream=True, allow_redirects=False)
        except requests.RequestException as exc:
            raise transport_failure(exc, source=what, code_prefix="INPUT") from exc
        with response:
            if not response.ok:
                raise status_failure(
                    response.status_code, response.reason, source=what, code_prefix="INPUT"
                )
            data = response.raw.read(MAX_INPUT_BYTES + 1, decode_content=True)
            content_type = response.headers.get("Content-Type", "application/octet-stream")
    return _bounded(data, what), content_type.split(";")[0].strip()


def _bounded(data: bytes, what: str) -> bytes:
    if len(data) > MAX_INPUT_BYTES:
        raise StepFailure(
            f"{what} is larger than {MAX_INPUT_BYTES // (1024 * 1024)} MB",
            type=FailureType.VALIDATION,
            code="INPUT_TOO_LARGE",
            retryable=False,
        )
    return data
