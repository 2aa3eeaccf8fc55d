"""Routes: prefixes and hosts, https upstreams, timeouts and context headers, read from TOML."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest

from proxy import config
from proxy.errors import ConfigError
from proxy.lab.pki import make_pki

HEAD = """
[listener]
bind = "127.0.0.1:8443"
certificate = "server.pem"
private_key = "server.key"

[client_certificates]
trust_anchors = ["root.pem"]

[kerberos]
principal = "HTTP/proxy.lab.test@LAB.TEST"
keytab = "proxy.keytab"
"""

ROUTES = """
[[routes]]
prefix = "/"
upstream = "http://127.0.0.1:8081"
spn = "HTTP/cas.lab.test"

[[routes]]
prefix = "/owa/"
upstream = "https://owa.lab.test"

[[routes]]
prefix = "/owa/"
host = "Mail.Example.COM"
upstream = "https://10.0.0.5:444"
spn = "HTTP/mail.example.com"
ca_bundle = "backend-ca.pem"
server_name = "mail.example.com"
preserve_host = true
connect_timeout = 2.5
read_timeout = 3700
context_headers = { "X-KCD-UPN" = "upn", "X-KCD-Cert-Serial" = "cert_serial" }

[[routes]]
prefix = "/"
host = "mail.example.com"
upstream = "http://127.0.0.1:8082"
spn = "HTTP/cas.lab.test"
"""


Write = Callable[..., Path]  # (routes, listener keys="") -> the written file


@pytest.fixture(scope="module")
def pem_bundle(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A real CA certificate in PEM (the lab PKI's root)."""
    return make_pki(tmp_path_factory.mktemp("pki"), now=datetime.now(UTC)).root_cert.read_bytes()


@pytest.fixture
def write(tmp_path: Path, pem_bundle: bytes) -> Write:
    for name in ("server.pem", "server.key", "root.pem", "proxy.keytab"):
        (tmp_path / name).write_text("x")
    (tmp_path / "backend-ca.pem").write_bytes(pem_bundle)

    def _write(routes: str, listener: str = "") -> Path:
        path = tmp_path / "gateway.toml"
        path.write_text(HEAD.replace("[listener]\n", f"[listener]\n{listener}") + routes)
        return path

    return _write


def _load(write: Write, routes: str) -> config.Config:
    return config.load(write(routes))


def test_route_keys_are_typed(write: Write, tmp_path: Path) -> None:
    """host, ca_bundle, server_name, timeouts, preserve_host and context_headers come out typed and checked."""
    cfg = _load(write, ROUTES)
    route = cfg.route_for("/owa/x", "mail.example.com")
    assert route is not None
    assert route.host == "mail.example.com"
    assert route.ca_bundle == tmp_path / "backend-ca.pem"
    assert route.server_name == "mail.example.com"
    assert route.https
    assert route.preserve_host
    assert (route.connect_timeout, route.read_timeout) == (2.5, 3700.0)
    assert route.context_headers == (("X-KCD-UPN", "upn"), ("X-KCD-Cert-Serial", "cert_serial"))


def test_default_read_timeout_outlasts_an_activesync_heartbeat(write: Write) -> None:
    """Without read_timeout a route waits 3600 s for the backend: a 3540 s Ping heartbeat is not cut."""
    route = _load(write, ROUTES).route_for("/Microsoft-Server-ActiveSync")
    assert route is not None
    assert route.read_timeout == config.DEFAULT_READ_TIMEOUT >= 3540


@pytest.mark.parametrize(
    ("path", "host", "upstream"),
    [
        ("/owa/x", "mail.example.com", "https://10.0.0.5:444"),  # host route, longest prefix
        ("/owa/x", "MAIL.example.com:443", "https://10.0.0.5:444"),  # port and case ignored
        ("/owa/x", "mail.example.com.", "https://10.0.0.5:444"),  # trailing dot ignored
        ("/owa/x", "other.example.com", "https://owa.lab.test"),  # host-less route of the same prefix
        ("/owa/x", None, "https://owa.lab.test"),
        ("/EWS/x", "mail.example.com", "http://127.0.0.1:8082"),  # host route "/" beats host-less "/"
        ("/EWS/x", "[::1]:8443", "http://127.0.0.1:8081"),
        ("/EWS/x", None, "http://127.0.0.1:8081"),
    ],
)
def test_routes_match_by_longest_prefix_then_host(write: Write, path: str, host: str | None, upstream: str) -> None:
    """The longest prefix wins among routes for any host or the request's host; at equal length the host's."""
    route = _load(write, ROUTES).route_for(path, host)
    assert route is not None
    assert route.upstream == upstream


def test_a_host_route_serves_no_other_host(write: Write) -> None:
    """Without a host-less route, a request for another host (or with no Host) has no route."""
    cfg = _load(write, '[[routes]]\nprefix = "/"\nhost = "mail.example.com"\nupstream = "http://127.0.0.1:8082"\n')
    assert cfg.route_for("/x", "mail.example.com") is not None
    assert cfg.route_for("/x", "other.example.com") is None
    assert cfg.route_for("/x") is None


HOST_ROOT = 'prefix = "/"\nhost = "mail.example.com"'
BROKEN = [
    ('host = "Mail.Example.COM"', 'host = "https://mail"', "routes[2].host: expected a host name"),
    ('host = "Mail.Example.COM"', 'host = "mail.example.com:443"', "routes[2].host: expected a host name"),
    ('ca_bundle = "backend-ca.pem"', 'ca_bundle = "missing.pem"', "routes[2].ca_bundle: file not found"),
    ('ca_bundle = "backend-ca.pem"', 'ca_bundle = "server.key"', "routes[2].ca_bundle: "),
    ('server_name = "mail.example.com"', 'server_name = "a b"', "routes[2].server_name: expected a host name"),
    ('upstream = "https://10.0.0.5:444"', 'upstream = "http://10.0.0.5:444"', "routes[2].ca_bundle: only for https"),
    ('upstream = "https://10.0.0.5:444"', 'upstream = "http://10.0.0.5:444"', "routes[2].server_name: only for https"),
    ("read_timeout = 3700", "read_timeout = 0", "routes[2].read_timeout: must be positive"),
    ("connect_timeout = 2.5", 'connect_timeout = "soon"', "routes[2].connect_timeout: expected float"),
    ('"X-KCD-UPN" = "upn"', '"X-KCD-UPN" = "password"', "routes[2].context_headers.X-KCD-UPN: expected one of"),
    ('"X-KCD-UPN" = "upn"', '"Authorization" = "upn"', "routes[2].context_headers.Authorization: "),
    ('"X-KCD-UPN" = "upn"', '"X_KCD_UPN" = "upn"', "routes[2].context_headers.X_KCD_UPN: expected a header name"),
    ('"X-KCD-UPN" = "upn"', '"x-kcd-cert-serial" = "upn"', "routes[2].context_headers.X-KCD-Cert-Serial: dup"),
    ('prefix = "/"\nhost = "mail.example.com"', 'prefix = "/owa/"\nhost = "mail.example.com"', "routes[3].prefix: dup"),
    ("preserve_host = true", "preserve_host = true\ncolour = 1", "routes[2].colour: unknown key"),
    (HOST_ROOT, HOST_ROOT.replace('"/"', '"/OWA/"'), "routes[3].prefix: dup"),
    (HOST_ROOT, HOST_ROOT.replace('"/"', '"/owa/../x/"'), "routes[3].prefix: write it as the backend reads it"),
    (HOST_ROOT, HOST_ROOT.replace('"/"', '"/a%20b/"'), "routes[3].prefix: write it as the backend reads it"),
    (HOST_ROOT, HOST_ROOT.replace('"/"', '"/a%2fb/"'), "routes[3].prefix: '/a%2fb/': the path has an encoded slash"),
    ("preserve_host = true", 'case_sensitive = "yes"', "routes[2].case_sensitive: expected bool"),
]


@pytest.mark.parametrize(("old", "new", "problem"), BROKEN)
def test_broken_route_keys_are_named(write: Write, old: str, new: str, problem: str) -> None:
    """Each broken route key is reported with its routes[i] key."""
    assert old in ROUTES
    with pytest.raises(ConfigError) as e:
        _load(write, ROUTES.replace(old, new, 1))
    assert any(p.startswith(problem) for p in e.value.problems), e.value.problems


def test_listener_idle_limits(write: Write) -> None:
    """client_body_timeout and client_send_timeout default to 60 s and are read from [listener]."""
    cfg = _load(write, ROUTES)
    assert (cfg.listener.client_body_timeout, cfg.listener.client_send_timeout) == (60.0, 60.0)
    cfg = config.load(write(ROUTES, "client_body_timeout = 5\nclient_send_timeout = 7\n"))
    assert (cfg.listener.client_body_timeout, cfg.listener.client_send_timeout) == (5.0, 7.0)


def test_prefixes_ignore_case_unless_the_route_says_otherwise(write: Write) -> None:
    """IIS paths are case-insensitive, so a prefix is too; `case_sensitive = true` is for other upstreams."""
    routes = ROUTES + '[[routes]]\nprefix = "/api/"\nupstream = "http://127.0.0.1:9000"\ncase_sensitive = true\n'
    cfg = _load(write, routes)
    for path in ("/OWA/x", "/Owa/", "/owa/"):
        route = cfg.route_for(path)
        assert route is not None
        assert route.upstream == "https://owa.lab.test", path
    api = cfg.route_for("/api/x")
    assert api is not None
    assert api.upstream == "http://127.0.0.1:9000"
    other = cfg.route_for("/API/x")
    assert other is not None
    assert other.upstream == "http://127.0.0.1:8081"  # not the case-sensitive route: the catch-all
