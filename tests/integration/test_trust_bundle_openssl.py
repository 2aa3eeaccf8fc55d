"""A trust anchor bundle that cryptography reads and OpenSSL refuses (review44): check-config and a reload name the
file and what to fix, and the running configuration stays."""

from __future__ import annotations

import asyncio
import signal
from datetime import UTC, datetime
from pathlib import Path

import aiohttp

from proxy import config as config_module
from proxy.lab.layout import LabLayout
from proxy.ops.check import check
from tests.integration.conftest import Gateway, client_context, free_port, lab_config, start_gateway

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
