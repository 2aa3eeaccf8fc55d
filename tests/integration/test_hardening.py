"""Attacks a hostile or careless client makes, sent byte for byte over TLS to a running gateway whose
upstreams record exactly what they receive (tests/integration/recorder.py).

The gateway has four routes, each to its own recorder: `/` and `/owa/` and `/ecp/` (Negotiate) and
`/basic/` (`backend_auth = "basic"`: the client's Basic header itself). Whatever a client sends, a
recorder only ever sees paths under its own route's prefix, and only `/basic/` ever sees a password.
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import os
import socket
import ssl
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from proxy.identity.upn import UPN_OID
from proxy.lab.layout import USERS, LabLayout
from tests.integration.conftest import Gateway, client_context, free_port, gateway_on_server, lab_config
from tests.integration.jsonlog import eventually
from tests.integration.recorder import Recorded, Recorder, dechunk, raw_request, read_head, read_until_closed

BASIC = base64.b64encode(f"alice:{USERS['alice']}".encode()).decode()


@dataclass
class Scene:
    gw: Gateway
    recorders: dict[str, Recorder]  # by route prefix

    def send(self, request: bytes, user: str | None = "alice") -> int:
        return raw_request(self._lab, self.gw.port, request, user).status

    def taken(self) -> dict[str, list[Recorded]]:
        return {prefix: rec.taken() for prefix, rec in self.recorders.items()}

    def forwarded(self, request: bytes) -> Recorded:
        """`request` sent as alice and served 200: the one request the `/owa/` backend got for it."""
        self.taken()
        assert self.send(request) == 200
        (got,) = self.taken()["/owa/"]
        return got

    _lab: LabLayout
    admin: str

    def requests_counted(self, status: int) -> float:
        """`kcd_requests_total` for `status`, summed over routes, from the admin listener's /metrics."""
        with urllib.request.urlopen(self.admin + "/metrics", timeout=30) as r:  # noqa: S310  loopback
            text = r.read().decode()
        lines = [line for line in text.splitlines() if line.startswith("kcd_requests_total{")]
        return sum(float(line.rpartition(" ")[2]) for line in lines if f'status="{status}"' in line)


@pytest.fixture(scope="module")
def scene(lab: LabLayout, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scene]:
    yield from hardening_scene(lab, tmp_path_factory, "own")


def hardening_scene(lab: LabLayout, tmp_path_factory: pytest.TempPathFactory, http_server: str) -> Iterator[Scene]:
    """The gateway with `listener.http_server = http_server`, a recorder behind each route, and its admin
    listener (test_hardening_aiohttp runs these tests against aiohttp's server)."""
    recorders = {prefix: Recorder() for prefix in ("/", "/owa/", "/ecp/", "/basic/")}
    base = lab_config(lab, port=free_port()).split("[[routes]]", 1)[0]
    routes = "".join(
        f'[[routes]]\nprefix = "{prefix}"\nupstream = "{rec.url}"\nspn = "HTTP/cas.lab.test"\n'
        + ('backend_auth = "basic"\n' if prefix == "/basic/" else "")
        for prefix, rec in recorders.items()
    )
    auth = '[authentication]\nmode = "certificate-or-basic"\nbasic_failures_per_address = 1000\n'
    admin = free_port()
    admin_table = f'[admin]\nbind = "127.0.0.1:{admin}"\n'
    directory = tmp_path_factory.mktemp(f"hardening-{http_server}")
    try:
        with gateway_on_server(lab, directory, http_server, base + routes + auth + admin_table) as gw:
            yield Scene(gw, recorders, lab, f"http://127.0.0.1:{admin}")
    finally:
        for rec in recorders.values():
            rec.close()


def _get(target: str, *extra: str) -> bytes:
    lines = [f"GET {target} HTTP/1.1", "Host: 127.0.0.1", *extra, "Connection: close", "", ""]
    return "\r\n".join(lines).encode("latin-1")


def _under_its_route(taken: dict[str, list[Recorded]]) -> None:
    """Each recorder got only paths under its own prefix (as IIS compares them: without regard to case), and
    only the Basic route got the client's Basic header."""
    for prefix, requests in taken.items():
        for rec in requests:
            other = [p for p in taken if len(p) > len(prefix) and rec.path.lower().startswith(p)]
            assert rec.path.lower().startswith(prefix), (prefix, rec.request_line)
            assert not other, (prefix, rec.request_line)
            authorization = rec.headers("Authorization")
            assert len(authorization) == 1
            assert authorization[0].startswith("Basic " if prefix == "/basic/" else "Negotiate "), (prefix, rec.path)


@pytest.mark.parametrize(
    ("target", "route", "backend_path"),
    [
        ("/owa/../ecp/x", "/ecp/", "/ecp/x"),
        ("/owa/%2e%2e/ecp/x", "/ecp/", "/ecp/x"),
        ("/owa/.%2E/ecp/x?a=%2F", "/ecp/", "/ecp/x?a=%2F"),
        ("//ecp/x", "/ecp/", "/ecp/x"),
        ("/owa\\..\\ecp\\x", "/ecp/", "/ecp/x"),
        ("/OWA/x", "/owa/", "/OWA/x"),
        ("/ECP/x", "/ecp/", "/ECP/x"),
        ("/owa/./x", "/owa/", "/owa/x"),
        ("/owa/a%20b", "/owa/", "/owa/a%20b"),
        ("/x/../owa/y", "/owa/", "/owa/y"),
    ],
)
def test_the_route_is_chosen_on_the_path_the_backend_acts_on(
    scene: Scene, target: str, route: str, backend_path: str
) -> None:
    """Dot-segments (plain or encoded), repeated slashes, backslashes and case are read as IIS reads them
    before routing: the request reaches the route of the path the backend acts on, with exactly that path."""
    scene.taken()
    assert scene.send(_get(target)) == 200
    taken = scene.taken()
    assert [r.path for r in taken[route]] == [backend_path]
    assert sum(len(v) for v in taken.values()) == 1
    _under_its_route(taken)


@pytest.mark.parametrize(
    ("target", "why"),
    [
        ("/owa/%2f../ecp/x", "encoded slash"),
        ("/owa/..%2Fecp/x", "encoded slash"),
        ("/owa/..%5Cecp/x", "encoded backslash"),
        ("/owa/%252e%252e/ecp/x", "encoded twice"),
        ("/owa/%00/x", "control character"),
        ("/../ecp/x", "climbs above the root"),
        ("/owa/%2e%2e/%2e%2e/ecp/x", "climbs above the root"),
        ("/owa/%u002e%u002e/ecp/x", "does not start a %XX escape"),
        ("/owa/%%2e%2e/ecp/x", "does not start a %XX escape"),
        ("/owa/%c0%ae%c0%ae/ecp/x", "not UTF-8"),
        ("/ew%C5%BF/x", "U+017F"),
    ],
)
def test_ambiguous_paths_are_refused_before_any_stage(scene: Scene, target: str, why: str) -> None:
    """Encoded separators, double encoding, NUL, climbing above the root: 400, the reason in the log, nothing
    forwarded, no stage run (no certificate is even looked at)."""
    scene.taken()
    scene.gw.mark()  # two cases share a reason: this request's line, not the one before
    assert scene.send(_get(target)) == 400
    assert not any(scene.taken().values())
    line = scene.gw.wait_for("request", lambda e: why in str(e.get("reason", "")), what=why)
    assert line["status"] == 400
    assert line["refused_stage"] == "request"
    assert set(line["ms"]) == {"total"}  # no stage ran


def test_a_password_never_follows_a_path_onto_a_negotiate_route(scene: Scene) -> None:
    """`/basic/../owa/x` with Basic credentials is an `/owa/` request: the backend gets a Negotiate ticket
    there, and the password goes to `/basic/` paths only."""
    scene.taken()
    for target in ("/basic/../owa/x", "/basic/%2e%2e/ecp/x", "/BASIC/x", "/basic//x", "/owa/../basic/y"):
        assert scene.send(_get(target, f"Authorization: Basic {BASIC}"), user=None) == 200, target
    taken = scene.taken()
    _under_its_route(taken)
    assert [r.path for r in taken["/owa/"]] == ["/owa/x"]
    assert [r.path for r in taken["/ecp/"]] == ["/ecp/x"]
    assert sorted(r.path for r in taken["/basic/"]) == ["/BASIC/x", "/basic/x", "/basic/y"]


@pytest.mark.parametrize(
    "password", [b"", b"\x00", USERS["alice"].encode() + b"\x00", USERS["alice"].encode() + b"\x00anything"]
)
def test_a_password_the_kdc_cannot_read_is_a_failed_sign_in(scene: Scene, password: bytes) -> None:
    """An empty password, or one with a NUL (Kerberos reads a password up to its first NUL: alice's password
    followed by NUL and anything was accepted as hers), is refused as a sign-in (401 with the challenge), never
    tried at the KDC, never served, and not told to the operator as a Kerberos misconfiguration (it was a 502)."""
    scene.taken()
    since = scene.gw.mark()
    header = "Authorization: Basic " + base64.b64encode(b"alice:" + password).decode()
    answer = raw_request(scene._lab, scene.gw.port, _get("/owa/x", header), None)
    assert answer.status == 401, answer.status_line
    assert "www-authenticate: basic" in answer.head.lower()
    assert not any(scene.taken().values())
    line = scene.gw.wait_for("request", lambda e: e.get("status") == 401, what="the 401's summary")
    assert line["refused_stage"] == "authentication"
    assert not scene.gw.events("kerberos_misconfigured", after=since)


# -- 2. request bodies keep their meaning ---------------------------------------------------------------


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_a_gzip_body_reaches_the_backend_byte_for_byte(scene: Scene, framing: str) -> None:
    """A `Content-Encoding: gzip` body is neither inflated by the gateway's server nor by its client: the
    backend gets the client's bytes, its length and its coding."""
    payload = gzip.compress(os.urandom(1000) + b"A" * 200_000)  # inflates to 201 kB
    head = ["POST /owa/upload HTTP/1.1", "Host: 127.0.0.1", "Content-Encoding: gzip", "Content-Type: text/plain"]
    if framing == "chunked":
        body = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in (payload[:777], payload[777:])) + b"0\r\n\r\n"
        head.append("Transfer-Encoding: chunked")
    else:
        body = payload
        head.append(f"Content-Length: {len(payload)}")
    request = ("\r\n".join([*head, "Connection: close", "", ""])).encode() + body
    got = scene.forwarded(request)
    received = dechunk(got.body) if got.headers("Transfer-Encoding") else got.body
    assert received == payload
    assert got.headers("Content-Encoding") == ["gzip"]
    if got.headers("Content-Length"):
        assert got.headers("Content-Length") == [str(len(payload))]


@pytest.mark.parametrize("length", ["010", "0000000010", "00"])
def test_a_content_length_with_leading_zeros_reaches_the_backend_as_its_number(scene: Scene, length: str) -> None:
    """`Content-Length: 010` is 10 to llhttp, and it went on as sent: a backend that reads a leading zero as octal
    (C's `strtol` with base 0) takes 8 bytes as the body and the rest as the start of its next request on the user's
    pooled connection. The backend gets the length as a plain number and the body whole, nothing else."""
    body = b"0123456789"[: int(length)]
    head = f"POST /owa/len HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {length}\r\nConnection: close\r\n\r\n"
    got = scene.forwarded(head.encode() + body)
    assert got.headers("Content-Length") == [str(int(length))]
    assert got.body == body


# -- 6. the smaller ones --------------------------------------------------------------------------------


def test_identity_and_client_address_headers_never_reach_the_backend(scene: Scene) -> None:
    """Headers that backends read as the user or the client's address are the gateway's to set, never the client's."""
    sent = [
        "True-Client-IP: 203.0.113.9",
        "X-Originating-IP: 203.0.113.9",
        "Client-IP: 203.0.113.9",
        "X-Cluster-Client-IP: 203.0.113.9",
        "CF-Connecting-IP: 203.0.113.9",
        "X-ProxyUser-Ip: 203.0.113.9",
        "X-CommonAccessToken: mallory",
        "X-MS-Exchange-Organization-AuthAs: mallory",
        "x-ms-exchange-organization-anything: mallory",
        "X-Rewrite-URL: /ecp/",
        "X-HTTP-Method-Override: DELETE",
        "X-Original-URL: /ecp/",
        "MS-ASProtocolVersion: 16.1",
    ]
    got = scene.forwarded(_get("/owa/h", *sent))
    head = got.head.decode("latin-1")
    assert "203.0.113.9" not in head
    assert "mallory" not in head
    assert "/ecp/" not in head
    assert "DELETE" not in head
    assert got.headers("MS-ASProtocolVersion") == ["16.1"]


def test_user_headers_of_any_spelling_never_reach_the_backend(scene: Scene) -> None:
    """Names that say who the user is in spellings no list can foresee (`X-Webauth-User`, `X-Proxy-User`, an SSO
    product's `...-Authenticated-User-Email`, `X-Amzn-Oidc-Identity`, `Proxy-User`), and the signed statements of who
    the user is that front ends hand their backends (Azure App Service's `X-MS-TOKEN-AAD-*`, AWS ALB's
    `X-Amzn-Oidc-Data`, IAP's and Cloudflare Access's `...-Jwt-Assertion`, an API gateway's `X-JWT-Assertion`: they
    passed) are the gateway's to set, never the device's: none reaches the backend; ordinary headers and Exchange's
    mailbox headers still do."""
    sent = [
        "X-Webauth-User: mallory",
        "X-Proxy-User: mallory",
        "Proxy-User: mallory",
        "X-Iis-Username: mallory",
        "X-Goog-Authenticated-User-Email: mallory",
        "Cf-Access-Authenticated-User-Email: mallory",
        "X-Amzn-Oidc-Identity: mallory",
        "X-Ms-Proxy-Principal: mallory",
        "X-Login: mallory",
        "X-User-Id: mallory",
        "X-User-Sid: mallory",
        "X-User-Groups: mallory",
        "X-Webauth-Groups: mallory",
        "X-Roles: mallory",
        "X-Userinfo: mallory",
        "X-Consumer-Id: mallory",
        "X-Id-Token: mallory",
        "X-Access-Token: mallory",
        "X-MS-TOKEN-AAD-ID-TOKEN: mallory",
        "X-MS-TOKEN-AAD-ACCESS-TOKEN: mallory",
        "X-Amzn-Oidc-Data: mallory",
        "X-Amzn-Oidc-Accesstoken: mallory",
        "X-Goog-Iap-Jwt-Assertion: mallory",
        "Cf-Access-Jwt-Assertion: mallory",
        "X-JWT-Assertion: mallory",
        "X-CSRF-Token: csrf-kept",
        "X-Request-Id: id-kept",
        "X-Anchormailbox: alice@lab.test",
        "X-User-Identity: alice@lab.test",
        "X-OWA-ExplicitLogonUser: shared@lab.test",
        "User-Agent: Outlook-iOS/2.0",
    ]
    got = scene.forwarded(_get("/owa/h", *sent))
    assert "mallory" not in got.head.decode("latin-1")
    assert got.headers("X-AnchorMailbox") == ["alice@lab.test"]
    assert got.headers("X-User-Identity") == ["alice@lab.test"]
    assert got.headers("X-OWA-ExplicitLogonUser") == ["shared@lab.test"]
    assert got.headers("User-Agent") == ["Outlook-iOS/2.0"]
    assert got.headers("X-CSRF-Token") == ["csrf-kept"]
    assert got.headers("X-Request-Id") == ["id-kept"]


def test_header_names_a_backend_could_fold_into_an_identity_header_never_reach_it(scene: Scene) -> None:
    """Names with a token character other than a letter, a digit or `-` (`X.Forwarded.For`, `Remote.User`,
    `X~Remote~User`): a CGI-style layer or a framework that maps such characters to `_` or `-` (PHP's `.` to `_`,
    IIS's server variables, WSGI's `HTTP_*`) reads them as the identity headers the gateway drops. None reaches the
    backend, whatever it names (nginx's `ignore_invalid_headers`); ordinary names still do."""
    sent = [
        "X.Forwarded.For: 203.0.113.9",
        "X.Remote.User: mallory",
        "Remote.User: mallory",
        "X~Remote~User: mallory",
        "X-Remote!User: mallory",
        "X+Auth+User: mallory",
        "X.Kcd.Upn: mallory",
        "X.Innocent: dotted",
        "X-Request-Id: id-kept",
    ]
    got = scene.forwarded(_get("/owa/h", *sent))
    head = got.head.decode("latin-1")
    assert "mallory" not in head
    assert "203.0.113.9" not in head
    assert "dotted" not in head
    assert got.headers("X-Request-Id") == ["id-kept"]


@pytest.mark.parametrize("method", ["GET", "HEAD"])
@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_a_body_on_get_or_head_is_refused_never_forwarded(scene: Scene, method: str, framing: str) -> None:
    """A GET or HEAD with a body (RFC 9110 9.3.1: no defined semantics) is 400 before any stage: a backend that
    ignores a body on GET would read it as the user's next request on the pooled connection (here a request for
    `/ecp/` smuggled under an `/owa/` route). Nothing reaches any backend; the refusal names the fix."""
    smuggled = b"GET /ecp/smuggled HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    if framing == "chunked":
        framed, body = "Transfer-Encoding: chunked", b"%x\r\n%b\r\n0\r\n\r\n" % (len(smuggled), smuggled)
    else:
        framed, body = f"Content-Length: {len(smuggled)}", smuggled
    scene.taken()
    scene.gw.mark()
    head = f"{method} /owa/get-body HTTP/1.1\r\nHost: 127.0.0.1\r\n{framed}\r\nConnection: close\r\n\r\n"
    answer = raw_request(scene._lab, scene.gw.port, head.encode() + body)
    assert answer.status == 400, answer
    assert not any(scene.taken().values())
    refused = scene.gw.wait_for("request_refused", lambda e: method in e.get("reason", ""), what=method)
    assert "body" in refused["reason"]


@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_a_get_or_head_with_content_length_0_is_served(scene: Scene, method: str) -> None:
    """`Content-Length: 0` on GET or HEAD says there is no body (some clients send it): served as any GET."""
    head = f"{method} /owa/empty HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    got = scene.forwarded(head.encode())
    assert got.body == b""


@pytest.mark.parametrize(
    "tail",
    [b"zz\r\n", b"5;ext=" + b"e" * (128 * 1024 + 1) + b"\r\nhello\r\n0\r\n\r\n", b"0\r\nX-T: " + b"t" * (128 * 1024)],
    ids=["bad-size", "long-extension", "long-trailer"],
)
def test_a_chunked_body_refused_mid_body_is_a_400_and_no_unhandled_exception(scene: Scene, tail: bytes) -> None:
    """A chunked body whose framing is refused after the request was forwarded (the gateway sent `100 Continue`,
    then a chunk size that is not hexadecimal, or an extension or trailer over `listener.max_header_bytes`): both
    servers answer 400 with the `request_refused` event; none logs an unhandled exception or a traceback."""
    mark = scene.gw.mark()
    owa = scene.recorders["/owa/"]
    heads = owa.heads.count("/owa/late-bad-chunk")
    ctx = client_context(scene._lab, "alice")
    head = (
        b"POST /owa/late-bad-chunk HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n"
        b"Expect: 100-continue\r\nConnection: close\r\n\r\n"
    )
    with (
        socket.create_connection(("127.0.0.1", scene.gw.port), timeout=30) as tcp,
        ctx.wrap_socket(tcp, server_hostname="127.0.0.1") as tls,
    ):
        tls.sendall(head)
        interim = read_head(tls)  # every stage passed and the request is at the backend
        assert interim.startswith(b"HTTP/1.1 100 "), interim
        tls.sendall(b"5\r\nhello\r\n" + tail)
        data = read_until_closed(tls)
    assert data.startswith(b"HTTP/1.1 400 "), data
    scene.gw.wait_event("request_refused", stage="request")
    scene.gw.wait_event("request", path="/owa/late-bad-chunk", status=400)

    # the backend's end of it: its cut-off request is recorded when the gateway closes that connection, which can
    # come after the answer; taken here, it is no later test's (`Scene.forwarded` found two requests)
    def ended() -> bool:
        return owa.heads.count("/owa/late-bad-chunk") > heads and owa.open == 0

    eventually(ended, "the backend's connection ended")
    scene.taken()
    after = scene.gw.logs()[mark:]
    assert not [e for e in after if e.get("level") in ("error", "critical")], after
    assert not [e for e in after if "traceback" in e or "exception" in e], after


@pytest.mark.parametrize("tail", [b"zz\r\n", b"0\r\nX-T: " + b"t" * (128 * 1024)], ids=["bad-size", "long-trailer"])
@pytest.mark.parametrize(
    ("user", "target", "status"), [(None, "/owa/refused-unread", 401), ("alice", "/owa/a%2Fb", 400)]
)
def test_a_body_refused_unread_whose_framing_breaks_later_leaves_no_unhandled_exception(
    scene: Scene, tail: bytes, user: str | None, target: str, status: int
) -> None:
    """A request refused before its body is read (no certificate and no password: 401; an encoded slash: 400), whose
    chunked body then breaks its framing (a chunk size that is not hexadecimal, a trailer over
    `listener.max_header_bytes`): the device has its refusal, and neither server logs an error, an unhandled exception
    or a traceback (aiohttp's reads the rest of a body after its answer, its lingering close, and would log a failed
    read there as `Unhandled exception`)."""
    mark = scene.gw.mark()
    ctx = client_context(scene._lab, user)
    head = f"POST {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n".encode()
    with (
        socket.create_connection(("127.0.0.1", scene.gw.port), timeout=30) as tcp,
        ctx.wrap_socket(tcp, server_hostname="127.0.0.1") as tls,
    ):
        tls.sendall(head)
        data = b""
        while b"\r\n\r\n" not in data:  # the refusal's head: the gateway has answered without the body
            chunk = tls.recv(65536)
            assert chunk, data
            data += chunk
        with contextlib.suppress(OSError):  # (the gateway may have closed already: the own server does)
            tls.sendall(tail)
            while tls.recv(65536):
                pass
    assert data.startswith(b"HTTP/1.1 %d " % status), data
    scene.gw.wait_event("request", status=status, method="POST")
    # aiohttp logs an unhandled exception once its lingering read of the body fails: polled, with a witness that the
    # gateway went on (a request after it, answered and logged)
    assert scene.send(_get("/owa/after-refused-unread")) == 200
    scene.gw.wait_event("request", path="/owa/after-refused-unread", status=200)
    after = scene.gw.logs()[mark:]
    assert not [e for e in after if e.get("level") in ("error", "critical")], after
    assert not [e for e in after if "traceback" in e or "exception" in e], after


@pytest.mark.parametrize(
    "host",
    ["evil.example/ecp/", "alice@evil.example", "127.0.0.1:abc", "127.0.0.1:99999", "", "a b", "[::1", "h%2F", "h:1:2"],
)
def test_a_host_that_is_not_a_host_is_refused(scene: Scene, host: str) -> None:
    """A `Host` that is not a host name or address with an optional port (a path, user info, a bad port, nothing
    at all) is 400 (RFC 9112 3.2) before any stage, never echoed to the backend in `X-Forwarded-Host` or `Host`."""
    scene.taken()
    request = _get("/owa/h").replace(b"Host: 127.0.0.1\r\n", f"Host: {host}\r\n".encode("latin-1"))
    assert scene.send(request) == 400
    assert not any(scene.taken().values())


@pytest.mark.parametrize("host", ["mail.example.com", "Mail.Example.COM.:443", "127.0.0.1:8443", "[::1]:88", "cas_01"])
def test_host_names_and_addresses_are_served(scene: Scene, host: str) -> None:
    """Host names (any case, a trailing dot, `_`), IPv4 and IPv6 addresses, with or without a port: served, and the
    backend's `X-Forwarded-Host` is the device's `Host`."""
    request = _get("/owa/h").replace(b"Host: 127.0.0.1\r\n", f"Host: {host}\r\n".encode("latin-1"))
    got = scene.forwarded(request)
    assert got.headers("X-Forwarded-Host") == [host]


def test_trace_is_refused_with_405(scene: Scene) -> None:
    """TRACE would echo the request (cookies, the gateway's own headers) back: 405, never forwarded."""
    scene.taken()
    answer = raw_request(scene._lab, scene.gw.port, b"TRACE /owa/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert answer.status == 405
    assert "allow:" in answer.head.lower()
    assert not any(scene.taken().values())


def test_the_405s_allow_names_the_methods_the_gateway_forwards(scene: Scene) -> None:
    """RFC 9110 15.5.6: a 405's `Allow` lists the methods the target supports. The gateway forwards every method its
    parser (llhttp, in both device servers) reads but TRACE and CONNECT, so that is the list, and each method in it
    reaches the backend as sent (WebDAV's PROPFIND and MOVE among them: OWA and EWS use them). Before, `Allow` listed
    seven (GET, HEAD, POST, PUT, DELETE, PATCH, OPTIONS) while the others were forwarded all the same."""
    answer = raw_request(scene._lab, scene.gw.port, b"TRACE /owa/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert answer.status == 405
    (allow,) = [line.partition(":")[2] for line in answer.head.split("\r\n") if line.lower().startswith("allow:")]
    methods = [method.strip() for method in allow.split(",")]
    assert {"PROPFIND", "PROPPATCH", "MOVE", "COPY", "MKCOL", "LOCK", "UNLOCK", "SEARCH", "PATCH"} <= set(methods)
    assert not {"TRACE", "TRACK", "CONNECT"} & set(methods), methods
    for method in methods:
        got = scene.forwarded(f"{method} /owa/x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        assert got.request_line.startswith(f"{method} /owa/x "), (method, got.request_line)


@pytest.mark.parametrize(("method", "status"), [(b"CONNECT", 405), (b"TRACK", 400)])
def test_track_and_connect_are_never_forwarded(scene: Scene, method: bytes, status: int) -> None:
    """CONNECT is answered 405 with Allow, like TRACE; TRACK (IIS's TRACE) is a method llhttp does not know, so
    both servers' parser answers it 400 before any stage. Neither reaches a backend."""
    scene.taken()
    target = b"cas.lab.test:443" if method == b"CONNECT" else b"/owa/"
    answer = raw_request(
        scene._lab, scene.gw.port, method + b" " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    assert answer.status == status
    if status == 405:
        assert "allow:" in answer.head.lower()
    assert not any(scene.taken().values())


def test_an_absolute_form_target_is_refused(scene: Scene) -> None:
    """`GET http://host/path`: a proxy request, not for this gateway; 400, nothing forwarded."""
    scene.taken()
    assert scene.send(_get("http://cas.lab.test/owa/x")) == 400
    assert not any(scene.taken().values())


@pytest.mark.parametrize("request_line", [b"GET /owa/\r\n\r\n", b"GET /owa/ \r\n\r\n", b"GET\r\n\r\n"])
def test_a_request_line_without_a_version_is_400_never_http_0_9(scene: Scene, request_line: bytes) -> None:
    """An HTTP/0.9 request line gets a 400 with an HTTP/1.x status line, and nothing is forwarded."""
    scene.taken()
    answer = raw_request(scene._lab, scene.gw.port, request_line)
    assert answer.status_line.startswith("HTTP/1."), answer
    assert answer.status == 400
    assert not any(scene.taken().values())


@pytest.mark.parametrize("host", [b"Host: 127.0.0.1\r\n", b""])
def test_a_request_line_of_another_major_version_is_505_never_forwarded_as_http_1_1(scene: Scene, host: bytes) -> None:
    """`GET /owa/ HTTP/2.0` (llhttp accepts the version) is not an HTTP/1.x request: 505 written as HTTP/1.1, and
    nothing reaches a backend. It used to be forwarded as HTTP/1.1, without a Host where it had none (the HTTP/1.1
    rule that a request carries one was checked for version 1.1 only)."""
    scene.taken()
    answer = raw_request(scene._lab, scene.gw.port, b"GET /owa/ HTTP/2.0\r\n" + host + b"Connection: close\r\n\r\n")
    assert answer.status_line.startswith("HTTP/1.1 "), answer
    assert answer.status == 505
    assert not any(scene.taken().values())


def test_answers_aiohttp_gives_itself_carry_their_status_in_the_summary(scene: Scene) -> None:
    """`OPTIONS *` and an unparseable request: the summary line and the metrics say the status the client got,
    not 500."""
    before = {status: scene.requests_counted(status) for status in (400, 404, 500)}
    mark = scene.gw.mark()
    star = raw_request(scene._lab, scene.gw.port, b"OPTIONS * HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    bad = raw_request(scene._lab, scene.gw.port, b"GET /owa/ HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n")
    assert bad.status == 400
    statuses = {star.status, bad.status}
    theirs = scene.gw.wait_events("request", 2, accept=lambda e: e.get("method") in ("OPTIONS", None, "UNKNOWN"))
    logged = [e["status"] for e in theirs]
    assert statuses <= set(logged), scene.gw.events("request", after=mark)
    assert 500 not in logged
    # the metrics are counted just after the summary line is written: polled for, as the line was
    eventually(lambda: scene.requests_counted(404) == before[404] + 1, "404 counted once")
    eventually(lambda: scene.requests_counted(400) == before[400] + 1, "400 counted once")
    assert scene.requests_counted(500) == before[500]


def _certificate_with_upn(lab: LabLayout, directory: Path, name: str, upn_der: bytes) -> str:
    """A clientAuth certificate from the lab's issuing CA whose UPN otherName holds exactly `upn_der`; the path
    of its PEM (the key beside it)."""
    ca_cert = x509.load_pem_x509_certificate((lab.pki_dir / "issuing.pem").read_bytes())
    ca_key = serialization.load_pem_private_key((lab.pki_dir / "issuing.key").read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.OtherName(UPN_OID, upn_der)]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    path = directory / f"{name}.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    path.with_suffix(".key").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return str(path.with_suffix(""))


def _utf8_string(value: bytes) -> bytes:
    return bytes([0x0C, len(value)]) + value  # DER UTF8String, short form length


@pytest.mark.parametrize(
    ("name", "upn_der", "reason"),
    [
        ("not-utf8", _utf8_string(b"al\xffce@lab.test"), "not UTF-8"),
        ("long-s", _utf8_string("alice@lab.te\u017ft".encode()), "not ASCII"),
        ("kelvin", _utf8_string("alice@\u212aab.test".encode()), "not ASCII"),
    ],
)
def test_upns_that_are_not_plain_are_refused_as_an_identity(
    scene: Scene, tmp_path: Path, name: str, upn_der: bytes, reason: str
) -> None:
    """A UPN whose bytes are not UTF-8, or whose suffix has letters that only Unicode case mapping makes ASCII
    (`lab.te` + U+017F + `t` upper-cases to LAB.TEST): the usual 403 from the identity stage and its audit event;
    no reset, no traceback, nothing forwarded."""
    scene.taken()
    cert = _certificate_with_upn(scene._lab, tmp_path, name, upn_der)
    answer = raw_request(scene._lab, scene.gw.port, _get("/owa/x"), user=cert)
    assert answer.status == 403, answer
    assert b"UPN" in answer.body
    assert not any(scene.taken().values())
    audit = scene.gw.wait_for("identity_rejected", lambda e: e.get("cert_subject") == f"CN={name}", what=name)
    assert reason in audit["reason"]
    failures = [
        e for e in scene.gw.logs() if e.get("level") in ("error", "critical") and e.get("logger") != "aiohttp.server"
    ]
    assert not failures  # no unhandled task, no failed handshake (aiohttp's own are the malformed requests')
    assert not [e for e in scene.gw.logs() if "traceback" in e]


def _ca_chain(directory: Path, length: int, padding: int = 0) -> tuple[Path, Path]:
    """A client certificate and `length` CA certificates above it, each issued by the next (the last one's
    issuer is sent by nobody), optionally padded with a `padding`-byte extension: (chain PEM, key PEM)."""
    now = datetime.now(UTC)
    keys = [ec.generate_private_key(ec.SECP256R1()) for _ in range(length + 2)]
    names = [x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"junk {i}")]) for i in range(length + 2)]
    pems = []
    for i in range(length + 1):
        builder = (
            x509.CertificateBuilder()
            .subject_name(names[i])
            .issuer_name(names[i + 1])
            .public_key(keys[i].public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(hours=1))
            .not_valid_after(now + timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=i > 0, path_length=None), critical=True)
        )
        if i == 0:
            builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        if padding:
            pad = x509.UnrecognizedExtension(
                x509.ObjectIdentifier("1.3.6.1.4.1.55555.1"), b"\x04\x82" + padding.to_bytes(2, "big") + b"j" * padding
            )
            builder = builder.add_extension(pad, critical=False)
        pems.append(builder.sign(keys[i + 1], hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
    chain, key = directory / "chain.pem", directory / "chain.key"
    chain.write_bytes(b"".join(pems))
    key.write_bytes(
        keys[0].private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return chain, key


def _handshake(scene: Scene, chain: Path, key: Path) -> str:
    """Present `chain` and return what the client saw: an HTTP status line, or the TLS error."""
    ctx = ssl.create_default_context(cafile=str(scene._lab.pki_dir / "root.pem"))
    ctx.load_cert_chain(chain, key)
    try:
        with (
            socket.create_connection(("127.0.0.1", scene.gw.port), timeout=30) as tcp,
            ctx.wrap_socket(tcp, server_hostname="127.0.0.1") as tls,
        ):
            tls.sendall(_get("/owa/"))
            return tls.recv(100).decode("latin-1").split("\r\n")[0]
    except (ssl.SSLError, OSError) as e:
        return f"{type(e).__name__}: {e}"


@pytest.mark.parametrize(
    ("length", "padding", "reason"),
    [(9, 0, "certificate chain too long"), (20, 2000, "excessive message size")],
)
def test_a_long_junk_client_chain_is_cut_short(
    scene: Scene, tmp_path: Path, length: int, padding: int, reason: str
) -> None:
    """A chain deeper than `max_chain_depth` (4) or bigger than `max_chain_bytes` (10 KiB) ends the handshake
    with OpenSSL's reason in the log, before the gateway spends more on it."""
    chain, key = _ca_chain(tmp_path, length, padding)
    if padding:
        assert len(chain.read_bytes()) * 3 // 4 > 10240  # the DER is over the limit
    scene.gw.mark()
    seen = _handshake(scene, chain, key)
    assert not seen.startswith("HTTP/"), seen
    scene.gw.wait_for("tls_handshake_refused", lambda e: reason in e["reason"], what=reason)


@pytest.mark.parametrize(
    "target",
    [
        "http://alice:{secret}@cas.lab.test/owa/",
        "http://alice:{secret}%2Fx%40y@cas.lab.test/owa/",  # a '/' and an '@' in the password, percent-encoded
        "https://alice:{secret}@cas.lab.test:99999/owa/",
        "http://cas.lab.test:99999/owa/?access_token={secret}",  # a port out of range: not parsed as a URL
    ],
)
def test_a_password_in_an_absolute_form_target_is_neither_logged_nor_answered(scene: Scene, target: str) -> None:
    """An absolute-form target (`GET http://user:password@host/...`, a client that takes the gateway for a proxy)
    is refused 400, and neither the answer nor the log holds the password: the summary line's `path` (and the
    trace) held the target's user information, password included."""
    secret = "Qx7TargetSecret42"
    mark = scene.gw.mark()
    answer = raw_request(scene._lab, scene.gw.port, _get(target.format(secret=secret)))
    assert answer.status == 400
    assert secret not in answer.head + answer.body.decode("latin-1")
    scene.gw.wait_event("request", status=400)
    assert not [(e["event"], k) for e in scene.gw.logs()[mark:] for k, v in e.items() if secret in str(v)]


def _plain_request(port: int, request: bytes) -> bytes:
    """`request` sent byte for byte over plain TCP (the admin listener); the answer, read until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
        return answer


@pytest.mark.parametrize(
    "request_line",
    ["GET http://h:99999/?access_token={secret} HTTP/1.1", "CONNECT alice:{secret}@h:99999 HTTP/1.1"],
)
def test_a_target_aiohttp_cannot_parse_is_neither_answered_nor_logged(scene: Scene, request_line: str) -> None:
    """A request target aiohttp's parser refuses (a port out of range) is left out of the 400 and the log, on the
    device side and the admin listener: aiohttp's message for it (InvalidURLError) is the target alone, without a
    quote for `unquoted` to cut at, so a query's token or a password in it was the 400's body and the
    `error_detail` of an error line."""
    secret = "Qx7UnparsedTarget42"
    request = f"{request_line.format(secret=secret)}\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode()
    mark = scene.gw.mark()
    device = raw_request(scene._lab, scene.gw.port, request)
    admin = _plain_request(int(scene.admin.rsplit(":", 1)[1]), request)
    assert device.status in (400, 405)
    assert admin.startswith(b"HTTP/1.0 400 ") or admin.startswith(b"HTTP/1.1 400 "), admin
    assert secret not in device.head + device.body.decode("latin-1")
    assert secret not in admin.decode("latin-1")
    # a request's summary line written after both answers: the lines about them are in the log before it
    raw_request(scene._lab, scene.gw.port, _get("/owa/after-the-unparsed-target", "Connection: close"))
    scene.gw.wait_event("request", path="/owa/after-the-unparsed-target")
    assert not [(e["event"], k) for e in scene.gw.logs()[mark:] for k, v in e.items() if secret in str(v)]
