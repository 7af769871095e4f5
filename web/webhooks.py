"""Webhook endpoints API: register receivers, inspect and replay their deliveries."""

from __future__ import annotations

from flask import Blueprint, Response

from emp_tasks.auth import Principal
from emp_tasks.specs import DeliveryListQuery, WebhookCreate, WebhookUpdate
from emp_tasks.webhooks import delivery
from emp_tasks.webhooks import endpoints as webhooks
from web.endpoints import endpoint, ok
from web.presenters import delivery_object, endpoint_object

bp = Blueprint("webhooks", __name__)

TAGS = ("webhooks",)


@endpoint(
    bp,
    "/api/webhooks",
    methods=("POST",),
    body=WebhookCreate,
    status=201,
    tags=TAGS,
    summary="Register a webhook endpoint; its secret is shown only in this answer",
)
def create_webhook(principal: Principal, body: WebhookCreate) -> Response:
    created = webhooks.create(body, principal)
    return ok(201, webhook=endpoint_object(created, with_secret=True))


@endpoint(bp, "/api/webhooks", tags=TAGS, summary="List webhook endpoints")
def list_webhooks(principal: Principal) -> Response:
    return ok(webhooks=[endpoint_object(e) for e in webhooks.list_endpoints(principal)])


@endpoint(bp, "/api/webhooks/<webhook_id>", tags=TAGS, summary="Get a webhook endpoint")
def get_webhook(principal: Principal, webhook_id: str) -> Response:
    return ok(webhook=endpoint_object(webhooks.get(webhook_id, principal)))


@endpoint(
    bp,
    "/api/webhooks/<webhook_id>",
    methods=("PATCH",),
    body=WebhookUpdate,
    tags=TAGS,
    summary="Change a webhook endpoint (only the fields sent)",
)
def update_webhook(principal: Principal, webhook_id: str, body: WebhookUpdate) -> Response:
    return ok(webhook=endpoint_object(webhooks.update(webhook_id, body, principal)))


@endpoint(
    bp,
    "/api/webhooks/<webhook_id>",
    methods=("DELETE",),
    tags=TAGS,
    summary="Delete a webhook endpoint",
)
def delete_webhook(principal: Principal, webhook_id: str) -> Response:
    webhooks.delete(webhook_id, principal)
    return ok(message=f"webhook {webhook_id} deleted")


@endpoint(
    bp,
    "/api/webhooks/<webhook_id>/test",
    methods=("POST",),
    status=202,
    tags=TAGS,
    summary="Send a webhook_test event to the endpoint",
)
def test_webhook(principal: Principal, webhook_id: str) -> Response:
    return ok(202, delivery=delivery_object(delivery.send_test(webhook_id, principal)))


@endpoint(
    bp,
    "/api/webhooks/<webhook_id>/deliveries",
    query=DeliveryListQuery,
    tags=TAGS,
    summary="Deliveries to the endpoint, newest first, each with its attempt log",
)
def list_deliveries(principal: Principal, webhook_id: str, query: DeliveryListQuery) -> Response:
    found = delivery.list_deliveries(webhook_id, principal, query.status, query.limit)
    return ok(deliveries=[delivery_object(logged) for logged in found])


@endpoint(
    bp,
    "/api/webhooks/<webhook_id>/deliveries/<delivery_id>/replay",
    methods=("POST",),
    tags=TAGS,
    summary="Send a finished (for example dead) delivery again",
)
def replay_delivery(principal: Principal, webhook_id: str, delivery_id: str) -> Response:
    return ok(delivery=delivery_object(delivery.replay(webhook_id, delivery_id, principal)))
