"""Which URLs webhooks may reach: the guard against server-side request forgery.

`vet(url)` parses a URL once, with the parser the sender uses (urllib3's
`parse_url`), refuses every form two parsers could read differently (backslashes,
userinfo, control characters or whitespace, percent-encoded or numeric-shorthand
hosts, trailing dots, zone ids), resolves the host and refuses it unless every
address is globally routable (or EMP_WEBHOOK_ALLOW_PRIVATE=true). Link-local and
cloud metadata addresses are refused always, and so are IPv6 forms that embed a
refused IPv4 address (IPv4-mapped, IPv4-compatible, 6to4, Teredo, NAT64).

`pinned_session(target)` is the only way the sender reaches a target: it connects
to the addresses `vet` checked, never resolving the name again (no DNS rebinding
between the check and the connection), while the Host header, TLS SNI and
certificate verification still use the URL's name. Refusal messages never name
the address a host resolved to.
"""

from __future__ import annotations

import http.cookiejar
import ipaddress
import re
import socket
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import requests
from requests.adapters import HTTPAdapter
from urllib3.exceptions import LocationParseError, NewConnectionError
from urllib3.util import parse_url

Address = ipaddress.IPv4Address | ipaddress.IPv6Address

MAX_URL_LENGTH = 2000
DEFAULT_PORTS = {"http": 80, "https": 443}

# Refused even with EMP_WEBHOOK_ALLOW_PRIVATE=true: instance credentials live here.
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(address)
    for address in (
        "169.254.169.254",  # AWS, GCP, Azure, DigitalOcean, Oracle, ...
        "169.254.170.2",  # AWS ECS task credentials
        "169.254.170.23",  # AWS EKS pod identity
        "100.100.100.200",  # Alibaba Cloud
        "192.0.0.192",  # Oracle Cloud
        "fd00:ec2::254",  # AWS IMDS over IPv6
        "fd00:ec2::23",  # AWS EKS pod identity over IPv6
    )
)
ALWAYS_REFUSED_NETWORKS = (
    ipaddress.ip_network("169.254.0.0/16"),  # link-local: metadata services live here
    ipaddress.ip_network("fe80::/10"),
)
SHARED_ADDRESS_SPACE = ipaddress.ip_network("100.64.0.0/10")  # carrier-grade NAT
LOCAL_NAT64 = ipaddress.ip_network("64:ff9b:1::/48")  # RFC 8215: a site's own translator
NAT64_NETWORKS = (ipaddress.ip_network("64:ff9b::/96"), LOCAL_NAT64)
TEREDO_NETWORK = ipaddress.ip_network("2001::/32")
IPV4_COMPATIBLE = ipaddress.ip_network("::/96")

_DOTTED_QUAD = re.compile(
    r"(?:(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\.){3}"
    r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
)
_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")
# A last label the WHATWG URL standard (and inet_aton) would read as a number: the
# whole name is then an IPv4 address in some shorthand (`0x7f.1`, `2130706433`).
_NUMERIC_LABEL = re.compile(r"[0-9]+|0x[0-9a-f]*")

PRIVATE_HINT = "set EMP_WEBHOOK_ALLOW_PRIVATE=true to allow private addresses"


class TargetRefused(ValueError):
    """The URL may not receive webhooks; the message says why (never the resolved address)."""


@dataclass(frozen=True)
class Target:
    """A URL that passed the guard, and the addresses it may be reached at."""

    url: str
    """The URL as urllib3 reads it: scheme, ASCII host, explicit port if one was given."""
    scheme: str
    host: str
    """ASCII host name or IP literal, without IPv6 brackets."""
    port: int
    request_target: str
    """Path and query, the part of the request line after the method."""
    addresses: tuple[str, ...] = ()

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == DEFAULT_PORTS[self.scheme] else f"{host}:{self.port}"


# --- parsing -------------------------------------------------------------------------------


def _ip_literal(host: str) -> Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _refuse_odd_characters(url: str) -> None:
    for char in url:
        if char == "\\":
            raise TargetRefused("must not contain a backslash")
        if char.isspace() or unicodedata.category(char) in ("Cc", "Cf", "Zs", "Zl", "Zp"):
            raise TargetRefused("must not contain whitespace or control characters")


def _check_host_name(host: str) -> None:
    """An ASCII DNS name: no empty, overlong or numeric-final labels."""
    if len(host) > 253:
        raise TargetRefused("host name is longer than 253 characters")
    if host.endswith("."):
        raise TargetRefused("host must not end with a dot")
    labels = host.split(".")
    if _NUMERIC_LABEL.fullmatch(labels[-1]):
        raise TargetRefused("a numeric host must be a dotted-decimal IPv4 address (a.b.c.d)")
    for label in labels:
        if not _LABEL.fullmatch(label):
            raise TargetRefused("host is not a valid DNS name")


def parse(url: str) -> Target:
    """Read `url` as the sender will, refusing anything ambiguous; no DNS lookup."""
    if not isinstance(url, str) or not url:
        raise TargetRefused("must be an http:// or https:// URL")
    if len(url) > MAX_URL_LENGTH:
        raise TargetRefused(f"must be at most {MAX_URL_LENGTH} characters")
    _refuse_odd_characters(url)
    scheme, separator, rest = url.partition("://")
    if not separator or scheme.lower() not in DEFAULT_PORTS:
        raise TargetRefused("must be an http:// or https:// URL")
    # The same authority urllib3 reads: everything up to the first / ? or #.
    authority = re.split(r"[/?#]", rest, maxsplit=1)[0]
    if "@" in authority:
        raise TargetRefused("must not contain userinfo (user:password@)")
    if "%" in authority:
        raise TargetRefused("host must not be percent-encoded or carry an IPv6 zone id")
    try:
        parts = parse_url(url)
    except (LocationParseError, UnicodeError, ValueError) as exc:
        raise TargetRefused("is not a valid URL: check the host and the port (1 to 65535)") from exc
    if parts.scheme not in DEFAULT_PORTS or parts.auth is not None or not parts.host:
        raise TargetRefused("must be an http:// or https:// URL with a host")
    if authority.endswith(":") or (
        parts.port is not None and not authority.endswith(f":{parts.port}")
    ):
        raise TargetRefused("port must be a number from 1 to 65535 without leading zeros")
    if parts.port == 0:
        raise TargetRefused("port must be a number from 1 to 65535")
    host = parts.host
    if host.startswith("["):
        host = host[1:-1]
        if not isinstance(_ip_literal(host), ipaddress.IPv6Address):
            raise TargetRefused("host is not a valid IPv6 address")
    elif not _DOTTED_QUAD.fullmatch(host):
        _check_host_name(host)
    request_target = parts.request_uri
    port = parts.port or DEFAULT_PORTS[parts.scheme]
    shown_host = parts.host if parts.port is None else f"{parts.host}:{parts.port}"
    return Target(
        url=f"{parts.scheme}://{shown_host}{request_target}",
        scheme=parts.scheme,
        host=host,
        port=port,
        request_target=request_target,
    )


# --- addresses -----------------------------------------------------------------------------


def _embedded_ipv4(address: ipaddress.IPv6Address) -> Iterator[ipaddress.IPv4Address]:
    """IPv4 addresses an IPv6 address carries, which translators may connect to."""
    if address.ipv4_mapped is not None:
        yield address.ipv4_mapped
    if address.sixtofour is not None:
        yield address.sixtofour
    if address in TEREDO_NETWORK:
        server, client = address.teredo or (None, None)
        yield from (ipv4 for ipv4 in (server, client) if ipv4 is not None)
    # NAT64 and the deprecated IPv4-compatible form keep the IPv4 address in the last
    # 32 bits (`::` and `::1` are not such forms, and are refused as non-global anyway).
    if any(address in network for network in NAT64_NETWORKS) or (
        address in IPV4_COMPATIBLE and int(address) > 1
    ):
        yield ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)


def _is_metadata(address: Address) -> bool:
    return address in METADATA_ADDRESSES or any(
        address.version == network.version and address in network
        for network in ALWAYS_REFUSED_NETWORKS
    )


def _is_internal(address: Address) -> bool:
    return (
        not address.is_global
        or address in SHARED_ADDRESS_SPACE
        or (address.version == 6 and address in LOCAL_NAT64)
    )


def refusal(address: Address, allow_private: bool) -> str | None:
    """Why webhooks may not go to `address`, or None if they may."""
    candidates: list[Address] = [address]
    if isinstance(address, ipaddress.IPv6Address):
        candidates += list(_embedded_ipv4(address))
    if any(_is_metadata(candidate) for candidate in candidates):
        return "host is a link-local or cloud metadata address"
    if not allow_private and any(_is_internal(candidate) for candidate in candidates):
        return f"host resolves to a private or non-public address ({PRIVATE_HINT})"
    return None


def resolve(host: str, port: int) -> list[str]:
    """The addresses `host` resolves to, in the resolver's order (tests replace this)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    return [info[4][0] for info in infos]


def _addresses(target: Target) -> list[Address]:
    literal = _ip_literal(target.host)
    if literal is not None:
        return [literal]
    try:
        found = resolve(target.host, target.port)
    except (OSError, UnicodeError) as exc:
        raise TargetRefused(f"host {target.host!r} does not resolve") from exc
    addresses: list[Address] = []
    for text in found:
        try:
            # A scoped answer (fe80::1%eth0) is link-local and refused below.
            addresses.append(ipaddress.ip_address(text.split("%")[0]))
        except ValueError as exc:
            raise TargetRefused(f"host {target.host!r} does not resolve") from exc
    if not addresses:
        raise TargetRefused(f"host {target.host!r} does not resolve")
    return list(dict.fromkeys(addresses))


def vet(url: str, allow_private: bool) -> Target:
    """The Target for `url` with the addresses it may be reached at, or TargetRefused.

    Every address the host resolves to must be allowed: a name that answers one
    public and one internal address is refused, as the connection could use either.
    """
    target = parse(url)
    addresses = _addresses(target)
    for address in addresses:
        reason = refusal(address, allow_private)
        if reason is not None:
            raise TargetRefused(reason)
    return Target(
        url=target.url,
        scheme=target.scheme,
        host=target.host,
        port=target.port,
        request_target=target.request_target,
        addresses=tuple(str(address) for address in addresses),
    )


# --- sending to the vetted address ---------------------------------------------------------


class PinnedAdapter(HTTPAdapter):
    """A requests transport that connects only to the addresses a Target was vetted at.

    The connection pool is keyed by the vetted IP, not the name, so nothing is
    resolved again; the Host header and, for https, the TLS server name and the
    certificate check use the URL's host. A request for another URL is refused.
    Not to be shared between threads: it holds the address being tried (the sender
    keeps one session per thread).
    """

    def __init__(self, target: Target, **kwargs: Any) -> None:
        if not target.addresses:
            raise ValueError("the target has not been vetted")
        self.target = target
        self._address = target.addresses[0]
        super().__init__(max_retries=0, **kwargs)

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:
        if not self._is_target(request.url or ""):
            raise requests.exceptions.InvalidURL("this session may only send to its vetted target")
        request.headers["Host"] = self.target.host_header
        failure: requests.ConnectionError | None = None
        # Like a resolver's answer list: move on only when no connection was made,
        # so a request is never sent twice.
        for address in self.target.addresses:
            self._address = address
            try:
                return super().send(request, **kwargs)
            except requests.ConnectionError as exc:
                if not _not_connected(exc):
                    raise
                failure = exc
        assert failure is not None
        raise failure

    def _is_target(self, url: str) -> bool:
        try:
            parts = parse_url(url)
        except LocationParseError:
            return False
        port = parts.port or DEFAULT_PORTS.get(parts.scheme or "")
        origin = (parts.scheme, (parts.host or "").strip("[]"), port)
        return origin == (self.target.scheme, self.target.host, self.target.port)

    def build_connection_pool_key_attributes(
        self, request: requests.PreparedRequest, verify: Any, cert: Any = None
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        _, pool_kwargs = super().build_connection_pool_key_attributes(request, verify, cert)
        host_params = {
            "scheme": self.target.scheme,
            "host": self._address,
            "port": self.target.port,
        }
        if self.target.scheme == "https":
            pool_kwargs["server_hostname"] = self.target.host
            pool_kwargs["assert_hostname"] = self.target.host
        return host_params, pool_kwargs

    def request_url(self, request: requests.PreparedRequest, proxies: Any) -> str:
        return self.target.request_target


def _not_connected(exc: requests.ConnectionError) -> bool:
    reason = exc.args[0] if exc.args else None
    return isinstance(getattr(reason, "reason", reason), NewConnectionError)


def pinned_session(target: Target) -> requests.Session:
    """A requests Session that sends only to `target`, at its vetted addresses.

    No proxy, .netrc or cookies from the environment: the connection must go
    where the guard said, and one receiver's cookies are no business of another.
    """
    session = requests.Session()
    session.trust_env = False
    session.cookies.set_policy(http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))
    adapter = PinnedAdapter(target)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session
