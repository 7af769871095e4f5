"""The gunicorn worker the `web` process runs: gthread, with its own refusals in our format.

gunicorn answers some bad requests before the application sees them (a request
line over `limit_request_line` is 414, too many or too large headers 431, a
malformed request line or header 400) with a small HTML page. Clients of this
API expect its JSON error format everywhere, so those answers are rewritten:
gunicorn decides the status exactly as before, and the body becomes
`{"success": false, "error": {...}}`.
"""

from __future__ import annotations

import json
import re
import socket
from typing import Any

from gunicorn.workers.gthread import ThreadWorker

from web.errors import HTTP_ERROR_CODES

STATUS_LINE = re.compile(rb"^HTTP/1\.[01] (\d{3}) ([^\r\n]*)\r\n")
MESSAGES = {
    400: "the request is malformed",
    414: "the request line (method, path and query) is too long",
    431: "the request has too many headers, or one that is too large",
}


class _Captured:
    """Stands in for the client socket while gunicorn writes its error page."""

    def __init__(self) -> None:
        self.data = b""

    def gettimeout(self) -> float:
        return 0.0

    def setblocking(self, flag: bool) -> None:
        return None

    def sendall(self, data: bytes) -> None:
        self.data += data


def json_error(status: int, reason: str) -> bytes:
    """A complete HTTP response in the API's error format, closing the connection."""
    message = MESSAGES.get(status, reason.lower() or "the request was refused")
    body = json.dumps(
        {
            "success": False,
            "error": {
                "code": HTTP_ERROR_CODES.get(status, "HTTP_ERROR"),
                "message": message,
                "details": [],
            },
        },
        separators=(",", ":"),
    ).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\nConnection: close\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode("latin-1") + body


class ApiThreadWorker(ThreadWorker):
    def handle_error(self, req: Any, client: socket.socket, addr: Any, exc: Exception) -> None:
        captured = _Captured()
        super().handle_error(req, captured, addr, exc)
        match = STATUS_LINE.match(captured.data)
        if match is None:
            return
        answer = json_error(int(match.group(1)), match.group(2).decode("latin-1"))
        # Non-blocking, as gunicorn writes its own: a client that reads nothing
        # must not hold the thread.
        try:
            client.setblocking(False)
            client.sendall(answer)
        except OSError:
            self.log.debug("Failed to send error message.")
