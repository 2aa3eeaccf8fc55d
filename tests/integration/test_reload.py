"""SIGHUP reload: new routes, CRLs and server certificate for what starts next; what is in flight is left alone."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from proxy.lab.layout import LabLayout
from tests.integration._pki_tools import load_ca, write_crl, write_server_certificate
from tests.integration.conftest import Gateway, client_context, free_port, lab_config, start_gateway, wait_port
from tests.integration.jsonlog import WAIT, eventually, whole_json_lines
from tests.integration.recorder import get_resuming

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


def _untrusting(lab: LabLayout, gw: Gateway) -> str:
    """The gateway's configuration with the lab's trust list replaced by the rogue CAs only (none of the lab users'
    chains) and no CRLs (the rogue CAs have none here)."""
    rogue = lab.pki_dir / "rogue"
    untrusting = (
        gw.config_path.read_text()
        .replace(str(lab.pki_dir / "root.pem"), str(rogue / "root.pem"))
        .replace(str(lab.pki_dir / "issuing.pem"), str(rogue / "issuing.pem"))
        .replace(f'crls = ["{lab.pki_dir / "crls.pem"}"]\nrevocation = "require"', 'revocation = "off"')
    )
    assert untrusting.count(str(rogue)) == 2
    return untrusting


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


def test_watched_files_named_by_the_configuration_reload_without_a_signal(lab: LabLayout, tmp_path: Path) -> None:
    """Issue 8: with [reload] watch the reload also follows "watched files", the ones the configuration names: the
    server certificate, its key and the CRL file replaced at once (their directory a link swapped to a new one, as
    Kubernetes updates a mounted Secret), the configuration file untouched, no SIGHUP: a `reloaded` line, then a new
    connection is shown the new server certificate and bob, whom the new CRL lists, is refused. Only an edit of the
    configuration file itself was tested from outside."""
    first = tmp_path / "files-1"
    first.mkdir()
    for name in ("server-chain.pem", "server.key", "crls.pem"):
        shutil.copy(lab.pki_dir / name, first / name)
    tls = tmp_path / "tls"
    tls.symlink_to(first.name)
    chain, key, crls = tls / "server-chain.pem", tls / "server.key", tls / "crls.pem"
    port = free_port()
    text = (
        lab_config(lab, port=port, extra="\n[reload]\nwatch = true\nwatch_interval = 0.2\n")
        .replace(str(lab.pki_dir / "server-chain.pem"), str(chain))
        .replace(str(lab.pki_dir / "server.key"), str(key))
        .replace(str(lab.pki_dir / "crls.pem"), str(crls))
    )
    gw = start_gateway(lab, tmp_path, text)
    try:
        old_serial = _server_serial(lab, port)
        assert asyncio.run(_get(lab, gw, "/owa/", "bob"))[0] == 200
        issuing = load_ca(lab.pki_dir, "issuing")
        bob = x509.load_pem_x509_certificate((lab.pki_dir / "users" / "bob.pem").read_bytes())
        second = tmp_path / "files-2"
        new_chain, new_key, new_leaf = write_server_certificate(second, issuing)
        new_chain.rename(second / "server-chain.pem")
        new_key.rename(second / "server.key")
        write_crl(second / "crls.pem", issuing, revoked=[bob.serial_number])
        gw.mark()
        (tmp_path / "tls-next").symlink_to(second.name)
        (tmp_path / "tls-next").rename(tls)  # the three files change in one step
        gw.wait_event("reloaded")
        assert _server_serial(lab, port) == new_leaf.serial_number != old_serial
        status, body, _ = asyncio.run(_get(lab, gw, "/owa/", "bob"))
        assert (status, "was revoked" in body) == (403, True), body
        assert asyncio.run(_get(lab, gw, "/owa/", "alice"))[0] == 200
    finally:
        assert gw.stop() == 0


def _config_pair(lab: LabLayout, tmp_path: Path, text: str, *, watch: bool) -> dict[str, str]:
    """Two configurations that differ in two sections at once: config "A" revokes bob (client_certificates.crls)
    and tells the backend `X-KCD-Config-A` (routes[0].context_headers); "B" revokes nobody and tells `-B`.
    A request served by half of each would show: bob forwarded with `-A`, or refused under "B"."""
    issuing = load_ca(lab.pki_dir, "issuing")
    bob = x509.load_pem_x509_certificate((lab.pki_dir / "users" / "bob.pem").read_bytes())
    crls = {
        "A": write_crl(tmp_path / "crl-a.pem", issuing, revoked=[bob.serial_number]),
        "B": write_crl(tmp_path / "crl-b.pem", issuing),
    }
    reload = "\n[reload]\nwatch = true\nwatch_interval = 0.2\n" if watch else ""
    route = f'upstream = "http://127.0.0.1:{lab.backend_port}"\n'
    assert route in text
    return {
        name: text.replace(str(lab.pki_dir / "crls.pem"), str(crl)).replace(
            route, route + f'context_headers = {{ "X-KCD-Config-{name}" = "upn" }}\n', 1
        )
        + reload
        for name, crl in crls.items()
    }


async def _served_as(session: aiohttp.ClientSession, url: str) -> str:
    """Which configuration served one request: "A" or "B" (bob is refused only under A), or what went wrong."""
    async with session.get(url) as r:
        body = await r.text()
    if r.status == 403 and "was revoked" in body:
        return "A (refused)"
    if r.status != 200:
        return f"status {r.status}: {body[:200]}"
    headers = {k.lower() for k in json.loads(body)["headers"]}
    told = sorted(h[-1].upper() for h in headers if h.startswith("x-kcd-config-"))
    return "".join(told) if told else "no configuration header"


@pytest.mark.parametrize("how", ["sighup", "watch"])
def test_under_load_every_request_is_served_by_one_whole_configuration(
    lab: LabLayout, tmp_path: Path, how: str
) -> None:
    """Eight keep-alive clients (alice and bob) send requests without pause while the configuration is swapped
    between A and B six times (by SIGHUP, or by [reload] watch seeing the file change): every request is
    answered, both configurations serve, and bob is only ever refused (A's CRL) or forwarded with B's header:
    never forwarded with A's header, which would be B's CRL applied with A's routes."""
    pair = _config_pair(lab, tmp_path, lab_config(lab, port=free_port()), watch=how == "watch")
    gw = start_gateway(lab, tmp_path, pair["A"])
    seen: dict[str, list[str]] = {"alice": [], "bob": []}

    async def client(user: str, stop: asyncio.Event) -> None:
        connector = aiohttp.TCPConnector(limit=1, ssl=client_context(lab, user))
        async with aiohttp.ClientSession(connector=connector) as session:
            while not stop.is_set():
                seen[user].append(await _served_as(session, gw.url + "/EWS/Exchange.asmx"))

    async def scenario() -> None:
        stop = asyncio.Event()
        clients = [asyncio.create_task(client(user, stop)) for user in ("alice", "bob") * 4]
        for swap in range(6):
            name = "B" if swap % 2 == 0 else "A"
            gw.mark()
            gw.config_path.write_text(pair[name])
            if how == "sighup":
                gw.proc.send_signal(signal.SIGHUP)
            await asyncio.to_thread(gw.wait_event, "reloaded")
            served = len(seen["alice"]) + len(seen["bob"])
            deadline = time.monotonic() + WAIT
            while len(seen["alice"]) + len(seen["bob"]) < served + 8:  # some requests under each configuration
                assert time.monotonic() < deadline
                await asyncio.sleep(0.02)
        stop.set()
        await asyncio.gather(*clients)

    try:
        asyncio.run(scenario())
    finally:
        assert gw.stop() == 0
    assert set(seen["alice"]) == {"A", "B"}, set(seen["alice"])
    assert set(seen["bob"]) == {"A (refused)", "B"}, set(seen["bob"])


def test_a_ca_bundle_rewritten_in_place_is_the_upstreams_trust_after_a_reload(lab: LabLayout, tmp_path: Path) -> None:
    """An https route's `ca_bundle` file replaced under the same name (a CA rotation) and SIGHUP: the next request
    is verified against the new bundle. A bundle that no longer holds the backend's CA refuses it (502), one
    that does again serves it; before, the carried-over backend pools kept the context built at start."""
    pki = lab.pki_dir
    port = free_port()
    argv = [sys.executable, "-m", "proxy.lab.backend", "--keytab", str(lab.backend_keytab)]
    argv += ["--bind", f"127.0.0.1:{port}", "--krb5-config", str(lab.krb5_conf), "--rcache", str(tmp_path / "rc")]
    argv += ["--tls-cert", str(pki / "server-chain.pem"), "--tls-key", str(pki / "server.key")]
    bundle = tmp_path / "backend-ca.pem"
    bundle.write_bytes((pki / "root.pem").read_bytes())
    route = f"""
[[routes]]
prefix = "/tls/"
upstream = "https://127.0.0.1:{port}"
spn = "HTTP/cas.lab.test"
ca_bundle = "{bundle}"
server_name = "proxy.lab.test"
"""
    with (tmp_path / "backend.log").open("wb") as out:
        backend = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    gw = None
    try:
        wait_port(port, backend)
        text = lab_config(lab, port=free_port(), extra=route)
        gw = start_gateway(lab, tmp_path / "gw", text)
        assert asyncio.run(_get(lab, gw, "/tls/x", "alice"))[0] == 200
        bundle.write_bytes((pki / "rogue" / "root.pem").read_bytes())  # the backend's CA is no longer trusted
        _reload(gw, text, "reloaded")
        assert asyncio.run(_get(lab, gw, "/tls/x", "alice"))[0] == 502
        bundle.write_bytes((pki / "root.pem").read_bytes())
        _reload(gw, text, "reloaded")
        assert asyncio.run(_get(lab, gw, "/tls/x", "alice"))[0] == 200
    finally:
        if gw is not None:
            assert gw.stop() == 0
        backend.terminate()
        backend.wait(timeout=10)


def _atomic_writer_swap(directory: Path, name: str, text: str, generation: str) -> None:
    """Update `directory` the way Kubernetes updates a mounted ConfigMap: the files in a new timestamped directory,
    the `..data` link swapped to it in one rename, the old directory deleted. `name` itself stays the link
    `..data/<name>`."""
    new = directory / f"..{generation}"
    new.mkdir()
    (new / name).write_text(text)
    old = (directory / "..data").resolve()
    (directory / "..data_tmp").symlink_to(new.name)
    (directory / "..data_tmp").rename(directory / "..data")
    shutil.rmtree(old)


@pytest.mark.parametrize("how", ["sighup", "watch"])
def test_a_configmap_style_update_through_symlinks_is_reloaded(lab: LabLayout, tmp_path: Path, how: str) -> None:
    """The configuration mounted as a Kubernetes ConfigMap (deploy/k8s): `gateway.toml` is a link to `..data/
    gateway.toml`, `..data` a link to a timestamped directory that an update replaces and deletes. The gateway read
    the link's target once at start and reloaded that deleted file: every later reload (SIGHUP or watch) was
    refused, "configuration file not found". It reads the configuration by the name it was given."""
    watch = "\n[reload]\nwatch = true\nwatch_interval = 0.2\n" if how == "watch" else ""
    text = lab_config(lab, port=free_port(), extra=watch)
    first = tmp_path / "..2026_12_05_00_00_00.1"
    first.mkdir()
    (first / "gateway.toml").write_text(text)
    (tmp_path / "..data").symlink_to(first.name)
    (tmp_path / "gateway.toml").symlink_to("..data/gateway.toml")
    gw = start_gateway(lab, tmp_path, text)  # writes through the link, starts with tmp_path/gateway.toml
    try:
        assert asyncio.run(_get(lab, gw, "/EWS/Exchange.asmx", "alice"))[0] == 200
        gw.mark()
        new = text.replace('prefix = "/"', 'prefix = "/owa/"')
        _atomic_writer_swap(tmp_path, "gateway.toml", new, "2026_12_05_00_01_00.2")
        if how == "sighup":
            gw.proc.send_signal(signal.SIGHUP)
        since = gw.since
        ended = ("reloaded", "reload_refused")
        event = eventually(lambda: next((e for e in gw.logs()[since:] if e.get("event") in ended), None), "a reload")
        assert event["event"] == "reloaded", event
        assert event["routes"] == ["/owa/"]
        assert asyncio.run(_get(lab, gw, "/EWS/Exchange.asmx", "alice"))[0] == 404
    finally:
        assert gw.stop() == 0


def _held_across_reload(lab: LabLayout, gw: Gateway, text: str) -> tuple[int, str]:
    """Two of bob's Pings (two connections of one certificate), held at the backend while `text` is reloaded: the
    answer they got, the same for both (AssertionError if either ran on)."""
    from tests.integration.test_revocation import held_at_the_backend, read_answer

    answers = []
    with held_at_the_backend(lab, gw, "bob") as ping, held_at_the_backend(lab, gw, "bob") as other:
        assert _reload(gw, text, "reloaded")["generation"] == 2
        for held in (ping, other):
            held.settimeout(WAIT)
            try:
                answers.append(read_answer(held))
            except TimeoutError:
                raise AssertionError("a held request ran on after the reload") from None
    assert answers[0] == answers[1], answers
    assert gw.wait_event("held_request_ended", cert_subject="CN=bob")["answer_started"] is False
    return answers[0]


def test_a_held_request_whose_ca_a_reload_no_longer_trusts_is_ended(lab: LabLayout, tmp_path: Path) -> None:
    """bob's Ping is held at the backend when a reload replaces the trust list by one that no longer holds bob's CAs
    (only the rogue CAs): the held request is ended with 403, as a revocation ends one, instead of running on for
    the rest of its hour under a trust the operator withdrew; a new connection of bob's is refused too."""
    gw = start_gateway(lab, tmp_path, lab_config(lab, port=free_port()))
    try:
        untrusting = _untrusting(lab, gw)
        assert "crls" not in untrusting
        status, body = _held_across_reload(lab, gw, untrusting)
        assert status == 403, body
        assert "no longer trusted" in body
        with pytest.raises(aiohttp.ClientError, match="unknown ca"):  # a new connection: refused in its handshake
            asyncio.run(_get(lab, gw, "/owa/", "bob"))
    finally:
        assert gw.stop() == 0


def test_a_held_request_revoked_by_a_crl_only_the_new_configuration_names_is_ended(
    lab: LabLayout, tmp_path: Path
) -> None:
    """bob's Ping is held when a reload names a new CRL file that revokes bob: the old configuration's CRL
    refresher (which the held request was watched by) never reads that file, so it ran on; now it is ended."""
    gw = start_gateway(lab, tmp_path, lab_config(lab, port=free_port()))
    try:
        bob = x509.load_pem_x509_certificate((lab.pki_dir / "users" / "bob.pem").read_bytes())
        crl = write_crl(tmp_path / "crls.pem", load_ca(lab.pki_dir, "issuing"), revoked=[bob.serial_number])
        status, body = _held_across_reload(
            lab, gw, gw.config_path.read_text().replace(str(lab.pki_dir / "crls.pem"), str(crl))
        )
        assert status == 403, body
        assert "was revoked on" in body
    finally:
        assert gw.stop() == 0


def test_a_request_held_across_two_reloads_is_judged_by_the_newest_configuration(
    lab: LabLayout, tmp_path: Path
) -> None:
    """bob's Ping is held across a first reload (nothing about bob changes) and then a second one naming a CRL that
    revokes bob: the request, still under the first configuration, was judged only by the second configuration's
    CRLs (whose refresher stops once that configuration's own requests end), never by the third's; now it is ended."""
    from tests.integration.test_revocation import held_at_the_backend, read_answer

    gw = start_gateway(lab, tmp_path, lab_config(lab, port=free_port()))
    try:
        text = gw.config_path.read_text()
        bob = x509.load_pem_x509_certificate((lab.pki_dir / "users" / "bob.pem").read_bytes())
        crl = write_crl(tmp_path / "crls.pem", load_ca(lab.pki_dir, "issuing"), revoked=[bob.serial_number])
        with held_at_the_backend(lab, gw, "bob") as ping:
            assert _reload(gw, text + "\n# the first reload\n", "reloaded")["generation"] == 2
            assert _reload(gw, text.replace(str(lab.pki_dir / "crls.pem"), str(crl)), "reloaded")["generation"] == 3
            ping.settimeout(WAIT)
            try:
                status, body = read_answer(ping)
            except TimeoutError:
                raise AssertionError("the held request ran on after the second reload") from None
        assert status == 403, body
        assert "was revoked on" in body
        assert gw.wait_event("held_request_ended", cert_subject="CN=bob")["answer_started"] is False
    finally:
        assert gw.stop() == 0


@pytest.mark.parametrize("cache", [2048, 0], ids=["stateful", "stateless-tickets"])
@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3], ids=["tls1.2", "tls1.3"])
def test_a_session_resumed_after_a_reload_that_no_longer_trusts_its_ca_is_refused(
    lab: LabLayout, tmp_path: Path, version: ssl.TLSVersion, cache: int
) -> None:
    """A resumed TLS session skips the certificate check of the handshake: alice's session (TLS 1.2 by session ID or
    ticket, TLS 1.3 by ticket; the session kept by the gateway, or sealed in a stateless ticket) is offered after a
    reload whose trust list no longer holds her CAs. The trust decision is made again: the reload's new TLS context
    resumes nothing of the old one, so the handshake is a full one and refused (`unknown ca`), never served."""
    text = lab_config(lab, port=free_port()).replace("[listener]\n", f"[listener]\ntls_session_cache = {cache}\n", 1)
    gw = start_gateway(lab, tmp_path, text)
    try:
        context = client_context(lab, "alice")
        context.minimum_version = context.maximum_version = version
        status, _, session = get_resuming(context, gw.port)
        assert status == 200
        status, resumed, session = get_resuming(context, gw.port, session)
        assert (status, resumed) == (200, True)  # the gateway resumes sessions: the case is real
        untrusting = _untrusting(lab, gw)
        _reload(gw, untrusting, "reloaded")
        with pytest.raises(ssl.SSLError, match=r"unknown ca|UNKNOWN_CA"):
            get_resuming(context, gw.port, session)
    finally:
        assert gw.stop() == 0


def test_a_reload_never_takes_a_crl_older_than_the_one_held(lab: LabLayout, tmp_path: Path) -> None:
    """A refresh refuses a CRL older than the one held (a replay: last week's CRL, from before a revocation, still
    within its nextUpdate); a reload, for any reason, built its CRLs afresh and took it: the revoked certificate was
    served again. A reload now starts from the CRLs the running configuration holds for the sources it keeps, so
    the older one is refused (`crl_rejected`, "replayed?") and the revoked certificate stays refused."""
    carol = x509.load_pem_x509_certificate((lab.pki_dir / "users" / "carol.pem").read_bytes())
    issuing, root = load_ca(lab.pki_dir, "issuing"), load_ca(lab.pki_dir, "root")
    crl = write_crl(tmp_path / "issuing.crl", issuing, revoked=[carol.serial_number], number=2001)
    root_crl = write_crl(tmp_path / "root.crl", root)
    text = lab_config(lab, port=free_port())
    lab_crls = f'crls = ["{lab.pki_dir / "crls.pem"}"]'
    assert lab_crls in text
    text = text.replace(lab_crls, f'crls = ["{crl}", "{root_crl}"]')
    gw = start_gateway(lab, tmp_path / "gw", text)
    try:
        assert asyncio.run(_get(lab, gw, "/owa/", "carol"))[0] == 403
        write_crl(tmp_path / "older.crl", issuing, number=2000).replace(crl)  # carol not yet revoked
        reloaded = _reload(gw, text + "\n# a reload for another reason\n", "reloaded")
        assert reloaded["generation"] == 2
        assert asyncio.run(_get(lab, gw, "/owa/", "carol"))[0] == 403
        rejected = gw.wait_event("crl_rejected", source=str(crl))
        assert "replayed?" in rejected["problem"]
    finally:
        assert gw.stop() == 0


def _long_crl(path: Path, ca: tuple[x509.Certificate, Any], entries: int) -> Path:
    """A CRL of `ca` listing `entries` serials (none of the lab users'): seconds to vet, as a large CA's is. Built once
    per CA and size in a test process (200,000 entries: about 0.9 s of CPU each time) and written to `path`."""
    der = _LONG_CRLS.get((ca[0], entries))
    if der is None:
        der = _LONG_CRLS[ca[0], entries] = _long_crl_der(ca, entries)
    path.write_bytes(der)
    return path


# `_long_crl`'s CRLs, by CA certificate (equal by its DER: a lab PKI made afresh is another key) and entries.
_LONG_CRLS: dict[tuple[x509.Certificate, int], bytes] = {}


def _long_crl_der(ca: tuple[x509.Certificate, Any], entries: int) -> bytes:
    """`_long_crl`'s CRL, signed and DER-encoded: valid from 5 minutes ago for a day."""
    now = datetime.now(UTC)
    revoked = [
        x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now - timedelta(minutes=10)).build()
        for serial in range(10**30, 10**30 + entries)
    ]
    builder = x509.CertificateRevocationListBuilder(
        issuer_name=ca[0].subject,
        last_update=now - timedelta(minutes=5),
        next_update=now + timedelta(days=1),
        extensions=[x509.Extension(x509.CRLNumber.oid, False, x509.CRLNumber(7))],
        revoked_certificates=revoked,
    )
    return builder.sign(ca[1], hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def _large_crl_gateway(lab: LabLayout, tmp_path: Path) -> tuple[subprocess.Popen[bytes], Path, Path]:
    """`kcd-proxy run` (one process, as the shipped unit runs it) on the root's CRL and an issuing CRL of 200,000
    entries; the process, its log and the root's CRL (read first: the long one is read next)."""
    root = write_crl(tmp_path / "root.crl", load_ca(lab.pki_dir, "root"))
    issuing = _long_crl(tmp_path / "issuing.crl", load_ca(lab.pki_dir, "issuing"), 200_000)
    text = lab_config(lab, port=free_port())
    lab_crls = f'crls = ["{lab.pki_dir / "crls.pem"}"]'
    assert lab_crls in text
    config = tmp_path / "gateway.toml"
    config.write_text(text.replace(lab_crls, f'crls = ["{root}", "{issuing}"]'))
    log = tmp_path / "gateway.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "proxy", "run", "--config", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **lab.env()},
        )
    return proc, log, root


def _seen(proc: subprocess.Popen[bytes], log: Path, event: str, **fields: object) -> bool:
    if proc.poll() is not None:
        raise AssertionError(f"the gateway ended ({proc.returncode}): {log.read_text()[-2000:]}")
    return any(e.get("event") == event and all(e.get(k) == v for k, v in fields.items()) for e in whole_json_lines(log))


def test_a_sighup_while_the_gateway_starts_is_a_reload_not_its_end(lab: LabLayout, tmp_path: Path) -> None:
    """`systemctl reload` just after a start (Type=exec: started once exec'd): SIGHUP reached a gateway still
    reading its CRLs, before its reload handler was in place, and ended it; the shipped unit's Restart=on-failure
    does not restart a process that SIGHUP ended (a "clean" signal to systemd), so the gateway stayed down. A SIGHUP
    from the moment `run` begins is remembered and becomes a reload once the gateway serves."""
    proc, log, root = _large_crl_gateway(lab, tmp_path)
    try:
        read_first = "the root's CRL read: the long one is next"
        eventually(lambda: _seen(proc, log, "crl_loaded", source=str(root)), read_first)
        proc.send_signal(signal.SIGHUP)
        eventually(lambda: _seen(proc, log, "listening"), "the gateway listening")
        eventually(lambda: _seen(proc, log, "reloaded", generation=2), "the SIGHUP's reload")
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


# CPU seconds a one-process gateway may spend from SIGTERM to its exit: its drain of no connection and its closes take
# a few tens of milliseconds; the interpreter's teardown of two 200,000-entry CRL sets took 0.63-0.74 s here (idle)
STOP_CPU_SECONDS = 0.3


def test_a_stop_does_not_spend_its_time_freeing_what_the_gateway_held(lab: LabLayout, tmp_path: Path) -> None:
    """A gateway holding large CRLs (200,000 entries, read at the start and again at a reload) ends on SIGTERM without
    the interpreter's teardown, which collected and freed every object the process held (py-spy: `gc_collect_main`
    after the `stopped` line) for memory the kernel takes back at once: 5-17 s after SIGTERM at a load of 10, past
    systemd's TimeoutStopSec (30 s, then SIGKILL) at the load of 16-20 where test_reload's stop above overran its
    30 s. Measured in the process's own CPU time (its rusage at exit), which the machine's load does not stretch."""
    proc, log, _ = _large_crl_gateway(lab, tmp_path)
    try:
        eventually(lambda: _seen(proc, log, "listening"), "the gateway listening")
        proc.send_signal(signal.SIGHUP)
        eventually(lambda: _seen(proc, log, "reloaded", generation=2), "the reload: the CRLs read a second time")
        fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        before = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime, in clock ticks
        proc.send_signal(signal.SIGTERM)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    finally:
        if proc.returncode is None:
            proc.kill()
            proc.wait()
    stop_cpu = usage.ru_utime + usage.ru_stime - before
    assert proc.returncode == 0, log.read_text()[-2000:]
    assert stop_cpu < STOP_CPU_SECONDS, f"the stop took {stop_cpu:.3f} s of CPU"
    assert any(e.get("event") == "stopped" for e in whole_json_lines(log)), "the stop's own steps were all taken"
