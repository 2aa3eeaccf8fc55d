"""The gateway behind a balancer, over real sockets: `[listener] proxy_protocol = true` with `trusted_proxies`.

A real gateway in front of the lab (KDC, backend) is given `trusted_proxies = ["127.0.0.1/32"]`. The
balancer is played by a raw socket that writes the PROXY header (v1 or v2) and then does a real TLS
handshake with alice's certificate, and by curl's own `--haproxy-protocol`. Connections from 127.0.0.2
(also loopback, but not trusted) stand for a device that bypasses the balancer. The compose test runs
HAProxy itself in front of two gateways.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import http.client
import json
import signal
import socket
import ssl
import struct
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from proxy.lab import runner
from proxy.lab.layout import LabLayout
from proxy.tls.proxy_protocol import V2_SIGNATURE
from tests.integration.conftest import Gateway, client_context, curl, free_port, gateway_on_server, start_gateway
from tests.integration.jsonlog import WAIT, eventually


@pytest.fixture(scope="module")
def balanced(lab: LabLayout, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """A gateway that takes PROXY headers from 127.0.0.1 only."""
    layout = dataclasses.replace(lab, balancer_subnet="127.0.0.1/32")
    text = runner.gateway_config(layout, gateway_port=free_port(), behind_balancer=True)
    gw = start_gateway(lab, tmp_path_factory.mktemp("balanced"), text)
    yield gw
    gw.stop()


def v2_header(source: str, port: int) -> bytes:
    body = socket.inet_aton(source) + socket.inet_aton("127.0.0.1") + struct.pack("!HH", port, 443)
    return V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", len(body)) + body


def through(
    lab: LabLayout, gw: Gateway, header: bytes, *, source: str = "127.0.0.1", extra: bytes = b""
) -> tuple[int, dict[str, Any]]:
    """One request the way a balancer passes it on: the header, then the device's TLS and HTTP."""
    raw = socket.create_connection(("127.0.0.1", gw.port), timeout=30, source_address=(source, 0))
    raw.sendall(header)
    with client_context(lab, "alice").wrap_socket(raw, server_hostname="proxy.lab.test") as tls:
        tls.sendall(
            b"GET /EWS/Exchange.asmx HTTP/1.1\r\nHost: proxy.lab.test\r\nConnection: close\r\n" + extra + b"\r\n"
        )
        response = http.client.HTTPResponse(tls)
        response.begin()
        body = response.read()
    return response.status, json.loads(body)


def test_v2_header_makes_the_device_the_client(lab: LabLayout, balanced: Gateway) -> None:
    """A v2 header naming 203.0.113.7: the backend gets X-Forwarded-For 203.0.113.7 (the client's own
    X-Forwarded-For is dropped), and the request's log line names 203.0.113.7 as the client."""
    balanced.mark()
    status, echo = through(lab, balanced, v2_header("203.0.113.7", 40001), extra=b"X-Forwarded-For: 6.6.6.6\r\n")
    assert status == 200
    assert echo["principal"] == "alice@LAB.TEST"
    headers = {k.lower(): v for k, v in echo["headers"].items()}
    assert headers["x-forwarded-for"] == "203.0.113.7"
    balanced.wait_for("request", lambda e: (e.get("client"), e.get("status")) == ("203.0.113.7", 200))


def test_the_trace_names_the_device_behind_the_balancer(
    lab: LabLayout, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Issue 17: behind a balancer the device's address (the PROXY header's) is the client in the trace that
    `GET /traces` on the admin listener returns, as it is in the log line and X-Forwarded-For; never the balancer's."""
    layout = dataclasses.replace(lab, balancer_subnet="127.0.0.1/32")
    admin = free_port()
    text = runner.gateway_config(layout, gateway_port=free_port(), behind_balancer=True)
    gw = start_gateway(
        lab, tmp_path_factory.mktemp("balanced-traces"), text + f'\n[admin]\nbind = "127.0.0.1:{admin}"\n'
    )
    try:
        assert through(lab, gw, v2_header("203.0.113.44", 40004))[0] == 200

        def device_trace() -> dict[str, Any] | None:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin}/traces?limit=10", timeout=30) as r:
                records: list[dict[str, Any]] = json.loads(r.read())
            return next((t for t in records if t["principal"] == "alice@LAB.TEST"), None)

        record = eventually(device_trace, "alice's trace")
        assert (record["client"], record["status"]) == ("203.0.113.44", 200)
    finally:
        assert gw.stop() == 0


def test_v1_header_from_a_raw_socket_and_from_curl(lab: LabLayout, balanced: Gateway) -> None:
    """v1: a hand-written TCP4 line, and curl's own --haproxy-protocol (its real address), both get through."""
    status, echo = through(lab, balanced, b"PROXY TCP4 198.51.100.9 127.0.0.1 40002 443\r\n")
    assert (status, {k.lower(): v for k, v in echo["headers"].items()}["x-forwarded-for"]) == (200, "198.51.100.9")
    done = curl(lab, f"https://127.0.0.1:{balanced.port}/EWS/Exchange.asmx", "alice", "--haproxy-protocol")
    assert done.stdout.rpartition("\n")[2] == "200", done.stdout + done.stderr


def test_the_device_address_is_an_address_and_an_ipv4_device_is_named_by_its_ipv4_address(
    lab: LabLayout, balanced: Gateway
) -> None:
    """A v1 TCP6 source with a zone (`fe80::1%eth0,192.0.2.66`: Python reads any text after `%` as one) is refused
    before TLS; it was the device's address, so the backend got `X-Forwarded-For: fe80::1%eth0,192.0.2.66`, a list
    naming a second client. A dual-stack balancer's `::ffff:198.51.100.20` is the IPv4 device 198.51.100.20 for the
    backend and the log, as the throttles and the per-address cap count it (it went on as `::ffff:c633:6414`)."""
    balanced.mark()
    with pytest.raises((ConnectionError, OSError)):
        through(lab, balanced, b"PROXY TCP6 fe80::1%eth0,192.0.2.66 ::1 40005 443\r\n")
    balanced.wait_for("proxy_header_refused", lambda e: "bad address" in str(e.get("reason")))
    assert not any("192.0.2.66" in str(e.get("client")) for e in balanced.logs())
    status, echo = through(lab, balanced, b"PROXY TCP6 ::ffff:198.51.100.20 ::1 40006 443\r\n")
    assert (status, {k.lower(): v for k, v in echo["headers"].items()}["x-forwarded-for"]) == (200, "198.51.100.20")
    balanced.wait_for("request", lambda e: e.get("client") == "198.51.100.20")


def test_a_connection_without_the_header_is_closed_before_tls(lab: LabLayout, balanced: Gateway) -> None:
    """A device that skips the balancer (plain TLS from the trusted address): no handshake, a logged refusal."""
    balanced.mark()
    done = curl(lab, f"https://127.0.0.1:{balanced.port}/EWS/Exchange.asmx", "alice")
    assert done.returncode != 0
    balanced.wait_for("proxy_header_refused", lambda e: str(e.get("reason", "")).startswith("no PROXY header"))


def _answer_to_a_client_hello(
    lab: LabLayout, gw: Gateway, source: str, header: bytes = b"", *, first_only: bool = False
) -> bytes:
    """Every byte the gateway sends back, until it closes (or its first bytes only), to `header` then a real
    ClientHello (alice's TLS client's, read from a memory BIO) from `source`: a ServerHello, or an alert, if TLS
    began; nothing if it did not."""
    outgoing = ssl.MemoryBIO()
    client = client_context(lab, "alice").wrap_bio(ssl.MemoryBIO(), outgoing, server_hostname="proxy.lab.test")
    with contextlib.suppress(ssl.SSLWantReadError):
        client.do_handshake()
    hello = outgoing.read()
    assert hello[:1] == b"\x16", hello[:8]  # a TLS handshake record
    received = b""
    address = ("127.0.0.1", gw.port)
    with (
        socket.create_connection(address, timeout=30, source_address=(source, 0)) as raw,
        contextlib.suppress(ConnectionResetError, BrokenPipeError),
    ):
        raw.sendall(header + hello)
        while chunk := raw.recv(4096):
            received += chunk
            if first_only:
                break
    return received


@pytest.mark.parametrize(
    ("source", "header", "reason"),
    [
        ("127.0.0.1", b"", "no PROXY header"),
        ("127.0.0.2", b"PROXY TCP4 203.0.113.67 127.0.0.1 40004 443\r\n", "trusted_proxies"),
    ],
    ids=["no header", "untrusted address"],
)
def test_a_refused_connection_gets_not_one_tls_byte(
    lab: LabLayout, balanced: Gateway, source: str, header: bytes, reason: str
) -> None:
    """Issue 17: a connection without the header, or from an address not in trusted_proxies, "is closed before TLS
    and logged": a raw socket sending a real ClientHello gets no byte back (no ServerHello, no alert; the same
    ClientHello behind a trusted v2 header gets a ServerHello), and the gateway logs the refusal with the
    connection's own address."""
    heard = _answer_to_a_client_hello(lab, balanced, "127.0.0.1", v2_header("203.0.113.68", 40005), first_only=True)
    assert heard[:1] == b"\x16", heard[:8]  # the witness: through the balancer, TLS begins (a ServerHello)
    mark = balanced.mark()
    assert _answer_to_a_client_hello(lab, balanced, source, header) == b""
    balanced.wait_for(
        "proxy_header_refused",
        lambda e: str(e.get("peer", "")).startswith(f"{source}:") and reason in str(e.get("reason")),
        what=reason,
    )
    refused = balanced.events("tls_handshake_refused", after=mark)
    assert not [e for e in refused if str(e.get("peer", "")).startswith(f"{source}:")]


def test_a_header_from_an_untrusted_address_is_not_believed(lab: LabLayout, balanced: Gateway) -> None:
    """A well-formed header sent from 127.0.0.2 (not in trusted_proxies): closed before TLS, logged with
    the connection's real address, and nothing reaches the backend as 203.0.113.66."""
    balanced.mark()
    with pytest.raises((ConnectionError, OSError)):
        through(lab, balanced, v2_header("203.0.113.66", 40003), source="127.0.0.2")
    balanced.wait_for(
        "proxy_header_refused",
        lambda e: str(e.get("peer", "")).startswith("127.0.0.2:") and "trusted_proxies" in str(e.get("reason")),
    )
    assert not any(e.get("client") == "203.0.113.66" for e in balanced.logs())


def test_a_refused_handshake_behind_the_balancer_is_logged_with_the_devices_address(
    lab: LabLayout, balanced: Gateway
) -> None:
    """An unknown certificate through the balancer: the TLS refusal is logged under the device's address."""
    balanced.mark()
    raw = socket.create_connection(("127.0.0.1", balanced.port), timeout=30)
    raw.sendall(v2_header("203.0.113.44", 40004))
    ctx = client_context(lab, "untrusted")  # a forged alice: the right names, another CA's keys
    with pytest.raises((ConnectionError, OSError)):
        ctx.wrap_socket(raw, server_hostname="proxy.lab.test").recv(1)  # the handshake's alert, or the reset
    balanced.wait_for("tls_handshake_refused", lambda e: str(e.get("peer", "")).startswith("203.0.113.44:"))


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_a_header_split_into_one_byte_segments_is_read_whole(lab: LabLayout, balanced: Gateway, version: str) -> None:
    """A balancer (or a slow network) that delivers the header a byte per TCP segment: the gate reads it whole and the
    device behind it is served under its own address."""
    header = v2_header("203.0.113.51", 40007) if version == "v2" else b"PROXY TCP4 203.0.113.51 127.0.0.1 40007 443\r\n"
    raw = socket.create_connection(("127.0.0.1", balanced.port), timeout=30)
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for i in range(len(header)):
        raw.sendall(header[i : i + 1])
        time.sleep(0.002)  # the scenario: one segment per byte
    with client_context(lab, "alice").wrap_socket(raw, server_hostname="proxy.lab.test") as tls:
        tls.sendall(b"GET /EWS/Exchange.asmx HTTP/1.1\r\nHost: proxy.lab.test\r\nConnection: close\r\n\r\n")
        response = http.client.HTTPResponse(tls)
        response.begin()
        echo = json.loads(response.read())
    assert response.status == 200
    assert {k.lower(): v for k, v in echo["headers"].items()}["x-forwarded-for"] == "203.0.113.51"


@pytest.mark.parametrize("first", ["v1", "v2"])
def test_a_second_header_is_never_read_as_one(lab: LabLayout, balanced: Gateway, first: str) -> None:
    """Two headers on one connection (a device that sends its own behind the balancer's): only the first is the
    PROXY protocol's; the second is where the TLS handshake should be, which is refused under the first's address,
    and nothing is served as the second's (203.0.113.99)."""
    one = v2_header("203.0.113.52", 40008) if first == "v2" else b"PROXY TCP4 203.0.113.52 127.0.0.1 40008 443\r\n"
    balanced.mark()
    with pytest.raises((ConnectionError, OSError)):
        through(lab, balanced, one + v2_header("203.0.113.99", 40009))
    balanced.wait_for("tls_handshake_refused", lambda e: str(e.get("peer", "")).startswith("203.0.113.52:"))
    assert not any("203.0.113.99" in str(e.get("client")) + str(e.get("peer")) for e in balanced.logs())


@pytest.fixture(scope="module")
def balanced_basic(lab: LabLayout, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """The same behind the balancer, with Basic authentication and a per-address throttle of two failures."""
    layout = dataclasses.replace(lab, balancer_subnet="127.0.0.1/32")
    text = runner.gateway_config(layout, gateway_port=free_port(), behind_balancer=True)
    text += '\n[authentication]\nmode = "basic"\nbasic_failures_per_address = 2\nbasic_failures_per_user = 1000\n'
    gw = start_gateway(lab, tmp_path_factory.mktemp("balanced-basic"), text)
    yield gw
    gw.stop()


def _basic(lab: LabLayout, gw: Gateway, device: str, user: str) -> int:
    """A wrong password for `user`, from `device` (as the balancer says); the status."""
    return _basic_from(lab, gw, v2_header(device, 40100), user)


def test_throttles_count_the_device_not_the_balancer(lab: LabLayout, balanced_basic: Gateway) -> None:
    """Wrong passwords from 203.0.113.5 get it throttled (429, logged with its address) while another device
    behind the same balancer still gets its own answer (401): the throttle counts devices, not the balancer."""
    balanced_basic.mark()
    statuses: list[int] = []
    while 429 not in statuses and len(statuses) < 10:
        statuses.append(_basic(lab, balanced_basic, "203.0.113.5", "bob@lab.test"))
    assert statuses[-1] == 429, statuses
    assert _basic(lab, balanced_basic, "203.0.113.6", "carol@lab.test") == 401
    balanced_basic.wait_for("authentication_throttled", lambda e: "from 203.0.113.5" in str(e.get("fix")))


def _refusals(admin: str) -> dict[str, float]:
    """`kcd_refusals_total{stage="proxy_protocol"}` by reason, scraped from /metrics."""
    with urllib.request.urlopen(admin + "/metrics", timeout=30) as r:  # noqa: S310  loopback
        text = r.read().decode()
    found = {}
    for line in text.splitlines():
        if line.startswith("kcd_refusals_total{") and 'stage="proxy_protocol"' in line:
            labels, _, value = line.rpartition(" ")
            found[labels.split('reason="', 1)[1].split('"', 1)[0]] = float(value)
    return found


def test_refused_proxy_headers_are_counted_by_reason(lab: LabLayout, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Each PROXY refusal, like a refused handshake, is counted in kcd_refusals_total{stage="proxy_protocol"} by
    a bounded reason: a connection from an untrusted address, a malformed header (a device's ClientHello, a
    request line), a connection that ends inside the header; the devices' addresses are never labels."""
    layout = dataclasses.replace(lab, balancer_subnet="127.0.0.1/32")
    admin_port = free_port()
    text = runner.gateway_config(layout, gateway_port=free_port(), behind_balancer=True)
    gw = start_gateway(lab, tmp_path_factory.mktemp("counted"), text + f'\n[admin]\nbind = "127.0.0.1:{admin_port}"\n')
    try:
        admin = f"http://{gw.admin}"
        before = _refusals(admin)
        gw.mark()
        with pytest.raises((ConnectionError, OSError)):
            through(lab, gw, v2_header("203.0.113.66", 40003), source="127.0.0.2")
        for garbage in (b"GET / HTTP/1.1\r\n\r\n", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"):
            with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as raw:
                raw.sendall(garbage)
                assert raw.recv(1) == b""  # closed, never answered
        with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as raw:
            raw.sendall(b"PROXY TCP4 198.51.100.9 ")
            raw.shutdown(socket.SHUT_WR)
            assert raw.recv(1) == b""
        deadline = time.monotonic() + WAIT
        want = {"untrusted_peer": 1.0, "malformed_header": 2.0, "incomplete_header": 1.0}

        def counted() -> dict[str, float]:
            after = _refusals(admin)
            return {reason: after[reason] - before.get(reason, 0.0) for reason in after}

        while (got := counted()) != want and time.monotonic() < deadline:
            time.sleep(0.2)
        assert got == want
        assert len(gw.wait_events("proxy_header_refused", 4)) == 4
    finally:
        gw.stop()


def test_a_reload_applies_trusted_proxies_both_ways(lab: LabLayout, tmp_path_factory: pytest.TempPathFactory) -> None:
    """SIGHUP with a new `trusted_proxies`: a balancer taken off the list is refused from the next connection
    (never still believed after a `reloaded` line), and one added is believed; before, the list read at start
    stayed in force while the log said the configuration was reloaded."""
    only_two = dataclasses.replace(lab, balancer_subnet="127.0.0.2/32")
    text = runner.gateway_config(only_two, gateway_port=free_port(), behind_balancer=True)
    gw = start_gateway(lab, tmp_path_factory.mktemp("reload-trust"), text)
    try:
        with pytest.raises((ConnectionError, OSError)):
            through(lab, gw, v2_header("203.0.113.21", 40021))  # from 127.0.0.1: not trusted yet
        gw.mark()
        gw.config_path.write_text(text.replace('"127.0.0.2/32"', '"127.0.0.1/32"'))
        gw.proc.send_signal(signal.SIGHUP)
        gw.wait_event("reloaded")
        status, echo = through(lab, gw, v2_header("203.0.113.22", 40022))
        assert (status, {k.lower(): v for k, v in echo["headers"].items()}["x-forwarded-for"]) == (200, "203.0.113.22")
        gw.mark()
        gw.config_path.write_text(text)  # 127.0.0.1 taken off the list again
        gw.proc.send_signal(signal.SIGHUP)
        gw.wait_event("reloaded")
        with pytest.raises((ConnectionError, OSError)):
            through(lab, gw, v2_header("203.0.113.23", 40023))
        gw.wait_for("proxy_header_refused", lambda e: str(e.get("peer", "")).startswith("127.0.0.1:"))
        assert not any(e.get("client") == "203.0.113.23" for e in gw.logs())
    finally:
        assert gw.stop() == 0


def test_a_balancer_taken_off_stays_refused_when_a_reload_turns_the_protocol_off(
    lab: LabLayout, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A balancer taken off `trusted_proxies` by one reload stays refused after a later reload that turns
    `proxy_protocol` off (a restart's business: the running gateway keeps reading PROXY headers, from the
    balancers last in force). Before, that reload brought back the list read at start, and with it the
    balancer taken off."""
    text = runner.gateway_config(lab, gateway_port=free_port(), behind_balancer=True)  # 127.0.0.1 believed
    balanced = f'proxy_protocol = true\ntrusted_proxies = ["{lab.balancer_subnet}"]\n'
    assert balanced in text
    gw = start_gateway(lab, tmp_path_factory.mktemp("reload-trust-off"), text)
    try:
        status, _ = through(lab, gw, v2_header("203.0.113.31", 40031))
        assert status == 200
        gw.mark()
        gw.config_path.write_text(text.replace(balanced, balanced.replace(lab.balancer_subnet, "127.0.0.2/32")))
        gw.proc.send_signal(signal.SIGHUP)
        gw.wait_event("reloaded")
        gw.mark()
        gw.config_path.write_text(text.replace(balanced, ""))  # the PROXY protocol off: needs a restart
        gw.proc.send_signal(signal.SIGHUP)
        gw.wait_for("reload_needs_restart", lambda e: e.get("key") == "listener.proxy_protocol")
        with pytest.raises((ConnectionError, OSError)):
            through(lab, gw, v2_header("203.0.113.32", 40032))  # from 127.0.0.1, taken off the list
        gw.wait_for("proxy_header_refused", lambda e: str(e.get("peer", "")).startswith("127.0.0.1:"))
        assert not any(e.get("client") == "203.0.113.32" for e in gw.logs())
    finally:
        assert gw.stop() == 0


def v2_header_ipv6(source: str, port: int) -> bytes:
    """A v2 header for a TCP connection over IPv6 from `source`."""
    body = socket.inet_pton(socket.AF_INET6, source) + socket.inet_pton(socket.AF_INET6, "2001:db8:ffff::1")
    body += struct.pack("!HH", port, 443)
    return V2_SIGNATURE + b"\x21\x21" + struct.pack("!H", len(body)) + body


def test_the_address_throttle_counts_an_ipv6_device_by_its_64_prefix(lab: LabLayout, balanced_basic: Gateway) -> None:
    """An IPv6 device holds a whole /64 (SLAAC, privacy addresses): wrong passwords from 2001:db8:5:6::1, ::2, ::3...
    (a sprayer stepping through its own prefix) share one address throttle (429 after two, the limit), while a
    device of another /64 still gets its own answer (401); an IPv4 address written IPv4-mapped is that address."""
    statuses = [
        _basic_from(lab, balanced_basic, v2_header_ipv6(f"2001:db8:5:6::{n:x}", 40200), "bob@lab.test")
        for n in range(1, 6)
    ]
    assert statuses[:2] == [401, 401]
    assert 429 in statuses, statuses
    assert _basic_from(lab, balanced_basic, v2_header_ipv6("2001:db8:5:7::1", 40201), "carol@lab.test") == 401
    # IPv4-mapped: 203.0.113.77 throttled as itself, whichever way the balancer writes it
    mapped = [
        _basic_from(lab, balanced_basic, v2_header_ipv6("::ffff:203.0.113.77", 40202), "bob@lab.test") for _ in range(2)
    ]
    assert mapped == [401, 401]
    assert _basic_from(lab, balanced_basic, v2_header("203.0.113.77", 40203), "bob@lab.test") == 429


def _basic_from(lab: LabLayout, gw: Gateway, header: bytes, user: str) -> int:
    """A wrong password for `user`, the connection opened with the PROXY `header`; the status."""
    raw = socket.create_connection(("127.0.0.1", gw.port), timeout=30)
    raw.sendall(header)
    credentials = base64.b64encode(f"{user}:not-the-password".encode()).decode()
    with client_context(lab, None).wrap_socket(raw, server_hostname="proxy.lab.test") as tls:
        tls.sendall(
            f"GET /EWS/Exchange.asmx HTTP/1.1\r\nHost: proxy.lab.test\r\nAuthorization: Basic {credentials}\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        response = http.client.HTTPResponse(tls)
        response.begin()
        response.read()
    return response.status


def test_the_per_address_cap_counts_the_device_behind_the_balancer(
    lab: LabLayout, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """max_connections_per_address = 1 behind the balancer: the PROXY header's address is counted, never the
    balancer's. Device 203.0.113.7 with one connection open (its TLS handshake done) gets its second reset
    right after the header, before TLS, logged under its address; 203.0.113.8, through the same balancer
    address, is served; a LOCAL health check is not counted."""
    layout = dataclasses.replace(lab, balancer_subnet="127.0.0.1/32")
    text = runner.gateway_config(layout, gateway_port=free_port(), behind_balancer=True)
    text = text.replace("[listener]\n", "[listener]\nmax_connections_per_address = 1\n", 1)
    gw = start_gateway(lab, tmp_path_factory.mktemp("capped"), text)
    try:
        gw.mark()
        raw = socket.create_connection(("127.0.0.1", gw.port), timeout=30)
        raw.sendall(v2_header("203.0.113.7", 40007))
        held = client_context(lab, "alice").wrap_socket(raw, server_hostname="proxy.lab.test")  # handshake done
        try:
            second = socket.create_connection(("127.0.0.1", gw.port), timeout=30)
            second.sendall(v2_header("203.0.113.7", 40008))
            with pytest.raises((ConnectionError, OSError)):
                client_context(lab, "alice").wrap_socket(second, server_hostname="proxy.lab.test").recv(1)
            event = gw.wait_event("address_connection_limit_reached")
            assert (event["address"], event["peer"], event["limit"]) == ("203.0.113.7", "203.0.113.7:40008", 1)
            with socket.create_connection(("127.0.0.1", gw.port), timeout=30) as health:
                health.sendall(V2_SIGNATURE + b"\x20\x00\x00\x00")  # LOCAL: the balancer's own check, no device
            status, answer = through(lab, gw, v2_header("203.0.113.8", 40009))
            assert status == 200, answer
            assert {k.lower(): v for k, v in answer["headers"].items()}["x-forwarded-for"] == "203.0.113.8"
            assert len(gw.events("address_connection_limit_reached", gw.since)) == 1
        finally:
            held.close()
    finally:
        gw.stop()


def _ssl_tlv_header(source: str, port: int) -> bytes:
    """A v2 header carrying PP2_TYPE_SSL (0x20) as a TLS-terminating balancer writes it: client 0x07 (TLS, a
    certificate on this connection and in its session), verify 0 (verified), CN "alice" (0x22) and version
    "TLSv1.3" (0x21); then a TLV whose length runs past the block (ignored: TLVs are not read)."""
    subtlvs = b"\x21" + struct.pack("!H", 7) + b"TLSv1.3" + b"\x22" + struct.pack("!H", 5) + b"alice"
    ssl_value = b"\x07" + struct.pack("!I", 0) + subtlvs
    tlvs = b"\x20" + struct.pack("!H", len(ssl_value)) + ssl_value + b"\x04" + struct.pack("!H", 200) + b"x"
    body = socket.inet_aton(source) + socket.inet_aton("127.0.0.1") + struct.pack("!HH", port, 443) + tlvs
    return V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", len(body)) + body


def _ask_without_a_certificate(lab: LabLayout, raw: socket.socket) -> bytes:
    """A request on `raw` over TLS without a client certificate; the answer's first byte."""
    with client_context(lab, None).wrap_socket(raw, server_hostname="proxy.lab.test") as tls:
        tls.sendall(b"GET /EWS/Exchange.asmx HTTP/1.1\r\nHost: proxy.lab.test\r\nConnection: close\r\n\r\n")
        return tls.recv(1)


def test_a_tlv_claiming_a_verified_client_certificate_is_never_one(lab: LabLayout, balanced: Gateway) -> None:
    """A v2 header whose SSL TLV says the balancer verified alice's client certificate (what a TLS-terminating
    balancer would send) is no certificate: the TLVs are never read, and the device's own handshake, without a
    certificate, is refused under the header's address; with alice's certificate it is served (the header itself,
    the TLV running past the block included, is sound)."""
    balanced.mark()
    raw = socket.create_connection(("127.0.0.1", balanced.port), timeout=30)
    raw.sendall(_ssl_tlv_header("203.0.113.90", 40090))
    with pytest.raises((ConnectionError, OSError)):  # the handshake's alert; an answer's first byte would fail here
        _ask_without_a_certificate(lab, raw)
    refused = balanced.wait_for("tls_handshake_refused", lambda e: str(e.get("peer", "")).startswith("203.0.113.90:"))
    assert refused["reason"] == "peer did not return a certificate"
    status, echo = through(lab, balanced, _ssl_tlv_header("203.0.113.91", 40091))
    assert (status, echo["principal"]) == (200, "alice@LAB.TEST")
    assert not any(e.get("client") == "203.0.113.90" for e in balanced.events("request", balanced.since))


def _one_segment(lab: LabLayout, port: int, header: bytes) -> dict[str, Any]:
    """alice's request on a connection whose first segment is `header` and the TLS ClientHello together (what a
    balancer that coalesces writes sends), the TLS driven on memory BIOs; the backend's echo."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = client_context(lab, "alice").wrap_bio(incoming, outgoing, server_hostname="proxy.lab.test")
    raw = socket.create_connection(("127.0.0.1", port), timeout=30)
    with raw:

        def pump() -> None:  # what TLS wrote goes out; then what the gateway sent next comes in
            if outgoing.pending:
                raw.sendall(outgoing.read())
            data = raw.recv(65536)
            incoming.write(data) if data else incoming.write_eof()

        with pytest.raises(ssl.SSLWantReadError):
            tls.do_handshake()
        raw.sendall(header + outgoing.read())  # one send: one segment on loopback
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                pump()
        tls.write(b"GET /EWS/Exchange.asmx HTTP/1.1\r\nHost: proxy.lab.test\r\nConnection: close\r\n\r\n")
        answer = b""
        while True:
            try:
                data = tls.read(65536)  # b"" once the gateway's close_notify came
            except ssl.SSLWantReadError:
                pump()
                continue
            if not data:
                break
            answer += data
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), head
    echo: dict[str, Any] = json.loads(body)
    return echo


@pytest.mark.parametrize("server", ["own", "aiohttp"])
def test_a_header_and_the_client_hello_in_one_segment(
    lab: LabLayout, tmp_path_factory: pytest.TempPathFactory, server: str
) -> None:
    """The header and the device's ClientHello in one TCP segment: the bytes after the header are the handshake's
    first (on both device-side servers). A v2 LOCAL header (the balancer's own connection) names no device: the
    connection's own address, the balancer's, is then the client (X-Forwarded-For 127.0.0.1)."""
    layout = dataclasses.replace(lab, balancer_subnet="127.0.0.1/32")
    text = runner.gateway_config(layout, gateway_port=free_port(), behind_balancer=True)
    with gateway_on_server(lab, tmp_path_factory.mktemp(f"one-segment-{server}"), server, text) as gw:
        proxied = _one_segment(lab, gw.port, v2_header("203.0.113.92", 40092))
        assert {k.lower(): v for k, v in proxied["headers"].items()}["x-forwarded-for"] == "203.0.113.92"
        local = _one_segment(lab, gw.port, V2_SIGNATURE + b"\x20\x00\x00\x00")
        assert {k.lower(): v for k, v in local["headers"].items()}["x-forwarded-for"] == "127.0.0.1"
        assert local["principal"] == "alice@LAB.TEST"


UNKNOWN_V1 = b"PROXY UNKNOWN\r\n"  # the balancer relays a connection whose addresses it does not know
UNSPEC_V2 = V2_SIGNATURE + b"\x21\x00\x00\x00"  # v2, PROXY, family UNSPEC, no addresses


def _status_through(lab: LabLayout, gw: Gateway, header: bytes) -> tuple[int, bytes]:
    """alice's request on a connection opened with `header`: the status and the body."""
    raw = socket.create_connection(("127.0.0.1", gw.port), timeout=30)
    raw.sendall(header)
    with client_context(lab, "alice").wrap_socket(raw, server_hostname="proxy.lab.test") as tls:
        tls.sendall(b"GET /EWS/Exchange.asmx HTTP/1.1\r\nHost: proxy.lab.test\r\nConnection: close\r\n\r\n")
        response = http.client.HTTPResponse(tls)
        response.begin()
        return response.status, response.read()


@pytest.mark.parametrize("header", [UNKNOWN_V1, UNSPEC_V2], ids=["v1-unknown", "v2-unspec"])
def test_a_header_that_names_no_device_serves_no_request(lab: LabLayout, balanced: Gateway, header: bytes) -> None:
    """A v1 UNKNOWN or v2 UNSPEC header relays a device the balancer cannot name: the request is refused (400, the
    reason naming the balancer's header) before any stage, logged and never forwarded. Before, it was served as the
    balancer's own address (X-Forwarded-For 127.0.0.1), which every such device shared."""
    balanced.mark()
    status, body = _status_through(lab, balanced, header)
    assert status == 400, body
    assert b"named no device" in body
    refused = balanced.wait_event("no_device_address")
    assert (refused["stage"], refused["level"]) == ("proxy_protocol", "warning")
    assert "v1 UNKNOWN, or v2 family UNSPEC" in str(refused["fix"])
    assert balanced.wait_event("request", status=400)["client"] == "unknown"
    status, _ = through(lab, balanced, v2_header("203.0.113.21", 40021))  # a device the balancer names is served
    assert status == 200


def test_devices_the_balancer_cannot_name_are_not_throttled_together(lab: LabLayout, balanced_basic: Gateway) -> None:
    """Wrong Basic passwords over v1 UNKNOWN headers are refused before the Basic stage (400, never 401 or 429), so
    they neither count against the balancer's address nor throttle other devices that come the same way. Before,
    they all counted as the balancer's address: after 2 (basic_failures_per_address) every such device got 429."""
    balanced_basic.mark()
    statuses = [_basic_from(lab, balanced_basic, UNKNOWN_V1, f"nobody{i}@lab.test") for i in range(4)]
    assert statuses == [400] * 4
    assert not balanced_basic.events("authentication_throttled", balanced_basic.since)
    assert _basic(lab, balanced_basic, "203.0.113.22", "carol@lab.test") == 401  # a named device: its own answer


def test_a_device_behind_the_balancer_that_sends_no_request_is_logged_by_its_own_address(
    lab: LabLayout, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """review61: a device that completes TLS behind a PROXY header (v1) and then sends nothing is logged at
    keepalive_timeout as `device_sent_no_request` naming the address the header gave (the device's), not the
    balancer's, and nothing the device sent."""
    layout = dataclasses.replace(lab, balancer_subnet="127.0.0.1/32")
    text = runner.gateway_config(layout, gateway_port=free_port(), behind_balancer=True)
    text = text.replace("[listener]\n", "[listener]\nkeepalive_timeout = 2\n", 1)
    gw = start_gateway(lab, tmp_path_factory.mktemp("idle-balanced"), text)
    try:
        raw = socket.create_connection(("127.0.0.1", gw.port), timeout=30)
        balancer = f"127.0.0.1:{raw.getsockname()[1]}"
        raw.sendall(b"PROXY TCP4 198.51.100.23 127.0.0.1 40023 443\r\n")
        with client_context(lab, "alice").wrap_socket(raw, server_hostname="proxy.lab.test") as tls:
            assert tls.recv(1) == b""  # closed by the gateway at keepalive_timeout, no answer
        line = gw.wait_event("device_sent_no_request", peer="198.51.100.23:40023")
        assert line["level"] == "info", line
        assert not [e for e in gw.logs() if balancer in json.dumps(e)], balancer
    finally:
        gw.stop()
