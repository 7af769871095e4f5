"""The workflow rows: one DAG of no-op steps submitted at once, timed until it has completed.

Each shape is built twice from the same description: as the body of one
`POST /api/workflows` for EMP Tasks, and as one Celery canvas (chain, chord) of
the bare app's no-op task, sent with one `apply_async`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

FAN = "fan"
CHAIN = "chain"


@dataclass(frozen=True)
class Shape:
    """A DAG of `steps` no-op steps: `1 → width → 1` (fan) or `width` in a row (chain)."""

    kind: str
    width: int

    @property
    def key(self) -> str:
        return f"{self.kind}-{self.width}"

    @property
    def steps(self) -> int:
        return self.width + 2 if self.kind == FAN else self.width

    @property
    def hops(self) -> int | None:
        """Sequential hand-overs of a chain (its length); None for a fan."""
        return self.width if self.kind == CHAIN else None

    @property
    def label(self) -> str:
        if self.kind == FAN:
            return f"workflow fan-out/fan-in 1 → {self.width} → 1 ({self.steps} steps)"
        return f"workflow chain of {self.width} steps"

    def depends_on(self) -> list[list[int]]:
        """Each step's dependencies by index, as `POST /api/workflows` takes them."""
        if self.kind == FAN:
            return [[]] + [[0] for _ in range(self.width)] + [list(range(1, self.width + 1))]
        return [[]] + [[index] for index in range(self.width - 1)]

    def emp_body(self) -> dict[str, Any]:
        steps = [
            {"service": "simulation", "payload": {}, "depends_on": dependencies}
            for dependencies in self.depends_on()
        ]
        return {"name": f"bench {self.label}", "steps": steps}

    def celery_signature(self, noop: Any) -> Any:
        """The same DAG as a Celery canvas of `noop` immutable signatures (`.si`)."""
        from celery import chain, chord, group

        if self.kind == FAN:
            header = group(noop.si(index) for index in range(1, self.width + 1))
            return chain(noop.si(0), chord(header, noop.si(self.width + 1)))
        return chain(*[noop.si(index) for index in range(self.width)])


SHAPES = (Shape(FAN, 998), Shape(CHAIN, 200))
