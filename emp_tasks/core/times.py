"""Time as the API shows it (UTC, ISO 8601 with a `Z`), and the timeframes stats count over."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

TIMEFRAMES = {"hour": timedelta(hours=1), "day": timedelta(days=1), "week": timedelta(weeks=1)}
"""The windows `GET /api/steps/stats` and `/api/workflows/stats` count over."""


def now() -> datetime:
    return datetime.now(UTC)


def iso(value: datetime | None) -> str | None:
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z") if value else None
