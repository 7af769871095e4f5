"""What clients may send: the validated shapes of requests.

These models validate every request and generate the OpenAPI document, so the
two cannot drift. Services receive validated models, never raw JSON.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    field_validator,
    model_validator,
)

from emp_tasks.core import references
from emp_tasks.core.config import get_settings
from emp_tasks.core.events import EventType
from emp_tasks.core.status import DeliveryStatus, StepStatus, WorkerStatus, WorkflowStatus

SERVICE_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}$"
MAX_NAME = 200
MAX_LABELS = 50
LABEL_KEY = re.compile(r"[A-Za-z0-9_.\-]{1,100}")
Name = Annotated[str, Field(min_length=1, max_length=MAX_NAME)]
"""A model name, label value or filter entry: short text."""
WorkflowStatusName = Literal[tuple(status.value for status in WorkflowStatus)]
"""A workflow status filter, as plain strings (the schema lists them inline)."""
DeliveryStatusName = Literal[tuple(status.value for status in DeliveryStatus)]
"""A delivery status filter, as plain strings (the schema lists them inline)."""
SERVICE_ALIASES = ("type", "job_type", "service_required")
CURSOR: dict[str, Any] = {
    "description": "The `next_cursor` of the previous page (an id): the page after it",
    "json_schema_extra": {"format": "uuid"},
}


def _json_number(value: Any) -> Any:
    """Accept JSON numbers only: not strings of digits, not booleans."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("must be a number")
    return value


Number = Annotated[float, BeforeValidator(_json_number)]


def _json_integer(value: Any) -> Any:
    """Accept JSON integers, written as `3` or `3.0` (JSON Schema's integer); no strings."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError("must be a whole number")
    return value


Integer = Annotated[int, BeforeValidator(_json_integer)]
STEP_EVENT_NAMES = sorted(e.value for e in EventType if e.value.startswith("step_"))


class Requirements(BaseModel):
    """What a worker must offer to run the step; unknown keys are worker labels to match."""

    model_config = ConfigDict(
        extra="allow",
        json_schema_extra={
            "maxProperties": MAX_LABELS,
            "additionalProperties": False,
            "patternProperties": {
                f"^{LABEL_KEY.pattern}$": {
                    "description": "a worker label to match",
                    "anyOf": [
                        {"type": "string", "maxLength": MAX_NAME},
                        {"type": "number"},
                        {"type": "boolean"},
                        {"type": "null"},
                    ],
                }
            },
        },
    )

    gpu_memory_gb: Number | None = Field(default=None, ge=0, le=4096)
    models: list[Name] | None = Field(default=None, max_length=100)
    customer_isolation: Literal["strict", "loose"] | None = None

    @model_validator(mode="after")
    def _labels_are_short_scalars(self) -> Requirements:
        labels = self.model_extra or {}
        if len(labels) > MAX_LABELS:
            raise ValueError(f"at most {MAX_LABELS} worker labels")
        for key, value in labels.items():
            if not LABEL_KEY.fullmatch(key):
                raise ValueError(f"label names are 1-100 letters, digits, '_', '.', '-': {key!r}")
            short_text = isinstance(value, str) and len(value) <= MAX_NAME
            if not (value is None or short_text or isinstance(value, bool | int | float)):
                raise ValueError(
                    f"label {key!r} must be a string of at most {MAX_NAME} characters,"
                    " a number or a boolean"
                )
        return self


WEBHOOK_URL_RULES = (
    "An http:// or https:// URL with no userinfo (user@), backslash, whitespace or control"
    " character; its host is a DNS name, a dotted-decimal IPv4 address or a bracketed IPv6"
    " address, not percent-encoded. Every address it resolves to must be public unless the"
    " server sets EMP_WEBHOOK_ALLOW_PRIVATE=true; link-local and cloud metadata addresses"
    " are refused always. Checked again before every delivery."
)

DOCUMENTED_URL = (
    r"^https?://([a-z0-9]{1,20}(-[a-z0-9]{1,20}){0,2}\.){1,4}[a-z]{2,12}(:[1-9][0-9]{0,3})?"
    r"(/[A-Za-z0-9._~!$&'()*+,;=:@/-]{0,200})?$"
)
"""A form every public webhook URL may take, for schema-driven clients and fuzzers; the
rules themselves (WEBHOOK_URL_RULES) accept more, e.g. IP literals and any port."""

WebhookUrl = Annotated[
    str,
    Field(
        max_length=2000,
        pattern=r"^https?://\S+$",
        description=WEBHOOK_URL_RULES,
        json_schema_extra={"pattern": DOCUMENTED_URL},
    ),
]


class StepCreate(BaseModel):
    """`POST /api/steps` (and the seed-compatible submit routes)."""

    model_config = ConfigDict(extra="ignore")

    service: str = Field(pattern=SERVICE_PATTERN, description="Service that runs the step")
    payload: dict[str, Any] = Field(default_factory=dict)
    priority: Integer = Field(default=50, ge=0, le=100, description="Higher runs first")
    requirements: Requirements = Field(default_factory=Requirements)
    max_retries: Integer = Field(default=3, ge=0, le=10)
    timeout_s: Number = Field(default=1800, gt=0, le=7 * 24 * 3600)
    expires_in_s: Number | None = Field(
        default=None,
        gt=0,
        le=30 * 24 * 3600,
        description="Fail with EXPIRED instead of starting later than this after submission",
    )
    webhook_url: WebhookUrl | None = None
    webhook_events: list[Literal[tuple(STEP_EVENT_NAMES)]] | None = Field(  # type: ignore[valid-type]
        default=None, min_length=1, description="At least one event, or omitted for the default"
    )
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


ID_PREFIX_PATTERN = r"^[0-9A-Fa-f-]{4,36}$"
ISO_TIME = re.compile(r"\d{4}-\d\d-\d\d[Tt ]\d\d:\d\d.*")


def _iso_time_text(value: Any) -> Any:
    """A time in a query is ISO 8601 text only (not a number of seconds)."""
    if not isinstance(value, str) or not ISO_TIME.fullmatch(value):
        raise ValueError("must be an ISO 8601 time with its offset, like 2026-01-02T03:04:05Z")
    return value


IsoTime = Annotated[AwareDatetime, BeforeValidator(_iso_time_text)]


class JobListQuery(BaseModel):
    """`GET /api/jobs` (the seed route): the filters it has always had."""

    model_config = ConfigDict(extra="ignore")

    status: StepStatus | None = None
    service: str | None = Field(default=None, max_length=200)
    workflow_id: str | None = Field(default=None, max_length=36)
    limit: int = Field(default=50, ge=1, le=200)
    cursor: str | None = Field(default=None, max_length=100, **CURSOR)


class StepListQuery(JobListQuery):
    """`GET /api/steps`: the job filters and the dashboard's."""

    customer_id: str | None = Field(
        default=None,
        min_length=1,
        max_length=200,
        description="Steps of this customer (a customer key: its own only, else 403)",
    )
    worker_id: str | None = Field(
        default=None,
        min_length=1,
        max_length=200,
        description="Steps whose latest attempt ran on this worker",
    )
    error_code: str | None = Field(
        default=None, min_length=1, max_length=100, description="Steps whose `error.code` is this"
    )
    created_after: IsoTime | None = Field(
        default=None, description="Steps created at or after this time (ISO 8601 with offset)"
    )
    created_before: IsoTime | None = Field(
        default=None, description="Steps created before this time (ISO 8601 with offset)"
    )
    id_prefix: str | None = Field(
        default=None,
        pattern=ID_PREFIX_PATTERN,
        description="Steps whose id starts with this (4 to 36 hex digits and dashes)",
    )


class StatsQuery(BaseModel):
    model_config = ConfigDict(extra="ignore")

    timeframe: Literal["hour", "day", "week"] = "day"


class SeriesQuery(BaseModel):
    model_config = ConfigDict(extra="ignore")

    window: Literal["hour", "day"] = Field(
        default="hour", description="The last hour (1-minute buckets) or day (15-minute buckets)"
    )


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

    depends_on: list[Integer] = Field(default_factory=list, max_length=10_000)

    @field_validator("depends_on")
    @classmethod
    def _unique(cls, value: list[int]) -> list[int]:
        if len(set(value)) != len(value):
            raise ValueError("must not repeat an index")
        return value


def _reference_errors(index: int, step: WorkflowStepSpec) -> list[Any]:
    """A step's payload may refer only to its own dependencies (emp_tasks.core.references)."""
    from pydantic_core import InitErrorDetails, PydanticCustomError

    try:
        found = references.find(step.payload)
    except references.MalformedReference as malformed:
        return [
            InitErrorDetails(
                type=PydanticCustomError("reference_syntax", str(malformed)),
                loc=("steps", index, "payload", *malformed.where),
                input=None,
            )
        ]
    return [
        InitErrorDetails(
            type=PydanticCustomError(
                "reference_not_a_dependency",
                "refers to step {step}, which is not in this step's depends_on {depends_on}",
                {"step": reference.step_index, "depends_on": step.depends_on},
            ),
            loc=("steps", index, "payload", *reference.where),
            input=reference.text,
        )
        for reference in found
        if reference.step_index not in step.depends_on
    ]


WORKFLOW_EVENT_NAMES = sorted(e.value for e in EventType if e.value.startswith("workflow_"))


class EmpropsRef(BaseModel):
    """`emprops` of a workflow: the EmProps job it runs (and its collection)."""

    model_config = ConfigDict(extra="ignore")

    job_id: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]*$")
    collection_id: str | None = Field(default=None, min_length=1, max_length=200)


class WorkflowCreate(BaseModel):
    """`POST /api/workflows`: a DAG of steps by `depends_on` (earlier indices only)."""

    model_config = ConfigDict(extra="ignore")

    name: str = Field(min_length=1, max_length=500)
    description: str | None = Field(default=None, max_length=5000)
    steps: list[WorkflowStepSpec] = Field(min_length=1)
    priority: Integer | None = Field(default=None, ge=0, le=100)
    failure_policy: Literal["fail_fast", "continue"] = "fail_fast"
    webhook_url: WebhookUrl | None = None
    webhook_events: list[Literal[tuple(WORKFLOW_EVENT_NAMES)]] | None = Field(  # type: ignore[valid-type]
        default=None, min_length=1, description="At least one event, or omitted for the default"
    )
    customer_id: str | None = Field(default=None, min_length=1, max_length=200)
    metadata: dict[str, Any] = Field(default_factory=dict)
    emprops: EmpropsRef | None = Field(
        default=None, description="An EmProps job: EmProps is told when the workflow ends"
    )

    @field_validator("name")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be blank")
        return value

    @field_validator("emprops")
    @classmethod
    def _emprops_configured(cls, value: EmpropsRef | None) -> EmpropsRef | None:
        if value is not None and get_settings().emprops_api_url is None:
            raise ValueError("EmProps is not configured here (EMPROPS_API_URL)")
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
            errors.extend(_reference_errors(index, step))
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

    status: WorkflowStatusName | None = None
    limit: int = Field(default=50, ge=1, le=200)
    cursor: str | None = Field(default=None, max_length=100, **CURSOR)


WEBHOOK_EVENT_NAMES = sorted(
    {e.value for e in EventType}
    | {"job_" + e.value[len("step_") :] for e in EventType if e.value.startswith("step_")}
    | {"*", "webhook_test"}
)
RESERVED_HEADERS = {
    # Ours: the body's type and the Standard Webhooks signature.
    "content-type",
    # HTTP framing and hop-by-hop: a receiver (or a proxy before it) could read the
    # request differently from how it was sent.
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "te",
    "trailer",
    "upgrade",
    "expect",
}
RESERVED_HEADER_PREFIXES = ("webhook-", "proxy-")
MAX_HEADER_NAME = 100
MAX_HEADER_VALUE = 2000
HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
"""RFC 9110 `token`."""
HEADER_VALUE = re.compile(r"[\x20-\x7e\t]*")
"""Visible ASCII, space and tab: no CR, LF or other control character."""


def _check_header(name: str, value: str) -> None:
    if not 1 <= len(name) <= MAX_HEADER_NAME or not HEADER_NAME.fullmatch(name):
        raise ValueError(
            f"header names are 1-{MAX_HEADER_NAME} token characters (RFC 9110): {name[:100]!r}"
        )
    lowered = name.lower()
    if lowered in RESERVED_HEADERS or lowered.startswith(RESERVED_HEADER_PREFIXES):
        raise ValueError(
            f"must not set {name!r}: {', '.join(sorted(RESERVED_HEADERS))},"
            " webhook-* and proxy-* are set by the server or by HTTP itself"
        )
    if len(value) > MAX_HEADER_VALUE or not HEADER_VALUE.fullmatch(value):
        raise ValueError(
            f"header {name!r}: values are at most {MAX_HEADER_VALUE} characters of visible"
            " ASCII, space or tab (no CR, LF or other control character)"
        )


def _any_case(text: str) -> str:
    return "".join(f"[{c.lower()}{c.upper()}]" if c.isalpha() else re.escape(c) for c in text)


RESERVED_HEADER_PATTERN = (
    f"^({'|'.join(_any_case(name) for name in sorted(RESERVED_HEADERS))})$"
    f"|^({'|'.join(_any_case(prefix) for prefix in RESERVED_HEADER_PREFIXES)})"
)

WebhookHeaders = Annotated[
    dict[str, str],
    Field(
        max_length=20,
        description="Extra request headers: RFC 9110 token names of at most"
        f" {MAX_HEADER_NAME} characters, values of at most {MAX_HEADER_VALUE} visible ASCII"
        " characters; not framing, hop-by-hop, Content-Type, webhook-* or proxy-* headers",
        json_schema_extra={
            "propertyNames": {
                "maxLength": MAX_HEADER_NAME,
                "not": {"pattern": RESERVED_HEADER_PATTERN},
            },
            "patternProperties": {
                f"^{HEADER_NAME.pattern}$": {
                    "type": "string",
                    "maxLength": MAX_HEADER_VALUE,
                    "pattern": f"^{HEADER_VALUE.pattern}$",
                }
            },
            "additionalProperties": False,
        },
    ),
]

WebhookSecret = Annotated[
    str,
    Field(
        max_length=200,
        pattern=r"^whsec_([A-Za-z0-9+/]{4}){5,48}([A-Za-z0-9+/]{4}|[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)$",
        description="`whsec_` and the base64 of a key of at least 16 bytes; generated when absent",
        json_schema_extra={"writeOnly": True},
    ),
]


class WebhookFilters(BaseModel):
    model_config = ConfigDict(extra="forbid")

    services: list[Name] | None = Field(default=None, max_length=100)
    workflow_ids: list[Name] | None = Field(default=None, max_length=1000)


class _WebhookFields(BaseModel):
    model_config = ConfigDict(extra="ignore")

    @field_validator("headers", check_fields=False)
    @classmethod
    def _valid_headers(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        for name, item in (value or {}).items():
            _check_header(name, item)
        return value


class WebhookCreate(_WebhookFields):
    """`POST /api/webhooks`: a receiver for this customer's events."""

    url: WebhookUrl
    events: list[Literal[tuple(WEBHOOK_EVENT_NAMES)]] = Field(  # type: ignore[valid-type]
        default_factory=lambda: ["*"], min_length=1
    )
    secret: WebhookSecret | None = None
    filters: WebhookFilters = Field(default_factory=WebhookFilters)
    headers: WebhookHeaders = Field(default_factory=dict)
    active: StrictBool = True
    description: str | None = Field(default=None, max_length=1000)
    legacy_event_names: StrictBool = False
    customer_id: str | None = Field(default=None, min_length=1, max_length=200)


class WebhookUpdate(_WebhookFields):
    """`PATCH /api/webhooks/{id}`: only the fields sent change."""

    url: WebhookUrl | None = None
    events: list[Literal[tuple(WEBHOOK_EVENT_NAMES)]] | None = Field(  # type: ignore[valid-type]
        default=None, min_length=1
    )
    secret: WebhookSecret | None = None
    filters: WebhookFilters | None = None
    headers: WebhookHeaders | None = None
    active: StrictBool | None = None
    description: str | None = Field(default=None, max_length=1000)
    legacy_event_names: StrictBool | None = None


class DeliveryListQuery(BaseModel):
    model_config = ConfigDict(extra="ignore")

    status: DeliveryStatusName | None = None
    limit: int = Field(default=50, ge=1, le=200)
