"""A hostile OCSP responder against a real gateway: the responder is whoever answers on the plain-HTTP path.

The test plays the responder (a raw socket server answering with bytes it controls, OCSP answers minted with
`cryptography` and the lab's issuing CA key) for a certificate of alice's whose authorityInfoAccess names it; curl and
Python's TLS client are the devices.
"""

from __future__ import annotations

import base64
import contextlib
import json
import socket
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp

from proxy.lab.layout import LabLayout
from proxy.lab.pki import Pki
from tests.integration._pki_tools import load_ca, write_crl
from tests.integration.conftest import Gateway, dead_port, free_port, lab_config, start_gateway
from tests.integration.jsonlog import WAIT, eventually
from tests.integration.loopback import stop_listening
from tests.integration.test_revocation import alice_reissued, connect, curl_with, get, signed_crl
from tests.pem import der_tlv, self_signed

Answer = Callable[[ocsp.OCSPRequest], list[bytes]]  # the request asked -> the parts sent, a pause between two


class RawServer:
    """A raw HTTP/1.1 server on loopback at `path`, each connection served by `_one` in a thread of its own."""

    def __init__(self, path: str) -> None:
        self._server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._server.getsockname()[1]}{path}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._server.accept()
            except OSError:  # closed
                return
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(30)
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            with contextlib.suppress(OSError):
                self._answer(conn, head, body)

    def _answer(self, conn: socket.socket, head: bytes, body: bytes) -> None:
        raise NotImplementedError

    def close(self) -> None:
        stop_listening(self._server)


class HostileResponder(RawServer):
    """Each request's body is read as an OCSP request and `answer` gives the bytes sent back (head and body), in parts
    with `pause` seconds between them; `asked` counts the requests."""

    def __init__(self, answer: Answer, pause: float = 0.0) -> None:
        self.answer, self.pause, self.asked = answer, pause, 0
        super().__init__("/")

    def _answer(self, conn: socket.socket, head: bytes, body: bytes) -> None:
        length = next(
            int(line.split(b":", 1)[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")
        )
        while len(body) < length:
            body += conn.recv(65536)
        self.asked += 1
        for i, part in enumerate(self.answer(ocsp.load_der_ocsp_request(body))):
            if i:
                time.sleep(self.pause)  # the scenario: the answer's second part comes later
            conn.sendall(part)


def http_answer(body: bytes, split: int | None = None) -> list[bytes]:
    """An HTTP 200 `application/ocsp-response` carrying `body`, in two parts cut `split` bytes into the body."""
    head = f"HTTP/1.1 200 OK\r\nContent-Type: application/ocsp-response\r\nContent-Length: {len(body)}\r\n"
    whole = head.encode() + b"Connection: close\r\n\r\n" + body
    cut = len(whole) - len(body) + split if split is not None else len(whole)
    return [whole[:cut], whole[cut:]] if cut < len(whole) else [whole]


def issuing_ca(lab: LabLayout) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    pki = Pki.at(lab.pki_dir)
    key = serialization.load_pem_private_key(pki.issuing_key.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return x509.load_pem_x509_certificate(pki.issuing_cert.read_bytes()), key


def good_from_the_ca(lab: LabLayout, request: ocsp.OCSPRequest) -> bytes:
    """A "good" answer for exactly what `request` asks (its serial, its nonce), signed by the issuing CA itself."""
    return good_answer(request, *issuing_ca(lab))


def good_from_a_stranger(request: ocsp.OCSPRequest, certificates: int) -> bytes:
    """A "good" answer for what `request` asks, signed by a responder of the path's own making (`CN=Responder`), its
    certificate attached `certificates` times."""
    cert, key = self_signed("Responder")
    return good_answer(request, cert, key, ocsp.OCSPResponderEncoding.NAME, certificates)


def good_answer(
    request: ocsp.OCSPRequest,
    signer: x509.Certificate,
    key: ec.EllipticCurvePrivateKey,
    responder_id: ocsp.OCSPResponderEncoding = ocsp.OCSPResponderEncoding.HASH,
    certificates: int = 0,
) -> bytes:
    """A "good" answer for exactly what `request` asks (its serial, its nonce), signed by `signer`'s `key`, with
    `certificates` copies of `signer` attached."""
    now = datetime.now(UTC)
    builder = ocsp.OCSPResponseBuilder().add_response_by_hash(
        issuer_name_hash=request.issuer_name_hash,
        issuer_key_hash=request.issuer_key_hash,
        serial_number=request.serial_number,
        algorithm=request.hash_algorithm,
        cert_status=ocsp.OCSPCertStatus.GOOD,
        this_update=now - timedelta(seconds=30),
        next_update=now + timedelta(minutes=10),
        revocation_time=None,
        revocation_reason=None,
    )
    builder = builder.responder_id(responder_id, signer)
    if certificates:
        builder = builder.certificates([signer] * certificates)
    nonce = request.extensions.get_extension_for_class(x509.OCSPNonce).value
    builder = builder.add_extension(nonce, critical=False)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


LAB_REVOCATION = 'crls = ["{crls}"]\nrevocation = "require"\n'  # the lab configuration's, for `revocation` below


def revocation_gateway(
    lab: LabLayout, directory: Path, revocation: str, *, extra: str = "", listen_timeout: float = WAIT
) -> Gateway:
    """The lab gateway with `revocation` (its settings) in place of the lab's CRL file; `extra` as lab_config's;
    `listen_timeout` as start_gateway's."""
    text = lab_config(lab, port=free_port(), extra=extra)
    lab_settings = LAB_REVOCATION.format(crls=lab.pki_dir / "crls.pem")
    assert lab_settings in text
    return start_gateway(lab, directory, text.replace(lab_settings, revocation), listen_timeout=listen_timeout)


def refreshed(*crls: object) -> str:
    """Settings: `crls` (URLs or files) fetched every second, revocation required."""
    listed = ", ".join(f'"{crl}"' for crl in crls)
    return f'crls = [{listed}]\ncrl_refresh_seconds = 1\nrevocation = "require"\n'


OcspOnly = Callable[[str], tuple[Gateway, Path, Path]]


@pytest.fixture
def ocsp_only(lab: LabLayout, tmp_path: Path) -> Iterator[OcspOnly]:
    """A factory for the lab gateway with OCSP alone deciding (`revocation = "off"`, `ocsp = "require"`), given the
    responder alice's certificate (issued again, in `tmp_path / "alice"`) names: the gateway (marked) and her
    certificate and key."""
    started: list[Gateway] = []

    def start(responder: str) -> tuple[Gateway, Path, Path]:
        gw = revocation_gateway(lab, tmp_path / "gw", 'revocation = "off"\nocsp = "require"\n')
        started.append(gw)
        cert, key = alice_reissued(lab, tmp_path / "alice", "alice", responder)
        gw.mark()
        return gw, cert, key

    yield start
    for gw in started:
        assert gw.stop() == 0


def test_an_answer_in_two_tcp_segments_is_read_whole(lab: LabLayout, tmp_path: Path, ocsp_only: OcspOnly) -> None:
    """A responder's good answer that arrives in two parts (its head and the first 40 bytes of its body, then the
    rest 0.3 s later, as a delegated responder's answer of more than one TCP segment may on a real network) is read
    whole: alice is served under `ocsp = "require"`. Before, the gateway read what had arrived first and took that for
    the whole answer ("not an OCSP response"): 403 for a good certificate."""
    responder = HostileResponder(lambda request: http_answer(good_from_the_ca(lab, request), split=40), pause=0.3)
    try:
        gw, cert, key = ocsp_only(responder.url)
        status, body = curl_with(lab, gw, cert, key)
        assert (status, responder.asked) == (200, 1), body
        answered = gw.wait_event("ocsp_answer", responder=responder.url)
        assert answered["status"] == "good"
    finally:
        responder.close()


def test_an_answer_carrying_thousands_of_certificates_is_refused_unread(
    lab: LabLayout, tmp_path: Path, ocsp_only: OcspOnly
) -> None:
    """An answer with 3,000 certificates attached (about 400 KB, under the 1 MiB cap), signed by a responder of the
    path's making, is refused before they are read (more than
    10). Before, reading them (cryptography's `OCSPResponse.certificates`, quadratic in their number, holding the GIL)
    took 3-8 s on the event loop, once per certificate every 5 s: every device of the gateway waited that long."""
    responder = HostileResponder(lambda request: http_answer(good_from_a_stranger(request, certificates=3000)))
    try:
        gw, cert, key = ocsp_only(responder.url)
        status, body = curl_with(lab, gw, cert, key)
        assert status == 403, body
        failed = gw.wait_event("ocsp_failed", responder=responder.url)
        assert "more than 10 certificates" in failed["error"], failed
        assert responder.asked == 1
    finally:
        responder.close()


def test_an_answer_dripping_a_byte_a_second_is_cut_at_the_timeout(
    lab: LabLayout, tmp_path: Path, ocsp_only: OcspOnly
) -> None:
    """A responder sending its good answer a byte a second (head first, then the body, about 12 minutes in all) is cut
    at the 5 s timeout whatever arrives meanwhile: the device has its 403 within 15 s, and the gateway's
    `ocsp_failed` names the timeout. The read to the end (review34) is bounded in time by aiohttp's total timeout, not
    only per read."""
    responder = HostileResponder(lambda request: [bytes([b]) for b in http_answer(good_from_the_ca(lab, request))[0]])
    responder.pause = 1.0
    try:
        gw, cert, key = ocsp_only(responder.url)
        started = time.monotonic()
        status, body = curl_with(lab, gw, cert, key)
        took = time.monotonic() - started
        assert status == 403, body
        assert took < 15, f"the device waited {took:.1f} s"
        failed = gw.wait_event("ocsp_failed", responder=responder.url)
        assert "TimeoutError" in failed["error"], failed
    finally:
        responder.close()


# --- a distribution point's path ------------------------------------------------------------------


ECDSA_WITH_SHA256 = bytes.fromhex("2a8648ce3d040302")


def forged_crl(issuer: x509.Name, entries: int, algorithm_oid: bytes = ECDSA_WITH_SHA256) -> bytes:
    """A DER CRL under `issuer`'s name, current, listing `entries` certificates (the same one, which costs as much to
    read), signed with a key of the path's making: 23 bytes an entry, 2.8 million in the gateway's 64 MiB. Its
    signatureAlgorithm names `algorithm_oid` (the OID's content octets; the signature is ECDSA with SHA-256 still)."""
    now = datetime.now(UTC)

    def utc(when: datetime) -> bytes:
        return der_tlv(0x17, when.strftime("%y%m%d%H%M%SZ").encode())

    entry = der_tlv(0x30, der_tlv(0x02, b"\x01\x00\x00\x01") + utc(now - timedelta(days=1)))
    algorithm = der_tlv(0x30, der_tlv(0x06, algorithm_oid))
    times = utc(now - timedelta(minutes=1)) + utc(now + timedelta(days=1))
    tbs = der_tlv(
        0x30, der_tlv(0x02, b"\x01") + algorithm + issuer.public_bytes() + times + der_tlv(0x30, entry * entries)
    )
    signature = ec.generate_private_key(ec.SECP256R1()).sign(tbs, ec.ECDSA(hashes.SHA256()))
    return der_tlv(0x30, tbs + algorithm + der_tlv(0x03, b"\x00" + signature))


class CrlPath(RawServer):
    """Every GET answered with `body` (200, `Content-Length`, then closed)."""

    def __init__(self, body: bytes) -> None:
        self.serve(body)
        super().__init__("/issuing.crl")

    def serve(self, body: bytes) -> None:
        """Answer `body` from the next GET on."""
        self.answer = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body

    def _answer(self, conn: socket.socket, head: bytes, body: bytes) -> None:
        conn.sendall(self.answer)


def pem_with_headers(der: bytes) -> bytes:
    """`der` as a PEM CRL block with an RFC 1421 header, as cryptography reads it."""
    return b"-----BEGIN X509 CRL-----\nProc-Type: 4,CRL\n\n" + base64.encodebytes(der) + b"-----END X509 CRL-----\n"


def _read_seconds(crl: bytes) -> float:
    """How long cryptography takes to read `crl` in this process, at this machine's present load. The gateway reads
    each forged CRL too, holding the GIL (0.33 s idle for 2.8 million entries: what a device may still wait at a
    refresh), and a loaded machine stretches that read: at a load average of 20 a device once waited 2.03 s. The
    refused check's stall (`is_signature_valid` encoding the tbsCertList again, then the read) is about eight times the
    read, loaded or not (seen: 14 times at a load of 5; the screened gateway's, 1.3 to 2.9 times, the most with the test
    and 8 busy loops on one CPU), so a bound of five reads keeps them apart where 2 s alone did not."""
    started = time.monotonic()
    x509.load_der_x509_crl(crl)
    return time.monotonic() - started


@pytest.mark.slow(seconds=60)
@pytest.mark.parametrize(("entries", "encode"), [(2_800_000, bytes), (2_000_000, pem_with_headers)], ids=["der", "pem"])
def test_a_forged_crl_of_millions_of_entries_stalls_no_device(
    lab: LabLayout, tmp_path: Path, entries: int, encode: Callable[[bytes], bytes]
) -> None:
    """A distribution point's path answers, at every refresh (1 s), a 64 MB CRL under the issuing CA's name with 2.8
    million entries (DER; in PEM with a header, 2 million in 62 MB), signed by another key. It is refused
    (`crl_rejected`: the signature) and alice, served from the lab's CRL file meanwhile, waits less than 2 s for any of
    her requests, or on a loaded machine less than five times what reading that CRL takes here and now
    (`_read_seconds`). Before, the refusal took `is_signature_valid`, which encodes the whole tbsCertList again
    holding the GIL: each refresh stalled every device 2.3 s and more (its thread did not help), about eight times the
    reading; a PEM with headers skipped the screen, and its regular expressions and PEM reading held the GIL 1.3 s
    more."""
    ca, _ = issuing_ca(lab)
    forged = forged_crl(ca.subject, entries)
    path = CrlPath(encode(forged))
    try:
        gw = revocation_gateway(lab, tmp_path / "gw", refreshed(path.url, lab.pki_dir / "crls.pem"))
        try:
            rejected = gw.wait_event("crl_rejected", source=path.url)
            assert "signature does not verify" in rejected["problem"], rejected
            conn = connect(lab, gw, "alice", timeout=60)
            assert get(conn)[0] == 200
            before = _read_seconds(forged)
            gw.mark()
            # Four more refreshes of the forged CRL, each awaited for WAIT: a refresh (fetch, read, refusal) takes 2 s
            # idle and 15 s at a load average of 15, so four of them did not fit in one WAIT (56 s seen alone).
            slowest, refreshes, deadline = 0.0, 0, time.monotonic() + WAIT
            while refreshes < 4:
                assert time.monotonic() < deadline, f"the forged CRL was not fetched again after {refreshes} refreshes"
                started = time.monotonic()
                assert get(conn)[0] == 200
                slowest = max(slowest, time.monotonic() - started)
                if (now := len(gw.events("crl_rejected", gw.since))) > refreshes:
                    refreshes, deadline = now, time.monotonic() + WAIT
            reading = max(before, _read_seconds(forged))  # the slower of two reads: the loop's load may have passed
            assert slowest < max(2.0, 5 * reading), f"alice waited {slowest:.2f} s (reading the CRL: {reading:.2f} s)"
        finally:
            assert gw.stop() == 0
    finally:
        path.close()


class FreshCrlPath(CrlPath):
    """Every GET answered with a new `body()` (a forged CRL's bytes change each time: a new ECDSA signature)."""

    def __init__(self, body: Callable[[], bytes]) -> None:
        self.body = body
        super().__init__(b"")

    def _answer(self, conn: socket.socket, head: bytes, body: bytes) -> None:
        crl = self.body()
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(crl) + crl)


def test_a_crl_of_an_unknown_algorithm_stops_no_other_crl(lab: LabLayout, tmp_path: Path) -> None:
    """A distribution point's path answers, from the second refresh (1 s) on, a new CRL each time under the issuing
    CA's name whose signature algorithm cryptography does not know (sha512-256WithRSAEncryption): it is refused
    (`crl_rejected`: the signature), and the issuing CA's CRL file, rewritten meanwhile to list alice, is taken:
    alice is refused as revoked. Before, the signature screen let cryptography's UnsupportedAlgorithm out of the
    refresh round (`crl_refresh_error`) before the new CRL set was swapped in, every round: the revocation was never
    applied; and with that answer from the first fetch on, the gateway did not start."""
    ca, _ = issuing_ca(lab)
    pki = Pki.at(lab.pki_dir)
    unknown = bytes.fromhex("2a864886f70d010110")  # 1.2.840.113549.1.1.16
    genuine = pki.issuing_crl.read_bytes()
    path = FreshCrlPath(lambda: genuine)
    issuing = tmp_path / "issuing.crl"
    issuing.write_bytes(genuine)
    try:
        gw = revocation_gateway(lab, tmp_path / "gw", refreshed(path.url, issuing, pki.root_crl))
        try:
            assert get(connect(lab, gw, "alice"))[0] == 200
            gw.mark()
            path.body = lambda: forged_crl(ca.subject, 1, algorithm_oid=unknown)
            rejected = gw.wait_event("crl_rejected", source=path.url)
            assert "signature does not verify" in rejected["problem"], rejected
            alice = x509.load_pem_x509_certificate(pki.user_cert("alice").read_bytes())
            now = datetime.now(UTC)
            (tmp_path / "new").mkdir()
            listed = signed_crl(
                lab,
                tmp_path / "new",
                key_path=pki.issuing_key,
                this=now,
                next_=now + timedelta(days=1),
                serials=[alice.serial_number],
            )
            listed.replace(issuing)  # whole, never half a file

            def refused() -> str | None:
                status, body = get(connect(lab, gw, "alice"))
                return body if status == 403 else None

            body = eventually(refused, "alice refused once her CRL is taken")
            assert "was revoked on" in body, body
            assert gw.events("crl_refresh_error") == []
        finally:
            assert gw.stop() == 0
    finally:
        path.close()


LONG_BAD_HEADER = b"HTTP/1.1 200 OK\r\nX-Long\x01: " + b"B" * 8000 + b"\r\n\r\n"  # aiohttp's error quotes the line


def test_a_responders_bad_head_is_not_echoed_to_the_device(lab: LabLayout, tmp_path: Path, ocsp_only: OcspOnly) -> None:
    """A responder answering a head aiohttp refuses (a control character in a header name, then 8,000 bytes of its
    choosing): the device's 403 and the `ocsp_failed` line name the fault in one line of at most 300 characters, not
    the responder's 8 KB. Before, aiohttp's error, which quotes the whole line (over several lines), was the reason
    sent to the device and logged."""
    responder = HostileResponder(lambda _request: [LONG_BAD_HEADER])
    try:
        gw, cert, key = ocsp_only(responder.url)
        status, body = curl_with(lab, gw, cert, key)
        assert status == 403, body
        assert "BBBBBBBBBB" * 30 not in body, body[:500]
        assert "Invalid header token" in body
        failed = gw.wait_event("ocsp_failed", responder=responder.url)
        assert len(failed["error"]) <= 300, failed["error"][:500]
        assert "\n" not in failed["error"]
    finally:
        responder.close()


def test_a_distribution_points_bad_head_is_shown_cut_short(lab: LabLayout, tmp_path: Path) -> None:
    """The same head from a CRL URL: `crl_fetch_failed` and /metrics' `kcd_crl_last_error` show one line of at most 300
    characters, not the 8 KB the server chose (written again at each refresh)."""
    path = CrlPath(b"")
    path.answer = LONG_BAD_HEADER
    admin = f"127.0.0.1:{free_port()}"
    try:
        gw = revocation_gateway(
            lab, tmp_path / "gw", refreshed(path.url, lab.pki_dir / "crls.pem"), extra=f'\n[admin]\nbind = "{admin}"\n'
        )
        try:
            failed = gw.wait_event("crl_fetch_failed", source=path.url)
            assert "Invalid header token" in failed["error"]
            assert len(failed["error"]) <= 300, failed["error"][:500]
            assert "\n" not in failed["error"]
            with urllib.request.urlopen(f"http://{gw.admin}/metrics", timeout=30) as answer:
                metrics = answer.read().decode()
            (line,) = [m for m in metrics.splitlines() if m.startswith("kcd_crl_last_error{")]
            assert "Invalid header token" in line
            assert len(line) < 500, line[:600]
        finally:
            assert gw.stop() == 0
    finally:
        path.close()


def test_a_signed_urls_token_in_another_spelling_is_shown_nowhere(lab: LabLayout, tmp_path: Path) -> None:
    """A signed CRL URL whose token holds lowercase percent-escapes (`sig=Ab%2bCd%3d…`, as a tool may write them), and
    a server (or whoever is on its path) answering a head aiohttp refuses, short enough that aiohttp's error quotes
    the URL within the 300 characters shown: `crl_fetch_failed` and /metrics' `kcd_crl_last_error` show
    `sig=[redacted]`. Before, aiohttp quoted the URL as yarl spells it (`%2B`, `%3D`), which matched neither the
    configured token nor its unquoted form: the token was in the log and in /metrics at every refresh."""
    secret = uuid.uuid4().hex  # in every spelling of the token
    token = f"Ab%2bCd%3d{secret}%2f"
    path = CrlPath(b"")
    path.answer = b"HTTP/1.1 200 OK\r\nX-Bad\x01: x\r\n\r\n"
    url = f"{path.url}?sv=2&sig={token}"
    admin = f"127.0.0.1:{free_port()}"
    try:
        gw = revocation_gateway(
            lab, tmp_path / "gw", refreshed(url, lab.pki_dir / "crls.pem"), extra=f'\n[admin]\nbind = "{admin}"\n'
        )
        try:
            failed = gw.wait_event("crl_fetch_failed")
            assert "Invalid header token" in failed["error"], failed
            assert "sig=[redacted]" in failed["error"], failed
            with urllib.request.urlopen(f"http://{gw.admin}/metrics", timeout=30) as answer:
                metrics = answer.read().decode()
            shown = {"log": gw.log_path.read_text(), "metrics": metrics}
            assert [where for where, text in shown.items() if secret in text] == []
        finally:
            assert gw.stop() == 0
    finally:
        path.close()


# a right-to-left override, a zero-width space, a bidirectional isolate, a tag character, a soft hyphen
INVISIBLE = "\u202e\u200b\u2066\U000e0041\u00ad"
INVISIBLE_ESCAPED = "\\u202e\\u200b\\u2066\\U000e0041\\xad"


def test_invisible_characters_a_distribution_point_sends_are_escaped(lab: LabLayout, tmp_path: Path) -> None:
    """A CRL URL answering a CRL whose issuer's name carries invisible characters (a right-to-left override, zero-width
    space, bidirectional isolate, tag character, soft hyphen): `crl_rejected` and /readyz show each as an escape, so a
    log viewer shows no reversed text. Before, `shown_error` escaped C0/C1 controls only and the rejection's problem
    went out as it was."""
    path = CrlPath(forged_crl(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, f"CA{INVISIBLE}x")]), 1))
    admin = f"127.0.0.1:{free_port()}"
    try:
        gw = revocation_gateway(
            lab, tmp_path / "gw", refreshed(path.url, lab.pki_dir / "crls.pem"), extra=f'\n[admin]\nbind = "{admin}"\n'
        )
        try:
            rejected = gw.wait_event("crl_rejected", source=path.url)
            assert f"CA{INVISIBLE_ESCAPED}x" in rejected["problem"], rejected
            # 200 (crls.pem holds every CA's current CRL), the source without a usable CRL named all the same
            with urllib.request.urlopen(f"http://{gw.admin}/readyz", timeout=30) as answer:
                crls = json.loads(answer.read())["crls"]
            (problem,) = [p for p in crls if p.startswith(path.url)]
            assert f"CA{INVISIBLE_ESCAPED}x" in problem, problem
            assert not [c for c in problem if not c.isprintable()], problem
        finally:
            assert gw.stop() == 0
    finally:
        path.close()


def test_a_ca_held_current_from_one_source_keeps_the_gateway_ready_beside_a_source_replaying_an_older_crl(
    lab: LabLayout, tmp_path: Path
) -> None:
    """One CA, two CRL sources: a file holding its CRL #3 and a URL (a stale mirror) answering its genuine #2, refused
    as a replay below #3. Every device gets the right answer (alice 200, the revoked user 403: #3 is in force), so
    /readyz stays 200 (issue 8: "CRLs current", which they are for every CA) and names the URL's problem in `crls`, as
    /metrics (`kcd_crl_last_error`) and the log (`crl_rejected`) do. Before, it was 503 naming the replay: a balancer
    took the gateway out, and every gateway of a fleet reading that URL with it. A CA with no current CRL at all still
    makes it 503 (`test_not_ready_once_a_crl_is_past_its_next_update`, test_admin.py)."""
    pki = Pki.at(lab.pki_dir)
    revoked = [entry.serial_number for entry in x509.load_der_x509_crl(pki.issuing_crl.read_bytes())]
    assert revoked  # the lab's revoked user
    issuing_ca = load_ca(lab.pki_dir, "issuing")
    newer = write_crl(tmp_path / "issuing-3.crl", issuing_ca, revoked=revoked, number=3)
    older = write_crl(tmp_path / "issuing-2.crl", issuing_ca, revoked=revoked, number=2).read_bytes()
    mirror = CrlPath(b"not yet")  # a mirror catching up: then #2, read after the file's #3 was taken
    admin = f"127.0.0.1:{free_port()}"
    try:
        settings = refreshed(newer, mirror.url, pki.root_crl) + f'crl_state = "{tmp_path / "crl-state"}"\n'  # floors
        gw = revocation_gateway(lab, tmp_path / "gw", settings, extra=f'\n[admin]\nbind = "{admin}"\n')
        try:
            gw.wait_event("crl_loaded", source=str(newer))
            gw.mark()
            mirror.serve(older)
            rejected = gw.wait_for("crl_rejected", lambda e: "#2" in e["problem"], what="the mirror's #2 refused")
            assert "replayed?" in rejected["problem"], rejected
            assert get(connect(lab, gw, "alice"))[0] == 200
            status, body = get(connect(lab, gw, "revoked"))
            assert (status, "was revoked on" in body) == (403, True), body
            with urllib.request.urlopen(f"http://{admin}/readyz", timeout=30) as answer:  # 200, else HTTPError
                ready = json.loads(answer.read())
            assert (ready["ready"], ready["kdc"]) == (True, "ok"), ready
            (problem,) = ready["crls"]
            assert problem.startswith(f"{mirror.url}: "), problem
            assert "replayed?" in problem, problem
            assert problem.endswith("held from another source"), problem  # visible, as not keeping it out
            with urllib.request.urlopen(f"http://{admin}/metrics", timeout=30) as answer:
                metrics = answer.read().decode()
            failing = [line for line in metrics.splitlines() if line.startswith("kcd_crl_last_error{")]
            assert [line for line in failing if f'source="{mirror.url}"' in line and "replayed?" in line], failing
        finally:
            assert gw.stop() == 0
    finally:
        mirror.close()


@pytest.mark.parametrize("beside", ["the issuing CA's file", "nothing"])
def test_a_crl_url_that_fails_leaves_the_gateway_unready_only_when_its_ca_has_no_current_crl(
    lab: LabLayout, tmp_path: Path, beside: str
) -> None:
    """The issuing CA's CRL URL refuses every connection, under "require". Beside a file holding that CA's current CRL
    (and the root's), every device is served right and /readyz is 200, naming the URL in `crls`; with nothing beside it
    (the root's CRL alone), the issuing CA has no current CRL, its users are refused, and /readyz is 503 naming the
    URL. Before, both were 503: readiness was judged per source."""
    pki = Pki.at(lab.pki_dir)
    url = f"http://127.0.0.1:{dead_port()}/issuing.crl"
    files = [pki.issuing_crl, pki.root_crl] if beside != "nothing" else [pki.root_crl]
    admin = f"127.0.0.1:{free_port()}"
    gw = revocation_gateway(lab, tmp_path / "gw", refreshed(url, *files), extra=f'\n[admin]\nbind = "{admin}"\n')
    try:
        gw.wait_event("crl_fetch_failed", source=url)
        served = 200 if beside != "nothing" else 403
        assert get(connect(lab, gw, "alice"))[0] == served
        try:
            with urllib.request.urlopen(f"http://{admin}/readyz", timeout=30) as answer:
                status, ready = answer.status, json.loads(answer.read())
        except urllib.error.HTTPError as e:
            status, ready = e.code, json.loads(e.read())
        assert (status, ready["ready"]) == ((200, True) if served == 200 else (503, False)), ready
        (problem,) = ready["crls"]
        assert problem.startswith(f"{url}: no usable CRL (fetch failed"), problem
        assert problem.endswith("held from another source") == (served == 200), problem
    finally:
        assert gw.stop() == 0


def test_control_characters_in_a_responders_url_are_escaped_in_the_refusal(
    lab: LabLayout, tmp_path: Path, ocsp_only: OcspOnly
) -> None:
    """A certificate whose OCSP responder URL carries control characters (ESC, BEL: an IA5String holds them), that
    responder answering garbage: the device's 403 and `ocsp_failed` name the responder with the characters as
    escapes. Before, the URL as shown (`shown_location`) kept them: the refusal wrote ESC [31m to the device."""
    responder = HostileResponder(lambda _request: http_answer(b"not DER"))
    try:
        gw, cert, key = ocsp_only(responder.url + "x\x1b[31m\x07")
        status, body = curl_with(lab, gw, cert, key)
        assert status == 403, body
        assert responder.asked == 1
        assert "x\\x1b[31m\\x07" in body, body
        assert "\x1b" not in body, body
        assert "\x07" not in body, body
        failed = gw.wait_event("ocsp_failed")
        assert failed["responder"] == responder.url + "x\\x1b[31m\\x07", failed
    finally:
        responder.close()
