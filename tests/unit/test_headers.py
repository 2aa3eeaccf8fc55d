"""Header rewriting between device and backend."""

from __future__ import annotations

import pytest
from multidict import CIMultiDict

from proxy.backend import headers


def _backend(client: list[tuple[str, str]], *, upstream_host: str | None = "cas.lab.test") -> CIMultiDict[str]:
    return headers.to_backend(
        CIMultiDict(client),
        client_ip="192.0.2.7",
        client_host="mail.example.com",
        upstream_host=upstream_host,
        authorization="Negotiate abc",
    )


@pytest.mark.parametrize(
    "name",
    [
        "Authorization",
        "authorization",
        "Proxy-Authorization",
        "X-Remote-User",
        "x-remote-user",
        "X_Remote_User",
        "REMOTE_USER",
        "Remote-User",
        "X-Forwarded-User",
        "X-Authenticated-User",
        "X-SSL-Client-Cert",
        "X-Client-Cert",
        "X-MS-CLIENT-PRINCIPAL-NAME",
        "X-KCD-UPN",
        "X-Real-IP",
        "Forwarded",
        "True-Client-IP",
        "X-Originating-IP",
        "Client-IP",
        "X-Cluster-Client-IP",
        "CF-Connecting-IP",
        "X-ProxyUser-Ip",
        "X-CommonAccessToken",
        "X-MS-Exchange-Organization-AuthAs",
        "x-ms-exchange-organization-anything-else",
        "X-Rewrite-URL",
        "X-Original-URL",
        "X-HTTP-Method-Override",
    ],
)
def test_client_identity_headers_never_reach_the_backend(name: str) -> None:
    """Client-sent credentials and identity claims are dropped, whatever the case or underscore spelling."""
    out = _backend([(name, "mallory@lab.test"), ("Accept", "*/*")])
    values = [v for k, v in out.items() if k.lower() != "authorization"]
    assert "mallory@lab.test" not in values
    assert out["Authorization"] == "Negotiate abc"
    assert out["Accept"] == "*/*"


@pytest.mark.parametrize(
    "name", ["X.Forwarded.For", "Remote.User", "X~Remote~User", "X-Remote!User", "X.Innocent", "A'B"]
)
def test_names_with_token_characters_other_than_letters_digits_and_dash_never_reach_the_backend(name: str) -> None:
    """A name with `.`, `~`, `!` or another token character a layer in front of an application may fold to `_` or `-`
    (PHP's `.`): dropped whatever it names, as nginx's `ignore_invalid_headers` does; letters, digits and `-` pass."""
    out = _backend([(name, "mallory"), ("X-Request-Id-2", "kept")])
    assert "mallory" not in out.values()
    assert out["X-Request-Id-2"] == "kept"


def test_hop_by_hop_and_connection_named_headers_are_dropped() -> None:
    """Hop-by-hop headers, and those the client lists in Connection, end at the gateway."""
    out = _backend(
        [
            ("Connection", "keep-alive, X-Secret-Hop"),
            ("X-Secret-Hop", "1"),
            ("Keep-Alive", "timeout=5"),
            ("TE", "trailers"),
            ("Upgrade", "websocket"),
            ("Transfer-Encoding", "chunked"),
            ("MS-ASProtocolVersion", "16.1"),
        ]
    )
    assert {k.lower() for k in out} == {
        "ms-asprotocolversion",
        "host",
        "authorization",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
    }


def test_forwarded_headers_are_the_gateways_own() -> None:
    """X-Forwarded-For/-Proto/-Host come from the gateway, replacing what the client claimed."""
    out = _backend([("X-Forwarded-For", "10.0.0.1"), ("X-Forwarded-Proto", "http"), ("Host", "mail.example.com")])
    assert out.getall("X-Forwarded-For") == ["192.0.2.7"]
    assert out.getall("X-Forwarded-Proto") == ["https"]
    assert out["X-Forwarded-Host"] == "mail.example.com"
    assert out.getall("Host") == ["cas.lab.test"]


def test_preserve_host_keeps_the_clients_host() -> None:
    """With no upstream host override, the client's Host goes through."""
    out = _backend([("Host", "mail.example.com")], upstream_host=None)
    assert out.getall("Host") == ["mail.example.com"]


def test_backend_challenges_and_hop_headers_do_not_reach_the_device() -> None:
    """WWW-Authenticate, hop-by-hop and Content-Length (set by the gateway itself) are not copied."""
    out = headers.to_client(
        CIMultiDict(
            [
                ("WWW-Authenticate", "Negotiate oYG..."),
                ("Connection", "close"),
                ("Transfer-Encoding", "chunked"),
                ("Content-Length", "12"),
                ("Set-Cookie", "a=1"),
                ("Set-Cookie", "b=2"),
                ("X-MS-Diagnostics", "x"),
            ]
        )
    )
    assert out.getall("Set-Cookie") == ["a=1", "b=2"]
    assert "WWW-Authenticate" not in out
    assert "Transfer-Encoding" not in out
    assert "Content-Length" not in out
    assert out["X-MS-Diagnostics"] == "x"
