"""Route choice at its edges, over raw TLS to a running gateway whose upstreams record what they receive: a prefix
written without a trailing slash, a route for one host name, and a `Host` naming another site.

Routes: `/ews` (no trailing slash) and `/EWSAdmin/` to their own recorders, `/owa/` only for `mail.example.com`,
`/API/` with `case_sensitive = true`, and `/` to a catch-all recorder. Each recorder only ever sees the paths its
route was meant for."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from proxy.lab.layout import LabLayout
from tests.integration.conftest import Gateway, free_port, lab_config, start_gateway
from tests.integration.recorder import Recorder, raw_request


@pytest.fixture(scope="module")
def routed(lab: LabLayout, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Gateway, dict[str, Recorder]]]:
    recorders = {name: Recorder() for name in ("ews", "ewsadmin", "mail-owa", "api", "all")}
    base = lab_config(lab, port=free_port()).split("[[routes]]", 1)[0]
    routes = (
        ("/ews", None, "ews"),
        ("/EWSAdmin/", None, "ewsadmin"),
        ("/owa/", "mail.example.com", "mail-owa"),
        ("/API/", None, "api"),
        ("/", None, "all"),
    )
    text = base + "".join(
        f'[[routes]]\nprefix = "{prefix}"\nupstream = "{recorders[name].url}"\nspn = "HTTP/cas.lab.test"\n'
        + (f'host = "{host}"\n' if host else "")
        + ("case_sensitive = true\n" if name == "api" else "")
        for prefix, host, name in routes
    )
    gw = start_gateway(lab, tmp_path_factory.mktemp("route-edges"), text)
    try:
        yield gw, recorders
    finally:
        gw.stop()
        for rec in recorders.values():
            rec.close()


def _send(lab: LabLayout, gw: Gateway, target: str, host: str = "127.0.0.1") -> int:
    request = f"GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode("latin-1")
    return raw_request(lab, gw.port, request).status


@pytest.mark.parametrize(
    ("target", "route", "path"),
    [
        ("/ews", "ews", "/ews"),
        ("/EWS/Exchange.asmx", "ews", "/EWS/Exchange.asmx"),
        ("/ews?x=1", "ews", "/ews?x=1"),
        ("/ewsfoo", "all", "/ewsfoo"),
        ("/EWSAdmin/x", "ewsadmin", "/EWSAdmin/x"),
        ("/ews.bak/x", "all", "/ews.bak/x"),
        ("/ews%2ex", "all", "/ews%2ex"),
        ("/ews/../ewsfoo", "all", "/ewsfoo"),
    ],
)
def test_a_prefix_without_a_trailing_slash_ends_at_a_segment(
    lab: LabLayout, routed: tuple[Gateway, dict[str, Recorder]], target: str, route: str, path: str
) -> None:
    """A route written `/ews` takes `/ews` and what is under `/ews/`, never `/ewsfoo` or `/ews.bak`: a prefix is
    whole path segments, as an IIS virtual directory is."""
    gw, recorders = routed
    for rec in recorders.values():
        rec.taken()
    assert _send(lab, gw, target) == 200
    taken = {name: [r.path for r in rec.taken()] for name, rec in recorders.items()}
    assert taken[route] == [path], taken
    assert sum(len(paths) for paths in taken.values()) == 1, taken


@pytest.mark.parametrize(
    ("target", "route"),
    [
        ("/ewsadmin/x", "ewsadmin"),
        ("/EwsAdmin/x", "ewsadmin"),
        ("/API/x", "api"),
        ("/api/x", "all"),
        ("/Api/x", "all"),
    ],
)
def test_prefixes_ignore_case_unless_the_route_is_case_sensitive(
    lab: LabLayout, routed: tuple[Gateway, dict[str, Recorder]], target: str, route: str
) -> None:
    """Issue 14: `prefix` matches without regard to case by default (`/EWSAdmin/` takes `/ewsadmin/x`, as IIS
    would serve it); a route with `case_sensitive = true` (`/API/`) takes only its own spelling, and `/api/x` goes
    on to the catch-all route. The path reaches the upstream as sent."""
    gw, recorders = routed
    for rec in recorders.values():
        rec.taken()
    assert _send(lab, gw, target) == 200
    taken = {name: [r.path for r in rec.taken()] for name, rec in recorders.items()}
    assert taken[route] == [target], taken
    assert sum(len(paths) for paths in taken.values()) == 1, taken


@pytest.mark.parametrize(
    ("host", "route"),
    [
        ("mail.example.com", "mail-owa"),
        ("MAIL.example.com.:443", "mail-owa"),
        ("evil.example", "all"),
        ("127.0.0.1", "all"),
    ],
)
def test_a_route_for_one_host_serves_only_that_host(
    lab: LabLayout, routed: tuple[Gateway, dict[str, Recorder]], host: str, route: str
) -> None:
    """`/owa/` published for mail.example.com only: another `Host` (another site) takes the catch-all route."""
    gw, recorders = routed
    for rec in recorders.values():
        rec.taken()
    assert _send(lab, gw, "/owa/x", host) == 200
    taken = {name: [r.path for r in rec.taken()] for name, rec in recorders.items()}
    assert taken[route] == ["/owa/x"], taken


@pytest.mark.parametrize(
    "target",
    [
        "/ews./Exchange.asmx",
        "/EWS%2E/Exchange.asmx",
        "/ews%20/Exchange.asmx",
        "/EWSAdmin.%20./x",
        "/ews::$DATA/x",
        "/ews;x=1/Exchange.asmx",
        "/EWSADM~1/x",
        "/ews%EF%BC%8E/x",
        "/%EF%BD%85ws/x",
        "/ews%c0%ae/x",
    ],
)
def test_a_path_windows_reads_as_another_route_is_refused(
    lab: LabLayout, routed: tuple[Gateway, dict[str, Recorder]], target: str
) -> None:
    """`/ews./x` is `/ews/x` to Windows once it trims the dot, and `EWSADM~1` may be `EWSAdmin`: the gateway would
    have sent them to the catch-all route; they are 400 and reach no upstream."""
    gw, recorders = routed
    for rec in recorders.values():
        rec.taken()
    gw.mark()
    assert _send(lab, gw, target) == 400
    line = gw.wait_for("request", lambda e: "ambiguous request target" in str(e.get("reason", "")), what=target)
    assert line["status"] == 400
    taken = {name: [r.path for r in rec.taken()] for name, rec in recorders.items()}
    assert not any(taken.values()), taken
