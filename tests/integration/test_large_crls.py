"""A genuine CRL of a large CA (a million entries: seconds of CPU to read and check) where that read costs most.

A stop that comes while a reload reads it, an on-path replay of an older one at every refresh, a reload of a
gateway holding one as a file, and refreshes that bring it again unchanged: the gateway is `kcd-proxy run` against the
lab, the CRL served at a URL of the test's own (`CrlPath`) or written to a file, its costs measured in CPU time (the
gateway's from /proc and its rusage, the read's in this process), which the machine's load does not stretch.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from proxy.certs.chain import TrustList
from proxy.certs.revocation import accept_der
from proxy.lab.layout import LabLayout
from proxy.lab.pki import Pki
from tests.integration.conftest import free_port, lab_config, start_gateway
from tests.integration.jsonlog import eventually
from tests.integration.test_hostile_responders import CrlPath, FreshCrlPath, issuing_ca, refreshed, revocation_gateway
from tests.integration.test_revocation import connect, get
from tests.pem import der_tlv

ECDSA_WITH_SHA256 = der_tlv(0x30, der_tlv(0x06, bytes.fromhex("2a8648ce3d040302")))
CRL_NUMBER = bytes.fromhex("551d14")  # id-ce-cRLNumber, 2.5.29.20


def genuine_crl(
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey], entries: int, number: int, this_update: datetime
) -> bytes:
    """A current DER CRL of the CA `ca` (its certificate and key: ECDSA with SHA-256), CRL number `number`, listing
    `entries` serials none of the lab's users has: 32 bytes and about 3.4 µs of reading an entry here, idle. Written
    by hand: cryptography's builder takes seconds for so many."""

    def utc(when: datetime) -> bytes:
        return der_tlv(0x17, when.strftime("%y%m%d%H%M%SZ").encode())

    revoked_at = utc(this_update - timedelta(hours=1))
    listed = b"".join(
        der_tlv(0x30, der_tlv(0x02, (10**30 + i).to_bytes(13, "big")) + revoked_at) for i in range(entries)
    )
    number_ext = der_tlv(0x30, der_tlv(0x06, CRL_NUMBER) + der_tlv(0x04, der_tlv(0x02, _integer(number))))
    extensions = der_tlv(0xA0, der_tlv(0x30, number_ext))
    issuer = ca[0].subject.public_bytes()
    times = utc(this_update) + utc(this_update + timedelta(days=2))
    tbs = der_tlv(
        0x30, der_tlv(0x02, b"\x01") + ECDSA_WITH_SHA256 + issuer + times + der_tlv(0x30, listed) + extensions
    )
    signature = ca[1].sign(tbs, ec.ECDSA(hashes.SHA256()))
    return der_tlv(0x30, tbs + ECDSA_WITH_SHA256 + der_tlv(0x03, b"\x00" + signature))


def _integer(value: int) -> bytes:
    """A non-negative INTEGER's content octets, DER (shortest, a leading zero where the top bit is set)."""
    return value.to_bytes(value.bit_length() // 8 + 1, "big")


def reading_seconds(lab: LabLayout, crl: bytes) -> float:
    """The CPU seconds this process takes to read and check `crl` as the gateway does (`accept_der`, the lab's CAs)."""
    pki = Pki.at(lab.pki_dir)
    anchors = (x509.load_pem_x509_certificate(pki.root_cert.read_bytes()),)
    trust = TrustList(anchors=anchors, intermediates=(issuing_ca(lab)[0],))
    started = time.thread_time()
    accept_der("reading", crl, trust, at=datetime.now(UTC))
    return time.thread_time() - started


def process_cpu(pid: int) -> float:
    """The CPU seconds (user and system) process `pid` has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main_thread_cpu(pid: int) -> float:
    """The CPU seconds the main thread of process `pid` (a gateway's event loop) has used so far."""
    fields = Path(f"/proc/{pid}/task/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def thread_cpu(pid: int) -> dict[int, float]:
    """The CPU seconds each thread of process `pid` but its main one has used so far, by thread id."""
    used: dict[int, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        if int(task.name) != pid:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            used[int(task.name)] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return used


# A gateway that reads the million-entry CRL as it starts: 3.4 s of CPU idle, and more than jsonlog.WAIT (60 s) before
# its `listening` line at a load average of 20 (both tests of it, once)
MILLION_START = 180


@dataclass(frozen=True)
class Million:
    """The issuing CA's CRL #7 of a million entries (DER) and the CPU seconds this process took to read it."""

    der: bytes
    reading: float


@pytest.fixture(scope="module")
def million(lab: LabLayout) -> Million:
    """`Million`, made and read once for the module's two tests of it (about 4 s of CPU each time, idle); its
    thisUpdate five minutes before the module's start, its nextUpdate two days after."""
    crl = genuine_crl(issuing_ca(lab), 1_000_000, 7, datetime.now(UTC) - timedelta(minutes=5))
    return Million(crl, reading_seconds(lab, crl))


class CountedCrlPath(CrlPath):
    """`CrlPath`, counting the answers sent whole (`served`)."""

    def __init__(self, body: bytes) -> None:
        self.served = 0
        super().__init__(body)

    def _answer(self, conn: socket.socket, head: bytes, body: bytes) -> None:
        super()._answer(conn, head, body)
        self.served += 1


@pytest.mark.slow(seconds=60)
def test_a_stop_does_not_wait_for_a_crl_being_read(lab: LabLayout, tmp_path: Path, million: Million) -> None:
    """SIGTERM comes while a reload reads the issuing CA's CRL of a million entries from its URL (in a thread: 3.4 s of
    CPU here, idle): the gateway ends (exit 0, `stopped`) without waiting for that read, whose CRLs nothing would serve
    with, spending less than half the read's CPU from SIGTERM to its exit. Before, asyncio's close of the event loop
    waited for its default executor's threads, the read among them: the stop took the rest of the read (3.4-3.6 s of
    CPU, 9.7 s in all at a load of 8-11; 64 MiB of CRL allowed: twice that); now 0.06 s of CPU, 0.2 s in all."""
    reading = million.reading
    path = CountedCrlPath(million.der)
    pki = Pki.at(lab.pki_dir)
    settings = f'crls = ["{path.url}", "{pki.root_crl}"]\ncrl_refresh_seconds = 3600\nrevocation = "require"\n'
    try:
        gw = revocation_gateway(lab, tmp_path, settings, listen_timeout=MILLION_START)  # its first read done
        try:
            served = path.served
            gw.proc.send_signal(signal.SIGHUP)  # the reload's store reads its sources afresh
            eventually(lambda: path.served > served, "the reload's fetch answered")
            threads = thread_cpu(gw.proc.pid)

            def reading_thread() -> bool:  # a thread of the gateway's at work: its read of the CRL
                now = thread_cpu(gw.proc.pid)
                return any(now[tid] - threads.get(tid, 0.0) >= 0.05 for tid in now)

            eventually(reading_thread, "a thread reading the CRL")
            before, started = process_cpu(gw.proc.pid), time.monotonic()
            gw.proc.send_signal(signal.SIGTERM)
            _, status, usage = os.wait4(gw.proc.pid, 0)
            took = time.monotonic() - started
            gw.proc.returncode = os.waitstatus_to_exitcode(status)
        finally:
            gw.stop()
    finally:
        path.close()
    stop_cpu = usage.ru_utime + usage.ru_stime - before
    assert gw.proc.returncode == 0, gw.log_path.read_text()[-2000:]
    assert gw.events("stopped"), "the stop's own steps were all taken"
    assert not gw.events("reloaded"), "the stop came while the reload read its CRLs"
    print(f"stop: {stop_cpu:.3f} s of CPU, {took:.3f} s in all; the CRL's read: {reading:.3f} s of CPU")
    assert stop_cpu < reading / 2, f"the stop took {stop_cpu:.3f} s of CPU (the CRL's read: {reading:.3f} s)"


@pytest.mark.slow(seconds=40)
def test_an_older_genuine_crl_replayed_is_refused_before_it_is_read(lab: LabLayout, tmp_path: Path) -> None:
    """The issuing CA's URL answers its CRL #8, then, at every refresh (1 s), its genuine CRL #7 of an hour before with
    200,000 entries (a replay on the path: a CA's CRL shrinks as expired certificates leave it). Each is refused as
    older (`crl_rejected`, "replayed?"), alice is still served, and a refusal costs the gateway less than a quarter of
    what reading that CRL costs (CPU), being decided on its outline (number, thisUpdate) once its signature verified.
    Before, each was read whole first (0.65 s of CPU here, idle, holding the GIL in stretches), then refused."""
    ca = issuing_ca(lab)
    now = datetime.now(UTC)
    newer = genuine_crl(ca, 1, 8, now - timedelta(minutes=5))
    older = genuine_crl(ca, 200_000, 7, now - timedelta(hours=1))
    reading = reading_seconds(lab, older)
    path = FreshCrlPath(lambda: newer)
    pki = Pki.at(lab.pki_dir)
    try:
        gw = revocation_gateway(lab, tmp_path, refreshed(path.url, pki.root_crl))
        try:
            assert [e["crl_number"] for e in gw.events("crl_loaded") if e["source"] == path.url] == [8]
            gw.mark()
            path.body = lambda: older
            rejected = gw.wait_event("crl_rejected", source=path.url)
            assert "CRL #7 of 'CN=Lab Issuing CA' is older than the CRL #8" in rejected["problem"], rejected
            assert "replayed?" in rejected["problem"]
            first = len([e for e in gw.events("crl_rejected", gw.since) if e["source"] == path.url])
            before = process_cpu(gw.proc.pid)
            gw.wait_events("crl_rejected", first + 3, accept=lambda e: e["source"] == path.url)
            per_refusal = (process_cpu(gw.proc.pid) - before) / 3
            assert get(connect(lab, gw, "alice"))[0] == 200
        finally:
            assert gw.stop() == 0
    finally:
        path.close()
    print(f"a refusal: {per_refusal:.3f} s of the gateway's CPU; the CRL's read: {reading:.3f} s")
    assert per_refusal < reading / 4, f"a refusal took {per_refusal:.3f} s of CPU (the CRL's read: {reading:.3f} s)"


@pytest.mark.slow(seconds=60)
def test_a_reload_reads_a_large_crl_file_off_the_event_loop(lab: LabLayout, tmp_path: Path, million: Million) -> None:
    """A reload (SIGHUP) of a gateway whose issuing CA's CRL is a file of a million entries spends less than half
    the CPU that file's read takes on its main thread, the event loop's, which every device's request waits for:
    the read runs in a thread (`LiveRevocation.start`'s first refresh, before the reload serves). Before, a reload
    read its CRL files on the event loop, as the start does (`build`): every request waited for the whole read
    (200,000 entries: the admin listener's /healthz waited 1.26 s at a load of 7-12; 0.14 s now)."""
    crl = tmp_path / "issuing.crl"
    crl.write_bytes(million.der)
    reading = million.reading
    pki = Pki.at(lab.pki_dir)
    text = lab_config(lab, port=free_port())
    lab_crls = f'crls = ["{lab.pki_dir / "crls.pem"}"]'
    assert lab_crls in text
    crls = f'crls = ["{crl}", "{pki.root_crl}"]'
    gw = start_gateway(lab, tmp_path / "gw", text.replace(lab_crls, crls), listen_timeout=MILLION_START)
    try:
        gw.mark()
        before = main_thread_cpu(gw.proc.pid)
        gw.proc.send_signal(signal.SIGHUP)
        assert gw.wait_event("reloaded")["generation"] == 2
        on_the_loop = main_thread_cpu(gw.proc.pid) - before
        assert [e["crl_number"] for e in gw.events("crl_loaded", gw.since) if e["source"] == str(crl)] == [7]
    finally:
        assert gw.stop() == 0
    print(f"the reload's CPU on the event loop: {on_the_loop:.3f} s; the CRL's read: {reading:.3f} s")
    assert on_the_loop < reading / 2, f"the reload took {on_the_loop:.3f} s on the loop (the read: {reading:.3f} s)"


@pytest.mark.slow(seconds=40)
def test_a_refresh_that_brings_no_new_crl_costs_a_fraction_of_a_read(lab: LabLayout, tmp_path: Path) -> None:
    """The issuing CA's CRL of 200,000 entries is a file that does not change, and the root CA's CRL comes from a URL
    that counts its answers (one a round); both are refreshed every second. A round costs the gateway (CPU, from
    /proc) less than a tenth of what reading that CRL costs, and alice is served. Before, each round indexed every CRL
    afresh, although nothing had changed: a set of all 200,000 entries, made twice (0.160 s a round at a load of 9-11,
    the read 0.90 s); now the set held is kept (`CrlSet.of`'s `previous`) and indexing makes no such set (0.010 s)."""
    crl = tmp_path / "issuing.crl"
    crl.write_bytes(genuine_crl(issuing_ca(lab), 200_000, 7, datetime.now(UTC) - timedelta(minutes=5)))
    reading = reading_seconds(lab, crl.read_bytes())
    root = CountedCrlPath(Pki.at(lab.pki_dir).root_crl.read_bytes())
    try:
        gw = revocation_gateway(lab, tmp_path / "gw", refreshed(root.url, crl))
        try:
            first = root.served
            eventually(lambda: root.served > first, "a refresh round after the start")
            before, counted = process_cpu(gw.proc.pid), root.served
            eventually(lambda: root.served >= counted + 5, "five more refresh rounds", timeout=60)
            per_round = (process_cpu(gw.proc.pid) - before) / (root.served - counted)
            assert not gw.events("crl_rejected"), gw.events("crl_rejected")
            assert get(connect(lab, gw, "alice"))[0] == 200
        finally:
            assert gw.stop() == 0
    finally:
        root.close()
    print(f"a refresh round: {per_round:.3f} s of the gateway's CPU; the CRL's read: {reading:.3f} s")
    assert per_round < reading / 10, f"a round took {per_round:.3f} s of CPU (the CRL's read: {reading:.3f} s)"
