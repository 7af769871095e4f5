"""The connector interface: how a worker hands one step attempt to a generation backend."""

from __future__ import annotations

import io
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from enum import StrEnum
from typing import IO, Any, Protocol

from emp_tasks.core.errors import StepError


class FailureType(StrEnum):
    """Why an attempt failed; decides whether another attempt can help."""

    VALIDATION = "validation"
    AUTH = "auth"
    REFUSAL = "refusal"
    TIMEOUT = "timeout"
    RESOURCE = "resource"
    NETWORK = "network"
    SERVICE = "service"
    SYSTEM = "system"


RETRYABLE_BY_DEFAULT = frozenset(
    {
        FailureType.TIMEOUT,
        FailureType.RESOURCE,
        FailureType.NETWORK,
        FailureType.SERVICE,
        FailureType.SYSTEM,
    }
)


class StepFailure(Exception):
    """A classified failure of one attempt, raised by a connector."""

    def __init__(
        self,
        message: str,
        *,
        type: FailureType = FailureType.SERVICE,
        code: str = "STEP_FAILED",
        retryable: bool | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.type = FailureType(type)
        self.code = code
        self.retryable = self.type in RETRYABLE_BY_DEFAULT if retryable is None else retryable

    def as_error(self, detail: str | None = None) -> StepError:
        """The error the failed step carries; `detail`: a crashed connector's traceback."""
        return StepError(
            code=self.code,
            message=self.message,
            type=str(self.type),
            retryable=self.retryable,
            detail=detail,
        )


class StepInterrupted(Exception):
    """The connector stopped because `cancel_requested()` said so."""


@dataclass(frozen=True)
class EventSubjects:
    """Whom a step's events name (and whether its own webhook wants them), as its row has
    them: what the worker needs to publish the attempt's progress without a query."""

    id: str
    customer_id: str | None = None
    correlation_id: str | None = None
    workflow_id: str | None = None
    machine_id: str | None = None
    worker_id: str | None = None
    webhook_url: str | None = None
    webhook_events: list[str] | None = None

    @classmethod
    def of(cls, step: Any) -> EventSubjects:
        """From a step's row."""
        return cls(
            id=step.id,
            customer_id=step.customer_id,
            correlation_id=step.correlation_id,
            workflow_id=step.workflow_id,
            machine_id=step.machine_id,
            worker_id=step.worker_id,
            webhook_url=step.webhook_url,
            webhook_events=step.webhook_events,
        )


@dataclass(frozen=True)
class StepRun:
    """What a connector sees of the step it runs: one attempt's inputs."""

    step_id: str
    service: str
    attempt: int
    payload: dict[str, Any]
    requirements: dict[str, Any]
    timeout_s: float
    customer_id: str
    inputs: dict[str, Any] = field(default_factory=dict)
    queue_wait_s: float | None = None
    """How long the step waited in its queue before this attempt started."""
    subjects: EventSubjects | None = None
    """Whom the attempt's events name (the worker's, not the connector's, concern)."""
    log_sink: Callable[[str, str], None] | None = field(default=None, repr=False, compare=False)
    """Where `log` lines go (the worker's attempt log); None: nowhere."""

    load_sink: Callable[[str, int | None], None] | None = field(
        default=None, repr=False, compare=False
    )
    """Where `model_loaded` / `model_ready` reports go (the worker's attempt record)."""

    def model_loaded(self, model: str, load_ms: int) -> None:
        """Report that the backend loaded `model` for this attempt, taking `load_ms`."""
        if self.load_sink is not None:
            self.load_sink(model, load_ms)

    def model_ready(self, model: str) -> None:
        """Report that the backend already held `model` (the attempt is warm)."""
        if self.load_sink is not None:
            self.load_sink(model, None)

    def log(self, message: str, level: str = "info") -> None:
        """Report one line of the attempt's log (`GET /api/steps/{id}/logs`): what the
        backend said (execution messages, status polls, errors), for the client to read."""
        if self.log_sink is not None:
            self.log_sink(level, message)

    @property
    def workflow_id(self) -> str | None:
        return self.subjects.workflow_id if self.subjects is not None else None


@dataclass(frozen=True)
class OutputFile:
    """A file a connector made, handed to the worker to store (never base64 in a result).

    A connector puts these in its result's `outputs` list; before the step completes the
    worker streams each into storage and replaces it with its entry (`url`, `key`,
    `content_type`, `size_bytes`, `sha256`, `width`, `height`, `node_id`). `open` is
    called once and yields a binary stream (an HTTP response's, a file's); a failure
    to read raises StepFailure like any other step of the attempt.
    """

    open: Callable[[], AbstractContextManager[IO[bytes]]]
    content_type: str = "application/octet-stream"
    node_id: str | None = None
    width: int | None = None
    height: int | None = None

    @classmethod
    def of_bytes(cls, data: bytes, content_type: str, **facts: Any) -> OutputFile:
        """A file already in memory (a small generated image, a decoded base64 field)."""
        return cls(lambda: nullcontext(io.BytesIO(data)), content_type, **facts)


ProgressReporter = Callable[..., None]
"""`report_progress(progress, stage=None, message=None)`, progress in percent 0-100."""


class Connector(Protocol):
    """Runs a step and returns its JSON-serialisable result, or raises StepFailure.

    Built once per service as `Kind(service, options)`, options from EMP_CONNECTORS.
    A connector polls `cancel_requested()` at least once a second while it waits
    and, when it returns True, stops its backend and raises StepInterrupted.

    Optional: `health() -> dict` (is the backend up, what it reports) and
    `models() -> list[str]` (models the backend can load; a worker advertises
    them for the service unless EMP_WORKER_MODELS names them).

    Files go in the result's `outputs` list as OutputFile objects; the worker stores
    them before it completes the step.
    """

    name: str
    service: str

    def run(
        self,
        step: StepRun,
        inputs: dict[str, Any],
        report_progress: ProgressReporter,
        cancel_requested: Callable[[], bool],
    ) -> Any: ...
