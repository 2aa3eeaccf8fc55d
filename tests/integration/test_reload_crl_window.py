"""A reload whose first CRL refresh reads a large CRL file in a thread (left18): no request is judged without CRLs
meanwhile (review44). The old gateway keeps judging with its CRLs until the new one has read its own, and the new one
is swapped in only then: a revoked device is refused before, during and after the reload."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
from cryptography import x509

from proxy.certs.revocation import MAX_CRL_BYTES
from proxy.lab.layout import LabLayout
from tests.integration._pki_tools import load_ca, write_crl
from tests.integration.conftest import REPO, Gateway, client_context, free_port, lab_config, start_gateway
from tests.integration.jsonlog import WAIT
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


def test_a_reload_to_a_crl_file_that_is_no_crl_is_refused_and_leaves_nothing_running(
    lab: LabLayout, tmp_path: Path
) -> None:
    """A reload (SIGHUP) naming a CRL file that holds no CRL is refused naming `client_certificates.crls[1]` and the
    file, as before; the file is now read by the new gateway's first CRL fetch, in a thread (`build` parsed every
    CRL file of a reload on the event loop: a 1,000,000-entry one stood every request still for its parse), and that
    gateway is closed with the refusal: its CRL refresher (every second here) never reads the file again while the
    running gateway refreshes three more times (a dead URL source of its own says so, failing at each round), and
    alice is served."""
    carol = x509.load_pem_x509_certificate((lab.pki_dir / "users" / "carol.pem").read_bytes())
    crl = write_crl(tmp_path / "issuing.crl", load_ca(lab.pki_dir, "issuing"), revoked=[carol.serial_number])
    junk = tmp_path / "junk.crl"
    junk.write_bytes(b"not a CRL\n")
    dead = f"http://127.0.0.1:{free_port()}/none.crl"  # nothing listens: each round's fetch fails, and says so
    text = lab_config(lab, port=free_port())
    lab_crls = f'crls = ["{lab.pki_dir / "crls.pem"}"]'
    assert lab_crls in text
    text = text.replace(lab_crls, f'crls = ["{crl}", "{{second}}"]\ncrl_refresh_seconds = 1')
    gw = start_gateway(lab, tmp_path / "gw", text.replace("{second}", dead))
    try:
        gw.mark()
        gw.config_path.write_text(text.replace("{second}", str(junk)))
        gw.proc.send_signal(signal.SIGHUP)
        refused = gw.wait_event("reload_refused")
        assert any(p.startswith(f"client_certificates.crls[1]: {junk}: ") for p in refused["problems"]), refused
        assert any("not a PEM or DER CRL" in p for p in refused["problems"]), refused
        gw.mark()
        gw.wait_events("crl_fetch_failed", 3, accept=lambda e: e["source"] == dead)
        assert [e for e in gw.events("crl_rejected", gw.since) if e["source"] == str(junk)] == []
        assert asyncio.run(_status(lab, gw, "alice")) == 200
        assert asyncio.run(_status(lab, gw, "carol")) == 403
    finally:
        assert gw.stop() == 0


def test_a_crl_file_over_the_size_limit_is_refused_by_a_start_as_by_a_reload(lab: LabLayout, tmp_path: Path) -> None:
    """A CRL file over `MAX_CRL_BYTES` (the lab's CRLs, then zeros): `run` refuses it (exit 2) naming
    `client_certificates.crls[0]`, the file and the limit, as a reload does; a start read it whole, logged a fetch
    failure and served without that file's CRLs."""
    big = tmp_path / "big.crl"
    big.write_bytes((lab.pki_dir / "crls.pem").read_bytes())
    with big.open("r+b") as f:
        f.truncate(MAX_CRL_BYTES + 1)  # sparse: costs no disk
    text = lab_config(lab, port=free_port())
    lab_crls = f'crls = ["{lab.pki_dir / "crls.pem"}"]'
    assert lab_crls in text
    bad = text.replace(lab_crls, f'crls = ["{big}"]')
    named, limit = f"client_certificates.crls[0]: {big}: ", f"more than {MAX_CRL_BYTES} bytes"
    config = tmp_path / "bad.toml"
    config.write_text(bad)
    argv = [sys.executable, "-m", "proxy", "run", "--config", str(config)]
    env = {**os.environ, **lab.env()}
    started = subprocess.run(argv, capture_output=True, text=True, timeout=WAIT, cwd=REPO, env=env, check=False)
    assert started.returncode == 2, started.stderr[-3000:]
    assert f"{named}{limit}" in started.stderr
    gw = start_gateway(lab, tmp_path / "gw", text)
    try:
        gw.mark()
        gw.config_path.write_text(bad.replace(text.split('bind = "', 1)[1].split('"', 1)[0], f"127.0.0.1:{gw.port}"))
        gw.proc.send_signal(signal.SIGHUP)
        refused = gw.wait_event("reload_refused")
        assert any(p.startswith(named) and limit in p for p in refused["problems"]), refused
    finally:
        assert gw.stop() == 0
