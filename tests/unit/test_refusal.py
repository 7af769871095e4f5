"""A worker handed a step it cannot serve stops consuming that queue before it hands the
step back: only a read of what Celery really consumes says the queue is no longer taken."""

from __future__ import annotations

from emp_tasks.routes.capabilities import Capabilities
from emp_tasks.worker.presence import Presence


def test_a_refused_queue_counts_as_stopped_only_once_celery_is_read_not_consuming_it():
    presence = Presence(Capabilities(), "threads", 2)
    # Added from outside (`add_consumer`) since the last tick: `consumed` does not know it.
    stopped = presence.refuse("emp.added-from-outside")
    assert not stopped.is_set()
    presence.applied({"emp.added-from-outside"})  # the next tick: Celery still takes it
    assert not stopped.is_set()
    presence.applied(set())  # reverted and refused: no longer consumed
    assert stopped.is_set()
