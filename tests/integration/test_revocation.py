"""Revocation in a running gateway, against the lab's CA, CRL server and OCSP responder.

A certificate revoked at the CA, with the new CRL published on the lab's HTTP server, is refused on the
same open connection, and its held request is ended, within crl_refresh_seconds + 5 s; stale and forged
CRLs under each policy; OCSP good, revoked and unknown from `openssl ocsp`.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import http.server
import json
import socket
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from email.message import Message
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import AuthorityInformationAccessOID

from proxy.lab.layout import LabLayout
from proxy.lab.pki import Pki, ocsp_responder_argv, revoke
from tests.integration._pki_tools import load_ca, write_crl
from tests.integration.conftest import Gateway, client_context, free_port, lab_config, start_gateway
from tests.integration.jsonlog import WAIT, eventually
from tests.integration.recorder import read_head

REFRESH = 1  # crl_refresh_seconds in these tests
GRACE = 5  # the promise: refused at most crl_refresh_seconds + 5 s after the CRL is published
ACTIVESYNC = "/Microsoft-Server-ActiveSync"


def gateway_with(lab: LabLayout, directory: Path, settings: str) -> Gateway:
    """The lab gateway with these [client_certificates] revocation settings instead of the lab's CRL file."""
    text = lab_config(lab, port=free_port())
    lab_settings = f'crls = ["{lab.pki_dir / "crls.pem"}"]\nrevocation = "require"\n'
    assert lab_settings in text
    return start_gateway(lab, directory, text.replace(lab_settings, settings))


def crl_url(lab: LabLayout, name: str) -> str:
    return f"http://127.0.0.1:{lab.crl_port}/{name}"


def get(conn: http.client.HTTPSConnection, headers: dict[str, str] | None = None) -> tuple[int, str]:
    conn.request("GET", ACTIVESYNC, headers=headers or {})
    response = conn.getresponse()
    return response.status, response.read().decode(errors="replace")


def connect(lab: LabLayout, gw: Gateway, user: str, timeout: float = 20) -> http.client.HTTPSConnection:
    return http.client.HTTPSConnection("127.0.0.1", gw.port, context=client_context(lab, user), timeout=timeout)


def curl_with(lab: LabLayout, gw: Gateway, cert: Path, key: Path) -> tuple[int, str]:
    """curl presenting a certificate that is not one of the lab's named users."""
    cmd = ["curl", "-sS", "--max-time", "20", "--cacert", str(lab.pki_dir / "root.pem")]
    cmd += ["--cert", str(cert), "--key", str(key), "-w", "\n%{http_code}", gw.url + ACTIVESYNC]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False).stdout
    body, _, code = out.rpartition("\n")
    return int(code), body


@contextlib.contextmanager
def held_at_the_backend(lab: LabLayout, gw: Gateway, user: str) -> Iterator[ssl.SSLSocket]:
    """A Ping the backend holds for 50 s, sent with `Expect: 100-continue`: the gateway answers `100 Continue`
    only once every stage said yes and it forwards (the request is watched for revocation from then on), so
    the interim answer is the proof the request is at the backend, not a guess of how long that takes."""
    raw = socket.create_connection(("127.0.0.1", gw.port), timeout=60)
    with client_context(lab, user).wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        head = f"POST {ACTIVESYNC} HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Lab-Hold-Seconds: 50\r\n"
        tls.sendall(head.encode() + b"Expect: 100-continue\r\nContent-Length: 1\r\n\r\n")
        interim = read_head(tls)
        assert interim.startswith(b"HTTP/1.1 100 "), interim
        tls.sendall(b"x")  # the body: the backend reads it, then holds
        yield tls


def read_answer(tls: ssl.SSLSocket) -> tuple[int, str]:
    """The status and body of the HTTP/1.1 answer coming on `tls` (with a Content-Length)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = tls.recv(65536)
        assert chunk, data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    length = next(int(line.split(":", 1)[1]) for line in lines if line.lower().startswith("content-length:"))
    while len(body) < length:
        chunk = tls.recv(65536)
        assert chunk, body
        body += chunk
    return int(lines[0].split()[1]), body.decode(errors="replace")


def test_revoked_certificate_is_refused_on_its_open_connection(lab: LabLayout, tmp_path: Path) -> None:
    """alice-phone is revoked and the CRL published while its keep-alive connection is open: refused on it in time."""
    issuing, root = crl_url(lab, "issuing.crl"), crl_url(lab, "root.crl")
    settings = f'crls = ["{issuing}", "{root}"]\ncrl_refresh_seconds = {REFRESH}\nrevocation = "require"\n'
    gw = gateway_with(lab, tmp_path, settings)
    try:
        conn = connect(lab, gw, "alice-phone")
        assert get(conn)[0] == 200
        assert conn.sock is not None
        local = conn.sock.getsockname()
        revoke(Pki.at(lab.pki_dir), lab.pki_dir / "users" / "alice-phone.pem", now=datetime.now(UTC))
        published = time.monotonic()
        while (answer := get(conn))[0] == 200:
            assert time.monotonic() - published < REFRESH + GRACE, "still served after the promised interval"
            time.sleep(0.1)
        elapsed = time.monotonic() - published
        assert conn.sock is not None
        assert conn.sock.getsockname() == local  # the same TCP (and TLS) connection all along
        assert answer[0] == 403
        assert "was revoked on" in answer[1]
        print(f"alice-phone refused on its open connection {elapsed:.2f} s after the CRL was published")
        conn.close()
        loaded = gw.wait_events("crl_loaded", 2, accept=lambda e: e["source"] == issuing)  # at start, and reissued
        assert loaded[-1]["crl_number"] > loaded[0]["crl_number"]
        assert {"issuer", "this_update", "next_update"} <= set(loaded[-1])
    finally:
        assert gw.stop() == 0


def test_held_request_of_a_revoked_user_is_ended(lab: LabLayout, tmp_path: Path) -> None:
    """A Ping held at the backend ends with 403 once a refresh revokes its certificate (CRL learned from the CDP), and
    its user's cached delegated tickets are dropped (they were kept: only the revocation stage's refusal dropped them,
    and test_ticket_cache's revoked-certificate test, taking a held request's 403 for that refusal, failed once)."""
    settings = f'crls = []\nuse_distribution_points = true\ncrl_refresh_seconds = {REFRESH}\nrevocation = "require"\n'
    gw = gateway_with(lab, tmp_path, settings)
    try:
        assert get(connect(lab, gw, "bob-phone"))[0] == 200  # the CRL its distribution point names was fetched
        summary = gw.wait_event("request", principal="bob@LAB.TEST")
        assert (summary["revocation"], summary["revocation_source"]) == ("good", crl_url(lab, "issuing.crl"))
        with held_at_the_backend(lab, gw, "bob-phone") as ping:
            revoke(Pki.at(lab.pki_dir), lab.pki_dir / "users" / "bob-phone.pem", now=datetime.now(UTC))
            published = time.monotonic()
            ping.settimeout(REFRESH + GRACE)
            try:
                status, body = read_answer(ping)
            except TimeoutError:
                raise AssertionError("the held request was not ended") from None
            elapsed = time.monotonic() - published
            assert elapsed < REFRESH + GRACE, "the held request was not ended in time"
        assert status == 403
        assert "was revoked on" in body
        print(f"bob-phone's held request ended {elapsed:.2f} s after the CRL was published")
        assert gw.wait_event("held_request_ended", cert_subject="CN=bob")["answer_started"] is False
        # the revoked certificate's user loses the delegated tickets, as when the revocation stage refuses it
        assert gw.wait_event("tickets_forgotten", principal="bob@LAB.TEST")["tickets"] == 1
    finally:
        assert gw.stop() == 0


def signed_crl(
    lab: LabLayout, tmp_path: Path, *, key_path: Path, this: datetime, next_: datetime, serials: list[int]
) -> Path:
    """A CRL naming the lab's issuing CA, signed with the key at `key_path`, listing `serials`."""
    pki = Pki.at(lab.pki_dir)
    signer = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    assert isinstance(signer, ec.EllipticCurvePrivateKey)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(x509.load_pem_x509_certificate(pki.issuing_cert.read_bytes()).subject)
        .last_update(this)
        .next_update(next_)
        .add_extension(x509.CRLNumber(1000), critical=False)
    )
    for serial in serials:
        entry = x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(this)
        builder = builder.add_revoked_certificate(entry.build())
    path = tmp_path / "issuing-test.crl"
    path.write_bytes(builder.sign(signer, hashes.SHA256()).public_bytes(serialization.Encoding.DER))
    return path


@pytest.mark.parametrize(("policy", "expected"), [("require", 403), ("best-effort", 200), ("off", 200)])
def test_stale_crl_under_each_policy(lab: LabLayout, tmp_path: Path, policy: str, expected: int) -> None:
    """The issuing CA's only CRL is past its nextUpdate: require refuses, best-effort and off let alice in."""
    now = datetime.now(UTC)
    pki = Pki.at(lab.pki_dir)
    stale = signed_crl(
        lab, tmp_path, key_path=pki.issuing_key, this=now - timedelta(days=8), next_=now - timedelta(days=1), serials=[]
    )
    settings = f'crls = ["{stale}", "{pki.root_crl}"]\nrevocation = "{policy}"\n'
    gw = gateway_with(lab, tmp_path, settings)
    try:
        status, body = get(connect(lab, gw, "alice"))
        assert status == expected, body
        if expected == 403:
            assert "no current CRL for issuer 'CN=Lab Issuing CA'" in body
        summary = gw.wait_event("request", principal="alice@LAB.TEST") if expected == 200 else None
        if summary is not None:
            assert summary["revocation"] == "unknown"

        def stale_logged() -> bool:
            rejected = gw.events("crl_not_used") + gw.events("crl_rejected")
            return any("is stale: its nextUpdate was" in str(e) for e in rejected)

        eventually(stale_logged, "the stale CRL's crl_not_used or crl_rejected line")
    finally:
        assert gw.stop() == 0


def test_crl_signed_by_the_wrong_key_is_never_used(lab: LabLayout, tmp_path: Path) -> None:
    """A CRL for the issuing CA but signed by the rogue key, listing alice: not used at start nor as a refresh."""
    pki = Pki.at(lab.pki_dir)
    alice = x509.load_pem_x509_certificate(pki.user_cert("alice").read_bytes())
    now = datetime.now(UTC)
    forged = signed_crl(
        lab,
        tmp_path,
        key_path=pki.rogue_issuing_key,
        this=now - timedelta(minutes=1),
        next_=now + timedelta(days=1),
        serials=[alice.serial_number],
    )
    # Served from the lab's CRL server: first the genuine CRL, then the forged one in its place.
    published = lab.root / "crl-publish" / "forge-test.crl"
    published.write_bytes(pki.issuing_crl.read_bytes())
    url = crl_url(lab, "forge-test.crl")
    settings = f'crls = ["{url}", "{pki.root_crl}"]\ncrl_refresh_seconds = {REFRESH}\nrevocation = "require"\n'
    gw = gateway_with(lab, tmp_path, settings)
    try:
        conn = connect(lab, gw, "alice")
        assert get(conn)[0] == 200
        published.write_bytes(forged.read_bytes())
        event = gw.wait_event("crl_rejected", timeout=REFRESH + GRACE, source=url)
        assert event["problem"] == (
            "CRL signature does not verify against the trusted 'CN=Lab Issuing CA' (signed with another key?)"
        )
        assert "CRL #" in event["holding"]  # it says what it keeps serving with
        assert get(conn)[0] == 200  # the genuine CRL still decides
    finally:
        assert gw.stop() == 0
        published.unlink()
    # Configured as a file from the start, the forged CRL is the only one for the issuing CA: no current CRL.
    gw = gateway_with(lab, tmp_path / "file", f'crls = ["{forged}", "{pki.root_crl}"]\nrevocation = "require"\n')
    try:
        status, body = get(connect(lab, gw, "alice"))
        assert (status, body.strip()) == (
            403,
            "the revocation status could not be determined: no current CRL for issuer 'CN=Lab Issuing CA'",
        )
    finally:
        assert gw.stop() == 0


# --- OCSP ----------------------------------------------------------------------------------------


def wait_for_openssl_ocsp(proc: subprocess.Popen[bytes], log: Path) -> None:
    """Until `openssl ocsp` (`proc`, its output in `log`) says it listens: its log read, not its port (a probing
    connect would wedge it); it must not exit meanwhile."""
    deadline = time.monotonic() + WAIT
    while b"waiting for OCSP client connections" not in log.read_bytes():
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)


@pytest.fixture(scope="module")
def ocsp_responder(lab: LabLayout, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The issuing CA's responder, `openssl ocsp`, on the port the lab's certificates name in their AIA."""
    log = tmp_path_factory.mktemp("ocsp") / "ocsp.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            ocsp_responder_argv(Pki.at(lab.pki_dir), lab.ocsp_port), stdout=out, stderr=subprocess.STDOUT
        )
    try:
        wait_for_openssl_ocsp(proc, log)
        yield f"http://127.0.0.1:{lab.ocsp_port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def alice_reissued(lab: LabLayout, directory: Path, stem: str, responder: str | None = None) -> tuple[Path, Path]:
    """alice's certificate (alice@lab.test, the lab's profile) issued again by the issuing CA with a key and serial
    of its own, so in no CA database (the lab's responder says unknown), written to `directory` as `stem`.pem and
    `stem`.key. With `responder`, that URL is its only OCSP responder, and its serial is on no CRL."""
    pki = Pki.at(lab.pki_dir)
    alice = x509.load_pem_x509_certificate(pki.user_cert("alice").read_bytes())
    ca_key = serialization.load_pem_private_key(pki.issuing_key.read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(alice.subject)
        .issuer_name(alice.issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(datetime.now(UTC) - timedelta(hours=1))
        .not_valid_after(datetime.now(UTC) + timedelta(days=30))
    )
    # the same profile: UPN, clientAuth, CRL distribution point, and her OCSP responder unless `responder` is given
    replaced = x509.AuthorityInformationAccess if responder is not None else x509.AuthorityKeyIdentifier
    for ext in alice.extensions:
        if not isinstance(ext.value, x509.SubjectKeyIdentifier | replaced):
            builder = builder.add_extension(ext.value, critical=ext.critical)
    if responder is not None:
        where = x509.AccessDescription(AuthorityInformationAccessOID.OCSP, x509.UniformResourceIdentifier(responder))
        builder = builder.add_extension(x509.AuthorityInformationAccess([where]), critical=False)
    directory.mkdir(parents=True, exist_ok=True)
    cert, key_path = directory / f"{stem}.pem", directory / f"{stem}.key"
    cert.write_bytes(builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert, key_path


def test_ocsp_require_good_revoked_unknown(lab: LabLayout, ocsp_responder: str, tmp_path: Path) -> None:
    """ocsp = "require" (no CRLs): good passes with the responder as evidence; revoked and unknown are refused."""
    gw = gateway_with(lab, tmp_path, 'revocation = "off"\nocsp = "require"\n')
    try:
        assert get(connect(lab, gw, "alice"))[0] == 200
        summary = gw.wait_event("request", principal="alice@LAB.TEST")
        assert (summary["revocation"], summary["revocation_source"]) == ("good", ocsp_responder)
        status, body = get(connect(lab, gw, "revoked"))
        assert status == 403
        assert "(reason keyCompromise, per OCSP)" in body
        status, body = curl_with(lab, gw, *alice_reissued(lab, tmp_path / "unknown", "unknown"))
        assert status == 403
        assert "the OCSP responder does not know serial" in body
    finally:
        assert gw.stop() == 0


def test_a_revoked_certificate_and_an_unknown_status_are_told_apart_in_the_log(
    lab: LabLayout, ocsp_responder: str, tmp_path: Path
) -> None:
    """One event name, `certificate_revoked`, for both refusals; its `revocation` field (and the summary line's) says
    "revoked" for erin (the responder says so) and "unknown" for a certificate no current CRL speaks for."""
    pki = Pki.at(lab.pki_dir)  # no CRL of the issuing CA: only the responder can speak for its certificates
    gw = gateway_with(lab, tmp_path, f'crls = ["{pki.root_crl}"]\nrevocation = "require"\nocsp = "prefer"\n')
    try:
        status, body = get(connect(lab, gw, "revoked"))
        assert (status, "per OCSP" in body) == (403, True), body
        refused = gw.wait_event("certificate_revoked", stage="revocation")
        summary = gw.wait_event("request", status=403)
        assert (refused.get("revocation"), summary.get("revocation")) == ("revoked", "revoked"), (refused, summary)
        gw.mark()
        status, body = curl_with(lab, gw, *alice_reissued(lab, tmp_path / "unknown", "unknown"))
        assert (status, body.startswith("the revocation status could not be determined: ")) == (403, True), body
        refused = gw.wait_event("certificate_revoked", stage="revocation")
        summary = gw.wait_event("request", status=403)
        assert (refused.get("revocation"), summary.get("revocation")) == ("unknown", "unknown"), (refused, summary)
    finally:
        assert gw.stop() == 0


def test_ocsp_prefer_falls_back_to_crls(lab: LabLayout, ocsp_responder: str, tmp_path: Path) -> None:
    """ocsp = "prefer": where the responder does not know the certificate, the lab's CRLs decide."""
    settings = f'crls = ["{lab.pki_dir / "crls.pem"}"]\nrevocation = "require"\nocsp = "prefer"\n'
    gw = gateway_with(lab, tmp_path, settings)
    try:
        status, _ = curl_with(lab, gw, *alice_reissued(lab, tmp_path / "unknown", "unknown"))
        assert status == 200
        summary = gw.wait_event("request", principal="alice@LAB.TEST")
        assert (summary["revocation"], summary["revocation_source"]) == ("good", str(lab.pki_dir / "crls.pem"))
        assert get(connect(lab, gw, "revoked"))[0] == 403
    finally:
        assert gw.stop() == 0


def test_an_ocsp_answer_is_kept_until_its_next_update_and_one_refresh_at_most(lab: LabLayout, tmp_path: Path) -> None:
    """Issue 4: OCSP answers "cached until nextUpdate". `openssl ocsp -nmin 60` (nextUpdate an hour ahead), counting
    the requests it gets: alice's three requests cost it one; the cache also ends after crl_refresh_seconds (2 here),
    so a certificate revoked at the responder is refused in seconds on the keep-alive connection its device holds, as
    a CRL's revocation is (docs/revocation.md), not an hour later: within two intervals + 5 s, as openssl reads its
    index again only after answering once more."""
    refresh = 2
    directory = tmp_path / "responder"
    directory.mkdir()
    port = free_port()
    cert, key = alice_reissued(lab, tmp_path / "alice", "alice", responder=f"http://127.0.0.1:{port}")
    alice = x509.load_pem_x509_certificate(cert.read_bytes())
    serial = f"{alice.serial_number:X}"
    serial = "0" * (len(serial) % 2) + serial
    expiry = alice.not_valid_after_utc.strftime("%y%m%d%H%M%SZ")
    index = directory / "index.txt"
    index.write_text(f"V\t{expiry}\t\t{serial}\tunknown\t/CN=alice\n")
    (directory / "index.txt.attr").write_text("unique_subject = no\n")
    pki = Pki.at(lab.pki_dir)
    argv = ["openssl", "ocsp", "-index", str(index), "-port", str(port), "-CA", str(pki.issuing_cert)]
    argv += ["-rsigner", str(pki.issuing_cert), "-rkey", str(pki.issuing_key), "-nmin", "60", "-timeout", "3"]
    log = directory / "ocsp.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)

    def asked() -> int:
        """Requests the responder has received (it logs each one's first line)."""
        return log.read_text(errors="replace").count("Received request")

    gw = None
    try:
        wait_for_openssl_ocsp(proc, log)
        settings = f'revocation = "off"\nocsp = "require"\ncrl_refresh_seconds = {refresh}\n'
        gw = gateway_with(lab, tmp_path / "gw", settings)
        started = time.monotonic()
        for _ in range(3):
            assert curl_with(lab, gw, cert, key)[0] == 200
        if time.monotonic() - started < refresh:  # all three within one refresh interval, as on any sane machine
            assert asked() == 1, log.read_text()
        conn = http.client.HTTPSConnection("127.0.0.1", gw.port, context=client_context(lab, str(cert.with_suffix(""))))
        assert get(conn)[0] == 200  # a keep-alive connection, held open across the revocation
        assert conn.sock is not None
        local = conn.sock.getsockname()
        line = f"R\t{expiry}\t{datetime.now(UTC):%y%m%d%H%M%SZ},keyCompromise\t{serial}\tunknown\t/CN=alice\n"
        # a new file in its place: openssl notices a changed index by its inode, or by an mtime in whole seconds,
        # which a rewrite in the second of the first write leaves as it was (it answered "good" for ever, in CI once)
        fresh = directory / "index.txt.new"
        fresh.write_text(line)
        fresh.replace(index)
        revoked = time.monotonic()

        def refused() -> str | None:
            status, body = get(conn)
            return body if status == 403 else None

        body = eventually(refused, "alice refused for the responder's revocation", timeout=60)
        # the responder reads its index again after the next request it answers: one more old answer, kept a refresh
        assert time.monotonic() - revoked < 2 * refresh + GRACE, "refused later than the refresh interval promises"
        assert "per OCSP" in body
        assert conn.sock is not None
        assert conn.sock.getsockname() == local  # on the connection it held: decided per request, not per handshake
        conn.close()
        print(f"refused {time.monotonic() - revoked:.2f} s after the responder's revocation; asked {asked()} times")
    finally:
        if gw is not None:
            assert gw.stop() == 0
        proc.terminate()
        proc.wait(timeout=10)


class _CrlServer:
    """A threaded HTTP server on loopback answering each GET with what `answer` gives for its path (with the query)
    and headers: (status, body)."""

    def __init__(self, answer: Callable[[str, Message], tuple[int, bytes]]) -> None:
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                status, body = answer(self.path, self.headers)
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_args: object) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class _FailingCrlServer(_CrlServer):
    """The lab's issuing CRL at /issuing.crl until `failing` is set, then `failure`: (status, body)."""

    def __init__(self, crl: bytes, failure: tuple[int, bytes]) -> None:
        self.failing = False
        super().__init__(lambda _path, _headers: failure if self.failing else (200, crl))
        self.url = f"http://127.0.0.1:{self.port}/issuing.crl"


@pytest.mark.parametrize(
    ("failure", "event", "error"),
    [((503, b"down"), "crl_fetch_failed", "HTTP 503"), ((200, b"<html>a portal</html>"), "crl_rejected", "")],
    ids=["http-503", "not-a-crl"],
)
def test_a_failed_fetch_keeps_the_last_good_crl(
    lab: LabLayout, tmp_path: Path, failure: tuple[int, bytes], event: str, error: str
) -> None:
    """Issue 4: "a fetch that fails keeps the last good CRL until it goes stale", and "a CRL that fails to parse ...
    never replaces a good one". The issuing CA's CRL comes from a URL refreshed every second; once that URL answers
    503, or 200 with a page that is no CRL (logged, saying what it keeps), the revoked certificate is still refused
    as revoked and alice still served: neither "no current CRL" nor a pass."""
    pki = Pki.at(lab.pki_dir)
    server = _FailingCrlServer(pki.issuing_crl.read_bytes(), failure)
    try:
        settings = (
            f'crls = ["{server.url}", "{pki.root_crl}"]\ncrl_refresh_seconds = {REFRESH}\nrevocation = "require"\n'
        )
        gw = gateway_with(lab, tmp_path, settings)
        try:
            assert get(connect(lab, gw, "alice"))[0] == 200
            status, body = get(connect(lab, gw, "revoked"))
            assert (status, "was revoked on" in body) == (403, True), body
            gw.mark()
            server.failing = True
            failed = gw.wait_event(event, source=server.url)
            assert error in str(failed)
            assert "CRL #" in failed["holding"]  # what it keeps serving with
            gw.wait_events(event, 2, accept=lambda e: e["source"] == server.url)  # and again: still kept
            status, body = get(connect(lab, gw, "revoked"))
            assert (status, "was revoked on" in body) == (403, True), body
            assert get(connect(lab, gw, "alice"))[0] == 200
        finally:
            assert gw.stop() == 0
    finally:
        server.close()


def test_a_crl_url_that_does_not_answer_is_named_in_its_fix_and_in_the_refusal(lab: LabLayout, tmp_path: Path) -> None:
    """The issuing CA's CRL URL on a port where nothing listens (a typo) under "require": `crl_fetch_failed` carries a
    fix (the URL, the network, the CA's server, what "require" does meanwhile); alice's 403 at revocation says her
    revocation status could not be determined and names the URL, and the refusal's fix names the failed fetch."""
    pki = Pki.at(lab.pki_dir)
    dead = f"http://127.0.0.1:{free_port()}/issuing.crl"
    gw = gateway_with(lab, tmp_path, f'crls = ["{dead}", "{pki.root_crl}"]\nrevocation = "require"\n')
    try:
        fix = gw.wait_event("crl_fetch_failed", source=dead).get("fix", "")
        assert all(words in fix for words in ("the URL", "network", "the CA's server", "every device")), fix
        gw.mark()
        status, body = get(connect(lab, gw, "alice"))
        assert status == 403, body
        assert body.strip() == (
            "the revocation status could not be determined: no current CRL for issuer 'CN=Lab Issuing CA' "
            f"(CRL source not fetched: {dead})"
        )
        refused = gw.wait_event("certificate_revoked", stage="revocation")
        assert f"could not be fetched ({dead}: fetch failed: " in refused["fix"], refused
    finally:
        assert gw.stop() == 0


class _GuardedCrlServer(_CrlServer):
    """The lab's issuing CRL at /issuing.crl to a GET that `signed` takes (its path with the query, its headers),
    `refused` (401 or 403) to any other, and nothing (404) at any other path; `asked` counts the signed GETs."""

    def __init__(self, crl: bytes, signed: Callable[[str, Message], bool], refused: int) -> None:
        self.asked = 0

        def answer(path: str, headers: Message) -> tuple[int, bytes]:
            if not signed(path, headers):
                return refused, b"sign in"
            self.asked += 1
            return (200, crl) if path.partition("?")[0] == "/issuing.crl" else (404, b"none here")

        super().__init__(answer)


def _admin_outputs(admin: str) -> dict[str, str]:
    """Everything the admin listener at `admin` shows: /metrics, /readyz, /healthz, /traces, the page and each trace
    (as JSON and drawn), by path."""

    def body(path: str) -> str:
        try:
            with urllib.request.urlopen(admin + path, timeout=30) as answer:  # noqa: S310  loopback
                return str(answer.read().decode())
        except urllib.error.HTTPError as e:  # /readyz's 503 has a body too
            return str(e.read().decode())

    outputs = {path: body(path) for path in ("/metrics", "/readyz", "/healthz", "/traces?limit=1000", "/")}
    for record in json.loads(outputs["/traces?limit=1000"]):
        for path in (f"/traces/{record['id']}", f"/trace/{record['id']}"):
            outputs[path] = body(path)
    return outputs


def _secret_shown_nowhere(
    lab: LabLayout,
    tmp_path: Path,
    server: _GuardedCrlServer,
    urls: tuple[str, str],
    shown: tuple[str, str],
    secret: str,
) -> None:
    """A gateway under "require" whose issuing CA's CRL comes only from `server` at `urls[0]` (`urls[1]`: a URL the
    server refuses or lacks) fetches it (alice 200, a revoked user 403), and every output names the URLs as `shown`
    and nowhere `secret`: /metrics' `source` labels, /readyz's list of CRLs that are not current, the traces and their
    pages, the log."""
    pki = Pki.at(lab.pki_dir)
    admin = f"http://127.0.0.1:{free_port()}"
    settings = (
        f'crls = ["{urls[0]}", "{urls[1]}", "{pki.root_crl}"]\n'
        f'crl_refresh_seconds = {REFRESH}\nrevocation = "require"\n'
    )
    text = lab_config(lab, port=free_port(), extra=f'\n[admin]\nbind = "{admin[len("http://") :]}"\n')
    lab_settings = f'crls = ["{lab.pki_dir / "crls.pem"}"]\nrevocation = "require"\n'
    gw = start_gateway(lab, tmp_path, text.replace(lab_settings, settings))
    try:
        assert get(connect(lab, gw, "alice"))[0] == 200
        status, body = get(connect(lab, gw, "revoked"))
        assert (status, "was revoked on" in body) == (403, True), body
        assert server.asked >= 1  # fetched, signed
        outputs = _admin_outputs(admin)
        assert f'source="{shown[0]}"' in outputs["/metrics"]  # named, without the secret
        assert f"{shown[1]}: " in outputs["/readyz"]
        outputs["log"] = gw.log_path.read_text()
        assert shown[0] in outputs["log"]
        assert [where for where, text in outputs.items() if secret in text] == []
    finally:
        assert gw.stop() == 0


def test_a_crl_urls_password_is_used_to_fetch_it_and_shown_nowhere(lab: LabLayout, tmp_path: Path) -> None:
    """A CRL URL with a user and password (`http://user:password@host/...`: a CRL endpoint behind Basic sign-in) is
    fetched with them (the issuing CA's CRL comes only from there, under "require": alice 200, a revoked user 403),
    but no output names the password: not /metrics' `source` labels, /readyz's list of CRLs that are not current (a
    second URL of the same server answers 404), the traces and their pages, nor the log; each shows the URL with
    `[redacted]` for the password. Before, the whole URL was the CRL's name everywhere, password included, and
    /metrics is scraped into a store that many more people read than the gateway's configuration."""
    password = "S3cret-crl-" + uuid.uuid4().hex[:8]
    expected = "Basic " + base64.b64encode(f"crlsvc:{password}".encode()).decode()
    crl = Pki.at(lab.pki_dir).issuing_crl.read_bytes()
    server = _GuardedCrlServer(crl, lambda _path, headers: headers.get("Authorization") == expected, 401)
    try:
        signed_in = f"http://crlsvc:{password}@127.0.0.1:{server.port}"
        shown = f"http://crlsvc:[redacted]@127.0.0.1:{server.port}"
        urls = (f"{signed_in}/issuing.crl", f"{signed_in}/missing.crl")
        _secret_shown_nowhere(lab, tmp_path, server, urls, (f"{shown}/issuing.crl", f"{shown}/missing.crl"), password)
        assert server.asked >= 2  # both URLs fetched, signed in
    finally:
        server.close()


def test_a_crl_urls_query_token_is_used_to_fetch_it_and_shown_nowhere(lab: LabLayout, tmp_path: Path) -> None:
    """A signed CRL URL (`...?sv=2&sig=<token>`, as object stores hand out) is fetched with its query (alice 200, a
    revoked user 403 under "require"), but every output shows the query's names only, `?sv=[redacted]&sig=[redacted]`:
    /metrics' labels, /readyz's list (a second URL whose signature the server refuses), the traces and their pages,
    the log. Before, the URL's `user:pw@` was redacted but its query went out whole: the token, which is the
    credential."""
    token = "SiGnEd-" + uuid.uuid4().hex
    crl = Pki.at(lab.pki_dir).issuing_crl.read_bytes()
    server = _GuardedCrlServer(crl, lambda path, _headers: f"sig={token}" in path.partition("?")[2].split("&"), 403)
    try:
        base = f"http://127.0.0.1:{server.port}"
        urls = (f"{base}/issuing.crl?sv=2&sig={token}", f"{base}/missing.crl?sv=2&sig={token}x")
        shown = (f"{base}/issuing.crl?sv=[redacted]&sig=[redacted]", f"{base}/missing.crl?sv=[redacted]&sig=[redacted]")
        _secret_shown_nowhere(lab, tmp_path, server, urls, shown, token)
    finally:
        server.close()


def test_a_crl_url_answering_another_genuine_crl_keeps_the_issuing_cas_until_its_next_update(
    lab: LabLayout, tmp_path: Path
) -> None:
    """The issuing CA's CRL URL (plain HTTP: anyone on its path answers what it likes) gives its CRL #3001 revoking
    carol, then the root's genuine CRL in its place: under "best-effort" carol stays refused, her issuing CA's CRL kept
    until its nextUpdate as a failed fetch keeps it, and `crl_scope_dropped` names it with a fix; the issuing CA's older
    #3000 then answered is refused as a replay of the CRL kept. Before, the source held the root's CRL alone, carol's
    status was unknown and she was served (200), and #3000 was taken."""
    carol = x509.load_pem_x509_certificate((lab.pki_dir / "users" / "carol.pem").read_bytes())
    issuing = load_ca(lab.pki_dir, "issuing")
    revoking = write_crl(tmp_path / "3001.crl", issuing, revoked=[carol.serial_number], number=3001).read_bytes()
    older = write_crl(tmp_path / "3000.crl", issuing, number=3000).read_bytes()
    root_crl = Pki.at(lab.pki_dir).root_crl
    answer = {"crl": revoking}
    server = _CrlServer(lambda _path, _headers: (200, answer["crl"]))
    url = f"http://127.0.0.1:{server.port}/issuing.crl"
    settings = f'crls = ["{url}", "{root_crl}"]\ncrl_refresh_seconds = {REFRESH}\nrevocation = "best-effort"\n'
    try:
        gw = gateway_with(lab, tmp_path, settings)
        try:
            status, body = get(connect(lab, gw, "carol"))
            assert (status, "was revoked on" in body) == (403, True), body
            gw.mark()
            answer["crl"] = root_crl.read_bytes()
            gw.wait_event("crl_loaded", source=url, issuer="CN=Lab Root CA")  # the URL's answer taken
            status, body = get(connect(lab, gw, "carol"))
            assert (status, "was revoked on" in body) == (403, True), body
            dropped = gw.wait_event("crl_scope_dropped", source=url)
            assert "CRL #3001 of 'CN=Lab Issuing CA'" in dropped["dropped"], dropped
            assert "kept until its nextUpdate" in dropped["dropped"], dropped
            assert "still serves the CA's own CRL" in dropped["fix"], dropped
            assert get(connect(lab, gw, "alice"))[0] == 200
            assert gw.wait_event("request", principal="alice@LAB.TEST")["revocation"] == "good"
            gw.mark()
            answer["crl"] = older
            refused = gw.wait_event("crl_rejected", source=url)
            assert "#3000" in refused["problem"], refused
            assert "replayed?" in refused["problem"], refused
            status, body = get(connect(lab, gw, "carol"))
            assert (status, "was revoked on" in body) == (403, True), body
        finally:
            assert gw.stop() == 0
    finally:
        server.close()
