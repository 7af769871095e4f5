"""What clients may send: the validated shapes of requests.

These models validate every request and generate the OpenAPI document, so the
two cannot drift. Services receive validated models, never raw JSON.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictInt,
    field_validator,
    model_validator,
)

from emp_tasks.events import EventType
from emp_tasks.models import StepStatus, WorkerStatus

SERVICE_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}$"
SERVICE_ALIASES = ("type", "job_type", "service_required")


def _json_number(value: Any) -> Any:
    """Accept JSON numbers only: not strings of digits, not booleans."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("must be a number")
    return value


Number = Annotated[float, BeforeValidator(_json_number)]
STEP_EVENT_NAMES = sorted(e.value for e in EventType if e.value.startswith("step_"))


class Requirements(BaseModel):
    """What a worker must offer to run the step; unknown keys are worker labels to match."""

    model_config = ConfigDict(extra="allow")

    gpu_memory_gb: Number | None = Field(default=None, ge=0, le=4096)
    models: list[str] | None = Field(default=None, max_length=100)
    customer_isolation: Literal["strict", "loose"] | None = None


class StepCreate(BaseModel):
    """`POST /api/steps` (and the seed-compatible submit routes)."""

    model_config = ConfigDict(extra="ignore")

    service: str = Field(pattern=SERVICE_PATTERN, description="Service that runs the step")
    payload: dict[str, Any] = Field(default_factory=dict)
    priority: StrictInt = Field(default=50, ge=0, le=100, description="Higher runs first")
    requirements: Requirements = Field(default_factory=Requirements)
    max_retries: StrictInt = Field(default=3, ge=0, le=10)
    timeout_s: Number = Field(default=1800, gt=0, le=7 * 24 * 3600)
    expires_in_s: Number | None = Field(
        default=None,
        gt=0,
        le=30 * 24 * 3600,
        description="Fail with EXPIRED instead of starting later than this after submission",
    )
    webhook_url: str | None = Field(default=None, max_length=2000, pattern=r"^https?://\S+$")
    webhook_events: list[Literal[tuple(STEP_EVENT_NAMES)]] | None = None  # type: ignore[valid-type]
    customer_id: str | None = Field(default=None, min_length=1, max_length=200)
    metadata: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _seed_format(cls, data: Any) -> Any:
        """Accept the seed system's field names: service aliases, top-level prompt/parameters."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if "service" not in data:
            for alias in SERVICE_ALIASES:
                if isinstance(data.get(alias), str):
                    data["service"] = data[alias]
                    break
        extras = {key: data[key] for key in ("prompt", "parameters") if key in data}
        if extras:
            payload = data.get("payload")
            if payload is None:
                payload = {}
            if isinstance(payload, dict):
                data["payload"] = {**payload, **extras}
        return data

    @field_validator("webhook_events")
    @classmethod
    def _no_empty_events(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and not value:
            raise ValueError("must name at least one event, or be omitted")
        return value


class StepListQuery(BaseModel):
    model_config = ConfigDict(extra="ignore")

    status: StepStatus | None = None
    service: str | None = Field(default=None, max_length=200)
    workflow_id: str | None = Field(default=None, max_length=36)
    limit: int = Field(default=50, ge=1, le=200)
    cursor: str | None = Field(default=None, max_length=100)


class StatsQuery(BaseModel):
    model_config = ConfigDict(extra="ignore")

    timeframe: Literal["hour", "day", "week"] = "day"


class CancelRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    reason: str | None = Field(default=None, max_length=1000)


class WorkerListQuery(BaseModel):
    model_config = ConfigDict(extra="ignore")

    status: WorkerStatus | None = None
    machine_id: str | None = Field(default=None, max_length=200)


class QueueListQuery(BaseModel):
    model_config = ConfigDict(extra="ignore")

    all: bool = Field(default=False, description="Include idle queues (nothing waiting or running)")


class DrainRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    reason: str | None = Field(default=None, max_length=1000)


class WorkflowStepSpec(StepCreate):
    """One step of a workflow: a step spec plus the indices of earlier steps it needs."""

    depends_on: list[StrictInt] = Field(default_factory=list, max_length=10_000)

    @field_validator("depends_on")
    @classmethod
    def _unique(cls, value: list[int]) -> list[int]:
        if len(set(value)) != len(value):
            raise ValueError("must not repeat an index")
        return value


WORKFLOW_EVENT_NAMES = sorted(e.value for e in EventType if e.value.startswith("workflow_"))


class WorkflowCreate(BaseModel):
    """`POST /api/workflows`: a DAG of steps by `depends_on` (earlier indices only)."""

    model_config = ConfigDict(extra="ignore")

    name: str = Field(min_length=1, max_length=500)
    description: str | None = Field(default=None, max_length=5000)
    steps: list[WorkflowStepSpec] = Field(min_length=1)
    priority: StrictInt | None = Field(default=None, ge=0, le=100)
    failure_policy: Literal["fail_fast", "continue"] = "fail_fast"
    webhook_url: str | None = Field(default=None, max_length=2000, pattern=r"^https?://\S+$")
    webhook_events: list[Literal[tuple(WORKFLOW_EVENT_NAMES)]] | None = None  # type: ignore[valid-type]
    customer_id: str | None = Field(default=None, min_length=1, max_length=200)
    metadata: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be blank")
        return value

    @model_validator(mode="after")
    def _earlier_dependencies_only(self) -> WorkflowCreate:
        from pydantic_core import InitErrorDetails, PydanticCustomError, ValidationError

        errors: list[InitErrorDetails] = []
        for index, step in enumerate(self.steps):
            for position, dependency in enumerate(step.depends_on):
                if not 0 <= dependency < index:
                    errors.append(
                        InitErrorDetails(
                            type=PydanticCustomError(
                                "dependency_order",
                                "must be the index of an earlier step (0 to {limit})",
                                {"limit": index - 1},
                            ),
                            loc=("steps", index, "depends_on", position),
                            input=dependency,
                        )
                    )
        if errors:
            raise ValidationError.from_exception_data("WorkflowCreate", errors)
        return self

    def step_priority(self, index: int) -> int:
        """A step's own priority if it set one, else the workflow's, else the default."""
        step = self.steps[index]
        if "priority" in step.model_fields_set:
            return step.priority
        return self.priority if self.priority is not None else step.priority


class WorkflowListQuery(BaseModel):
    model_config = ConfigDict(extra="ignore")

    status: Literal["pending", "running", "completed", "failed", "cancelled"] | None = None
    limit: int = Field(default=50, ge=1, le=200)
    cursor: str | None = Field(default=None, max_length=100)


WEBHOOK_EVENT_NAMES = sorted(
    {e.value for e in EventType}
    | {"job_" + e.value[len("step_") :] for e in EventType if e.value.startswith("step_")}
    | {"*", "webhook_test"}
)
RESERVED_HEADERS = {
    "content-type",
    "webhook-id",
    "webhook-timestamp",
    "webhook-signature",
    "host",
    "content-length",
}


class WebhookFilters(BaseModel):
    model_config = ConfigDict(extra="forbid")

    services: list[str] | None = Field(default=None, max_length=100)
    workflow_ids: list[str] | None = Field(default=None, max_length=1000)


class _WebhookFields(BaseModel):
    model_config = ConfigDict(extra="ignore")

    @field_validator("headers", check_fields=False)
    @classmethod
    def _own_headers_only(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value and RESERVED_HEADERS & {name.lower() for name in value}:
            raise ValueError(f"must not set {', '.join(sorted(RESERVED_HEADERS))}")
        return value


class WebhookCreate(_WebhookFields):
    """`POST /api/webhooks`: a receiver for this customer's events."""

    url: str = Field(max_length=2000, pattern=r"^https?://\S+$")
    events: list[Literal[tuple(WEBHOOK_EVENT_NAMES)]] = Field(  # type: ignore[valid-type]
        default_factory=lambda: ["*"], min_length=1
    )
    secret: str | None = Field(default=None, max_length=200)
    filters: WebhookFilters = Field(default_factory=WebhookFilters)
    headers: dict[str, str] = Field(default_factory=dict, max_length=20)
    active: bool = True
    description: str | None = Field(default=None, max_length=1000)
    legacy_event_names: bool = False
    customer_id: str | None = Field(default=None, min_length=1, max_length=200)


class WebhookUpdate(_WebhookFields):
    """`PATCH /api/webhooks/{id}`: only the fields sent change."""

    url: str | None = Field(default=None, max_length=2000, pattern=r"^https?://\S+$")
    events: list[Literal[tuple(WEBHOOK_EVENT_NAMES)]] | None = Field(  # type: ignore[valid-type]
        default=None, min_length=1
    )
    secret: str | None = Field(default=None, max_length=200)
    filters: WebhookFilters | None = None
    headers: dict[str, str] | None = Field(default=None, max_length=20)
    active: bool | None = None
    description: str | None = Field(default=None, max_length=1000)
    legacy_event_names: bool | None = None


class DeliveryListQuery(BaseModel):
    model_config = ConfigDict(extra="ignore")

    status: Literal["pending", "delivering", "retrying", "succeeded", "failed", "dead"] | None = (
        None
    )
    limit: int = Field(default=50, ge=1, le=200)
