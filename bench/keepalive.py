"""A lean HTTP/1.1 client for the benchmark's load: one keep-alive connection per thread.

The throughput rows run their clients on the same cores as the system they
measure, so every millisecond the load generator spends is a millisecond the
API, the worker and PostgreSQL do not get. `requests` costs about three times
what the standard library's `http.client` does per call (its adapters, hooks,
cookie jar and header merging); this client is `http.client` with the few things
the benchmark needs: JSON bodies, a timeout, and one new connection when the
server closed the kept-alive one (it answers `Connection: close` to an error).
"""

from __future__ import annotations

import http.client
import json
from typing import Any
from urllib.parse import urlsplit

ERRORS = (OSError, http.client.HTTPException)
"""What a request raises when it gets no answer (refused, reset, timed out, malformed)."""


class Response:
    """What the benchmark reads of an answer."""

    def __init__(self, status_code: int, body: bytes) -> None:
        self.status_code = status_code
        self.content = body

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")

    def json(self) -> Any:
        return json.loads(self.content)


class KeepAlive:
    """Requests to one server over one kept-alive connection (one per thread: not shared)."""

    def __init__(self, base_url: str) -> None:
        parts = urlsplit(base_url)
        if parts.scheme != "http" or parts.hostname is None:
            raise ValueError(f"an http:// URL with a host is needed, not {base_url!r}")
        self.host = parts.hostname
        self.port = parts.port or 80
        self._connection: http.client.HTTPConnection | None = None

    def request(
        self,
        method: str,
        url: str,
        *,
        json_body: Any = None,
        headers: dict[str, str] | None = None,
        timeout: float,
    ) -> Response:
        """Send one request (`url` absolute, on this client's server) and read its answer.

        A kept-alive connection the server has closed since the last answer fails before
        anything of the request was read by it, so the request goes once more on a new one.
        """
        path = urlsplit(url)
        target = path.path + (f"?{path.query}" if path.query else "")
        sent = dict(headers or {})
        body = None
        if json_body is not None:
            body = json.dumps(json_body).encode()
            sent["Content-Type"] = "application/json"
        for fresh in (self._connection is None, True):
            connection = self._connect(timeout)
            try:
                connection.request(method, target, body=body, headers=sent)
                answer = connection.getresponse()
                content = answer.read()
            except (ConnectionError, http.client.RemoteDisconnected, http.client.BadStatusLine):
                self.close()
                if fresh:
                    raise
                continue
            except BaseException:
                self.close()
                raise
            if answer.will_close:
                self.close()
            return Response(answer.status, content)
        raise AssertionError("unreachable")

    def post(self, url: str, *, json: Any = None, **kw: Any) -> Response:
        return self.request("POST", url, json_body=json, **kw)

    def get(self, url: str, **kw: Any) -> Response:
        return self.request("GET", url, **kw)

    def delete(self, url: str, **kw: Any) -> Response:
        return self.request("DELETE", url, **kw)

    def _connect(self, timeout: float) -> http.client.HTTPConnection:
        if self._connection is None:
            self._connection = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        else:
            self._connection.timeout = timeout
            if self._connection.sock is not None:
                self._connection.sock.settimeout(timeout)
        return self._connection

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None
