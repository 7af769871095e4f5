"""The HTTP face of EMP Tasks: REST routes (thin), the live WebSocket, the dashboard,
the error format and the OpenAPI document. `create_app` is in web.app."""

from web.app import create_app

__all__ = ["create_app"]
