"""The request id on a request's log lines: on every line its task (and what it awaits) writes, never on another
request's, and not on lines written outside a request.

Three users' connections at once, each with three requests pipelined on it, each request refused after the
stages awaited something (the KDC, a backend): the refusal's audit event (and the Kerberos stage's
`delegation_failed`, written by the ticket's flight when it lands) must carry the id of the request whose summary
line names the same user and refusal. A reload during the requests (SIGHUP: a background task of its own) and the
start's lines carry none, and an unparsed request's summary line starts with its status, as before.
"""

from __future__ import annotations

import signal
import socket
import ssl
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from proxy.lab.layout import LabLayout
from tests.integration.conftest import (
    Gateway,
    client_context,
    failing_routes,
    free_port,
    gateway_on_server,
    lab_config,
)
from tests.integration.jsonlog import eventually

USERS = ("alice", "bob", "carol")
# route prefix: the audit event its refusal writes
REFUSED = {
    "/dead/": "backend_unavailable",
    "/not-delegable/": "kerberos_refused",
    "/wrong-key/": "backend_rejected_ticket",
}
OUTSIDE = ("listening", "reloaded", "crl_loaded", "kdcs_answer", "admin_listening")


@pytest.fixture(scope="module", params=["own", "aiohttp"])
def gw(request: pytest.FixtureRequest, lab: LabLayout, other_backend: str, tmp_path_factory: Any) -> Iterator[Gateway]:
    server = str(request.param)
    text = lab_config(lab, port=free_port(), extra=failing_routes(lab, other_backend))
    with gateway_on_server(lab, tmp_path_factory.mktemp(f"context-{server}"), server, text) as gateway:
        yield gateway


def _pipelined(lab: LabLayout, port: int, user: str, ready: threading.Barrier, out: list[bytes]) -> None:
    """`user`'s connection: handshake, wait for the others, then every route's request in one write; reads the
    answers until the connection has given three (or ends)."""
    ctx = client_context(lab, user)
    with (
        socket.create_connection(("127.0.0.1", port), timeout=60) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        ready.wait(timeout=60)
        tls.sendall(b"".join(f"GET {prefix}{user} HTTP/1.1\r\nHost: gw\r\n\r\n".encode() for prefix in REFUSED))
        got = b""
        while got.count(b"HTTP/1.1 ") < len(REFUSED):
            chunk = tls.recv(65536)
            if not chunk:
                break
            got += chunk
        out.append(got)


def _requests(gw: Gateway, since: int, count: int) -> list[dict[str, Any]]:
    """The summary lines written since `since`, once there are `count` of them."""

    def found() -> list[dict[str, Any]] | None:
        lines = [e for e in gw.logs()[since:] if e.get("event") == "request"]
        return lines if len(lines) >= count else None

    return eventually(found, f"{count} summary lines")


def test_each_line_carries_its_own_requests_id(gw: Gateway, lab: LabLayout) -> None:
    """Concurrent requests on three connections, three pipelined on each: every audit event and
    `delegation_failed` carries the id of its own request (same user, same refusal), each id is one request's,
    and the reload's line written meanwhile carries none."""
    since = gw.mark()
    ready = threading.Barrier(len(USERS) + 1)
    answers: list[bytes] = []
    threads = [threading.Thread(target=_pipelined, args=(lab, gw.port, u, ready, answers)) for u in USERS]
    for thread in threads:
        thread.start()
    ready.wait(timeout=60)
    gw.proc.send_signal(signal.SIGHUP)  # a reload: a task of its own, while the requests run
    for thread in threads:
        thread.join(timeout=120)
    assert len(answers) == len(USERS), "a connection did not finish"
    expected = len(USERS) * len(REFUSED)
    summaries = _requests(gw, since, expected)
    gw.wait_event("reloaded")
    lines = gw.logs()[since:]

    ids = [s["request_id"] for s in summaries]
    assert len(set(ids)) == len(ids) == expected, "one id per request"
    by_refusal = {(s.get("upn"), s.get("refusal")): s["request_id"] for s in summaries}
    assert {r for _, r in by_refusal} == set(REFUSED.values()), summaries

    audits = [e for e in lines if e.get("event") in REFUSED.values()]
    assert len(audits) == expected
    for audit in audits:
        assert audit.get("request_id") == by_refusal[(audit.get("upn"), audit["event"])], audit

    kerberos = {s.get("principal"): s["request_id"] for s in summaries if s.get("refusal") == "kerberos_refused"}
    for failed in (e for e in lines if e.get("event") == "delegation_failed"):
        assert failed.get("request_id") == kerberos[failed["principal"]], failed

    for line in lines:  # any other line a request wrote carries one of the ids
        if "request_id" in line:
            assert line["request_id"] in ids, line
    outside = [e for e in gw.logs() if e.get("event") in OUTSIDE]
    assert any(e["event"] == "reloaded" for e in outside)
    assert all("request_id" not in e for e in outside), [e for e in outside if "request_id" in e]


def test_an_unparsed_requests_line_has_no_bound_id(gw: Gateway, lab: LabLayout) -> None:
    """A request the server cannot parse after one it serves (on our server pipelined, so it is answered from where
    that request ended):
    its summary line carries the fresh trace's id (not the earlier request's), after its status, as every unparsed
    line did."""
    since = gw.mark()
    ctx = client_context(lab, "alice")
    served = b"GET /dead/first HTTP/1.1\r\nHost: gw\r\n\r\n"
    bad = b"GET /x HTTP/1.1\r\nHost: gw\r\nBad Header\r\n\r\n"
    with (
        socket.create_connection(("127.0.0.1", gw.port), timeout=60) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        if 'http_server = "aiohttp"' in gw.config_path.read_text():
            tls.sendall(served)  # aiohttp's parser refuses the whole buffer: the first request is sent alone
            _requests(gw, since, 1)
            tls.sendall(bad)
        else:
            tls.sendall(served + bad)
        _drain(tls)
    first, unparsed = _requests(gw, since, 2)
    assert unparsed["status"] == 400
    assert unparsed["request_id"] != first["request_id"]
    assert list(unparsed)[:2] == ["status", "request_id"], unparsed
    assert list(first)[:2] == ["request_id", "status"], first


def _drain(tls: ssl.SSLSocket) -> None:
    try:
        while tls.recv(65536):
            pass
    except (ssl.SSLError, OSError):
        pass
