"""The listener on uvloop (`listener.event_loop = "uvloop"`): the same TLS behaviour as on asyncio's loop.

uvloop was once turned down because handshakes stalled on it and refused ones lost their alert. Both were the
listener's doing (the ClientHello reached the gate before TLS owned the socket; an isinstance check skipped the
alert), not uvloop's: these tests pin that a gateway running on uvloop answers, refuses with a readable alert
over TLS 1.2 and 1.3, and times a silent handshake out; and behind a balancer (`[listener] proxy_protocol`)
that a good PROXY header makes the device the client and a bad one is refused and counted.
"""

from __future__ import annotations

import dataclasses
import socket
import subprocess
import time
from collections.abc import Iterator

import pytest

from proxy.lab import runner
from proxy.lab.layout import LabLayout
from tests.integration._alerts import HANDSHAKE_REFUSALS
from tests.integration.conftest import Gateway, curl, free_port, lab_config, start_gateway
from tests.integration.jsonlog import WAIT
from tests.integration.test_proxy_protocol import _refusals, through, v2_header


@pytest.fixture(scope="module")
def uv_gateway(lab: LabLayout, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    text = lab_config(lab, port=free_port())
    text = text.replace("[listener]\n", '[listener]\nevent_loop = "uvloop"\nhandshake_timeout = 2\n', 1)
    gw = start_gateway(lab, tmp_path_factory.mktemp("uvloop"), text)
    yield gw
    gw.stop()


def test_the_gateway_runs_on_uvloop_and_serves(lab: LabLayout, uv_gateway: Gateway) -> None:
    """The loop really running is uvloop's (its start-up line says so), and a good certificate is served."""
    assert uv_gateway.events("listening")[-1]["event_loop"] == "uvloop"  # start_gateway waited for it
    res = curl(lab, uv_gateway.url + "/EWS/Exchange.asmx", "alice")
    assert res.stdout.endswith("\n200"), res


@pytest.mark.parametrize(("user", "reason_in_log", "curl_says"), HANDSHAKE_REFUSALS)
def test_refused_certificates_get_their_alert_over_tls13(
    lab: LabLayout, uv_gateway: Gateway, user: str | None, reason_in_log: str, curl_says: str
) -> None:
    """curl (TLS 1.3) reads OpenSSL's alert for each refusal, and the refusal is logged with its reason."""
    uv_gateway.mark()
    res = curl(lab, uv_gateway.url + "/EWS/Exchange.asmx", user)
    assert res.returncode != 0, res
    assert curl_says in res.stderr.lower()
    uv_gateway.wait_for("tls_handshake_refused", lambda e: reason_in_log in e["reason"].lower(), what=reason_in_log)


def test_an_expired_certificate_over_tls12_gets_its_alert_and_the_connection_ends(
    lab: LabLayout, uv_gateway: Gateway
) -> None:
    """TLS 1.2, where the handshake used to stall on uvloop: openssl s_client prints the alert and exits."""
    users = lab.pki_dir / "users"
    argv = ["openssl", "s_client", "-tls1_2", "-connect", f"127.0.0.1:{uv_gateway.port}"]
    argv += ["-CAfile", str(lab.pki_dir / "root.pem"), "-cert", str(users / "expired.pem")]
    argv += ["-key", str(users / "expired.key")]
    uv_gateway.mark()
    res = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30, check=False)
    assert "alert certificate expired" in (res.stdout + res.stderr).lower(), res
    uv_gateway.wait_for("tls_handshake_refused", lambda e: "has expired" in e["reason"], what="expired, TLS 1.2")


def test_a_silent_client_is_cut_after_the_handshake_timeout(uv_gateway: Gateway) -> None:
    """A client that connects and sends nothing is closed once handshake_timeout (2 s here) has passed."""
    uv_gateway.mark()
    with socket.create_connection(("127.0.0.1", uv_gateway.port), timeout=30) as s:
        started = time.monotonic()
        assert s.recv(1) == b""  # the gateway closed it
        waited = time.monotonic() - started
    assert waited >= 1.5
    # asyncio's TLS protocol ends a slow handshake with ConnectionAbortedError: logged as abandoned, with its words
    uv_gateway.wait_for("tls_handshake_abandoned", lambda e: "taking longer" in e["reason"], what="handshake timeout")


@pytest.fixture(scope="module")
def uv_balanced(lab: LabLayout, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Gateway, str]]:
    """A uvloop gateway behind a balancer: PROXY headers believed from 127.0.0.1 only, and its admin listener."""
    layout = dataclasses.replace(lab, balancer_subnet="127.0.0.1/32")
    admin_port = free_port()
    text = runner.gateway_config(layout, gateway_port=free_port(), behind_balancer=True)
    text = text.replace("[listener]\n", '[listener]\nevent_loop = "uvloop"\n', 1)
    text += f'\n[admin]\nbind = "127.0.0.1:{admin_port}"\n'
    gw = start_gateway(lab, tmp_path_factory.mktemp("uvloop-balanced"), text)  # waits for the admin listener too
    yield gw, f"http://{gw.admin}"
    gw.stop()


def test_a_good_proxy_header_on_uvloop_makes_the_device_the_client(
    lab: LabLayout, uv_balanced: tuple[Gateway, str]
) -> None:
    """On uvloop, a v2 PROXY header naming 203.0.113.9, then alice's TLS: served, the backend gets that address in
    X-Forwarded-For, and the request's summary line names it as the client."""
    gw, _ = uv_balanced
    assert gw.events("listening")[-1]["event_loop"] == "uvloop"  # start_gateway waited for it
    gw.mark()
    status, echo = through(lab, gw, v2_header("203.0.113.9", 40011))
    assert (status, echo["principal"]) == (200, "alice@LAB.TEST")
    assert {k.lower(): v for k, v in echo["headers"].items()}["x-forwarded-for"] == "203.0.113.9"
    line = gw.wait_for("request", lambda e: e.get("client") == "203.0.113.9", what="client 203.0.113.9")
    assert line["status"] == 200


def test_a_bad_proxy_header_on_uvloop_is_refused_and_counted(uv_balanced: tuple[Gateway, str]) -> None:
    """On uvloop, a connection that starts with a ClientHello instead of the PROXY header is closed unanswered,
    logged (proxy_header_refused) and counted as malformed_header in kcd_refusals_total."""
    gw, admin = uv_balanced
    before = _refusals(admin).get("malformed_header", 0.0)
    gw.mark()
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as raw:
        raw.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
        assert raw.recv(1) == b""  # closed, never answered
    deadline = time.monotonic() + WAIT
    while _refusals(admin).get("malformed_header", 0.0) - before < 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _refusals(admin).get("malformed_header", 0.0) - before == 1
    refused = gw.wait_for("proxy_header_refused", lambda e: True)  # a line since the mark: this connection's
    assert str(refused.get("peer", "")).startswith("127.0.0.1:")
