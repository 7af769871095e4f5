"""Outputs of the `file` store, served to whoever holds a signed link (no API key).

`GET /outputs/<key>?expires=&signature=`: the link a step's `result.outputs[].url`
holds (emp_tasks.storage.files); 403 when the signature is wrong or has expired, 404
when the store has no such output. With an `s3` store outputs are fetched from the
store's own URLs and this route answers 404.
"""

from __future__ import annotations

from flask import Blueprint, Response, send_file
from pydantic import BaseModel, ConfigDict, Field

from emp_tasks import storage
from emp_tasks.storage.files import FileStore
from web.endpoints import endpoint
from web.errors import ApiError

bp = Blueprint("outputs", __name__)


class OutputQuery(BaseModel):
    model_config = ConfigDict(extra="ignore")

    expires: str | None = Field(default=None, pattern=r"^[0-9]{1,20}$", description="Unix seconds")
    signature: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$", description="HMAC, hex")


@endpoint(
    bp,
    "/outputs/<path:key>",
    authenticated=False,
    query=OutputQuery,
    tags=("outputs",),
    produces="application/octet-stream",
    errors=(400, 403, 404),
    summary="A stored output of the file store, behind the expiring signature of its URL",
)
def output(key: str, query: OutputQuery) -> Response:
    store = storage.get()
    if not isinstance(store, FileStore):
        raise ApiError(404, "NOT_FOUND", "outputs are served by the object store's own URLs")
    if not store.check(key, query.expires, query.signature):
        raise ApiError(403, "FORBIDDEN", "the output link's signature is invalid or expired")
    path = store.path_of(key)
    if not path.is_file():
        raise ApiError(404, "NOT_FOUND", "no such output")
    response = send_file(
        path, mimetype=storage.content_type_of(key), conditional=True, max_age=3600
    )
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Content-Security-Policy"] = "default-src 'none'; sandbox"
    return response
