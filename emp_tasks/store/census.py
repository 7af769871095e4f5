"""What the broker holds: which steps have a task waiting in a queue or reserved by a worker.

A step's task is in one of two places until its worker acknowledges it: a queue's Redis
lists (one per priority level), or kombu's `unacked` hash (a worker took it and has not
acknowledged it yet; with late acknowledgement, until the task returns), indexed by the
time it was taken in `unacked_index`. Every message names its step in the `argsrepr`
header, ours (emp_tasks.store.broker) and `apply_async`'s alike, so a census reads that
header with a pattern instead of decoding bodies.

`depths` counts (cheap: one LLEN per list); `queued_steps` reads a queue's lists whole
(only for a queue whose counts disagree with PostgreSQL's); `taken` reads the unacked
hash, which holds at most the fleet's prefetch.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from datetime import datetime

from emp_tasks.core.priority import BROKER_PRIORITY_LEVELS
from emp_tasks.store import dispatch
from emp_tasks.store.broker import queue_list

UNACKED = "unacked"
UNACKED_INDEX = "unacked_index"
"""kombu's Redis transport keys (its defaults; celeryconfig does not change them)."""

_STEP_OF = re.compile(r'"argsrepr":\s*"\(\'([^\']+)\',\)"')
_ARGSREPR = re.compile(r"\('([^']+)',\)")


def step_of(message: str) -> str | None:
    """The step a raw task message runs, from its `argsrepr` header; None if not a step's."""
    found = _STEP_OF.search(message)
    return found.group(1) if found else None


def _lists(queue: str) -> list[str]:
    return [queue_list(queue, level) for level in range(BROKER_PRIORITY_LEVELS)]


def depths(queues: list[str]) -> dict[str, int]:
    """Messages waiting in each queue's lists (all priority levels)."""
    if not queues:
        return {}
    pipe = dispatch.broker_client().pipeline(transaction=False)
    for queue in queues:
        for key in _lists(queue):
            pipe.llen(key)
    counts = pipe.execute()
    return {
        queue: sum(counts[i * BROKER_PRIORITY_LEVELS : (i + 1) * BROKER_PRIORITY_LEVELS])
        for i, queue in enumerate(queues)
    }


def queued_steps(queue: str, chunk: int = 5000) -> set[str]:
    """The steps whose task waits in `queue`'s lists (read in chunks)."""
    client = dispatch.broker_client()
    found: set[str] = set()
    for key in _lists(queue):
        start = 0
        while True:
            messages = client.lrange(key, start, start + chunk - 1)
            for message in messages:
                step_id = step_of(message)
                if step_id is not None:
                    found.add(step_id)
            if len(messages) < chunk:
                break
            start += chunk
    return found


@dataclass(frozen=True)
class Taken:
    """A task a worker took from `queue` and has not acknowledged."""

    step_id: str
    queue: str
    taken_at: float  # epoch seconds
    eta: datetime | None

    def held_for_later(self, at: float | None = None) -> bool:
        """A retry's task a worker holds until its ETA (legitimately, for any time)."""
        return self.eta is not None and self.eta.timestamp() > (at or time.time())


def taken() -> list[Taken]:
    """Every task workers have taken and not acknowledged (the fleet's prefetch at most)."""
    client = dispatch.broker_client()
    pipe = client.pipeline(transaction=False)
    pipe.hgetall(UNACKED)
    pipe.zrange(UNACKED_INDEX, 0, -1, withscores=True)
    raw, index = pipe.execute()
    when = {tag: score for tag, score in index}
    out = []
    for tag, value in raw.items():
        try:
            message, _exchange, routing_key = json.loads(value)
            headers = message.get("headers") or {}
            found = _ARGSREPR.fullmatch(str(headers.get("argsrepr") or ""))
            step_id = found.group(1) if found else None
            eta = headers.get("eta")
            eta_at = datetime.fromisoformat(eta) if eta else None
        except (ValueError, TypeError, AttributeError):
            continue
        if step_id is not None:
            out.append(Taken(step_id, routing_key, when.get(tag, 0.0), eta_at))
    return out
