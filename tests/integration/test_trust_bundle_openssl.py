"""A trust anchor bundle that cryptography reads and OpenSSL refuses (review44): check-config, a reload and a start
name the file and what to fix, and the running configuration stays; the admin listener's `client_ca` is read the same
way (left21)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from proxy import config as config_module
from proxy.lab.layout import LabLayout
from proxy.ops.check import check
from tests.integration.conftest import REPO, Gateway, client_context, free_port, lab_config, start_gateway
from tests.integration.jsonlog import WAIT
from tests.integration.test_admin import _openssl_admin_certificate

# A PEM block OpenSSL reads as a CRL and cannot decode; cryptography's certificate reader passes over it.
DAMAGED_CRL_BLOCK = b"-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n"


async def _status(lab: LabLayout, gw: Gateway, user: str) -> int:
    """`user`'s device's status for /owa/ on a connection of its own."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(gw.url + "/owa/", ssl=client_context(lab, user)) as r,
    ):
        return r.status


def test_a_trust_bundle_openssl_refuses_is_named_by_check_config_and_the_reload(lab: LabLayout, tmp_path: Path) -> None:
    """The root CA's certificate followed by a damaged `X509 CRL` block as `trust_anchors[0]`: check-config names
    that key and file (it said ok: cryptography reads the certificate and passes over the block), and a reload to it
    is refused (`reload_refused`) with the same problem, not OpenSSL's bare "[X509] PEM lib (_ssl.c:...)" that named
    no file; the running configuration serves alice on."""
    bundle = tmp_path / "anchors.pem"
    bundle.write_bytes((lab.pki_dir / "root.pem").read_bytes() + DAMAGED_CRL_BLOCK)
    text = lab_config(lab, port=free_port())
    anchors = f'trust_anchors = ["{lab.pki_dir / "root.pem"}"]'
    assert anchors in text
    broken = text.replace(anchors, f'trust_anchors = ["{bundle}"]')
    probe = tmp_path / "probe.toml"
    probe.write_text(broken)
    problems = check(config_module.load(probe), at=datetime.now(UTC))
    assert any(p.startswith("client_certificates.trust_anchors[0]: ") and str(bundle) in p for p in problems), problems
    gw = start_gateway(lab, tmp_path / "gw", text)
    try:
        gw.mark()
        gw.config_path.write_text(broken)
        gw.proc.send_signal(signal.SIGHUP)
        refused = gw.wait_event("reload_refused")
        assert any(
            p.startswith("client_certificates.trust_anchors[0]: ") and str(bundle) in p for p in refused["problems"]
        ), refused
        assert asyncio.run(_status(lab, gw, "alice")) == 200
    finally:
        assert gw.stop() == 0


def _run_refused(lab: LabLayout, config: Path) -> str:
    """`kcd-proxy run` with `config`, which must refuse to start as a configuration error (exit 2); what it printed
    (its log on stdout, then stderr)."""
    argv = [sys.executable, "-m", "proxy", "run", "--config", str(config)]
    run = subprocess.run(argv, capture_output=True, text=True, timeout=WAIT, cwd=REPO, env={**os.environ, **lab.env()})
    assert run.returncode == 2, (run.returncode, run.stderr[-3000:])
    return run.stdout + run.stderr


def _admin(lab: LabLayout, client_ca: Path, allowed: str = "CN=alice") -> str:
    """An `[admin]` table on a free port with TLS, `client_ca` and `allowed` on the allow-list."""
    p = lab.pki_dir
    return f"""
[admin]
bind = "127.0.0.1:{free_port()}"
certificate = "{p / "server-chain.pem"}"
private_key = "{p / "server.key"}"
client_ca = "{client_ca}"
allowed_clients = ["{allowed}"]
"""


def test_a_ca_file_openssl_refuses_is_named_when_the_gateway_starts(lab: LabLayout, tmp_path: Path) -> None:
    """A start (no check-config before it) with such a bundle as `trust_anchors[0]`, or as `admin.client_ca`, exits 2
    naming that key, the file and the fix: it was a traceback ending in OpenSSL's unnamed "[X509] PEM lib" for the
    device listener, and "admin.bind: cannot listen" (OpenSSL's SSLError is an OSError) for the admin listener."""
    bundle = tmp_path / "anchors.pem"
    bundle.write_bytes((lab.pki_dir / "root.pem").read_bytes() + DAMAGED_CRL_BLOCK)
    text = lab_config(lab, port=free_port())
    anchors = f'trust_anchors = ["{lab.pki_dir / "root.pem"}"]'
    device = tmp_path / "device.toml"
    device.write_text(text.replace(anchors, f'trust_anchors = ["{bundle}"]'))
    printed = _run_refused(lab, device)
    assert f"configuration error: client_certificates.trust_anchors[0]: {bundle}: OpenSSL cannot read it" in printed
    assert "Traceback" not in printed
    admin = tmp_path / "admin.toml"
    admin.write_text(text + _admin(lab, bundle))
    printed = _run_refused(lab, admin)
    assert f"configuration error: admin.client_ca: {bundle}: OpenSSL cannot read it" in printed, printed[-3000:]
    assert "admin.bind" not in printed


def test_a_der_admin_client_ca_that_check_config_passes_serves(lab: LabLayout, tmp_path: Path) -> None:
    """An operators' CA in DER as `admin.client_ca`: check-config passes it (as it does a DER trust anchor) and the
    admin listener serves the operator it issued (it refused to start: "admin.bind: cannot listen ... no certificate
    or crl found", OpenSSL's `cafile` reading PEM only)."""
    key, pem, der = tmp_path / "ops-ca.key", tmp_path / "ops-ca.pem", tmp_path / "ops-ca.der"
    argv = ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "5"]
    argv += ["-subj", "/CN=Operators CA", "-addext", "basicConstraints=critical,CA:TRUE"]
    argv += ["-addext", "keyUsage=critical,keyCertSign,cRLSign", "-keyout", str(key), "-out", str(pem)]
    subprocess.run(argv, check=True, capture_output=True)
    der.write_bytes(x509.load_pem_x509_certificate(pem.read_bytes()).public_bytes(Encoding.DER))
    operator = _openssl_admin_certificate(lab, tmp_path, "ops", 0xAD0301, issuer=pem)
    table = _admin(lab, der, allowed="CN=ops")
    probe = tmp_path / "probe.toml"
    probe.write_text(lab_config(lab, port=free_port(), extra=table))
    assert check(config_module.load(probe), at=datetime.now(UTC)) == []
    gw = start_gateway(lab, tmp_path / "gw", lab_config(lab, port=free_port(), extra=table))
    try:
        admin_port = int(table.split('bind = "127.0.0.1:', 1)[1].split('"', 1)[0])
        url = f"https://127.0.0.1:{admin_port}/metrics"
        with urllib.request.urlopen(url, timeout=WAIT, context=client_context(lab, str(operator))) as r:
            assert r.status == 200
    finally:
        assert gw.stop() == 0
