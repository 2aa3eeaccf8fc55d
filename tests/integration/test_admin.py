"""The admin listener: /healthz, /readyz, /metrics after real traffic, and its TLS allow-list."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import http.client
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.admin import ADMIN_MAX_CONNECTIONS, ADMIN_SILENT_SECONDS
from proxy.lab.layout import LabLayout
from tests.integration._pki_tools import load_ca, write_crl, write_server_certificate
from tests.integration.conftest import Gateway, client_context, curl, dead_port, free_port, lab_config, start_gateway
from tests.integration.jsonlog import WAIT, eventually

HOLD = 8  # seconds the backend holds the Ping
# seconds from a CRL's publication to its nextUpdate: the gateway re-reads the file every second, and must take it
# before then on a machine that stalled a whole gateway start for 6.4 s
STALE_AFTER = 10

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _get(url: str, context: ssl.SSLContext | None = None) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=15, context=context) as r:  # noqa: S310  loopback test URLs
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _scrape(admin: str) -> Samples:
    status, text = _get(admin + "/metrics")
    assert status == 200
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def _start_admin_gateway(lab: LabLayout, directory: Path) -> tuple[Gateway, str]:
    """A gateway with a dead route (/dead/) and a plain admin listener on loopback: (gateway, admin URL)."""
    admin_port = free_port()
    extra = f'\n[[routes]]\nprefix = "/dead/"\nupstream = "http://127.0.0.1:{dead_port()}"\n'
    extra += f'spn = "HTTP/cas.lab.test"\n\n[admin]\nbind = "127.0.0.1:{admin_port}"\n'
    gw = start_gateway(lab, directory, lab_config(lab, port=free_port(), extra=extra))
    return gw, f"http://{gw.admin}"


def _admin_port(gw: Gateway) -> int:
    """The port of `gw`'s admin listener, as started (`start_gateway` moves one taken meanwhile)."""
    assert gw.admin is not None
    return int(gw.admin.rpartition(":")[2])


@pytest.fixture(scope="module")
def admin_gateway(lab: LabLayout, tmp_path_factory: pytest.TempPathFactory) -> Any:
    gw, admin = _start_admin_gateway(lab, tmp_path_factory.mktemp("admin"))
    yield gw, admin
    gw.stop()


@pytest.fixture
def own_admin_gateway(lab: LabLayout, tmp_path: Path) -> Any:
    """`admin_gateway`, for one test only: counts that no other test's requests (alice's ticket cached, or 200s
    counted before) can change."""
    gw, admin = _start_admin_gateway(lab, tmp_path / "admin")
    yield gw, admin
    gw.stop()


async def _held_request(lab: LabLayout, gw: Gateway, admin: str) -> tuple[int, Samples]:
    """A Ping the backend holds for HOLD seconds; the scrape taken while it is held (in flight for longer than
    LONG_POLL_AFTER, 1 s: the scrape has HOLD - 1 s to see it, plenty on a loaded machine)."""
    async with aiohttp.ClientSession() as session:
        request = session.get(
            gw.url + "/Microsoft-Server-ActiveSync?Cmd=Ping",
            ssl=client_context(lab, "alice"),
            headers={"X-Lab-Hold-Seconds": str(HOLD)},
        )
        task = asyncio.create_task(request.__aenter__())
        deadline = time.monotonic() + HOLD
        while True:
            samples = await asyncio.to_thread(_scrape, admin)
            if _value(samples, "kcd_long_polls_held") >= 1 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        response = await task
        status = response.status
        await response.__aexit__(None, None, None)
        return status, samples


def test_metrics_after_traffic(lab: LabLayout, own_admin_gateway: tuple[Gateway, str]) -> None:
    """Requests by route and status, refusals by stage and reason (TLS included), KDC requests and latency (the
    stage's, and S4U2Self's and S4U2Proxy's apart), ticket-cache hits, CRL ages, open connections and a held
    long-poll all show in one scrape format. A gateway of its own: on the module's, a test that ran first (alice's
    200 in the loopback-names test) changed the counts."""
    gw, admin = own_admin_gateway
    for user, path in [
        ("alice", "/owa/"),
        ("alice", "/owa/"),
        ("revoked", "/owa/"),
        ("ghost", "/owa/"),
        ("bob", "/dead/"),
    ]:
        curl(lab, gw.url + path, user)
    for refused in ("expired", None):
        assert curl(lab, gw.url + "/owa/", refused).returncode != 0
    status, during = asyncio.run(_held_request(lab, gw, admin))
    assert status == 200
    assert _value(during, "kcd_long_polls_held") == 1
    assert _value(during, "kcd_requests_in_flight") >= 1
    assert _value(during, "kcd_open_connections") >= 1

    # the Ping is counted when its request ends, after its answer has gone out: the scrape once nothing is in flight
    after = eventually(lambda: s if _value(s := _scrape(admin), "kcd_requests_in_flight") == 0 else None, "idle")
    assert _value(after, "kcd_requests_total", route="/", status="200") == 3
    assert _value(after, "kcd_requests_total", route="/dead/", status="502") == 1
    assert _value(after, "kcd_refusals_total", stage="revocation", reason="certificate_revoked") == 1
    assert _value(after, "kcd_refusals_total", stage="kerberos", reason="kerberos_refused") == 1
    assert _value(after, "kcd_refusals_total", stage="backend", reason="backend_unavailable") == 1
    assert _value(after, "kcd_refusals_total", stage="tls", reason="certificate has expired") == 1
    assert _value(after, "kcd_refusals_total", stage="tls", reason="peer did not return a certificate") == 1
    assert _value(after, "kcd_kdc_requests_total", outcome="ok") >= 2  # alice and bob, once each
    assert _value(after, "kcd_kdc_requests_total", outcome="kerberos_refused") == 1
    assert _value(after, "kcd_kdc_request_seconds_count") == _value(after, "kcd_kdc_requests_total", outcome="ok")
    assert 0 < _value(after, "kcd_kdc_request_seconds_sum") < 10
    for exchange in ("s4u2self", "s4u2proxy"):  # each of the two, apart: which one is slow
        count = _value(after, "kcd_kdc_exchange_seconds_count", exchange=exchange)
        assert count == _value(after, "kcd_kdc_request_seconds_count"), exchange
        assert 0 < _value(after, "kcd_kdc_exchange_seconds_sum", exchange=exchange) < 10
    both = sum(_value(after, "kcd_kdc_exchange_seconds_sum", exchange=e) for e in ("s4u2self", "s4u2proxy"))
    assert both <= _value(after, "kcd_kdc_request_seconds_sum")  # parts of the stages' time
    assert _value(after, "kcd_ticket_cache_total", result="hit") >= 2  # alice's second request and her Ping
    assert _value(after, "kcd_long_polls_held") == 0
    crls = str(lab.pki_dir / "crls.pem")
    for issuer in ("CN=Lab Issuing CA", "CN=Lab Root CA"):
        assert _value(after, "kcd_crl_age_seconds", source=crls, issuer=issuer) > 0
        assert _value(after, "kcd_crl_next_update_seconds", source=crls, issuer=issuer) > 0


def test_crl_metrics_show_each_sources_last_fetch_and_last_error(lab: LabLayout, tmp_path: Path) -> None:
    """Issue 4: the metrics show each CRL source's last fetch and last error, beside thisUpdate and nextUpdate: a
    file read at start has a last fetch and a last success and no error; a URL where nothing listens has a last
    fetch, no success, and its error as a label."""
    admin_port = free_port()
    url = f"http://127.0.0.1:{dead_port()}/issuing.crl"
    crls = str(lab.pki_dir / "crls.pem")
    text = lab_config(lab, port=free_port(), extra=f'\n[admin]\nbind = "127.0.0.1:{admin_port}"\n')
    text = text.replace(f'crls = ["{crls}"]', f'crls = ["{crls}", "{url}"]\ncrl_refresh_seconds = 1')
    assert url in text
    gw = start_gateway(lab, tmp_path, text)
    try:
        started = time.time()
        admin = f"http://{gw.admin}"

        def failed() -> Samples | None:
            samples = _scrape(admin)
            return samples if any(name == "kcd_crl_last_error" for name, _ in samples) else None

        samples = eventually(failed, "the URL's failed fetch in the metrics")
        errors = [dict(labels) for name, labels in samples if name == "kcd_crl_last_error"]
        assert [e["source"] for e in errors] == [url]
        assert "fetch failed" in errors[0]["error"]
        assert _value(samples, "kcd_crl_last_fetch_timestamp_seconds", source=url) > started - 120
        assert _value(samples, "kcd_crl_last_success_timestamp_seconds", source=url) == 0  # absent: never
        assert _value(samples, "kcd_crl_last_fetch_timestamp_seconds", source=crls) > started - 120
        assert _value(samples, "kcd_crl_last_success_timestamp_seconds", source=crls) > started - 120
    finally:
        assert gw.stop() == 0


def test_health_and_readiness(admin_gateway: tuple[Gateway, str]) -> None:
    """/healthz answers while serving; /readyz says the KDC answers and the CRLs are current."""
    _, admin = admin_gateway
    status, body = _get(admin + "/healthz")
    assert (status, json.loads(body)["status"]) == (200, "ok")
    status, body = _get(admin + "/readyz")
    assert status == 200
    assert json.loads(body) == {"ready": True, "kdc": "ok", "crls": "ok", "generation": 1}


def test_not_ready_without_a_kdc(lab: LabLayout, tmp_path: Path) -> None:
    """With no KDC answering, /readyz is 503 and says so; /healthz still 200."""
    dead = tmp_path / "krb5.conf"
    dead.write_text(lab.krb5_conf.read_text().replace(f":{lab.kdc_port}", f":{dead_port()}"))
    admin_port = free_port()
    text = lab_config(lab, port=free_port(), krb5_conf=dead, extra=f'\n[admin]\nbind = "127.0.0.1:{admin_port}"\n')
    gw = start_gateway(lab, tmp_path, text)
    try:
        status, body = _get(f"http://{gw.admin}/readyz")
        assert status == 503
        answer = json.loads(body)
        assert (answer["ready"], answer["crls"]) == (False, "ok")
        assert "unreachable" in answer["kdc"]
        assert _get(f"http://{gw.admin}/healthz")[0] == 200
    finally:
        assert gw.stop() == 0


def test_not_ready_once_a_crl_is_past_its_next_update(lab: LabLayout, tmp_path: Path) -> None:
    """Issue 8: /readyz says "CRLs current": ready while they are, then the issuing CA's CRL reaching its nextUpdate
    (STALE_AFTER s after it was published, nothing newer since) makes /readyz 503 naming that CRL's source, while the
    KDC is still "ok".

    The short-lived CRL is published once the gateway runs and taken by its refresh (`crl_loaded`, the witness):
    written before the start, it was past its nextUpdate before a slow start read it (6.4 s from the write to the
    read, with 3 s of life, on a loaded machine), and a CRL never taken is "no usable CRL", not a stale one."""
    issuing_ca = load_ca(lab.pki_dir, "issuing")
    issuing = write_crl(tmp_path / "issuing.crl", issuing_ca)  # current for a day: the gateway starts ready
    root = write_crl(tmp_path / "root.crl", load_ca(lab.pki_dir, "root"))
    admin_port = free_port()
    text = lab_config(lab, port=free_port(), extra=f'\n[admin]\nbind = "127.0.0.1:{admin_port}"\n')
    lab_crls = f'crls = ["{lab.pki_dir / "crls.pem"}"]'
    assert lab_crls in text
    crls = f'crls = ["{issuing}", "{root}"]\ncrl_refresh_seconds = 1'  # re-read every second
    gw = start_gateway(lab, tmp_path, text.replace(lab_crls, crls))
    readyz = f"http://{gw.admin}/readyz"
    try:
        assert _get(readyz)[0] == 200
        gw.mark()
        short = datetime.now(UTC) + timedelta(seconds=STALE_AFTER)
        write_crl(tmp_path / "issuing.new", issuing_ca, number=1001, next_update=short).replace(issuing)  # whole

        def read() -> dict[str, Any] | None:  # taken, or refused (read past its nextUpdate), or not read
            outcomes = ("crl_loaded", "crl_rejected", "crl_fetch_failed")
            lines = gw.logs()[gw.since :]
            return next((e for e in lines if e.get("event") in outcomes and e.get("source") == str(issuing)), None)

        taken = eventually(read, "the gateway's refresh to read the short-lived CRL")
        assert (taken["event"], taken.get("crl_number")) == ("crl_loaded", 1001), f"read too late for the test: {taken}"

        def stale() -> dict[str, Any] | None:
            status, body = _get(readyz)
            return json.loads(body) if status == 503 else None

        answer = eventually(stale, "/readyz 503 once the CRL is stale")
        assert (answer["ready"], answer["kdc"]) == (False, "ok")
        assert [line.split(": ")[0] for line in answer["crls"]] == [str(issuing)], answer  # the root's is current
        assert "stale since" in answer["crls"][0]
        assert datetime.now(UTC) >= short.replace(microsecond=0)
    finally:
        assert gw.stop() == 0


def test_a_stale_crl_under_best_effort_is_named_by_readyz_but_the_gateway_stays_ready(
    lab: LabLayout, tmp_path: Path
) -> None:
    """Under `revocation = "best-effort"` a CRL past its nextUpdate does not stop the gateway serving (the certificates
    it speaks for are served as unknown), so /readyz stays 200 and names the stale CRL in `crls`, as it did. Before, it
    was 503: a balancer or kubelet took out every gateway sharing the late CA at once, the outage best-effort is
    chosen to avoid (under "require" a stale CRL refuses its CA's users, and /readyz is 503: the test above)."""
    issuing_ca = load_ca(lab.pki_dir, "issuing")
    past = datetime.now(UTC) - timedelta(hours=1)
    issuing = write_crl(tmp_path / "issuing.crl", issuing_ca, this_update=past - timedelta(days=1), next_update=past)
    root = write_crl(tmp_path / "root.crl", load_ca(lab.pki_dir, "root"))
    admin_port = free_port()
    text = lab_config(lab, port=free_port(), extra=f'\n[admin]\nbind = "127.0.0.1:{admin_port}"\n')
    lab_crls = f'crls = ["{lab.pki_dir / "crls.pem"}"]'
    policy = 'revocation = "require"'
    assert lab_crls in text
    assert policy in text
    text = text.replace(lab_crls, f'crls = ["{issuing}", "{root}"]').replace(policy, 'revocation = "best-effort"')
    gw = start_gateway(lab, tmp_path, text)
    try:
        done = curl(lab, f"{gw.url}/owa/", "alice")
        assert done.stdout.endswith("\n200"), done.stdout + done.stderr  # served: the gateway can serve
        status, body = _get(f"http://{gw.admin}/readyz")
        answer = json.loads(body)
        assert [line.split(": ")[0] for line in answer["crls"]] == [str(issuing)], answer  # named all the same
        assert (status, answer["ready"], answer["kdc"]) == (200, True, "ok"), answer
    finally:
        assert gw.stop() == 0


def test_a_route_to_the_admin_listener_is_refused_at_start_as_at_a_reload(lab: LabLayout, tmp_path: Path) -> None:
    """A route whose upstream is the gateway's own admin listener (`http://127.0.0.1:<admin port>`) lets every device
    with a certificate read it through the gateway: the traces of every user (who, from where, which paths), the
    metrics. `check-config` and a reload refused it, but `kcd-proxy run` started with it and served bob the admin's
    /traces. It is refused at the start too: exit 2, the route named."""
    port, admin_port = free_port(), free_port()
    route = f'[[routes]]\nprefix = "/traces"\nupstream = "http://127.0.0.1:{admin_port}"\nspn = "HTTP/cas.lab.test"\n'
    config = tmp_path / "gateway.toml"
    config.write_text(lab_config(lab, port=port, extra=f'\n{route}\n[admin]\nbind = "127.0.0.1:{admin_port}"\n'))
    argv = [sys.executable, "-m", "proxy", "run", "--config", str(config)]
    env = {**os.environ, **lab.env()}
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) as run:
        try:
            _, stderr = run.communicate(timeout=WAIT)
        except subprocess.TimeoutExpired:  # it serves: what a device reads through it
            answer = curl(lab, f"https://127.0.0.1:{port}/traces", "bob").stdout
            run.kill()
            run.communicate()
            raise AssertionError(f"kcd-proxy run served a route to its admin listener; bob read {answer!r}") from None
    assert run.returncode == 2, stderr
    assert "routes[1].upstream: " in stderr  # the lab's "/" is routes[0]
    assert "is the admin listener" in stderr


def _tls_admin(lab: LabLayout, tmp_path: Path) -> tuple[Gateway, int]:
    """A gateway whose admin listener takes TLS and alice's certificate only; its admin port."""
    admin_port = free_port()
    p = lab.pki_dir
    bundle = tmp_path / "admin-ca.pem"  # the root and the intermediate: devices send their leaf only
    bundle.write_bytes((p / "root.pem").read_bytes() + (p / "issuing.pem").read_bytes())
    extra = f"""
[admin]
bind = "127.0.0.1:{admin_port}"
certificate = "{p / "server-chain.pem"}"
private_key = "{p / "server.key"}"
client_ca = "{bundle}"
allowed_clients = ["CN=alice"]
"""
    gw = start_gateway(lab, tmp_path, lab_config(lab, port=free_port(), extra=extra))
    return gw, _admin_port(gw)


def test_tls_admin_listener_serves_only_allowed_client_certificates(lab: LabLayout, tmp_path: Path) -> None:
    """With TLS and an allow-list, a listed certificate is served, another trusted one gets 403."""
    gw, admin_port = _tls_admin(lab, tmp_path)
    url = f"https://127.0.0.1:{admin_port}/metrics"
    try:
        status, body = _get(url, client_context(lab, "alice"))
        assert status == 200
        assert "kcd_requests_in_flight" in body
        status, body = _get(url, client_context(lab, "bob"))
        assert status == 403
        assert "allow-list" in body
        assert gw.wait_event("admin_refused")["subject"] == "CN=bob"
    finally:
        assert gw.stop() == 0


def test_tls_admin_listener_to_curl_with_and_without_a_certificate(lab: LabLayout, tmp_path: Path) -> None:
    """Issue 8, as an operator's curl meets it: with TLS and a client-certificate allow-list, curl with the listed
    certificate scrapes /metrics (200); with another trusted one, 403 naming the allow-list; with none, no HTTP
    answer at all (the handshake asks for one). Python's client alone had asked before."""
    gw, admin_port = _tls_admin(lab, tmp_path)
    url = f"https://127.0.0.1:{admin_port}/metrics"
    try:
        listed = curl(lab, url, "alice")
        body, _, status = listed.stdout.rpartition("\n")
        assert status == "200", listed.stderr
        assert "kcd_requests_in_flight" in body
        other = curl(lab, url, "bob")
        body, _, status = other.stdout.rpartition("\n")
        assert (status, "allow-list" in body) == ("403", True), other.stdout + other.stderr
        anonymous = curl(lab, url, None)
        assert anonymous.returncode != 0, anonymous.stdout
        assert anonymous.stdout.rpartition("\n")[2] == "000", anonymous.stdout
    finally:
        assert gw.stop() == 0


def _openssl_admin_certificate(
    lab: LabLayout, where: Path, name: str, serial: int, subject: str = "", issuer: Path | None = None
) -> Path:
    """An operator's client certificate `CN=<name>` (or `subject`, openssl's /A=b/C=d form) from the lab's issuing
    CA, made with the openssl CLI; its path without the .pem suffix (the key beside it), as `client_context` takes
    it."""
    base = where / name
    key, csr, ext = (Path(f"{base}.{suffix}") for suffix in ("key", "csr", "ext"))
    argv = ["openssl", "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    subprocess.run(
        [*argv, "-keyout", str(key), "-out", str(csr), "-subj", subject or f"/CN={name}"],
        check=True,
        capture_output=True,
    )
    ext.write_text(
        "basicConstraints = CA:FALSE\nkeyUsage = critical, digitalSignature\nextendedKeyUsage = clientAuth\n"
    )
    ca = issuer or lab.pki_dir / "issuing.pem"  # (its key beside it)
    argv = ["openssl", "x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca.with_suffix(".key"))]
    argv += ["-days", "5", "-set_serial", hex(serial), "-extfile", str(ext)]
    subprocess.run([*argv, "-out", f"{base}.pem"], check=True, capture_output=True)
    return base


def _get_on(connection: http.client.HTTPSConnection, path: str) -> tuple[int, str]:
    connection.request("GET", path)
    answer = connection.getresponse()
    return answer.status, answer.read().decode()


def test_a_revoked_admin_certificate_is_refused_and_a_crl_refresh_cuts_a_connected_admin(
    lab: LabLayout, tmp_path: Path
) -> None:
    """The TLS admin listener checks its clients' certificates against the CRLs the gateway holds for their CA, on
    every request: a revoked operator certificate on the allow-list gets 403 naming the revocation (it read
    /traces and /metrics before), a good one is served, and once a refreshed CRL lists that one too, the next
    request on its open connection is refused. Certificates from the openssl CLI, under the lab's issuing CA."""
    good = _openssl_admin_certificate(lab, tmp_path, "ops-good", 0xAD0001)
    revoked = _openssl_admin_certificate(lab, tmp_path, "ops-revoked", 0xAD0002)
    issuing_ca = load_ca(lab.pki_dir, "issuing")
    issuing = write_crl(tmp_path / "issuing.crl", issuing_ca, revoked=[0xAD0002])
    root = write_crl(tmp_path / "root.crl", load_ca(lab.pki_dir, "root"))
    admin_port = free_port()
    bundle = tmp_path / "admin-ca.pem"
    bundle.write_bytes((lab.pki_dir / "root.pem").read_bytes() + (lab.pki_dir / "issuing.pem").read_bytes())
    extra = f"""
[admin]
bind = "127.0.0.1:{admin_port}"
certificate = "{lab.pki_dir / "server-chain.pem"}"
private_key = "{lab.pki_dir / "server.key"}"
client_ca = "{bundle}"
allowed_clients = ["CN=ops-good", "CN=ops-revoked"]
"""
    text = lab_config(lab, port=free_port(), extra=extra)
    lab_crls = f'crls = ["{lab.pki_dir / "crls.pem"}"]'
    assert lab_crls in text
    gw = start_gateway(
        lab, tmp_path, text.replace(lab_crls, f'crls = ["{issuing}", "{root}"]\ncrl_refresh_seconds = 1')
    )
    admin_port = _admin_port(gw)
    connection = http.client.HTTPSConnection(
        "127.0.0.1", admin_port, context=client_context(lab, str(good)), timeout=30
    )
    try:
        for path in ("/traces?limit=1", "/metrics"):
            status, body = _get(f"https://127.0.0.1:{admin_port}{path}", client_context(lab, str(revoked)))
            assert status == 403, (path, status, body)
            assert "revoked" in body, body
        refused = gw.wait_event("admin_refused", reason="revoked")
        assert refused["subject"] == "CN=ops-revoked"
        assert _get_on(connection, "/metrics")[0] == 200
        gw.mark()
        write_crl(tmp_path / "next.crl", issuing_ca, revoked=[0xAD0001, 0xAD0002], number=1001).replace(issuing)
        gw.wait_event("crl_loaded", source=str(issuing), crl_number=1001)

        # `crl_loaded` is logged once the CRL is vetted, before the set it joins is indexed (in a thread) and put in
        # force: the open connection is asked until that set refuses it (a single request right after the line was
        # served 200 once, in a fresh-clone run)
        def refusing() -> tuple[int, str] | None:
            answer = _get_on(connection, "/traces?limit=1")  # the same TLS connection, admitted before
            return answer if answer[0] == 403 else None

        status, body = eventually(refusing, "the open admin connection refused under the refreshed CRL")
        assert "revoked" in body
    finally:
        connection.close()
        assert gw.stop() == 0


def test_an_operators_own_ca_is_checked_against_admin_crls(lab: LabLayout, tmp_path: Path) -> None:
    """Operators' certificates from a CA of their own (openssl CLI; the devices' CRLs cannot speak for it) are
    checked against `[admin] crls`, re-read every `crl_refresh_seconds`: the revoked one gets 403 naming the
    revocation, the good one is served, and a CRL revoking it too refuses the next request on its open connection."""
    ca, ca_key = tmp_path / "ops-ca.pem", tmp_path / "ops-ca.key"
    argv = ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "5"]
    argv += ["-subj", "/CN=Operators CA", "-addext", "basicConstraints=critical,CA:TRUE"]
    argv += ["-addext", "keyUsage=critical,keyCertSign,cRLSign", "-keyout", str(ca_key), "-out", str(ca)]
    subprocess.run(argv, check=True, capture_output=True)
    good = _openssl_admin_certificate(lab, tmp_path, "ops-good", 0xAD0201, issuer=ca)
    revoked = _openssl_admin_certificate(lab, tmp_path, "ops-revoked", 0xAD0202, issuer=ca)
    operators_ca = load_ca(tmp_path, "ops-ca")
    crl = write_crl(tmp_path / "ops.crl", operators_ca, revoked=[0xAD0202])
    admin_port = free_port()
    extra = f"""
[admin]
bind = "127.0.0.1:{admin_port}"
certificate = "{lab.pki_dir / "server-chain.pem"}"
private_key = "{lab.pki_dir / "server.key"}"
client_ca = "{ca}"
allowed_clients = ["CN=ops-good", "CN=ops-revoked"]
crls = ["{crl}"]
"""
    text = lab_config(lab, port=free_port(), extra=extra)
    lab_crls = f'crls = ["{lab.pki_dir / "crls.pem"}"]'
    gw = start_gateway(lab, tmp_path, text.replace(lab_crls, f"{lab_crls}\ncrl_refresh_seconds = 1"))
    admin_port = _admin_port(gw)
    context = client_context(lab, str(good))
    connection = http.client.HTTPSConnection("127.0.0.1", admin_port, context=context, timeout=30)
    try:
        status, body = _get(f"https://127.0.0.1:{admin_port}/traces?limit=1", client_context(lab, str(revoked)))
        assert (status, "revoked" in body) == (403, True), (status, body)
        assert gw.wait_event("admin_refused", reason="revoked")["subject"] == "CN=ops-revoked"
        assert _get_on(connection, "/metrics")[0] == 200
        gw.mark()
        write_crl(tmp_path / "next.crl", operators_ca, revoked=[0xAD0201, 0xAD0202], number=1001).replace(crl)
        gw.wait_event("crl_loaded", source=str(crl), crl_number=1001)  # vetted; its set in force a moment later

        def refusing() -> tuple[int, str] | None:
            answer = _get_on(connection, "/metrics")  # the same TLS connection, admitted before
            return answer if answer[0] == 403 else None

        status, body = eventually(refusing, "the open admin connection refused under the refreshed [admin] crls")
        assert "revoked" in body, body
    finally:
        connection.close()
        assert gw.stop() == 0


def test_the_admin_allow_list_matches_a_whole_subject_exactly(lab: LabLayout, tmp_path: Path) -> None:
    """`allowed_clients = ["CN=alice"]` (the lab's users' CA as `client_ca`) admits the subject `CN=alice` and
    nothing that merely contains or resembles it: `O=Evil, CN=alice`, `CN=alice, OU=x`, `CN=Alice`, `CN=alice ` are
    each 403 `admin_refused` (openssl-CLI certificates under the same CA)."""
    gw, admin_port = _tls_admin(lab, tmp_path)
    url = f"https://127.0.0.1:{admin_port}/traces?limit=1"
    try:
        exact = _openssl_admin_certificate(lab, tmp_path, "exact", 0xAD0101, "/CN=alice")
        assert _get(url, client_context(lab, str(exact)))[0] == 200
        for n, subject in enumerate(["/O=Evil/CN=alice", "/CN=alice/OU=x", "/CN=Alice", "/CN=alice "]):
            cert = _openssl_admin_certificate(lab, tmp_path, f"near{n}", 0xAD0110 + n, subject)
            status, body = _get(url, client_context(lab, str(cert)))
            assert (status, "allow-list" in body) == (403, True), (subject, status, body)
        assert len(gw.wait_events("admin_refused", count=4)) >= 4
    finally:
        assert gw.stop() == 0


def test_tls_handshakes_never_finished_do_not_hold_the_admin_listener(lab: LabLayout, tmp_path: Path) -> None:
    """Anyone who reaches a TLS admin listener (bound off loopback) could keep it full without a certificate:
    connections that never finish their handshake held ADMIN_MAX_CONNECTIONS slots for asyncio's 60 s handshake
    timeout, renewed at will. They are closed after ADMIN_SILENT_SECONDS, so the allowed client is served again
    within a few times that while their client still holds them open."""
    gw, admin_port = _tls_admin(lab, tmp_path)
    url = f"https://127.0.0.1:{admin_port}/healthz"
    stalled = []
    try:
        gw.mark()
        for _ in range(ADMIN_MAX_CONNECTIONS + 1):  # the last one is refused, and says so
            stalled.append(socket.create_connection(("127.0.0.1", admin_port), timeout=15))
        gw.wait_event("admin_connection_limit_reached")  # the next one is refused: every slot is held
        started = time.monotonic()

        def served() -> bool:
            try:
                return _get(url, client_context(lab, "alice"))[0] == 200
            except (OSError, http.client.HTTPException):
                return False

        eventually(served, "alice served again", timeout=3 * ADMIN_SILENT_SECONDS)
        assert time.monotonic() - started < 3 * ADMIN_SILENT_SECONDS
    finally:
        for sock in stalled:
            sock.close()
        assert gw.stop() == 0


def test_a_probe_is_served_at_once_while_unfinished_tls_handshakes_fill_the_admin_listener(
    lab: LabLayout, tmp_path: Path
) -> None:
    """ADMIN_MAX_CONNECTIONS raw connections that start a TLS handshake and never finish it (a record header, the rest
    of the ClientHello never sent), held open: the allowed client is served at its first try, in far less than the
    handshake timeout, and the oldest of them is closed to make room. Before, every new connection was closed at once
    while they held every place, for ADMIN_SILENT_SECONDS, renewed at will: a kubelet's probe refused meanwhile."""
    gw, admin_port = _tls_admin(lab, tmp_path)
    stalled: list[socket.socket] = []
    try:
        gw.mark()
        for _ in range(ADMIN_MAX_CONNECTIONS):
            sock = socket.create_connection(("127.0.0.1", admin_port), timeout=15)
            sock.sendall(b"\x16\x03\x01\x02\x00")  # a handshake record of 512 bytes, none of which follow
            stalled.append(sock)
        started = time.monotonic()  # the probe's connection is accepted after theirs (the listen queue's order)
        assert _get(f"https://127.0.0.1:{admin_port}/healthz", client_context(lab, "alice"))[0] == 200
        assert time.monotonic() - started < ADMIN_SILENT_SECONDS
        gw.wait_event("admin_connection_limit_reached")
        eventually(lambda: _closed(stalled[0]), "the oldest unfinished handshake closed for the probe")
        newest_closed = _closed(stalled[-1])
        # (after ADMIN_SILENT_SECONDS its handshake timeout closes it anyway: only a machine that slow cannot tell)
        assert not newest_closed or time.monotonic() - started >= ADMIN_SILENT_SECONDS, "the newest was closed"
    finally:
        for sock in stalled:
            sock.close()
        assert gw.stop() == 0


def _get_as(admin: str, path: str, host: str) -> tuple[int, str]:
    """GET `path` from the admin listener with the Host header `host`, as a browser would send it."""
    connection = http.client.HTTPConnection(urlsplit(admin).netloc, timeout=15)
    try:
        connection.request("GET", path, headers={"Host": host})
        response = connection.getresponse()
        return response.status, response.read().decode()
    finally:
        connection.close()


def test_plain_admin_listener_answers_loopback_names_only(lab: LabLayout, admin_gateway: tuple[Gateway, str]) -> None:
    """DNS rebinding: a web page whose name an attacker re-pointed at 127.0.0.1 reads nothing from a plain-HTTP
    admin listener (no trace of who signed in from where, no metric, no health): any Host but a loopback address,
    `localhost` or the bind's own name gets 421; the loopback names are served."""
    gw, admin = admin_gateway
    assert curl(lab, gw.url + "/owa/", "alice").returncode == 0
    port = urlsplit(admin).port
    for path in ("/", "/traces", "/traces?limit=1", "/metrics", "/healthz", "/readyz", "/trace/x"):
        for host in (f"rebind.attacker.example:{port}", "attacker.example", f"127.0.0.1.attacker.example:{port}"):
            status, body = _get_as(admin, path, host)
            assert status == 421, (path, host, status)
            assert "alice" not in body
            assert "kcd_" not in body
            assert "loopback" in body
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"LOCALHOST:{port}", f"[::1]:{port}", "127.0.0.1"):
        status, body = _get_as(admin, "/traces?limit=1", host)
        assert status == 200, (host, status)
        assert "alice@lab.test" in body


def test_trace_limit_that_is_not_an_ascii_number_is_a_400(admin_gateway: tuple[Gateway, str]) -> None:
    """A hostile scrape's `limit` (a superscript digit, 5,000 digits, a sign) is a 400 naming the parameter,
    never a 500 with a traceback in the log."""
    _, admin = admin_gateway
    for limit in ("%C2%B2", "9" * 5000, "-1", "0", "+5", "%EF%BC%95"):
        for path in ("/traces", "/"):
            status, body = _get(f"{admin}{path}?limit={limit}")
            assert status == 400, (path, limit[:10], status)
            assert "limit" in body
    assert _get(admin + "/traces?limit=100000")[0] == 200  # a big number is the ring's size at most


def _answers(url: str) -> bool:
    """Whether `url` answers 200 (a connection closed by the admin listener's cap is no answer)."""
    try:
        return _get(url)[0] == 200
    except (OSError, http.client.HTTPException):
        return False


def _closed(sock: socket.socket) -> bool:
    """Whether the admin listener closed `sock` (what it answered before is read and dropped), without waiting."""
    sock.setblocking(False)
    try:
        while sock.recv(65536):
            pass
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True
    return True


def test_idle_connections_to_the_admin_listener_are_capped(lab: LabLayout, admin_gateway: tuple[Gateway, str]) -> None:
    """Any local user reaches the loopback admin listener: 600 connections that never send a request held 600 of
    the gateway's file descriptors (the device listener is capped, this one was not; at a soft limit of 1024 the
    devices' accept() then fails). Past ADMIN_MAX_CONNECTIONS each new one takes the place of the oldest, which is
    closed: the descriptors stay bounded, devices are served meanwhile, and the admin answers at once while their
    client still holds the rest."""
    gw, admin = admin_gateway
    port = urlsplit(admin).port
    assert port is not None
    fds = Path(f"/proc/{gw.proc.pid}/fd")
    before = len(list(fds.iterdir()))
    idle = []
    try:
        for _ in range(600):
            idle.append(socket.create_connection(("127.0.0.1", port), timeout=15))
        assert eventually(lambda: _closed(idle[0]), "the oldest connection closed to make room: the cap is reached")
        bound = before + ADMIN_MAX_CONNECTIONS + 20
        eventually(lambda: len(list(fds.iterdir())) <= bound, f"at most {bound} descriptors open")
        assert curl(lab, gw.url + "/owa/", "alice").returncode == 0
        assert _answers(admin + "/healthz")  # in the place of the oldest of the idle ones
    finally:
        for sock in idle:
            sock.close()


def test_connections_that_send_a_request_or_part_of_one_do_not_hold_the_admin_listener(
    lab: LabLayout, admin_gateway: tuple[Gateway, str]
) -> None:
    """Any local user could shut the admin listener (and with it the orchestrator's /readyz and /healthz probes)
    for an hour: connections that sent one request and then idled (aiohttp's keep-alive, 3630 s) or half a request
    head escaped the silence timer and held the ADMIN_MAX_CONNECTIONS slots. Both are closed once idle for
    ADMIN_SILENT_SECONDS (no new connection asking meanwhile: a new one would take the oldest one's place), and the
    admin answers while their client still holds them open."""
    gw, admin = admin_gateway
    port = urlsplit(admin).port
    assert port is not None
    held = []
    try:
        for i in range(ADMIN_MAX_CONNECTIONS):
            sock = socket.create_connection(("127.0.0.1", port), timeout=15)
            if i % 2:  # a whole request, answered, then the connection kept alive and idle
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            else:  # a request head that never ends
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            held.append(sock)
        timeout = 4 * ADMIN_SILENT_SECONDS
        assert eventually(lambda: all(_closed(s) for s in held), "each closed by its timer", timeout=timeout)
        assert _answers(admin + "/healthz")
        assert curl(lab, gw.url + "/owa/", "alice").returncode == 0
    finally:
        for sock in held:
            sock.close()


_HEAD = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n"


def _trickling(port: int, kind: str) -> socket.socket:
    """A connection to the admin listener that is never silent for long and never done: it has sent a request head
    (`head`) or a body (`body`) in part, and `_keep_busy` sends the rest a byte at a time."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=15)
    sock.sendall(_HEAD + (b"X-Slow: " if kind == "head" else b"Content-Length: 1000000\r\n\r\n"))
    sock.setblocking(False)
    return sock


def _pipelined(sock: socket.socket) -> None:
    """As many more whole requests as the buffers take now (`sock` is non-blocking)."""
    with contextlib.suppress(BlockingIOError):
        for _ in range(40_000):
            sock.send(_HEAD + b"\r\n")


def _keep_busy(socks: list[socket.socket], stop: threading.Event, *, read: bool = False) -> None:
    """Every half second, a byte from each of `socks`; or (`read`) a byte read from each and more requests sent,
    so that the gateway has answers to write until they fill every buffer, however fast it reads."""
    while not stop.wait(0.5):
        for sock in socks:
            with contextlib.suppress(OSError):
                if read:
                    sock.recv(1)
                    _pipelined(sock)
                else:
                    sock.send(b"x")


@pytest.mark.parametrize("kind", ["head", "body"])
def test_connections_that_trickle_a_request_do_not_hold_the_admin_listener(
    own_admin_gateway: tuple[Gateway, str], kind: str
) -> None:
    """A local user holds ADMIN_MAX_CONNECTIONS connections that are never silent: each trickles its request's head
    or body a byte every half second. A request's head must be whole ADMIN_SILENT_SECONDS after the connection
    opened (aiohttp's keep-alive timer) and a body the handler leaves unread is read for at most 10 s (aiohttp's
    lingering close): each is closed (no new connection asking meanwhile: a new one would take the oldest one's
    place), and the admin answers /healthz."""
    _, admin = own_admin_gateway
    port = urlsplit(admin).port
    assert port is not None
    socks: list[socket.socket] = []
    stop = threading.Event()
    busy = threading.Thread(target=_keep_busy, args=(socks, stop), daemon=True)
    try:
        socks += [_trickling(port, kind) for _ in range(ADMIN_MAX_CONNECTIONS)]
        busy.start()
        timeout = 4 * ADMIN_SILENT_SECONDS
        assert eventually(lambda: all(_closed(s) for s in socks), "each closed by its timers", timeout=timeout)
        assert _answers(admin + "/healthz")
    finally:
        stop.set()
        if busy.is_alive():
            busy.join()
        for sock in socks:
            sock.close()


def test_a_client_that_reads_its_answers_slowly_is_cut(own_admin_gateway: tuple[Gateway, str]) -> None:
    """A local user's connection pipelines requests and reads the answers a byte every half second, its receive
    buffer small: past the kernel's buffers the answers wait in the gateway's, and aiohttp's timers never end such
    a connection (its close waits for what is unsent), so 64 of them held the admin listener, and /readyz, for as
    long as they liked. A connection whose answers still wait at two looks ADMIN_SILENT_SECONDS apart is cut
    (`admin_send_stalled`); before, this one was served on for the test's whole wait."""
    gw, admin = own_admin_gateway
    port = urlsplit(admin).port
    assert port is not None
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(15)
    stop = threading.Event()
    busy = threading.Thread(target=_keep_busy, args=([sock], stop), kwargs={"read": True}, daemon=True)
    try:
        sock.connect(("127.0.0.1", port))
        sock.setblocking(False)
        _pipelined(sock)  # and more each half second: their answers outgrow every buffer on the way
        busy.start()
        stalled = gw.wait_event("admin_send_stalled", timeout=6 * ADMIN_SILENT_SECONDS)
        assert stalled["unsent"] > 0
        assert stalled["seconds"] == ADMIN_SILENT_SECONDS
        stop.set()
        busy.join()
        sock.setblocking(True)

        def cut() -> bool:
            try:
                return sock.recv(65536) == b""
            except ConnectionResetError:
                return True

        assert eventually(cut, "the connection cut")
        assert _answers(admin + "/healthz")
    finally:
        stop.set()
        if busy.is_alive():
            busy.join()
        sock.close()


def test_a_client_that_reads_its_answers_slowly_but_steadily_is_not_cut(own_admin_gateway: tuple[Gateway, str]) -> None:
    """A scraper on a slow link: its receive buffer small, it reads a few KiB every second of answers larger than
    every buffer on the way (pipelined requests, more of them each second), for longer than two looks of the stall
    check. It takes bytes between every two looks, so it is served on: the check judges by progress (the bytes the
    client's kernel acknowledged, or the write buffer shrinking), not by answers waiting. Failed before: answers
    waited in the write buffer at two looks ADMIN_SILENT_SECONDS apart, and the connection was cut while it read."""
    gw, admin = own_admin_gateway
    port = urlsplit(admin).port
    assert port is not None
    mark = gw.mark()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(15)
    try:
        sock.connect(("127.0.0.1", port))
        sock.setblocking(False)
        _pipelined(sock)
        read = 0
        deadline = time.monotonic() + 2.5 * ADMIN_SILENT_SECONDS  # past two looks, whenever the first one falls
        while time.monotonic() < deadline:
            sock.setblocking(True)
            for _ in range(2):  # 4 KiB a second at most: far slower than loopback, and never stopped
                try:
                    chunk = sock.recv(2048)
                except ConnectionResetError:
                    chunk = b""
                assert chunk, f"the connection was cut after {read} bytes: {gw.events('admin_send_stalled', mark)}"
                read += len(chunk)
            sock.setblocking(False)
            _pipelined(sock)  # answers keep waiting in the gateway's buffer
            time.sleep(1)  # the reader's pace (what the test is about), not a wait for the gateway
        assert gw.events("admin_send_stalled", mark) == []
        assert read > 10_000
    finally:
        sock.close()
    assert _answers(admin + "/healthz")


def test_connections_that_keep_asking_do_not_starve_readyz(own_admin_gateway: tuple[Gateway, str]) -> None:
    """A local user holds ADMIN_MAX_CONNECTIONS connections, each asking /healthz again every 2 s and reading the
    answer: never silent, never slow, never cut, so every new connection was closed at once and /readyz failed for as
    long as they liked (0 of 29 probes in 30 s). At the cap a new connection now takes the place of the oldest one
    past its TLS handshake: the probes are served while those connections keep asking."""
    _, admin = own_admin_gateway
    port = urlsplit(admin).port
    assert port is not None
    socks = [socket.create_connection(("127.0.0.1", port), timeout=15) for _ in range(ADMIN_MAX_CONNECTIONS)]
    stop, asked = threading.Event(), threading.Event()

    def keep_asking() -> None:
        while not stop.is_set():
            for sock in socks:
                with contextlib.suppress(OSError):
                    sock.sendall(_HEAD + b"\r\n")
                    sock.recv(4096)
            asked.set()  # every connection asked once, and was answered (or cut): all of them were open at once
            stop.wait(2)

    asking = threading.Thread(target=keep_asking, daemon=True)
    try:
        asking.start()
        assert asked.wait(WAIT)
        served = [_answers(admin + "/readyz") for _ in range(5)]
        assert served == [True] * 5
    finally:
        stop.set()
        asking.join()
        for sock in socks:
            sock.close()


class _HeldKdc:
    """A TCP relay to the lab's KDC that holds what clients send while `hold` is set (`held` says something came):
    the gateway's AS exchange waits in it, as it would for a slow KDC."""

    def __init__(self, kdc_port: int) -> None:
        self.hold, self.held, self._stop = threading.Event(), threading.Event(), threading.Event()
        self._kdc_port = kdc_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.port = self._listener.getsockname()[1]
        self._threads = [threading.Thread(target=self._serve, daemon=True)]
        self._threads[0].start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            kdc = socket.create_connection(("127.0.0.1", self._kdc_port), timeout=30)
            for source, target, holds in ((client, kdc, True), (kdc, client, False)):
                thread = threading.Thread(target=self._pump, args=(source, target, holds), daemon=True)
                thread.start()
                self._threads.append(thread)

    def _pump(self, source: socket.socket, target: socket.socket, holds: bool) -> None:
        with contextlib.suppress(OSError):
            source.settimeout(0.2)
            while not self._stop.is_set():
                try:
                    data = source.recv(65536)
                except TimeoutError:
                    continue
                if not data:
                    break
                while holds and self.hold.is_set() and not self._stop.is_set():
                    self.held.set()
                    self._stop.wait(0.05)
                target.sendall(data)
        with contextlib.suppress(OSError):
            target.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()
        self._listener.close()


def test_a_flood_of_new_connections_does_not_evict_a_probe_being_answered(lab: LabLayout, tmp_path: Path) -> None:
    """A kubelet's /readyz waits for its KDC probe (the KDC slow: a relay holds the AS exchange) while a local user
    opens three times ADMIN_MAX_CONNECTIONS new admin connections: at the cap each new one takes the place of the
    oldest idle one, never the probe's, which is answered 200 once the KDC answers. Before, the probe's connection
    became the oldest within ADMIN_MAX_CONNECTIONS accepts and was closed unanswered (seen with a plain flood too: the
    first /readyz past the cache cut, 1 of 3)."""
    relay = _HeldKdc(lab.kdc_port)
    kdc = f"kdc = 127.0.0.1:{lab.kdc_port}"
    text = lab.krb5_conf.read_text()
    assert kdc in text, text
    krb5_conf = tmp_path / "krb5-relay.conf"
    krb5_conf.write_text(text.replace(kdc, f"kdc = 127.0.0.1:{relay.port}"))
    admin_port = free_port()
    config = lab_config(
        lab, port=free_port(), extra=f'\n[admin]\nbind = "127.0.0.1:{admin_port}"\n', krb5_conf=krb5_conf
    )
    gw = start_gateway(lab, tmp_path / "gateway", config)
    flood: list[socket.socket] = []
    answered: list[bool] = []
    try:
        relay.hold.set()
        probe = threading.Thread(target=lambda: answered.append(_answers(f"http://127.0.0.1:{admin_port}/readyz")))
        probe.start()
        assert relay.held.wait(WAIT), "the probe's AS exchange never reached the relay"
        flood = [
            socket.create_connection(("127.0.0.1", admin_port), timeout=15) for _ in range(3 * ADMIN_MAX_CONNECTIONS)
        ]
        eventually(lambda: _closed(flood[2 * ADMIN_MAX_CONNECTIONS - 1]), "the cap closed the flood's oldest")
        relay.hold.clear()
        probe.join(WAIT)
        assert answered == [True]
    finally:
        relay.hold.clear()
        for sock in flood:
            sock.close()
        gw.stop()
        relay.close()


def _curl_headers(url: str, *args: str) -> tuple[int, dict[str, str], str]:
    """curl GET `url`: status, the answer's headers (lower-case names), body."""
    argv = ["curl", "-sS", "--max-time", "30", "-D", "/dev/stderr", *args, url]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True)
    lines = done.stderr.splitlines()
    headers = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if colon:
            headers[name.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), headers, done.stdout


def test_every_admin_answer_forbids_sniffing_and_anything_but_its_own_style(
    lab: LabLayout, admin_gateway: tuple[Gateway, str]
) -> None:
    """Each kind of admin answer (the HTML pages, JSON, /metrics' text, a 400, a 404, a 421 to a foreign Host) says
    `X-Content-Type-Options: nosniff` and a Content-Security-Policy that loads nothing (`default-src 'none'`), frames
    nowhere and lets the pages' own inline style in by its hash only; the trace pages are HTML that shows what devices
    sent. Before, none had either header."""
    gw, admin = admin_gateway
    gw.mark()
    assert curl(lab, gw.url + "/owa/", "alice").returncode == 0
    request_id = gw.wait_event("request", upn="alice@lab.test")["request_id"]
    port = urlsplit(admin).port
    answers = {
        path: _curl_headers(admin + path)
        for path in ("/", "/?user=alice@lab.test", f"/trace/{request_id}", "/traces", f"/traces/{request_id}")
    }
    answers |= {path: _curl_headers(admin + path) for path in ("/healthz", "/readyz", "/metrics", "/nowhere")}
    answers["400"] = _curl_headers(admin + "/traces?limit=-1")
    answers["421"] = _curl_headers(admin + "/metrics", "-H", f"Host: attacker.example:{port}")
    assert [answers[kind][0] for kind in ("/", f"/trace/{request_id}", "/nowhere", "400", "421")] == [
        200,
        200,
        404,
        400,
        421,
    ]
    assert "<style>" in answers["/"][2]
    for kind, (_, headers, body) in answers.items():
        assert headers.get("x-content-type-options") == "nosniff", kind
        policy = headers.get("content-security-policy", "")
        assert "default-src 'none'" in policy, kind
        assert "frame-ancestors 'none'" in policy, kind
        assert "script-src" not in policy, kind
        assert "unsafe-inline" not in policy, kind
        if "<style>" in body:  # the page's own style is let in, by its hash
            style = body.split("<style>", 1)[1].split("</style>", 1)[0]
            digest = base64.b64encode(hashlib.sha256(style.encode()).digest()).decode()
            assert f"'sha256-{digest}'" in policy, kind


def test_readyz_says_when_the_listeners_own_certificate_has_expired(lab: LabLayout, tmp_path: Path) -> None:
    """The device listener's `listener.certificate` past its notAfter fails every device's handshake: /readyz was 200
    all the same. It is ready while the certificate is valid, then 503 naming the file and the fix (renew it, then
    reload)."""
    not_after = (datetime.now(UTC) + timedelta(seconds=25)).replace(microsecond=0)
    chain, key, _ = write_server_certificate(tmp_path / "tls", load_ca(lab.pki_dir, "issuing"), not_after=not_after)
    admin_port = free_port()
    text = lab_config(lab, port=free_port(), extra=f'\n[admin]\nbind = "127.0.0.1:{admin_port}"\n')
    text = text.replace(str(lab.pki_dir / "server-chain.pem"), str(chain)).replace(
        str(lab.pki_dir / "server.key"), str(key)
    )
    gw = start_gateway(lab, tmp_path / "gw", text)
    admin = f"http://127.0.0.1:{admin_port}"
    try:
        status, body = _get(admin + "/readyz")
        if datetime.now(UTC) < not_after:  # asked before the certificate ended (a stalled start may pass it)
            assert status == 200, body
        eventually(lambda: datetime.now(UTC) > not_after + timedelta(seconds=1), "the certificate's end", WAIT)
        assert curl(lab, gw.url + "/owa/", "alice").returncode != 0  # what every device now meets
        status, body = _get(admin + "/readyz")
        assert status == 503, body
        answer = json.loads(body)
        assert answer["ready"] is False
        assert str(chain) in answer["tls"]
        assert "expired" in answer["tls"]
        assert "reload" in answer["tls"]
    finally:
        gw.stop()


def _full_listener_gateway(lab: LabLayout, directory: Path, *, workers: int = 1) -> tuple[Gateway, str]:
    """A gateway of `workers` workers with SLOTS device connections each (handshakes left unfinished are kept for
    a minute: a loaded machine must not close them before the test looks) and a plain admin listener."""
    port, admin_port = free_port(), free_port()
    text = lab_config(lab, port=port, extra=f'\n[admin]\nbind = "127.0.0.1:{admin_port}"\n')
    bind = f'bind = "127.0.0.1:{port}"\n'
    assert bind in text
    listener = f"{bind}max_connections = {SLOTS}\nhandshake_timeout = 60\n"
    text = text.replace(bind, listener + (f"workers = {workers}\n" if workers > 1 else ""))
    return start_gateway(lab, directory, text), f"http://127.0.0.1:{admin_port}"


SLOTS = 2  # listener.max_connections of `_full_listener_gateway`


def _readiness(admin: str) -> tuple[int, dict[str, Any]]:
    status, body = _get(admin + "/readyz")
    return status, json.loads(body)


def _readiness_once(admin: str, status: int) -> dict[str, Any]:
    """The body of the first /readyz answered with `status` (polled until WAIT)."""

    def answer() -> dict[str, Any] | None:
        got, body = _readiness(admin)
        return body if got == status else None

    return eventually(answer, f"/readyz answering {status}")


def test_readyz_is_503_while_the_device_listener_is_full(lab: LabLayout, tmp_path: Path) -> None:
    """Every device connection slot taken (listener.max_connections, here by connections that never finish their
    handshake): /readyz answers 503 naming the listener and the key, so a balancer sends new devices to a gateway
    that can take them; once a connection closes, 200 again and the body as it was. Before, /readyz said 200 while
    every new device waited in the listen backlog."""
    gw, admin = _full_listener_gateway(lab, tmp_path / "gw")
    held: list[socket.socket] = []
    try:
        assert _readiness(admin)[0] == 200
        held = [socket.create_connection(("127.0.0.1", gw.port), timeout=15) for _ in range(SLOTS)]
        body = _readiness_once(admin, 503)
        assert body["ready"] is False
        assert body["kdc"] == "ok"
        assert "listener.max_connections" in body["listener"], body
        assert f"{SLOTS} of {SLOTS}" in body["listener"], body
        held.pop().close()
        body = _readiness_once(admin, 200)
        assert "listener" not in body
    finally:
        for sock in held:
            sock.close()
        gw.stop()


def test_readyz_of_two_workers_is_503_only_when_both_listeners_are_full(lab: LabLayout, tmp_path: Path) -> None:
    """Two workers of SLOTS device connections each, both full (20 connections: the kernel spreads them, so each gets
    its SLOTS, the rest wait in the backlog): whichever worker the probe reaches answers 503 naming both (it asks the
    other, as for /metrics); with every connection closed, 200."""
    gw, admin = _full_listener_gateway(lab, tmp_path / "gw", workers=2)
    held: list[socket.socket] = []
    try:
        gw.wait_events("listening", 2)
        held = [socket.create_connection(("127.0.0.1", gw.port), timeout=15) for _ in range(20)]
        body = _readiness_once(admin, 503)
        assert f"worker 1: {SLOTS} of {SLOTS}, worker 2: {SLOTS} of {SLOTS}" in body["listener"], body
        for _ in range(4):  # each probe reaches one of the two workers: each says so
            assert _readiness(admin)[0] == 503
        for sock in held:
            sock.close()
        _readiness_once(admin, 200)
    finally:
        for sock in held:
            sock.close()
        gw.stop()


class _ForeignSibling:
    """A Unix socket in a worker's place among the siblings, answering /listener with what no worker sends: each
    connection in turn gets a body that is not JSON, JSON that is not the figures, then a 200 of a gigabyte sent as
    fast as the asker reads it. `answered` counts the connections it answered."""

    ANSWERS = (b"not json", b'{"connections": Infinity, "limit": 2}')

    def __init__(self, path: Path) -> None:
        self.answered = 0
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(str(path))
        self._server.listen(16)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                connection, _ = self._server.accept()
                with connection:
                    connection.recv(65536)
                    turn, self.answered = self.answered % 3, self.answered + 1
                    with contextlib.suppress(OSError):
                        self._answer(connection, turn)

    def _answer(self, connection: socket.socket, turn: int) -> None:
        if turn < len(self.ANSWERS):
            body = self.ANSWERS[turn]
            connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            return
        connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % 2**30)
        chunk = b"0" * 2**20
        for _ in range(2**10):
            connection.sendall(chunk)

    def close(self) -> None:
        self._server.shutdown(socket.SHUT_RDWR)
        self._server.close()
        self._thread.join(timeout=WAIT)


def _peak_kib(pid: int) -> int:
    """A process's peak resident memory (VmHWM), KiB."""
    line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith("VmHWM:"))
    return int(line.split()[1])


def test_readyz_of_a_full_worker_whose_sibling_answers_what_no_worker_sends_is_an_answer(
    lab: LabLayout, tmp_path: Path
) -> None:
    """Both workers full, and worker 2's sibling socket answered by another process of the gateway's user: a body
    that is not JSON, JSON that is not the figures (Infinity), a gigabyte. Whichever worker a probe reaches, /readyz
    answers 200 or 503 (worker 1 naming worker 2 unanswered, taken as having no room, as a hung one is), and worker 1's
    peak memory grows by less than 32 MiB. Before, worker 1 answered 500 to the first two (json.loads and int raised
    out of the handler) and read the gigabyte for READY_ASK_TIMEOUT into its memory (hundreds of MiB)."""
    gw, admin = _full_listener_gateway(lab, tmp_path / "gw", workers=2)
    held: list[socket.socket] = []
    foreign: _ForeignSibling | None = None
    try:
        listening = gw.wait_events("admin_listening", 2)
        first = next(e["pid"] for e in listening if Path(e["siblings"]).name == "1.sock")
        second = next(Path(e["siblings"]) for e in listening if e["siblings"].endswith("/2.sock"))
        held = [socket.create_connection(("127.0.0.1", gw.port), timeout=15) for _ in range(20)]
        _readiness_once(admin, 503)
        second.unlink()
        foreign = _ForeignSibling(second)
        peak = _peak_kib(first)
        statuses: list[tuple[int, str]] = []
        deadline = time.monotonic() + WAIT
        while foreign.answered < 6 and time.monotonic() < deadline:
            status, body = _get(admin + "/readyz")
            statuses.append((status, body))
            assert status in (200, 503), statuses
        assert foreign.answered >= 6, statuses
        named = [json.loads(body) for _, body in statuses if "unanswered" in body]
        assert named, statuses
        assert all(b["unanswered"].startswith("worker 2 did not answer") for b in named), named
        assert _peak_kib(first) - peak < 32 * 1024
    finally:
        if foreign is not None:
            foreign.close()
        for sock in held:
            sock.close()
        gw.stop()


def test_readyz_of_a_full_worker_beside_a_hung_sibling_is_503(lab: LabLayout, tmp_path: Path) -> None:
    """Two workers of SLOTS device connections each, one of them stopped (SIGSTOP: the kernel still gives its socket
    its share of new connections, which wait in its backlog), 20 connections opened: a probe the kernel gives the
    running worker, full, asks its sibling, gets no answer within READY_ASK_TIMEOUT and answers 503 within kubelet's
    1 s, naming the silent worker in `listener` and `unanswered`. Before, the silent sibling was taken as having room:
    200, and the balancer went on sending devices to a gateway that could take none. Probes the kernel gives the
    stopped worker wait for it: at most 16 tries, each of a 3 s timeout, for one that reaches the running one."""
    gw, admin = _full_listener_gateway(lab, tmp_path / "gw", workers=2)
    held: list[socket.socket] = []
    stopped = sorted({e["pid"] for e in gw.wait_events("listening", 2)})[0]
    os.kill(stopped, signal.SIGSTOP)
    try:
        held = [socket.create_connection(("127.0.0.1", gw.port), timeout=15) for _ in range(20)]
        answers: list[tuple[float, int, str]] = []
        for _ in range(16):
            started = time.monotonic()
            try:
                with urllib.request.urlopen(admin + "/readyz", timeout=3) as r:  # noqa: S310  loopback test URL
                    answers.append((time.monotonic() - started, r.status, r.read().decode()))
            except urllib.error.HTTPError as e:
                answers.append((time.monotonic() - started, e.code, e.read().decode()))
            except (TimeoutError, urllib.error.URLError):  # the stopped worker's admin socket
                continue
            if "did not answer" in answers[-1][2]:  # the running worker, full, asked its sibling
                break
        _, status, text = answers[-1] if answers else (0.0, 0, "no answer from the running worker")
        assert status == 503, answers
        body = json.loads(text)
        assert f"{SLOTS} of {SLOTS} connections" in body["listener"], body
        assert "did not answer): new devices wait in the listen backlog" in body["listener"], body
        assert body["unanswered"].endswith("did not answer within 0.5 s (taken as having no room)"), body
    finally:
        os.kill(stopped, signal.SIGCONT)
        for sock in held:
            sock.close()
        gw.stop()


class _ForeignScrapeSibling(_ForeignSibling):
    """`_ForeignSibling` for the scrapes: /metrics, /traces and /traces/<id>, each path in turn answered with a body
    that is not the answer, JSON of another shape, then a gigabyte; `asked` counts each path's connections."""

    ANSWERS = (b"not metrics, not json", b'{"records": 1, "held": "x"}')

    def __init__(self, path: Path) -> None:
        self.asked: dict[str, int] = {}
        super().__init__(path)

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                connection, _ = self._server.accept()
                with connection:
                    head = connection.recv(65536).split(b" ", 2)[1].decode()
                    path = head.split("?")[0]
                    path = "/traces/<id>" if path.startswith("/traces/") else path
                    turn = self.asked.get(path, 0)
                    self.asked[path] = turn + 1
                    self.answered += 1
                    with contextlib.suppress(OSError):
                        self._answer(connection, turn % 3)


def test_scrapes_of_a_worker_whose_sibling_answers_what_no_worker_sends_are_answered(
    lab: LabLayout, tmp_path: Path
) -> None:
    """Two workers, worker 2's sibling socket answered by another process of the gateway's user: to /metrics,
    /traces and /traces/<id>, a body that is neither metrics nor JSON, JSON of another shape, a gigabyte. Whichever
    worker a scrape reaches, /metrics and /traces answer 200 (worker 1's naming worker 2 as not answering) and a trace
    by id 404; worker 1's peak memory grows by less than 256 MiB (its bounds: `METRICS_ANSWER_BYTES`, and a /traces
    answer's by the records asked). Before, worker 1 answered 500 (the parser and json.loads raised out of the
    handler) and read the whole gigabyte into its memory."""
    gw, admin = _full_listener_gateway(lab, tmp_path / "gw", workers=2)
    foreign: _ForeignScrapeSibling | None = None
    try:
        listening = gw.wait_events("admin_listening", 2)
        first = next(e["pid"] for e in listening if Path(e["siblings"]).name == "1.sock")
        second = next(Path(e["siblings"]) for e in listening if e["siblings"].endswith("/2.sock"))
        second.unlink()
        foreign = _ForeignScrapeSibling(second)
        peak = _peak_kib(first)
        answers: list[tuple[str, int, str]] = []
        scrapes = {"/metrics": 200, "/traces?limit=50": 200, "/traces/0123456789abcdef": 404}
        deadline = time.monotonic() + 4 * WAIT
        while min(foreign.asked.get(p, 0) for p in ("/metrics", "/traces", "/traces/<id>")) < 3:
            assert time.monotonic() < deadline, (foreign.asked, answers[-3:])
            for path, expected in scrapes.items():
                status, body = _get(admin + path)
                answers.append((path, status, body[:300]))
                assert status == expected, answers[-1]
        metrics = [body for path, _, body in answers if path == "/metrics" and "# worker 2 did not answer" in body]
        assert metrics, answers
        unanswered = gw.events("admin_worker_unanswered")
        assert {e["path"] for e in unanswered} >= {"/metrics", "/traces"}, unanswered
        assert _peak_kib(first) - peak < 256 * 1024
    finally:
        if foreign is not None:
            foreign.close()
        gw.stop()


def test_readyz_of_a_worker_with_room_does_not_wait_for_a_hung_sibling(lab: LabLayout, tmp_path: Path) -> None:
    """Two workers, one of them stopped (SIGSTOP: a worker stuck in a long call, its admin socket and sibling socket
    open, nothing answered): a probe the kernel gives the running worker, whose device listener has room, is answered
    200 at once. The listener's part can only be 503 when every worker is full, so a worker with room asks nobody;
    before, it asked the stuck sibling and waited ASK_TIMEOUT (5 s) on every probe, past a kubelet's 1 s probe timeout,
    and the gateway was taken out of service by a worker that does not decide the answer. Probes the kernel gives the
    stopped worker wait for it: at most 16 tries, each of a 3 s timeout, for one that reaches the running one."""
    gw, admin = _full_listener_gateway(lab, tmp_path / "gw", workers=2)
    stopped = sorted({e["pid"] for e in gw.wait_events("listening", 2)})[0]
    os.kill(stopped, signal.SIGSTOP)
    try:
        answers: list[str] = []
        for _ in range(16):
            try:
                with urllib.request.urlopen(admin + "/readyz", timeout=3) as r:  # noqa: S310  loopback test URL
                    answers.append(f"{r.status} {r.read().decode()}")
                    break
            except urllib.error.HTTPError as e:
                answers.append(f"{e.code} {e.read().decode()}")
            except (TimeoutError, urllib.error.URLError) as e:  # the stopped worker's, or one waiting for it
                answers.append(repr(e))
        assert answers[-1].startswith("200 "), answers
    finally:
        os.kill(stopped, signal.SIGCONT)
        gw.stop()
