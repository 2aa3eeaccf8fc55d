"""A reload whose first CRL refresh reads a large CRL file in a thread (left18): no request is judged without CRLs
meanwhile (review44). The old gateway keeps judging with its CRLs until the new one has read its own, and the new one
is swapped in only then: a revoked device is refused before, during and after the reload."""

from __future__ import annotations

import asyncio
import signal
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
from cryptography import x509

from proxy.lab.layout import LabLayout
from tests.integration._pki_tools import load_ca, write_crl
from tests.integration.conftest import Gateway, client_context, free_port, lab_config, start_gateway
from tests.integration.test_large_crls import genuine_crl


async def _status(lab: LabLayout, gw: Gateway, user: str) -> int:
    """`user`'s device's status for /owa/ on a connection of its own."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(gw.url + "/owa/", ssl=client_context(lab, user)) as r,
    ):
        return r.status


def test_a_revoked_device_is_refused_while_a_reload_reads_a_large_crl(lab: LabLayout, tmp_path: Path) -> None:
    """carol revoked by the issuing CA's CRL; a reload (SIGHUP) adds the root CA's CRL of 600,000 entries, which its
    first refresh reads in a thread for seconds: carol's requests sent while it reads are refused (403, judged by the
    running gateway's CRLs, never by a new gateway holding none yet), alice is served, and after `reloaded` carol is
    still refused by the new gateway's CRLs."""
    carol = x509.load_pem_x509_certificate((lab.pki_dir / "users" / "carol.pem").read_bytes())
    issuing, root = load_ca(lab.pki_dir, "issuing"), load_ca(lab.pki_dir, "root")
    crl = write_crl(tmp_path / "issuing.crl", issuing, revoked=[carol.serial_number], number=2001)
    root_crl = write_crl(tmp_path / "root.crl", root)
    large = tmp_path / "root-large.crl"
    large.write_bytes(genuine_crl(root, 600_000, 2000, datetime.now(UTC) - timedelta(minutes=5)))
    text = lab_config(lab, port=free_port())
    lab_crls = f'crls = ["{lab.pki_dir / "crls.pem"}"]'
    assert lab_crls in text
    gw = start_gateway(lab, tmp_path / "gw", text.replace(lab_crls, f'crls = ["{crl}", "{root_crl}"]'))
    try:
        assert asyncio.run(_status(lab, gw, "carol")) == 403
        gw.mark()
        gw.config_path.write_text(text.replace(lab_crls, f'crls = ["{crl}", "{large}"]'))
        gw.proc.send_signal(signal.SIGHUP)
        during: list[int] = []
        deadline = time.monotonic() + 120
        while not gw.events("reloaded", gw.since):
            assert time.monotonic() < deadline, "no reload within 120 s"
            during.append(asyncio.run(_status(lab, gw, "carol")))
        assert during, "the reload ended before a request could be sent during it"
        assert set(during) == {403}, during
        print(f"{len(during)} requests while the reload read the CRL")
        assert [e["crl_number"] for e in gw.events("crl_loaded", gw.since) if e["source"] == str(large)] == [2000]
        assert asyncio.run(_status(lab, gw, "carol")) == 403
        assert asyncio.run(_status(lab, gw, "alice")) == 200
    finally:
        assert gw.stop() == 0
