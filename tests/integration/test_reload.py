"""SIGHUP reload: new routes, CRLs and server certificate for what starts next; what is in flight is left alone."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import time
import urllib.request
from pathlib import Path

import aiohttp
from cryptography import x509

from proxy.lab.layout import LabLayout
from tests.integration._pki_tools import load_ca, write_crl, write_server_certificate
from tests.integration.conftest import Gateway, client_context, free_port, lab_config, start_gateway
from tests.integration.jsonlog import WAIT

# How long the backend holds the request that spans the reload: longer than the reload and the requests around
# it take on a loaded machine (the test asserts it is still held after them).
HOLD = 15


def _server_serial(lab: LabLayout, port: int) -> int:
    """The serial of the server certificate a new TLS connection to the gateway is shown."""
    with (
        socket.create_connection(("127.0.0.1", port)) as sock,
        client_context(lab, "alice").wrap_socket(sock, server_hostname="127.0.0.1") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def _metric(admin: str, name: str) -> float:
    with urllib.request.urlopen(admin + "/metrics", timeout=10) as r:  # noqa: S310  a loopback test URL
        text = r.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def _reload(gw: Gateway, text: str, event: str) -> dict[str, object]:
    """Write `text` as the configuration, send SIGHUP, and return the `event` line the reload wrote."""
    gw.mark()
    gw.config_path.write_text(text)
    gw.proc.send_signal(signal.SIGHUP)
    return gw.wait_events(event)[-1]


async def _get(lab: LabLayout, gw: Gateway, path: str, user: str, **headers: str) -> tuple[int, str, float]:
    start = time.monotonic()
    async with (
        aiohttp.ClientSession() as session,
        session.get(gw.url + path, ssl=client_context(lab, user), headers=headers) as r,
    ):
        return r.status, await r.text(), time.monotonic() - start


def test_reload_swaps_routes_crls_and_certificate_while_a_held_request_finishes(lab: LabLayout, tmp_path: Path) -> None:
    """A request held across a reload is answered by the old configuration; new requests and connections use
    the new routes, CRLs and server certificate; a broken configuration is refused and the last good one serves."""
    admin_port, port = free_port(), free_port()
    admin = f"http://127.0.0.1:{admin_port}"
    text = lab_config(lab, port=port, extra=f'\n[admin]\nbind = "127.0.0.1:{admin_port}"\n')
    gw = start_gateway(lab, tmp_path, text)
    try:
        old_serial = _server_serial(lab, port)
        bob = x509.load_pem_x509_certificate((lab.pki_dir / "users" / "bob.pem").read_bytes())
        chain, key, new_leaf = write_server_certificate(tmp_path / "tls", load_ca(lab.pki_dir, "issuing"))
        crl = write_crl(tmp_path / "crls.pem", load_ca(lab.pki_dir, "issuing"), revoked=[bob.serial_number])
        new_text = (
            text.replace('prefix = "/"', 'prefix = "/owa/"')
            .replace(str(lab.pki_dir / "server-chain.pem"), str(chain))
            .replace(str(lab.pki_dir / "server.key"), str(key))
            .replace(str(lab.pki_dir / "crls.pem"), str(crl))
        )

        async def scenario() -> None:
            held = asyncio.create_task(
                _get(lab, gw, "/Microsoft-Server-ActiveSync?Cmd=Ping", "alice", **{"X-Lab-Hold-Seconds": str(HOLD)})
            )
            deadline = time.monotonic() + WAIT
            while await asyncio.to_thread(_metric, admin, "kcd_requests_in_flight") < 1:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            assert (await _get(lab, gw, "/owa/", "bob"))[0] == 200
            reloaded = await asyncio.to_thread(_reload, gw, new_text, "reloaded")
            assert reloaded["generation"] == 2
            assert "routes" in str(reloaded["changed"])
            assert (await _get(lab, gw, "/Microsoft-Server-ActiveSync", "alice"))[0] == 404  # the route is gone
            assert (await _get(lab, gw, "/owa/", "alice"))[0] == 200
            status, body, _ = await _get(lab, gw, "/owa/", "bob")  # revoked by the new CRL
            assert (status, "was revoked" in body) == (403, True)
            assert not held.done()
            status, body, seconds = await held
            assert status == 200
            assert json.loads(body)["principal"] == "alice@LAB.TEST"
            assert seconds >= HOLD

        asyncio.run(scenario())
        assert _server_serial(lab, port) == new_leaf.serial_number != old_serial

        broken = new_text.replace(str(key), str(lab.pki_dir / "users" / "alice.key"))
        refused = _reload(gw, broken, "reload_refused")
        problems = refused["problems"]
        assert isinstance(problems, list)
        assert any(p.startswith("listener.private_key: ") for p in problems)
        assert asyncio.run(_get(lab, gw, "/owa/", "alice"))[0] == 200
        assert _server_serial(lab, port) == new_leaf.serial_number
        assert _metric(admin, 'kcd_reloads_total{outcome="ok"}') == 1
        assert _metric(admin, 'kcd_reloads_total{outcome="refused"}') == 1
    finally:
        assert gw.stop() == 0


def test_a_keep_alive_connection_is_checked_against_the_new_crl(lab: LabLayout, tmp_path: Path) -> None:
    """The connection negotiated before the reload stays open, and its next request meets the new CRL."""
    text = lab_config(lab, port=free_port())
    gw = start_gateway(lab, tmp_path, text)
    carol = x509.load_pem_x509_certificate((lab.pki_dir / "users" / "carol.pem").read_bytes())
    crl = write_crl(tmp_path / "crls.pem", load_ca(lab.pki_dir, "issuing"), revoked=[carol.serial_number])

    async def scenario() -> tuple[list[int], int]:
        statuses: list[int] = []
        connections = 0

        async def connected(*_: object) -> None:
            nonlocal connections
            connections += 1

        tracing = aiohttp.TraceConfig()
        tracing.on_connection_create_end.append(connected)
        connector = aiohttp.TCPConnector(limit=1, ssl=client_context(lab, "carol"))
        async with aiohttp.ClientSession(connector=connector, trace_configs=[tracing]) as session:
            for i in range(2):
                if i:
                    new = text.replace(str(lab.pki_dir / "crls.pem"), str(crl))
                    await asyncio.to_thread(_reload, gw, new, "reloaded")
                async with session.get(gw.url + "/owa/") as r:
                    await r.read()
                    statuses.append(r.status)
        return statuses, connections

    try:
        statuses, connections = asyncio.run(scenario())
        assert statuses == [200, 403]
        assert connections == 1
    finally:
        assert gw.stop() == 0


def test_watched_files_reload_without_a_signal(lab: LabLayout, tmp_path: Path) -> None:
    """With [reload] watch, editing the configuration file is enough: the new route serves, no SIGHUP sent."""
    text = lab_config(lab, port=free_port(), extra="\n[reload]\nwatch = true\nwatch_interval = 0.2\n")
    gw = start_gateway(lab, tmp_path, text)
    try:
        assert asyncio.run(_get(lab, gw, "/EWS/Exchange.asmx", "alice"))[0] == 200
        gw.mark()
        gw.config_path.write_text(text.replace('prefix = "/"', 'prefix = "/owa/"'))
        assert gw.wait_event("reloaded")["routes"] == ["/owa/"]
        assert asyncio.run(_get(lab, gw, "/EWS/Exchange.asmx", "alice"))[0] == 404
    finally:
        assert gw.stop() == 0
