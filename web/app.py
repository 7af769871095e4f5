"""The Flask application factory: every blueprint, the request hooks, the error handlers."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING

from flask import Flask, Response, g, request

from emp_tasks.core.config import Settings, get_settings, scoped
from emp_tasks.core.ids import new_id
from web import (
    dashboard,
    emprops,
    errors,
    fleet,
    health,
    inbound,
    jobs,
    metrics,
    outputs,
    series,
    step_logs,
    steps,
    streams,
    webhooks,
    workflows,
    ws,
)

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

CORRELATION_HEADER = "X-Correlation-ID"
CORRELATION_PATTERN = re.compile(r"^[A-Za-z0-9._:\-]{1,200}$")

logger = logging.getLogger(__name__)


def _with_settings(wsgi_app: WSGIApplication, settings: Settings) -> WSGIApplication:
    def serve(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        with scoped(settings):
            return wsgi_app(environ, start_response)

    return serve


def create_app(settings: Settings | None = None) -> Flask:
    """Application factory.

    Without `settings`, the app follows the process's settings (emp_tasks.core.config),
    read on each use. With them, the app is built from them and every request it
    serves sees them through `get_settings()`, domain code included.
    """
    if settings is not None:
        with scoped(settings):
            app = create_app()
        app.wsgi_app = _with_settings(app.wsgi_app, settings)  # type: ignore[method-assign]
        return app
    settings = get_settings()
    app = Flask(__name__)
    # One byte over the limit may be read: a chunked body is cut at MAX_CONTENT_LENGTH
    # without an error, so the body route needs to see that there was more (413).
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes + 1
    app.json.sort_keys = False  # type: ignore[attr-defined]

    @app.before_request
    def _correlation() -> None:
        incoming = request.headers.get(CORRELATION_HEADER, "")
        g.correlation_id = incoming if CORRELATION_PATTERN.match(incoming) else new_id()

    @app.before_request
    def _refuse_unstorable_text() -> None:
        try:
            inbound.check_url_text(request.path, request.args.to_dict(flat=False))
        except inbound.InboundRefused as exc:
            raise errors.invalid(exc.field, exc.message, exc.kind) from exc

    @app.after_request
    def _echo_correlation(response: Response) -> Response:
        response.headers[CORRELATION_HEADER] = getattr(g, "correlation_id", "")
        return response

    for blueprint in (
        health.bp,
        steps.bp,
        jobs.bp,
        workflows.bp,
        webhooks.bp,
        fleet.bp,
        ws.bp,
        metrics.bp,
        dashboard.bp,
        outputs.bp,
        emprops.bp,
        series.bp,
        streams.bp,
        step_logs.bp,
    ):
        app.register_blueprint(blueprint)
    ws.configure(app)
    errors.register(app)
    return app
