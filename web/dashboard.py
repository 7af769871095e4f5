"""The operators' dashboard at `/` (and `/dashboard`).

The page holds no data: its scripts (in `web/static/dashboard/`) read the
authenticated REST API with the key the operator enters, and follow `/ws`.
"""

from __future__ import annotations

from flask import Blueprint, Response, render_template, request

from web.endpoints import endpoint

bp = Blueprint("dashboard", __name__)


def _content_security_policy() -> str:
    """Everything from this origin only (but output images); the socket is the same host
    over ws/wss."""
    host = request.host
    return "; ".join(
        (
            "default-src 'self'",
            f"connect-src 'self' ws://{host} wss://{host}",
            # Output thumbnails: the file store's links are this origin, an object store's
            # (presigned or CDN) another; images run no script.
            "img-src 'self' data: https: http:",
            "object-src 'none'",
            "base-uri 'none'",
            "frame-ancestors 'none'",
        )
    )


@endpoint(
    bp,
    "/",
    aliases=("/dashboard",),
    authenticated=False,
    tags=("dashboard",),
    produces="text/html",
    summary="The operators' dashboard (HTML); its data comes from the authenticated API",
)
def dashboard() -> Response:
    response = Response(render_template("dashboard.html"), mimetype="text/html")
    response.headers["Content-Security-Policy"] = _content_security_policy()
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Cache-Control"] = "no-cache"
    return response
