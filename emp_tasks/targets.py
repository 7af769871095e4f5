"""Which URLs a webhook may be sent to: the guard against server-side request forgery.

A target whose host resolves to a private, loopback or link-local address is
refused unless EMP_WEBHOOK_ALLOW_PRIVATE=true; cloud metadata addresses are
refused always. Checked when a URL is registered and again before each send
(a name may resolve elsewhere later).
"""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit

METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(address)
    for address in ("169.254.169.254", "169.254.170.2", "fd00:ec2::254", "100.100.100.200")
)


class TargetRefused(ValueError):
    """The URL may not receive webhooks; the message says why."""


def _addresses(host: str, port: int) -> set[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    try:
        infos = socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)
    except socket.gaierror as exc:
        raise TargetRefused(f"host {host!r} does not resolve") from exc
    return {ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos}


def check(url: str, allow_private: bool) -> None:
    """Raise TargetRefused unless `url` is an http(s) URL on an allowed address."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise TargetRefused("must be an http:// or https:// URL with a host")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    for address in _addresses(parts.hostname, port):
        if address in METADATA_ADDRESSES:
            raise TargetRefused(f"{address} is a cloud metadata address")
        internal = (
            address.is_private
            or address.is_loopback
            or address.is_link_local
            or address.is_reserved
            or address.is_multicast
            or address.is_unspecified
        )
        if internal and not allow_private:
            raise TargetRefused(
                f"{parts.hostname} resolves to the internal address {address}"
                " (set EMP_WEBHOOK_ALLOW_PRIVATE=true to allow)"
            )
