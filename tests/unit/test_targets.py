"""Which URLs webhooks may reach (emp_tasks.core.targets): the rules alone, no services.

The URL strategies here are also used by tests/test_ssrf.py, which sends the same
classes of URL through the API.
"""

from __future__ import annotations

import ipaddress
import shutil
import socket
import ssl
import string
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from emp_tasks.core import targets

PUBLIC_IP = "93.184.215.14"
PUBLIC_LITERALS = ("8.8.8.8", "1.1.1.1", PUBLIC_IP, "9.9.9.9", "208.67.222.222")
INTERNAL_NETWORKS = tuple(
    ipaddress.ip_network(network)
    for network in (
        "127.0.0.0/8",
        "10.0.0.0/8",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "169.254.0.0/16",
        "100.64.0.0/10",
        "0.0.0.0/8",
    )
)
GENERATED = settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

# --- strategies: every class of URL two parsers could read differently ------------------

schemes = st.sampled_from(["http", "https", "HTTP", "HttpS"])
ports = st.one_of(st.just(""), st.integers(1, 65535).map(lambda port: f":{port}"))
paths = st.sampled_from(["", "/", "/hook", "/x/y?z=1", "/?a=b#frag"])
public_hosts = st.sampled_from(PUBLIC_LITERALS)
any_ipv4 = st.integers(0, 2**32 - 1).map(ipaddress.IPv4Address)
internal_ipv4 = st.sampled_from(INTERNAL_NETWORKS).flatmap(
    lambda network: st.integers(0, network.num_addresses - 1).map(lambda i: network[i])
)
metadata_ipv4 = st.sampled_from(
    [address for address in targets.METADATA_ADDRESSES if address.version == 4]
)
internal_hosts = st.one_of(
    internal_ipv4.map(str),
    st.sampled_from(["localhost", "metadata.google.internal", "[::1]", "[fd00:ec2::254]"]),
)


@st.composite
def backslash_urls(draw: st.DrawFn) -> str:
    """`http://127.0.0.1:18999\\@8.8.8.8/x` and every other place a backslash can go."""
    if draw(st.booleans()):
        separator = draw(st.sampled_from(["\\@", "\\\\@", "\\/@", "/\\@", "\\", "\\?@", "\\#@"]))
        return (
            f"{draw(schemes)}://{draw(internal_hosts)}{draw(ports)}{separator}"
            f"{draw(public_hosts)}{draw(paths)}"
        )
    url = f"{draw(schemes)}://{draw(public_hosts)}{draw(ports)}{draw(paths)}"
    at = draw(st.integers(len("http"), len(url)))
    return url[:at] + draw(st.sampled_from(["\\", "\\\\", "\\@"])) + url[at:]


@st.composite
def userinfo_urls(draw: st.DrawFn) -> str:
    userinfo = draw(
        st.one_of(
            internal_hosts.map(lambda host: f"{host}:80"),
            st.text(string.ascii_letters + string.digits + ":-._~!$&'()*+,;=", max_size=20),
            st.sampled_from(["user:pass", "%40", "a@b", ":"]),
        )
    )
    return f"{draw(schemes)}://{userinfo}@{draw(public_hosts)}{draw(ports)}{draw(paths)}"


@st.composite
def encoded_host_urls(draw: st.DrawFn) -> str:
    """Hosts in percent-encoding, fullwidth digits, Unicode dots or with invisible characters."""
    host = draw(st.one_of(internal_ipv4.map(str), public_hosts, st.just("localhost")))
    how = draw(st.sampled_from(["percent", "fullwidth", "dots", "invisible"]))
    if how == "percent":
        chosen = draw(st.sets(st.integers(0, len(host) - 1), min_size=1))
        hex_format = draw(st.sampled_from(["%{:02x}", "%{:02X}"]))
        host = "".join(
            hex_format.format(ord(char)) if index in chosen else char
            for index, char in enumerate(host)
        )
    elif how == "fullwidth":  # U+FF01..U+FF5E: what browsers' UTS 46 mapping folds to ASCII
        chosen = draw(st.sets(st.integers(0, len(host) - 1), min_size=1))
        host = "".join(
            chr(ord(char) + 0xFEE0) if index in chosen else char for index, char in enumerate(host)
        )
    elif how == "dots":
        dot = draw(st.sampled_from(["\u3002", "\uff0e", "\uff61"]))
        host = host.replace(".", dot) if "." in host else host + dot + "com"
    else:
        at = draw(st.integers(0, len(host)))
        invisible = draw(st.sampled_from(["\u00ad", "\u200b", "\u200d", "\u2060", "\ufeff"]))
        host = host[:at] + invisible + host[at:]
    return f"{draw(schemes)}://{host}{draw(ports)}{draw(paths)}"


def _radix(draw: st.DrawFn, value: int) -> str:
    style = draw(st.sampled_from(["dec", "hex", "HEX", "oct", "zeros"]))
    return {
        "dec": str(value),
        "hex": f"0x{value:x}",
        "HEX": f"0X{value:X}",
        "oct": f"0{value:o}",
        "zeros": f"00{value}",
    }[style]


@st.composite
def numeric_ipv4_hosts(draw: st.DrawFn) -> str:
    """IPv4 in the shorthands inet_aton and browsers accept: `0x7f.1`, `2130706433`, ..."""
    address = draw(any_ipv4)
    value = int(address)
    octets = address.packed
    shape = draw(st.sampled_from(["one", "two", "three", "four", "trailing-dot"]))
    if shape == "one":
        host = _radix(draw, value)
    elif shape == "two":
        host = f"{_radix(draw, octets[0])}.{_radix(draw, value & 0xFFFFFF)}"
    elif shape == "three":
        parts = (octets[0], octets[1], value & 0xFFFF)
        host = ".".join(_radix(draw, part) for part in parts)
    elif shape == "four":
        host = ".".join(_radix(draw, part) for part in octets)
    else:
        host = f"{address}."
    if host == str(address):  # the canonical form is not ambiguous; make it so
        host = f"0{host}"
    return host


numeric_ipv4_urls = st.builds(
    lambda scheme, host, port, path: f"{scheme}://{host}{port}{path}",
    schemes,
    numeric_ipv4_hosts(),
    ports,
    paths,
)


def _embeddings(draw: st.DrawFn, v4: ipaddress.IPv4Address) -> str:
    high, low = int(v4) >> 16, int(v4) & 0xFFFF
    inverted = int(v4) ^ 0xFFFFFFFF
    form = draw(
        st.sampled_from(
            [
                f"::ffff:{v4}",
                f"::ffff:{high:x}:{low:x}",
                f"0:0:0:0:0:FFFF:{high:04X}:{low:04X}",
                f"2002:{high:x}:{low:x}::",
                f"2002:{high:x}:{low:x}:1::1",
                f"64:ff9b::{v4}",
                f"64:ff9b::{high:x}:{low:x}",
                f"64:ff9b:1::{high:x}:{low:x}",
                f"2001:0:4136:e378:8000:63bf:{inverted >> 16:x}:{inverted & 0xFFFF:x}",
                f"2001:0:{high:x}:{low:x}::1",
                f"::{v4}",
            ]
        )
    )
    return f"[{form}]"


@st.composite
def embedded_ipv4_urls(draw: st.DrawFn, v4: st.SearchStrategy = internal_ipv4) -> str:
    """IPv6 forms (mapped, compatible, 6to4, Teredo, NAT64) that carry an internal IPv4."""
    host = _embeddings(draw, draw(v4))
    return f"{draw(schemes)}://{host}{draw(ports)}{draw(paths)}"


@st.composite
def control_character_urls(draw: st.DrawFn) -> str:
    url = f"{draw(schemes)}://{draw(public_hosts)}{draw(ports)}{draw(paths)}"
    at = draw(st.integers(len("http"), len(url)))
    char = draw(
        st.one_of(
            st.characters(categories=["Cc", "Zs", "Zl", "Zp", "Cf"]),
            st.sampled_from(["\t", "\n", "\r", "\x00", " ", "\x7f"]),
        )
    )
    return url[:at] + char + url[at:]


SYNTAX_CLASSES = {
    "backslash": backslash_urls(),
    "userinfo": userinfo_urls(),
    "encoded host": encoded_host_urls(),
    "numeric IPv4": numeric_ipv4_urls,
    "control characters": control_character_urls(),
}
"""Refused for their form alone, whatever the host resolves to and whatever the setting."""


# --- fixtures ------------------------------------------------------------------------------


@dataclass
class FakeDNS:
    """Names map to answers; every lookup is recorded."""

    answers: dict[str, list[str]] = field(default_factory=dict)
    calls: list[str] = field(default_factory=list)

    def resolve(self, host: str, port: int) -> list[str]:
        self.calls.append(host)
        if host not in self.answers:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return self.answers[host]


@pytest.fixture
def dns(monkeypatch) -> FakeDNS:
    fake = FakeDNS()
    monkeypatch.setattr(targets, "resolve", fake.resolve)
    return fake


def refused(url: str, allow_private: bool = False) -> str:
    with pytest.raises(targets.TargetRefused) as caught:
        targets.vet(url, allow_private)
    return str(caught.value)


# --- the parser-difference class ----------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:18999\\@8.8.8.8/x",
        "http://169.254.169.254\\@8.8.8.8/",
        "http://user:pass@8.8.8.8/",
        "http://@8.8.8.8/",
        "http://%31%32%37.0.0.1/",
        "http://0x7f.1/",
        "http://017700000001/",
        "http://2130706433/",
        "http://127.1/",
        "http://127.0.0.1./",
        "http://8.8.8.8./",
        "http://example.com./",
        "http://１２７.０.０.１/",
        "http://[fe80::1%25eth0]/",
        "http://exa\u00admple.com/",
        "http://8.8.8.8\t/",
        "http://8.8.8.8:080/",
        "http://8.8.8.8:/",
        "http://8.8.8.8:0/",
    ],
)
def test_ambiguous_url_is_refused_before_any_lookup(dns, url):
    refused(url, allow_private=True)
    assert dns.calls == []


@pytest.mark.parametrize("name", sorted(SYNTAX_CLASSES))
def test_each_ambiguous_class_is_refused_for_its_form_alone(dns, name):
    offered: set[str] = set()

    @settings(GENERATED, max_examples=150)
    @given(url=SYNTAX_CLASSES[name], allow_private=st.booleans())
    def check(url: str, allow_private: bool) -> None:
        offered.add(url)
        refused(url, allow_private)

    check()
    assert len(offered) >= 100
    assert dns.calls == []


@pytest.mark.parametrize(
    "url",
    [
        "http://[::1/",
        "http://]",
        "http://[::1]x/",
        "http://example.com:99999/",
        "http://example.com:-1/",
        "http://example.com:65536/",
        "http://xn--.com/",
        "http://a..b/",
        "http://" + "a" * 64 + ".com/",
        "http://ex\u00e4mple\u3002com/",
        "http:///x",
        "http:example.com",
        "ftp://example.com/",
        "",
    ],
)
def test_broken_url_is_refused_not_crashed(dns, url):
    refused(url, allow_private=True)


@GENERATED
@given(tail=st.text(max_size=60))
def test_any_text_is_a_target_or_a_refusal(dns, tail):
    dns.answers.update({name: [PUBLIC_IP] for name in ("example.com", "hooks.example.test")})
    for url in (
        f"http://{tail}",
        f"https://example.com{tail}",
        f"http://hooks.example.test:{tail}",
    ):
        try:
            target = targets.vet(url, allow_private=False)
        except targets.TargetRefused:
            continue
        assert target.addresses and target.scheme in ("http", "https")
        assert "\\" not in target.url and "@" not in target.url.split("/")[2]


# --- addresses -----------------------------------------------------------------------------


@GENERATED
@given(url=embedded_ipv4_urls())
def test_ipv6_forms_embedding_an_internal_ipv4_are_refused(dns, url):
    assert "address" in refused(url)
    assert dns.calls == []


@GENERATED
@given(url=embedded_ipv4_urls(metadata_ipv4), allow_private=st.booleans())
def test_metadata_addresses_are_refused_even_embedded_and_allowed(url, allow_private):
    assert "metadata" in refused(url, allow_private)


@pytest.mark.parametrize(
    "url",
    [
        "http://100.64.0.1/",
        "http://100.127.255.254/",
        "http://[2002:7f00:1::]/",
        "http://[::ffff:127.0.0.1]/",
        "http://[64:ff9b::7f00:1]/",
        "http://[64:ff9b:1::808:808]/",
        "http://[2001:0:4136:e378:8000:63bf:3fff:fdd2]/",
        "http://192.0.2.1/",
        "http://198.18.0.1/",
        "http://240.0.0.1/",
        "http://255.255.255.255/",
        "http://[fc00::1]/",
        "http://[::]/",
    ],
)
def test_not_globally_routable_addresses_are_refused_unless_allowed(url):
    assert "EMP_WEBHOOK_ALLOW_PRIVATE" in refused(url)
    assert targets.vet(url, allow_private=True).addresses


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest",
        "http://169.254.170.2/",
        "http://169.254.1.1/",
        "http://100.100.100.200/",
        "http://[fd00:ec2::254]/",
        "http://[fe80::1]/",
        "http://[::ffff:169.254.169.254]/",
        "http://[64:ff9b::a9fe:a9fe]/",
    ],
)
def test_link_local_and_metadata_addresses_are_refused_always(url):
    assert "metadata" in refused(url, allow_private=True)


def test_a_name_with_any_internal_answer_is_refused(dns):
    dns.answers["mixed.example.test"] = [PUBLIC_IP, "10.0.0.7"]
    refused("https://mixed.example.test/hook")


def test_refusal_never_names_the_resolved_address(dns):
    dns.answers["internal.example.test"] = ["10.11.12.13"]
    dns.answers["meta.example.test"] = ["169.254.169.254"]
    dns.answers["v6.example.test"] = ["fd12:3456:789a::1"]
    for name in ("internal", "meta", "v6"):
        message = refused(f"http://{name}.example.test/x")
        for secret in ("10.11.12.13", "169.254.169.254", "fd12:3456:789a::1"):
            assert secret not in message


def test_unresolvable_name_is_refused(dns):
    assert "does not resolve" in refused("http://nowhere.example.test/")


def test_public_name_is_vetted_with_its_addresses(dns):
    dns.answers["hooks.example.test"] = [PUBLIC_IP, "2606:2800:21f:cb07:6820:80da:af6b:8b2c"]
    target = targets.vet("HTTPS://Hooks.Example.Test:8443/a/../hook?x=1#f", allow_private=False)
    assert target == targets.Target(
        url="https://hooks.example.test:8443/hook?x=1",
        scheme="https",
        host="hooks.example.test",
        port=8443,
        request_target="/hook?x=1",
        addresses=(PUBLIC_IP, "2606:2800:21f:cb07:6820:80da:af6b:8b2c"),
    )
    assert target.host_header == "hooks.example.test:8443"


def test_internationalised_name_is_vetted_in_its_ascii_form(dns):
    dns.answers["xn--bcher-kva.example"] = [PUBLIC_IP]
    assert targets.vet("http://bücher.example/", False).host == "xn--bcher-kva.example"


def test_private_address_is_allowed_when_configured(dns):
    dns.answers["hooks.example.test"] = ["127.0.0.1"]
    assert targets.vet("http://hooks.example.test:9/", True).addresses == ("127.0.0.1",)


def test_each_vet_resolves_again(dns):
    dns.answers["rebind.example.test"] = [PUBLIC_IP]
    targets.vet("http://rebind.example.test/", False)
    dns.answers["rebind.example.test"] = ["127.0.0.1"]
    refused("http://rebind.example.test/")
    assert dns.calls == ["rebind.example.test", "rebind.example.test"]


# --- the pinned connection -----------------------------------------------------------------


class _Recorder(BaseHTTPRequestHandler):
    seen: list[dict[str, str]]

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.seen.append({"path": self.path, **{k.lower(): v for k, v in self.headers.items()}})
        self.send_response(204)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def local_server() -> Iterator[Callable[..., tuple[int, list[dict[str, str]]]]]:
    servers: list[ThreadingHTTPServer] = []

    def start(context: ssl.SSLContext | None = None) -> tuple[int, list[dict[str, str]]]:
        seen: list[dict[str, str]] = []
        handler = type("Handler", (_Recorder,), {"seen": seen})
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        if context is not None:
            server.socket = context.wrap_socket(server.socket, server_side=True)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server.server_address[1], seen

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_pinned_session_connects_to_the_vetted_address_with_the_original_host(
    dns, local_server, monkeypatch
):
    port, seen = local_server()
    dns.answers["hooks.example.test"] = ["127.0.0.1"]
    target = targets.vet(f"http://hooks.example.test:{port}/hook?x=1", allow_private=True)

    real_getaddrinfo = socket.getaddrinfo

    def numeric_only(host, *args, **kwargs):
        ipaddress.ip_address(host)  # a literal is fine; a name would be a second lookup
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", numeric_only)
    response = targets.pinned_session(target).post(target.url, data=b"{}", timeout=5)
    assert response.status_code == 204
    assert seen[0]["host"] == f"hooks.example.test:{port}"
    assert seen[0]["path"] == "/hook?x=1"


def test_pinned_session_moves_to_the_next_address_only_when_none_answered(dns, local_server):
    port, seen = local_server()
    with socket.socket() as closed:
        closed.bind(("127.0.0.2", port))  # the port is held but nobody listens there
        target = targets.Target(
            url=f"http://hooks.example.test:{port}/",
            scheme="http",
            host="hooks.example.test",
            port=port,
            request_target="/",
            addresses=("127.0.0.2", "127.0.0.1"),
        )
        response = targets.pinned_session(target).post(target.url, data=b"{}", timeout=5)
    assert response.status_code == 204 and len(seen) == 1


def test_pinned_session_refuses_any_other_url(dns):
    dns.answers["hooks.example.test"] = [PUBLIC_IP]
    target = targets.vet("http://hooks.example.test/", allow_private=False)
    with pytest.raises(requests.exceptions.InvalidURL):
        targets.pinned_session(target).post("http://127.0.0.1:9/", data=b"{}", timeout=1)


@pytest.fixture(scope="module")
def certificate(tmp_path_factory) -> Path:
    """A self-signed certificate for hooks.example.test (key and certificate in one file)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    path = tmp_path_factory.mktemp("tls") / "hooks.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-subj", "/CN=hooks.example.test",
            "-addext", "subjectAltName=DNS:hooks.example.test",
            "-keyout", str(path), "-out", str(path),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return path


def _tls_server(local_server, certificate: Path) -> tuple[int, list[dict[str, str]]]:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certificate)
    return local_server(context)


def test_pinned_https_checks_the_certificate_against_the_url_name(dns, local_server, certificate):
    port, seen = _tls_server(local_server, certificate)
    dns.answers["hooks.example.test"] = ["127.0.0.1"]
    target = targets.vet(f"https://hooks.example.test:{port}/hook", allow_private=True)
    session = targets.pinned_session(target)
    session.verify = str(certificate)
    assert session.post(target.url, data=b"{}", timeout=5).status_code == 204
    assert seen[0]["host"] == f"hooks.example.test:{port}"


def test_pinned_https_refuses_a_certificate_for_another_name(dns, local_server, certificate):
    port, seen = _tls_server(local_server, certificate)
    dns.answers["other.example.test"] = ["127.0.0.1"]
    target = targets.vet(f"https://other.example.test:{port}/hook", allow_private=True)
    session = targets.pinned_session(target)
    session.verify = str(certificate)
    with pytest.raises(requests.exceptions.SSLError):
        session.post(target.url, data=b"{}", timeout=5)
    assert seen == []
