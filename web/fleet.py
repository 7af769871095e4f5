"""Fleet routes: machines, workers, queues, and the operator actions on them.

Machines and workers are operator information: admin keys only. Queues are
visible to every key, each customer seeing only its own (with consumer counts,
not worker ids).
"""

from __future__ import annotations

from flask import Blueprint, Response

from emp_tasks import workers
from emp_tasks.auth import Principal
from emp_tasks.routes import queues
from emp_tasks.specs import CancelRequest, DrainRequest, QueueListQuery, WorkerListQuery
from emp_tasks.steps import client as steps_client
from web.endpoints import endpoint, ok
from web.presenters import machine_object, worker_object

bp = Blueprint("fleet", __name__)

TAGS = ("fleet",)


@endpoint(bp, "/api/machines", admin=True, tags=TAGS, summary="Machines and their workers")
def list_machines(principal: Principal) -> Response:
    return ok(machines=[machine_object(m) for m in workers.list_machines()])


@endpoint(bp, "/api/machines/<machine_id>", admin=True, tags=TAGS, summary="A machine")
def get_machine(principal: Principal, machine_id: str) -> Response:
    return ok(machine=machine_object(workers.get_machine(machine_id)))


@endpoint(
    bp,
    "/api/machines/<machine_id>",
    methods=("DELETE",),
    admin=True,
    tags=TAGS,
    summary="Remove a machine: its workers take nothing more, its running steps are re-queued",
)
def delete_machine(principal: Principal, machine_id: str) -> Response:
    return ok(**workers.remove_machine(machine_id))


@endpoint(bp, "/api/workers", query=WorkerListQuery, admin=True, tags=TAGS, summary="Workers")
def list_workers(principal: Principal, query: WorkerListQuery) -> Response:
    found = workers.list_workers(status=query.status, machine_id=query.machine_id)
    return ok(workers=[worker_object(w) for w in found])


@endpoint(bp, "/api/workers/<worker_id>", admin=True, tags=TAGS, summary="A worker")
def get_worker(principal: Principal, worker_id: str) -> Response:
    return ok(worker=worker_object(workers.get_worker(worker_id)))


@endpoint(
    bp,
    "/api/workers/<worker_id>/drain",
    methods=("POST",),
    body=DrainRequest,
    admin=True,
    tags=TAGS,
    summary="Drain a worker: it finishes its current step and takes no new one",
)
def drain_worker(principal: Principal, worker_id: str, body: DrainRequest) -> Response:
    return ok(worker=worker_object(workers.drain(worker_id, body.reason)))


@endpoint(
    bp,
    "/api/workers/<worker_id>/resume",
    methods=("POST",),
    admin=True,
    tags=TAGS,
    summary="Resume a drained worker",
)
def resume_worker(principal: Principal, worker_id: str) -> Response:
    return ok(worker=worker_object(workers.resume(worker_id)))


@endpoint(
    bp,
    "/api/queues",
    query=QueueListQuery,
    tags=TAGS,
    summary="Queues: steps waiting (depth) and running, consumers, and why none can serve",
)
def list_queues(principal: Principal, query: QueueListQuery) -> Response:
    return ok(queues=queues.list_queues(principal, include_idle=query.all))


@endpoint(
    bp,
    "/api/queues/<queue>/purge",
    methods=("POST",),
    body=CancelRequest,
    admin=True,
    tags=TAGS,
    summary="Cancel every pending step of a queue (admin); each gets its step_cancelled",
)
def purge_queue(principal: Principal, queue: str, body: CancelRequest) -> Response:
    return ok(cancelled=steps_client.purge_queue(queue, body.reason))
