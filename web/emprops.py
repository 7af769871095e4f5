"""EmProps pass-through routes: calls the client makes to EmProps through us."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response
from pydantic import BaseModel, ConfigDict

from emp_tasks.auth import Principal
from emp_tasks.emprops import client
from web.endpoints import endpoint, ok
from web.errors import ApiError

bp = Blueprint("emprops", __name__)


class CollectionCreate(BaseModel):
    """Passed to EmProps as it is: EmProps validates its own collections."""

    model_config = ConfigDict(extra="allow")


@endpoint(
    bp,
    "/api/emprops/collections",
    methods=("POST",),
    body=CollectionCreate,
    status=201,
    tags=("emprops",),
    errors=(400, 502),
    summary="Create an EmProps collection (forwarded to EmProps; 502 when EmProps fails)",
)
def create_collection(principal: Principal, body: CollectionCreate) -> Response:
    if not client.configured():
        raise ApiError(400, "VALIDATION_FAILED", "EmProps is not configured here (EMPROPS_API_URL)")
    forwarded: dict[str, Any] = body.model_dump()
    try:
        collection = client.create_collection(forwarded)
    except client.EmpropsError as failure:
        details = [{"field": "emprops", "message": failure.message, "type": "upstream"}]
        if failure.status is not None:
            details[0]["status"] = failure.status
        raise ApiError(
            502, "UPSTREAM_FAILED", "EmProps did not create the collection", details
        ) from failure
    return ok(201, collection=collection)
