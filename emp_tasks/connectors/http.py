"""The `http` connector: a step run by a REST generation API.

The step payload is POSTed as JSON to `url`. In `sync` mode the answer is the result
(or its `result_field`). In `async` mode the answer names a job (`id_field`) whose
`status_url` is polled until its `status_field` reaches a done or failed value; a
numeric `progress` field on the way is reported. Cancelling stops waiting at once
and, for an async job, POSTs `cancel_url`. Field names may be dotted paths
(`data.id`); URL templates take `{id}`.

Files go to the product's storage, not into the result: a binary answer (an image,
video or audio body) is the step's one output; in a JSON result, each item of the list
at `outputs_field` (default `outputs`) that is a URL (a string, or an object's `url`) or
base64 (`base64`, `b64_json` or `data`, with an optional `content_type`) becomes an
output. The result's `outputs` then lists the stored files.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from typing import IO, Any
from urllib.parse import quote

import requests

from emp_tasks.connectors.base import (
    FailureType,
    OutputFile,
    ProgressReporter,
    StepFailure,
    StepInterrupted,
    StepRun,
)
from emp_tasks.connectors.remote import (
    ProgressThrottle,
    call_until_cancelled,
    error_detail,
    sleep_until_cancelled,
    status_failure,
    transport_failure,
)
from emp_tasks.core.config import ConfigError

logger = logging.getLogger(__name__)

DONE_VALUES = ("completed", "succeeded", "success", "done")
FILE_TYPES = ("image/", "video/", "audio/", "application/octet-stream")
"""Content types of an answer that is a file rather than JSON."""
BASE64_FIELDS = ("base64", "b64_json", "data")
FAILED_VALUES = ("failed", "error", "cancelled", "canceled")


def lookup(body: Any, path: str | None) -> Any:
    """`body`'s value at a dotted `path` (None when absent); the whole body for no path."""
    if not path:
        return body
    value = body
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def _strings(options: dict[str, Any], name: str, default: tuple[str, ...]) -> frozenset[str]:
    values = options.get(name, default)
    if not isinstance(values, list | tuple) or not all(isinstance(v, str) for v in values):
        raise ConfigError(f"http connector option {name!r} must be a list of strings")
    return frozenset(v.lower() for v in values)


def _positive(options: dict[str, Any], name: str, default: float) -> float:
    try:
        value = float(options.get(name, default))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"http connector option {name!r} must be a number") from exc
    if value <= 0:
        raise ConfigError(f"http connector option {name!r} must be > 0")
    return value


def _url(options: dict[str, Any], name: str, service: str, required: bool = False) -> str | None:
    value = options.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value.startswith(("http://", "https://")):
        raise ConfigError(f"connector for {service!r}: option {name!r} must be an http(s) URL")
    return value


class HttpConnector:
    """Runs a step as one call to, or one polled job on, a REST generation API."""

    name = "http"

    def __init__(self, service: str, options: dict[str, Any] | None = None) -> None:
        options = dict(options or {})
        self.service = service
        self.url = _url(options, "url", service, required=True) or ""
        self.mode = options.get("mode", "sync")
        if self.mode not in ("sync", "async"):
            raise ConfigError(f"connector for {service!r}: mode must be 'sync' or 'async'")
        self.status_url = _url(options, "status_url", service, required=self.mode == "async")
        if self.mode == "async" and "{id}" not in (self.status_url or ""):
            raise ConfigError(f"connector for {service!r}: status_url must contain '{{id}}'")
        self.cancel_url = _url(options, "cancel_url", service)
        self.health_url = _url(options, "health_url", service)
        self.headers = {str(k): str(v) for k, v in dict(options.get("headers") or {}).items()}
        self.timeout_s = _positive(options, "timeout_s", 60)
        self.poll_interval_s = _positive(options, "poll_interval_s", 1)
        default_result = "result" if self.mode == "async" else None
        self.result_field: str | None = options.get("result_field", default_result)
        self.id_field: str = options.get("id_field", "id")
        self.status_field: str = options.get("status_field", "status")
        self.progress_field: str = options.get("progress_field", "progress")
        self.error_field: str = options.get("error_field", "error")
        self.done_values = _strings(options, "done_values", DONE_VALUES)
        self.failed_values = _strings(options, "failed_values", FAILED_VALUES)
        self.outputs_field: str = options.get("outputs_field", "outputs")

    def run(
        self,
        step: StepRun,
        inputs: dict[str, Any],
        report_progress: ProgressReporter,
        cancel_requested: Callable[[], bool],
    ) -> Any:
        with requests.Session() as http:
            http.headers.update(self.headers)
            if self.mode == "sync":
                body = call_until_cancelled(
                    lambda: self._call(http, "POST", self.url, step.payload), cancel_requested
                )
                return self._result(body)
            # The submission is awaited even if a cancel arrives meanwhile: only its
            # answer names the remote job that then has to be cancelled.
            answer = self._call(http, "POST", self.url, step.payload)
            job_id = lookup(answer, self.id_field)
            if not isinstance(job_id, str | int) or isinstance(job_id, bool):
                raise StepFailure(
                    f"{self.service} answered without a job id at {self.id_field!r}",
                    type=FailureType.SERVICE,
                    code="HTTP_INVALID_RESPONSE",
                    retryable=False,
                )
            try:
                step.log(f"submitted to {self.service}: job {job_id}", "info")
                return self._follow(
                    http, str(job_id), answer, report_progress, cancel_requested, step.log
                )
            except StepInterrupted:
                self._cancel(http, str(job_id))
                raise

    def health(self) -> dict[str, Any]:
        """`{"ok": ...}` from `health_url`; without one the backend is assumed up."""
        if self.health_url is None:
            return {"ok": True, "checked": False}
        try:
            response = requests.get(
                self.health_url, headers=self.headers, timeout=min(self.timeout_s, 10)
            )
        except requests.RequestException as exc:
            return {"ok": False, "error": str(exc)}
        if not response.ok:
            return {"ok": False, "status": response.status_code, "error": error_detail(response)}
        return {"ok": True, "status": response.status_code}

    def _follow(
        self,
        http: requests.Session,
        job_id: str,
        answer: Any,
        report_progress: ProgressReporter,
        cancel_requested: Callable[[], bool],
        log: Callable[[str, str], None],
    ) -> Any:
        status_url = self._template(self.status_url or "", job_id)
        body = answer
        last_answer = time.monotonic()
        progress = ProgressThrottle(report_progress)
        last_state: Any = None
        while True:
            state = lookup(body, self.status_field)
            if state != last_state:
                log(f"job {job_id}: {self.status_field} = {state}", "info")
                last_state = state
            if isinstance(state, str):
                if state.lower() in self.done_values:
                    return self._result(body)
                if state.lower() in self.failed_values:
                    raise self._job_failure(job_id, state, body)
                percent = self._percent(lookup(body, self.progress_field))
                if percent is not None:
                    progress(percent, state, f"{self.service} job {state}")
            sleep_until_cancelled(self.poll_interval_s, cancel_requested)
            try:
                body = self._call(http, "GET", status_url)
                last_answer = time.monotonic()
            except StepFailure as failure:
                # A status endpoint that hiccups should not throw away the remote work;
                # one that stays down for timeout_s fails the attempt.
                if not failure.retryable or time.monotonic() - last_answer > self.timeout_s:
                    raise
                logger.warning(
                    "Job status poll failed; polling on",
                    extra={"action": "http_poll_failed", "service": self.service, "job": job_id},
                )
                log(f"job {job_id}: status poll failed ({failure}); polling on", "warning")

    def _call(self, http: requests.Session, method: str, url: str, body: Any | None = None) -> Any:
        try:
            response = http.request(method, url, json=body, timeout=self.timeout_s)
        except requests.RequestException as exc:
            raise transport_failure(exc, source=self.service, code_prefix="HTTP") from exc
        if not response.ok:
            raise status_failure(
                response.status_code,
                error_detail(response),
                source=self.service,
                code_prefix="HTTP",
            )
        content_type = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if content_type.startswith(FILE_TYPES):
            return {self.outputs_field: [OutputFile.of_bytes(response.content, content_type)]}
        try:
            return response.json()
        except ValueError as exc:
            raise StepFailure(
                f"{self.service} answered {response.status_code} without JSON",
                type=FailureType.SERVICE,
                code="HTTP_INVALID_RESPONSE",
                retryable=False,
            ) from exc

    def _result(self, body: Any) -> Any:
        if isinstance(body, dict) and self._files_in(body.get(self.outputs_field)):
            return {**body, "outputs": body[self.outputs_field]}  # a binary answer
        value = lookup(body, self.result_field)
        result = body if value is None else value
        if not isinstance(result, dict):
            return result
        items = lookup(result, self.outputs_field)
        if not isinstance(items, list) or not items:
            return result
        files = [self._file(item, n) for n, item in enumerate(items)]
        return {**result, "outputs": files}

    @staticmethod
    def _files_in(items: Any) -> bool:
        return isinstance(items, list) and any(isinstance(i, OutputFile) for i in items)

    def _file(self, item: Any, n: int) -> Any:
        """One item of the backend's outputs as a file to store (or as it was)."""
        if isinstance(item, str) and item.startswith(("http://", "https://")):
            return self._download(item, None)
        if not isinstance(item, dict):
            return item
        content_type = str(item.get("content_type") or item.get("mime_type") or "")
        encoded = next((item[f] for f in BASE64_FIELDS if isinstance(item.get(f), str)), None)
        if encoded is not None:
            try:
                data = base64.b64decode(encoded.split(",", 1)[-1], validate=True)
            except (binascii.Error, ValueError) as exc:
                raise StepFailure(
                    f"{self.service} output {n} is not valid base64",
                    type=FailureType.SERVICE,
                    code="HTTP_INVALID_RESPONSE",
                    retryable=False,
                ) from exc
            return OutputFile.of_bytes(data, content_type or "application/octet-stream")
        url = item.get("url")
        if isinstance(url, str) and url.startswith(("http://", "https://")):
            return self._download(url, content_type or None)
        return item

    def _download(self, url: str, content_type: str | None) -> OutputFile:
        """A file the backend names by URL, streamed from there into storage."""

        @contextlib.contextmanager
        def open_url() -> Iterator[IO[bytes]]:
            try:
                response = requests.get(url, timeout=self.timeout_s, stream=True)
            except requests.RequestException as exc:
                raise transport_failure(exc, source=self.service, code_prefix="HTTP") from exc
            with response:
                if not response.ok:
                    raise status_failure(
                        response.status_code,
                        error_detail(response),
                        source=f"{self.service} output download",
                        code_prefix="HTTP",
                    )
                response.raw.decode_content = True
                yield response.raw

        guessed = content_type or _content_type_from(url)
        return OutputFile(open_url, guessed)

    def _job_failure(self, job_id: str, state: str, body: Any) -> StepFailure:
        error = lookup(body, self.error_field)
        if isinstance(error, dict):
            error = error.get("message") or error
        reason = f": {error}" if error else ""
        return StepFailure(
            f"{self.service} job {job_id} ended {state}{reason}",
            type=FailureType.SERVICE,
            code="HTTP_JOB_FAILED",
        )

    def _cancel(self, http: requests.Session, job_id: str) -> None:
        if self.cancel_url is None:
            return
        try:
            http.post(self._template(self.cancel_url, job_id), timeout=min(self.timeout_s, 10))
        except requests.RequestException as exc:
            logger.warning(
                "Could not cancel the remote job",
                extra={"action": "http_cancel_failed", "service": self.service, "error": str(exc)},
            )

    @staticmethod
    def _template(template: str, job_id: str) -> str:
        return template.replace("{id}", quote(job_id, safe=""))

    @staticmethod
    def _percent(value: Any) -> float | None:
        """Progress in percent from a 0-100 number, or from a 0-1 fraction given as a float."""
        if not isinstance(value, int | float) or isinstance(value, bool):
            return None
        percent = value * 100 if isinstance(value, float) and value <= 1 else value
        return round(max(0.0, min(100.0, float(percent))), 2)


def _content_type_from(url: str) -> str:
    import mimetypes

    return mimetypes.guess_type(url.split("?")[0])[0] or "application/octet-stream"
