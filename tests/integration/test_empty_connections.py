"""Connections that end before their first byte (health checks, scans), flooded at a real gateway over raw sockets.

HAProxy's health checks connect and end with a reset, often before the gateway has accepted the connection: the
kernel then no longer knows who it was. A flood of them is bounded by `listener.max_connections` (each takes a slot
from accept to close); the gateway counts them in `kcd_listener_empty_connections_total`, logs each at debug level
only, and counts none as a refusal. Both ways in: TLS directly, and behind the PROXY protocol.
"""

from __future__ import annotations

import dataclasses
import socket
import struct
import time
import urllib.request
from pathlib import Path

import pytest

from proxy.lab import runner
from proxy.lab.layout import LabLayout
from tests.integration.conftest import Gateway, free_port, start_gateway
from tests.integration.jsonlog import WAIT
from tests.integration.test_proxy_protocol import v2_header

FLOOD = 40
CLIENT_HELLO_START = b"\x16\x03\x01\x02\x00\x01"  # a TLS record header and the first byte of a ClientHello


def _gateway(lab: LabLayout, directory: Path, admin_port: int, *, balanced: bool) -> Gateway:
    layout = dataclasses.replace(lab, balancer_subnet="127.0.0.1/32")
    text = runner.gateway_config(layout, gateway_port=free_port(), behind_balancer=balanced)
    text = text.replace("[listener]\n", "[listener]\nmax_connections = 2\n", 1)
    text += f'\n[admin]\nbind = "127.0.0.1:{admin_port}"\n'
    return start_gateway(lab, directory, text)


def _reset(sock: socket.socket) -> None:
    """Close with a reset (SO_LINGER 0), as HAProxy ends a health check."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def _metrics(gw: Gateway) -> dict[str, float]:
    with urllib.request.urlopen(f"http://{gw.admin}/metrics", timeout=30) as r:
        text = r.read().decode()
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def _refusals(metrics: dict[str, float]) -> float:
    return sum(v for k, v in metrics.items() if k.startswith("kcd_refusals_total"))


def _empty(gw: Gateway, at_least: int) -> float:
    """`kcd_listener_empty_connections_total` once it reaches `at_least` (polled), or what it is at the deadline."""
    deadline = time.monotonic() + WAIT
    while True:
        value = _metrics(gw).get("kcd_listener_empty_connections_total", -1.0)
        if value >= at_least or time.monotonic() > deadline:
            return value
        time.sleep(0.1)


@pytest.mark.parametrize("balanced", [False, True], ids=["tls", "proxy-protocol"])
def test_a_flood_of_connections_reset_before_and_after_accept_is_counted_not_refused(
    lab: LabLayout, tmp_path: Path, balanced: bool
) -> None:
    """max_connections = 2, both held by handshakes begun; 40 connections reset while they wait in the backlog
    (never accepted before their reset), then 40 more reset one by one on an idle listener (accepted first, mostly):
    all 80 are counted in kcd_listener_empty_connections_total, none as a refusal, none logged above debug."""
    admin_port = free_port()
    gw = _gateway(lab, tmp_path, admin_port, balanced=balanced)
    try:
        before = _metrics(gw)
        line = gw.mark()
        opening = v2_header("203.0.113.7", 40001) if balanced else b""
        holders = [socket.create_connection(("127.0.0.1", gw.port), timeout=30) for _ in range(2)]
        for holder in holders:
            holder.sendall(opening + CLIENT_HELLO_START)  # a handshake begun: not an empty connection
        time.sleep(0.5)  # both are accepted and in their handshake (nothing observable waits here)
        flood = [socket.create_connection(("127.0.0.1", gw.port), timeout=30) for _ in range(FLOOD)]
        for sock in flood:
            _reset(sock)  # in the backlog: the listener is at max_connections
        for holder in holders:
            holder.close()  # the flood is accepted now, already reset
        assert _empty(gw, FLOOD) == FLOOD
        for _ in range(FLOOD):
            sock = socket.create_connection(("127.0.0.1", gw.port), timeout=30)
            time.sleep(0.01)
            _reset(sock)
        assert _empty(gw, 2 * FLOOD) == 2 * FLOOD
        after = _metrics(gw)
        assert _refusals(after) == _refusals(before)
        logged = [e for e in gw.logs()[line:] if e.get("level") not in ("debug", None)]
        noisy = [e for e in logged if e.get("event") not in ("tls_handshake_abandoned", "connection_limit_reached")]
        assert noisy == [], noisy
        assert len([e for e in logged if e.get("event") == "tls_handshake_abandoned"]) <= 2  # the holders
    finally:
        gw.stop()
