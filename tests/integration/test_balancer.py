"""Two gateways behind a real TCP balancer (Debian's HAProxy, `send-proxy-v2`), driven by curl, on the host.

The compose test runs the same shape in containers; this one runs on every `make test` in seconds. HAProxy
listens on 127.0.0.1 and connects to the gateways from 127.0.0.1, the only address they trust for PROXY
headers (`[listener] proxy_protocol = true`, `trusted_proxies = ["127.0.0.1/32"]`). The device is curl bound
to 127.0.0.3, so the address the gateways and the backend see tells whether the header was believed: the
device's (127.0.0.3) through the balancer, never the balancer's own.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import http.client
import io
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.lab import runner
from proxy.lab.layout import LabLayout
from tests.integration.conftest import (
    REPO,
    Gateway,
    accept_queue,
    client_context,
    curl,
    dead_port,
    free_port,
    lab_config,
    metric,
    start_gateway,
    wait_port,
)
from tests.integration.jsonlog import eventually
from tests.integration.test_proxy_protocol import v2_header

DEVICE = "127.0.0.3"  # curl's source address: loopback, but not a balancer


@dataclasses.dataclass
class Balanced:
    port: int  # the balancer's, where devices connect
    gateways: tuple[Gateway, Gateway]
    stats: Path  # HAProxy's stats socket


def _haproxy_config(
    port: int, gateways: tuple[Gateway, ...], stats: Path, check: str = "check check-send-proxy inter 500ms"
) -> str:
    """TCP mode (TLS ends on the gateways), round robin, PROXY v2 on every connection and on the health
    checks (HAProxy sends those as v2 LOCAL, which names no device); `check` is each server's health check."""
    servers = "\n".join(
        f"    server gw{i} 127.0.0.1:{gw.port} send-proxy-v2 {check}" for i, gw in enumerate(gateways, 1)
    )
    return f"""global
    log stdout format raw local0 info
    stats socket {stats} level user

defaults
    mode tcp
    log global
    option tcplog
    timeout connect 5s
    timeout client 60s
    timeout server 60s

frontend devices
    bind 127.0.0.1:{port}
    default_backend gateways

backend gateways
    balance roundrobin
{servers}
"""


@pytest.fixture(scope="module")
def balanced(lab: LabLayout, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Balanced]:
    """Two gateways that believe PROXY headers from 127.0.0.1 only, and HAProxy in front of them."""
    layout = dataclasses.replace(lab, balancer_subnet="127.0.0.1/32")
    gateways: list[Gateway] = []
    try:
        for name in ("gw1", "gw2"):
            text = runner.gateway_config(layout, gateway_port=free_port(), behind_balancer=True)
            text += f'\n[admin]\nbind = "127.0.0.1:{free_port()}"\n'
            gateways.append(start_gateway(lab, tmp_path_factory.mktemp(name), text))
        pair = (gateways[0], gateways[1])
        port = free_port()
        directory = tmp_path_factory.mktemp("haproxy")
        stats = directory / "stats.sock"
        with _haproxy(directory, port, _haproxy_config(port, pair, stats)):
            yield Balanced(port, pair, stats)
    finally:
        for gw in gateways:
            gw.stop()


@contextlib.contextmanager
def _haproxy(directory: Path, port: int, config: str) -> Iterator[None]:
    """HAProxy (`haproxy -db`) run with `config`, checked first, once it listens on `port`; stopped at the end."""
    cfg = directory / "haproxy.cfg"
    cfg.write_text(config)
    check = subprocess.run(["haproxy", "-c", "-f", str(cfg)], capture_output=True, text=True, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    with (directory / "haproxy.log").open("wb") as out:
        proc = subprocess.Popen(["haproxy", "-db", "-f", str(cfg)], stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_port(port, proc)
        yield
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _through(lab: LabLayout, balanced: Balanced, user: str, path: str = "/EWS/Exchange.asmx") -> tuple[str, str]:
    """One request from the device through the balancer (a new connection each time) for `path`: status and body."""
    url = f"https://127.0.0.1:{balanced.port}{path}"
    done = curl(lab, url, user, "--interface", DEVICE)
    body, _, status = done.stdout.rpartition("\n")
    return status, body + done.stderr


def test_both_gateways_serve_the_device_under_its_own_address(lab: LabLayout, balanced: Balanced) -> None:
    """Six connections through HAProxy: every one is served as alice, both gateways take some, each logs the
    device's address (not the balancer's) as the client, and the backend's X-Forwarded-For names the device."""
    path = "/EWS/six-through-the-balancer"  # this test's: another's last line (alice, the device) can follow a mark

    def lines(gw: Gateway) -> list[dict[str, object]]:
        return [e for e in gw.events("request", gw.since) if e.get("path") == path]

    for gw in balanced.gateways:
        gw.mark()
    for _ in range(6):
        status, body = _through(lab, balanced, "alice", path)
        assert status == "200", body
        echo = json.loads(body)
        assert echo["principal"] == "alice@LAB.TEST"
        assert {k.lower(): v for k, v in echo["headers"].items()}["x-forwarded-for"] == DEVICE
    eventually(lambda: sum(len(lines(gw)) for gw in balanced.gateways) == 6, "six request lines")
    served = [len(lines(gw)) for gw in balanced.gateways]
    assert all(n > 0 for n in served), served
    for gw in balanced.gateways:
        assert {(e.get("client"), e.get("status")) for e in lines(gw)} == {(DEVICE, 200)}
        assert {t["client"] for t in _traces(gw) if t.get("path") == path} == {DEVICE}


def _traces(gw: Gateway) -> list[dict[str, object]]:
    """The gateway's recent traces, from its admin listener (`[admin] bind`)."""
    with urllib.request.urlopen(f"http://{gw.admin}/traces?limit=50", timeout=30) as r:
        traces: list[dict[str, object]] = json.loads(r.read())
    return traces


def test_a_refused_certificate_through_the_balancer_is_refused_under_the_devices_address(
    lab: LabLayout, balanced: Balanced
) -> None:
    """A revoked certificate through HAProxy: 403 from whichever gateway took it, logged with the device's
    address, never the balancer's."""
    for gw in balanced.gateways:
        gw.mark()
    status, body = _through(lab, balanced, "revoked")
    assert status == "403", body

    def refusal() -> dict[str, object] | None:
        lines = [e for gw in balanced.gateways for e in gw.events("request", gw.since)]
        return lines[0] if lines else None

    line = eventually(refusal, "the revoked certificate's request line")
    assert (line.get("client"), line.get("status")) == (DEVICE, 403)


def test_the_device_going_around_the_balancer_is_refused_and_health_checks_are_not(
    lab: LabLayout, balanced: Balanced
) -> None:
    """curl straight to a gateway from the device's address: closed before TLS (untrusted peer). HAProxy's own
    health checks (PROXY v2 LOCAL, every 500 ms) are never counted as refusals."""
    gw = balanced.gateways[0]
    gw.mark()
    done = curl(lab, f"https://127.0.0.1:{gw.port}/EWS/Exchange.asmx", "alice", "--interface", DEVICE)
    assert done.returncode != 0, done.stdout
    refused = gw.wait_for("proxy_header_refused", lambda e: str(e.get("peer", "")).startswith(f"{DEVICE}:"))
    assert "trusted_proxies" in str(refused.get("reason"))
    # HAProxy checked both gateways (its stats say L4OK) all along, from 127.0.0.1: none of that was refused.
    eventually(lambda: _check_status(balanced.stats) == {"gw1": "L4OK", "gw2": "L4OK"}, "both health checks passing")
    for each in balanced.gateways:
        assert [e for e in each.events("proxy_header_refused") if not str(e["peer"]).startswith(DEVICE)] == []


def _check_status(stats: Path) -> dict[str, str]:
    """Each server's last health-check status, from HAProxy's stats socket `stats` (`show stat`, CSV)."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(str(stats))
        sock.sendall(b"show stat\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    rows = list(csv.reader(io.StringIO(data.decode().lstrip("# "))))
    header = rows[0]
    return {
        row[header.index("svname")]: row[header.index("check_status")]
        for row in rows[1:]
        if len(row) == len(header) and row[header.index("svname")].startswith("gw")
    }


@pytest.mark.parametrize("server", ["own", "aiohttp"])
def test_a_balancers_tls_health_check_without_a_certificate_is_no_refusal(
    lab: LabLayout, tmp_path_factory: pytest.TempPathFactory, server: str
) -> None:
    """HAProxy's `check-ssl` check (`check-send-proxy`: a PROXY v2 LOCAL header, then a TLS handshake without a
    client certificate; every 200 ms here, 2 s by default) is the balancer's own connection: each one is logged at
    debug level (`tls_handshake_refused`, `health_check`) and counted in `kcd_listener_health_checks_total`, never a
    warning nor in `kcd_refusals_total` (it was both, each check: a log filled with refusals naming the balancer and
    a refusal rate no alert could use). A device without a certificate through the same balancer is still refused,
    logged at warning level under its own address and counted. On both device-side servers (`listener.http_server`),
    whose handshakes are driven apart."""
    layout = dataclasses.replace(lab, balancer_subnet="127.0.0.1/32")
    admin = free_port()
    text = runner.gateway_config(layout, gateway_port=free_port(), behind_balancer=True)
    text = text.replace("[listener]\n", f'[listener]\nhttp_server = "{server}"\n', 1)
    text += f'\n[admin]\nbind = "127.0.0.1:{admin}"\n'
    gw = start_gateway(lab, tmp_path_factory.mktemp("tls-check"), text, args=("--log-level", "debug"))
    try:
        gw.wait_for("listening", lambda e: e.get("http_server") == server, what=server)
        directory = tmp_path_factory.mktemp("haproxy-tls-check")
        port = free_port()
        check = "check check-ssl verify none check-send-proxy inter 200ms"
        with _haproxy(directory, port, _haproxy_config(port, (gw,), directory / "stats.sock", check)):

            def checks() -> list[dict[str, object]]:
                lines = gw.events("tls_handshake_refused")
                return [e for e in lines if str(e.get("peer", "")).startswith("127.0.0.1:")]

            eventually(lambda: len(checks()) >= 3, "three of HAProxy's TLS health checks")
            assert {(e["level"], e.get("health_check")) for e in checks()} == {("debug", True)}
            gw.mark()
            done = curl(lab, f"https://127.0.0.1:{port}/EWS/Exchange.asmx", None, "--interface", DEVICE)
            assert done.returncode != 0, done.stdout
            device = gw.wait_for("tls_handshake_refused", lambda e: str(e.get("peer", "")).startswith(f"{DEVICE}:"))
            assert (device["level"], device.get("health_check")) == ("warning", None)
            # the device sends a LOCAL header of its own, then a handshake without a certificate: the gateway reads
            # the balancer's header only, so the device's is TLS that is not TLS, a warning under its address
            gw.mark()
            _own_local_header_then_tls(port)
            local = gw.wait_for("tls_handshake_refused", lambda e: str(e.get("peer", "")).startswith(f"{DEVICE}:"))
            assert (local["level"], local.get("health_check")) == ("warning", None)
        counted = _metrics(f"http://127.0.0.1:{admin}")
        assert counted.get('kcd_refusals_total{reason="peer did not return a certificate",stage="tls"}') == 1.0
        assert counted["kcd_listener_health_checks_total"] >= 3
    finally:
        assert gw.stop() == 0


def _own_local_header_then_tls(port: int) -> None:
    """From the device's address through the balancer at `port`: a PROXY v2 LOCAL header, then a TLS handshake
    without a client certificate (what a balancer's check sends, but from a device)."""
    local = b"\r\n\r\n\x00\r\nQUIT\n" + b"\x20\x00\x00\x00"  # v2, LOCAL, UNSPEC, no addresses
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=30, source_address=(DEVICE, 0)) as raw:
        raw.sendall(local)
        with contextlib.suppress(ssl.SSLError, OSError), context.wrap_socket(raw, server_hostname="proxy.lab.test"):
            pass


def _metrics(admin: str) -> dict[str, float]:
    """Every sample of the gateway's /metrics, by its name and labels."""
    with urllib.request.urlopen(admin + "/metrics", timeout=30) as r:  # noqa: S310  loopback
        lines = r.read().decode().splitlines()
    return {line.rpartition(" ")[0]: float(line.rpartition(" ")[2]) for line in lines if not line.startswith("#")}


def test_the_shipped_balancer_configuration_serves_every_device_while_a_gateway_is_down(
    lab: LabLayout, balanced: Balanced, tmp_path: Path
) -> None:
    """`deploy/balancer/haproxy.cfg` as shipped, its two servers pointed at a running gateway and at a port where
    no gateway listens (one that died, or is restarting): every device connection is served, by the running one.
    The file had no health check and no redispatch: HAProxy kept sending every other device to the dead gateway,
    retried there and gave up, so half the devices' connections were closed until it came back."""
    shipped = (REPO / "deploy" / "balancer" / "haproxy.cfg").read_text()
    port = free_port()
    config = shipped.replace("bind :8443", f"bind 127.0.0.1:{port}")
    config = config.replace("gateway-1:8443", f"127.0.0.1:{balanced.gateways[0].port}")
    config = config.replace("gateway-2:8443", f"127.0.0.1:{dead_port()}")
    assert config.count("127.0.0.1:") == 3, config
    with _haproxy(tmp_path, port, config):
        statuses = []
        for _ in range(6):
            done = curl(lab, f"https://127.0.0.1:{port}/EWS/Exchange.asmx", "alice", "--interface", DEVICE)
            statuses.append(done.stdout.rpartition("\n")[2])
    assert statuses == ["200"] * 6, statuses


def test_a_gateway_stopped_under_traffic_through_the_shipped_balancer_configuration_fails_no_device(
    lab: LabLayout, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """`deploy/balancer/haproxy.cfg` as shipped in front of two gateways, four devices sending requests the backend
    holds 0.4 s each: SIGTERM to the second gateway while it holds a request (a rolling restart) fails no device. The
    requests it holds are answered before it exits (its drain); the connections HAProxy opens to it after its listener
    closed are refused and sent to the first one (`retries`, `option redispatch`). Before the drain, the requests it
    held were cut: curl got an empty reply."""
    layout = dataclasses.replace(lab, balancer_subnet="127.0.0.1/32")
    gateways: list[Gateway] = []
    admins: list[str] = []
    try:
        for name in ("one", "two"):
            admin = f"127.0.0.1:{free_port()}"
            text = runner.gateway_config(layout, gateway_port=free_port(), behind_balancer=True)
            gateways.append(
                start_gateway(lab, tmp_path_factory.mktemp(f"stop-{name}"), text + f'\n[admin]\nbind = "{admin}"\n')
            )
            admins.append(f"http://{gateways[-1].admin}")  # moved if its port was taken meanwhile
        port = free_port()
        shipped = (REPO / "deploy" / "balancer" / "haproxy.cfg").read_text()
        config = shipped.replace("bind :8443", f"bind 127.0.0.1:{port}")
        config = config.replace("gateway-1:8443", f"127.0.0.1:{gateways[0].port}")
        config = config.replace("gateway-2:8443", f"127.0.0.1:{gateways[1].port}")
        statuses: list[str] = []
        done = threading.Event()

        def device() -> None:
            while not done.is_set():
                answer = curl(
                    lab, f"https://127.0.0.1:{port}/EWS/Exchange.asmx?hold=0.4", "alice", "--interface", DEVICE
                )
                statuses.append(answer.stdout.rpartition("\n")[2] + answer.stderr)

        with _haproxy(tmp_path_factory.mktemp("haproxy-stop"), port, config):
            devices = [threading.Thread(target=device, daemon=True) for _ in range(4)]
            for thread in devices:
                thread.start()
            eventually(lambda: metric(admins[1], "kcd_requests_in_flight") >= 1, "a request held by the second gateway")
            gateways[1].proc.send_signal(signal.SIGTERM)
            assert gateways[1].proc.wait(timeout=60) == 0
            after = len(statuses)
            eventually(lambda: len(statuses) >= after + 8, "eight requests after the stop")
            done.set()
            for thread in devices:
                thread.join(timeout=90)
        assert statuses
        assert set(statuses) == {"200"}, statuses
        held = [e for e in gateways[1].events("request") if e.get("status") != 200]
        assert held == []  # it logged no request as cut (499)
    finally:
        for gw in gateways:
            gw.stop()


def _documented_readyz_check(port: int, gateways: list[tuple[Gateway, int]], stats: Path, tls: Path | None) -> str:
    """HAProxy's configuration: the shipped file's global, defaults and frontend (`bind` on `port`, a stats socket
    added), then docs/deploying.md's `/readyz` backend block as written, its servers pointed at `gateways` (each
    device port, admin port) and, with `tls` (a directory holding HAProxy's `readyz-client.pem` and the admin
    listener's `admin-ca.pem`), its files there; without, `check-ssl` up to `inter` left out as the doc says."""
    shipped = (REPO / "deploy" / "balancer" / "haproxy.cfg").read_text()
    head = shipped.split("\nbackend gateways", 1)[0].replace("bind :8443", f"bind 127.0.0.1:{port}") + "\n\n"
    head = head.replace("global\n", f"global\n    stats socket {stats} level user\n", 1)
    doc = (REPO / "docs" / "deploying.md").read_text().split("<!-- haproxy: readyz -->\n```\n", 1)[1]
    block = doc.split("```", 1)[0]
    lines = []
    for line in block.splitlines():
        if line.strip().startswith("server gw"):
            number = int(line.split()[1].removeprefix("gw"))
            gw, admin = gateways[number - 1]
            line = line.replace(f"10.0.1.1{number}:8443", f"127.0.0.1:{gw.port}").replace("port 9443", f"port {admin}")
            if tls is None:
                line = line.split(" check-ssl ", 1)[0] + " inter" + line.split(" inter", 1)[1]
            else:
                line = line.replace("/etc/haproxy/", f"{tls}/")
        lines.append(line)
    return head + "\n".join(lines) + "\n"


def _admin_in_flight(admin: str, context: ssl.SSLContext | None) -> float:
    """`kcd_requests_in_flight` on the admin listener at URL `admin` (TLS with `context`'s client certificate)."""
    with urllib.request.urlopen(admin + "/metrics", timeout=30, context=context) as r:  # noqa: S310  loopback
        text = r.read().decode()
    return sum(
        float(line.rpartition(" ")[2]) for line in text.splitlines() if line.startswith("kcd_requests_in_flight ")
    )


def _held_through_header(lab: LabLayout, gw: Gateway) -> threading.Thread:
    """A Ping the backend holds 60 s, sent to `gw` the way the balancer passes one on (a PROXY v2 header from
    127.0.0.1), in a thread; it ends when the gateway answers or cuts it."""

    def run() -> None:
        with contextlib.suppress(OSError, http.client.HTTPException):
            raw = socket.create_connection(("127.0.0.1", gw.port), timeout=120)
            raw.sendall(v2_header("203.0.113.82", 40082))
            with client_context(lab, "alice").wrap_socket(raw, server_hostname="proxy.lab.test") as tls:
                tls.sendall(
                    b"GET /Microsoft-Server-ActiveSync?Cmd=Ping&hold=60 HTTP/1.1\r\nHost: proxy.lab.test\r\n\r\n"
                )
                http.client.HTTPResponse(tls).begin()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("admin_tls", [False, True], ids=["loopback", "tls"])
def test_the_documented_readyz_check_takes_a_draining_gateway_out_and_devices_go_to_the_other(
    lab: LabLayout, tmp_path_factory: pytest.TempPathFactory, admin_tls: bool
) -> None:
    """docs/deploying.md's HAProxy block that checks `/readyz` (on the admin port, plain on loopback or with TLS and
    HAProxy's own client certificate in the gateways' allow-list), as written: both gateways pass (`L7OK`); the
    second one gets SIGTERM while it holds a Ping, and HAProxy marks it down on its 503 (`L7STS`, its drain still
    under way: not a refused connect), while every device is served by the first one."""
    layout = dataclasses.replace(lab, balancer_subnet="127.0.0.1/32")
    files = tmp_path_factory.mktemp("readyz-check")
    p = lab.pki_dir
    context = None
    admin_table = ""
    if admin_tls:  # HAProxy's client certificate is bob's (a lab certificate the allow-list names); alice's is refused
        (files / "readyz-client.pem").write_bytes(
            (p / "users" / "bob.pem").read_bytes() + (p / "users" / "bob.key").read_bytes()
        )
        (files / "admin-ca.pem").write_bytes((p / "root.pem").read_bytes())
        (files / "client-ca.pem").write_bytes((p / "root.pem").read_bytes() + (p / "issuing.pem").read_bytes())
        admin_table = (
            f'certificate = "{p / "server-chain.pem"}"\nprivate_key = "{p / "server.key"}"\n'
            f'client_ca = "{files / "client-ca.pem"}"\nallowed_clients = ["CN=bob"]\n'
        )
        context = client_context(lab, "bob")
        context.check_hostname = False
    gateways: list[tuple[Gateway, int]] = []
    try:
        for name in ("one", "two"):
            admin = free_port()
            text = runner.gateway_config(layout, gateway_port=free_port(), behind_balancer=True)
            text = text.replace("[listener]\n", "[listener]\ndrain_timeout = 30\n", 1)
            text += f'\n[admin]\nbind = "127.0.0.1:{admin}"\n{admin_table}'
            gateways.append((start_gateway(lab, tmp_path_factory.mktemp(f"readyz-{name}"), text), admin))
        port = free_port()
        stats = files / "stats.sock"
        config = _documented_readyz_check(port, gateways, stats, files if admin_tls else None)
        scheme = "https" if admin_tls else "http"
        with _haproxy(files, port, config):
            eventually(lambda: _check_status(stats) == {"gw1": "L7OK", "gw2": "L7OK"}, "both gateways ready")
            second, second_admin = gateways[1]
            held = _held_through_header(lab, second)
            eventually(lambda: _admin_in_flight(f"{scheme}://127.0.0.1:{second_admin}", context) >= 1, "the held Ping")
            second.proc.send_signal(signal.SIGTERM)
            eventually(lambda: _check_status(stats).get("gw2") == "L7STS", "gw2 taken out on its /readyz 503")
            assert second.proc.poll() is None  # still draining: the 503 took it out, not a refused connect
            statuses = [_through(lab, Balanced(port, (gateways[0][0], second), stats), "alice")[0] for _ in range(4)]
            assert statuses == ["200"] * 4
            assert held.is_alive()
    finally:
        for gw, _ in gateways:
            gw.proc.kill()
            gw.proc.wait()


@pytest.mark.parametrize("sessions", ["stateful", "stateless"])
@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3], ids=["tls1.2", "tls1.3"])
def test_a_session_made_on_one_gateway_is_not_resumed_on_the_other(
    lab: LabLayout, tmp_path_factory: pytest.TempPathFactory, sessions: str, version: ssl.TLSVersion
) -> None:
    """The gateways share no TLS session state: a session alice's device made on gateway 1 resumes there, and on
    gateway 2 (the balancer's next pick) it is a full handshake, served; with stateful tickets (the default) and
    with stateless ones (`tls_session_cache = 0`, whose ticket keys OpenSSL draws per process). So a CA one gateway
    stopped trusting, or a session it never judged, is never carried in by another gateway's session."""
    layout = dataclasses.replace(lab, balancer_subnet="127.0.0.1/32")
    extra = "[listener]\ntls_session_cache = 0\n" if sessions == "stateless" else "[listener]\n"
    gateways = []
    try:
        for name in ("one", "two"):
            text = runner.gateway_config(layout, gateway_port=free_port(), behind_balancer=True)
            text = text.replace("[listener]\n", extra, 1)
            gateways.append(start_gateway(lab, tmp_path_factory.mktemp(f"sessions-{name}"), text))
        ctx = client_context(lab, "alice")
        ctx.minimum_version = ctx.maximum_version = version

        def request(gw: Gateway, session: ssl.SSLSession | None) -> tuple[int, ssl.SSLSession | None, bool | None]:
            raw = socket.create_connection(("127.0.0.1", gw.port), timeout=30)
            raw.sendall(v2_header("203.0.113.80", 40080))
            with ctx.wrap_socket(raw, server_hostname="proxy.lab.test", session=session) as tls:
                tls.sendall(b"GET /EWS/Exchange.asmx HTTP/1.1\r\nHost: proxy.lab.test\r\nConnection: close\r\n\r\n")
                response = http.client.HTTPResponse(tls)  # read to the gateway's close_notify: the session is kept
                response.begin()
                response.read()
                return response.status, tls.session, tls.session_reused

        status, session, _ = request(gateways[0], None)
        assert status == 200
        assert request(gateways[0], session)[::2] == (200, True)  # the device does offer it, and gateway 1 takes it
        assert request(gateways[1], session)[::2] == (200, False)
    finally:
        for gw in gateways:
            assert gw.stop() == 0


def test_two_gateways_tokens_for_one_user_at_once_are_both_accepted(lab: LabLayout, balanced: Balanced) -> None:
    """Both gateways (one keytab, one service principal) send alice's delegated token to the backend at the same
    moment, five times: every request is served. Each token has its own authenticator (the time to the
    microsecond, a random subkey and sequence number), and the lab backend's MIT acceptor, whose replay cache
    (file2) records a hash of each authenticator, takes both; a replay of either would be refused
    (test_ap_req.py). What Windows' replay cache does differently is in docs/deploying.md, "Several gateways"."""
    for gw in balanced.gateways:
        gw.mark()
    ctx = client_context(lab, "alice")
    for round_ in range(5):
        start = threading.Barrier(2)
        statuses: dict[int, int] = {}

        def one(i: int, gw: Gateway, start: threading.Barrier, statuses: dict[int, int]) -> None:
            raw = socket.create_connection(("127.0.0.1", gw.port), timeout=30)
            raw.sendall(v2_header("203.0.113.81", 40081 + i))
            with ctx.wrap_socket(raw, server_hostname="proxy.lab.test") as tls:
                start.wait(timeout=30)  # both handshakes done: the two requests leave together
                tls.sendall(b"GET /EWS/Exchange.asmx HTTP/1.1\r\nHost: proxy.lab.test\r\nConnection: close\r\n\r\n")
                response = http.client.HTTPResponse(tls)
                response.begin()
                response.read()
                statuses[i] = response.status

        threads = [
            threading.Thread(target=one, args=(i, gw, start, statuses)) for i, gw in enumerate(balanced.gateways)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=90)
        assert statuses == {0: 200, 1: 200}, (round_, statuses)
    for gw in balanced.gateways:
        lines = gw.wait_events("request", 5)
        assert {(e.get("principal"), e.get("status")) for e in lines} == {("alice@LAB.TEST", 200)}


def test_the_walk_throughs_revoke_command_is_refused_by_a_gateway_reading_the_labs_crl(
    lab: LabLayout, tmp_path: Path
) -> None:
    """docs/deploying.md's "Revoking a certificate behind both gateways" command, run as written from a directory
    holding a copy of the lab's PKI as `.lab/pki`: a gateway reading that `crls.pem` every second served alice's second
    device before it and refuses it (403, "was revoked") after. The walk-through said only "revoke a certificate",
    and the lab has no command for it (its CA is not `openssl ca`'s)."""
    doc = (REPO / "docs" / "deploying.md").read_text().split("<!-- lab: revoke -->\n```sh\n", 1)[1]
    command = doc.split("```", 1)[0].replace(".venv/bin/python", sys.executable, 1)
    shutil.copytree(lab.pki_dir, tmp_path / ".lab" / "pki")
    crls = tmp_path / ".lab" / "pki" / "crls.pem"
    config = lab_config(lab, port=free_port()).replace(f'"{lab.pki_dir / "crls.pem"}"', f'"{crls}"')
    assert f'"{crls}"' in config
    config = config.replace('revocation = "require"\n', 'revocation = "require"\ncrl_refresh_seconds = 1\n')
    gw = start_gateway(lab, tmp_path / "gw", config)
    try:
        assert (
            curl(lab, gw.url + "/EWS/Exchange.asmx", "alice-phone", "-o", "/dev/null", "-w", "%{http_code}").stdout
            == "200"
        )
        subprocess.run(["sh", "-c", command], cwd=tmp_path, check=True, capture_output=True, timeout=60)

        def refused() -> str | None:
            done = curl(lab, gw.url + "/EWS/Exchange.asmx", "alice-phone")
            return done.stdout if "was revoked" in done.stdout else None

        assert "certificate serial 0x" in eventually(refused, "alice-phone refused as revoked")
    finally:
        gw.stop()


@pytest.mark.slow(seconds=20)  # 4-8 s quiet, 33-40 s with six CPU burners on the two cores
def test_connections_the_balancer_opened_to_a_stopping_gateway_are_served_by_it(
    lab: LabLayout, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """`deploy/balancer/haproxy.cfg` as shipped in front of two gateways of two workers each; the second gateway's
    workers are held (SIGSTOP) while six devices connect through the balancer, so the three connections HAProxy gave it
    wait in its listen queue, as they do for a moment whenever a busy gateway is stopped: the kernel completed them,
    no worker has accepted them yet. Then the second gateway is stopped (SIGTERM to its supervisor, which passes the
    stop on with a SIGCONT). Every device is answered 200: a connection the balancer opened is one it will not send
    elsewhere. Before, each worker closed its listener with the queue in it, the kernel reset every queued connection,
    and HAProxy, whose connect had succeeded, closed the device's (curl: "Connection reset by peer"; HAProxy's log:
    `SD`, 0 bytes): a rolling restart under wrk failed 13-29 new connections in four stops."""
    layout = dataclasses.replace(lab, balancer_subnet="127.0.0.1/32")
    gateways: list[Gateway] = []
    held: list[int] = []
    try:
        for name in ("one", "two"):
            text = runner.gateway_config(layout, gateway_port=free_port(), behind_balancer=True)
            text = text.replace("[listener]\n", "[listener]\nworkers = 2\n", 1)
            gateways.append(start_gateway(lab, tmp_path_factory.mktemp(f"queued-{name}"), text))
        second = gateways[1]
        eventually(lambda: len(second.events("listening")) == 2, "the second gateway's two workers listening")
        held = [e["pid"] for e in second.events("listening")]
        port = free_port()
        shipped = (REPO / "deploy" / "balancer" / "haproxy.cfg").read_text()
        config = shipped.replace("bind :8443", f"bind 127.0.0.1:{port}")
        config = config.replace("gateway-1:8443", f"127.0.0.1:{gateways[0].port}")
        config = config.replace("gateway-2:8443", f"127.0.0.1:{second.port}")
        with _haproxy(tmp_path_factory.mktemp("haproxy-queued"), port, config):
            for pid in held:
                os.kill(pid, signal.SIGSTOP)
            statuses: list[str] = []

            def device() -> None:
                answer = curl(lab, f"https://127.0.0.1:{port}/EWS/Exchange.asmx", "alice", "--interface", DEVICE)
                statuses.append(answer.stdout.rpartition("\n")[2] + answer.stderr)

            devices = [threading.Thread(target=device, daemon=True) for _ in range(6)]
            for thread in devices:
                thread.start()
            # the first gateway answers its three; the other three wait in the second's queue (with a health check
            # or so: HAProxy's TCP check connects there every 2 s)
            eventually(lambda: len(statuses) >= 3 and accept_queue(second.port) >= 3, "three devices queued")
            second.proc.send_signal(signal.SIGTERM)
            held = []  # the supervisor passes the stop on, and a SIGCONT after it
            for thread in devices:
                thread.join(timeout=90)
            assert second.proc.wait(timeout=60) == 0
        assert sorted(statuses) == ["200"] * 6, statuses
    finally:
        for pid in held:
            os.kill(pid, signal.SIGCONT)
        for gw in gateways:
            gw.stop()
