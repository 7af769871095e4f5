"""The API's JSON shapes of rows the domain returns: steps, workflows, webhooks, the fleet.

Only views that nothing but HTTP and the WebSocket show live here. A shape the
domain itself records or sends — `step_details` in workflow events and webhooks,
event envelopes, metrics — is built in the domain, by one function, so every
channel shows the same thing.
"""

from __future__ import annotations

from typing import Any

from emp_tasks.core.status import LIVE_WORKER_STATUSES, SCHEDULED_DELIVERY_STATUSES
from emp_tasks.core.times import iso
from emp_tasks.store.models import WebhookEndpoint
from emp_tasks.webhooks.delivery import LoggedDelivery
from emp_tasks.workers import FleetMachine, FleetWorker

# --- steps and workflows -------------------------------------------------------------------


def step_object(step: Any) -> dict[str, Any]:
    """The public shape of a step (API.md, "Step object fields"): of its ORM row or of a row
    read with the same attribute names (emp_tasks.steps.transitions.STEP_COLUMNS)."""
    return {
        "id": step.id,
        "service": step.service,
        "status": step.status,
        "priority": step.priority,
        "payload": step.payload,
        "requirements": step.requirements,
        "queue": step.queue,
        "result": step.result,
        "error": step.error,
        "progress": step.progress,
        "stage": step.stage,
        "message": step.message,
        "attempts": step.attempts,
        "max_retries": step.max_retries,
        "timeout_s": step.timeout_s,
        "workflow_id": step.workflow_id,
        "step_index": step.step_index,
        "depends_on": step.depends_on,
        "customer_id": step.customer_id,
        "worker_id": step.worker_id,
        "machine_id": step.machine_id,
        "webhook_url": step.webhook_url,
        "webhook_events": step.webhook_events,
        "correlation_id": step.correlation_id,
        "metadata": step.meta,
        "created_at": iso(step.created_at),
        "started_at": iso(step.started_at),
        "completed_at": iso(step.completed_at),
        "updated_at": iso(step.updated_at),
    }


def attempt_object(attempt: Any) -> dict[str, Any]:
    """One attempt of a step: where it ran, how long, and how it ended."""
    return {
        "attempt": attempt.attempt,
        "worker_id": attempt.worker_id,
        "machine_id": attempt.machine_id,
        "outcome": attempt.outcome,
        "error": attempt.error,
        "started_at": iso(attempt.started_at),
        "finished_at": iso(attempt.finished_at),
        "cold_start": attempt.cold_start,
        "model_load_ms": attempt.model_load_ms,
    }


def workflow_object(workflow: Any) -> dict[str, Any]:
    """A workflow's ORM row or a row with its attribute names (steps.workflows)."""
    total = workflow.total_steps or 1
    return {
        "id": workflow.id,
        "name": workflow.name,
        "description": workflow.description,
        "status": workflow.status,
        "total_steps": workflow.total_steps,
        "completed_steps": workflow.completed_steps,
        "failed_steps": workflow.failed_steps,
        "progress_percentage": round(100.0 * workflow.completed_steps / total, 2),
        "failure_policy": workflow.failure_policy,
        "priority": workflow.priority,
        "failed_step_index": workflow.failed_step_index,
        "error": workflow.error,
        "customer_id": workflow.customer_id,
        "webhook_url": workflow.webhook_url,
        "webhook_events": workflow.webhook_events,
        "correlation_id": workflow.correlation_id,
        "metadata": workflow.meta,
        "created_at": iso(workflow.created_at),
        "started_at": iso(workflow.started_at),
        "completed_at": iso(workflow.completed_at),
        "updated_at": iso(workflow.updated_at),
    }


# --- webhooks ------------------------------------------------------------------------------


def endpoint_object(endpoint: WebhookEndpoint, *, with_secret: bool = False) -> dict[str, Any]:
    """A webhook endpoint; its secret only when asked (the answer that creates it)."""
    shown = {
        "id": endpoint.id,
        "url": endpoint.url,
        "events": endpoint.events,
        "filters": endpoint.filters,
        "headers": endpoint.headers,
        "active": endpoint.active,
        "description": endpoint.description,
        "legacy_event_names": endpoint.legacy_event_names,
        "disabled_reason": endpoint.disabled_reason,
        "customer_id": endpoint.customer_id,
        "created_at": iso(endpoint.created_at),
        "updated_at": iso(endpoint.updated_at),
    }
    if with_secret:
        shown["secret"] = endpoint.secret
    return shown


def delivery_object(logged: LoggedDelivery) -> dict[str, Any]:
    """A webhook delivery with its attempt log."""
    delivery = logged.delivery
    return {
        "id": delivery.id,
        "webhook_id": delivery.endpoint_id,
        "event_id": delivery.event_id,
        "event_type": delivery.event_type,
        "url": delivery.url,
        "status": delivery.status,
        "attempts": delivery.attempts,
        "next_attempt_at": iso(delivery.next_attempt_at)
        if delivery.status in SCHEDULED_DELIVERY_STATUSES
        else None,
        "last_status_code": delivery.last_status_code,
        "last_error": delivery.last_error,
        "created_at": iso(delivery.created_at),
        "delivered_at": iso(delivery.delivered_at),
        "body": delivery.body,
        "log": [
            {
                "attempt": row.attempt,
                "status_code": row.status_code,
                "error": row.error,
                "duration_ms": row.duration_ms,
                "attempted_at": iso(row.attempted_at),
            }
            for row in logged.attempts
        ],
    }


# --- the fleet -----------------------------------------------------------------------------


def worker_object(entry: FleetWorker) -> dict[str, Any]:
    worker = entry.worker
    return {
        "id": worker.id,
        "machine_id": worker.machine_id,
        "status": worker.status,
        "status_reason": worker.status_reason,
        "capabilities": worker.capabilities,
        "queues": worker.queues,
        "backends": worker.backends,
        "loaded_models": worker.loaded_models,
        "current_step_id": (entry.current_step_ids or [None])[0],
        "current_step_ids": entry.current_step_ids,
        "concurrency": worker.concurrency,
        "pool": worker.pool,
        "hostname": worker.hostname,
        "pid": worker.pid,
        "version": worker.version,
        "started_at": iso(worker.started_at),
        "last_heartbeat_at": iso(worker.last_heartbeat_at),
        "stopped_at": iso(worker.stopped_at),
    }


def machine_object(entry: FleetMachine) -> dict[str, Any]:
    """A machine with its workers: online while any of them is live."""
    machine = entry.machine
    fleet = [worker_object(worker) for worker in entry.workers]
    live = [w for w in fleet if w["status"] in LIVE_WORKER_STATUSES]
    gpus = [w["capabilities"].get("gpu_model") for w in fleet]
    return {
        "id": machine.id,
        "hostname": machine.hostname,
        "status": "online" if live else "offline",
        "workers_online": len(live),
        "workers": fleet,
        "gpus": [gpu for gpu in gpus if gpu],
        "first_seen_at": iso(machine.first_seen_at),
        "last_seen_at": iso(machine.last_seen_at),
    }
