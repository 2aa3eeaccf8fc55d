"""A keep-alive connection's certificate is read once per connection (`PresentedCertificates`), and checked per
request: a certificate that expires while its connection is open is refused on that connection's next request."""

from __future__ import annotations

import http.client
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from proxy.lab.layout import LabLayout
from proxy.lab.pki import Pki, UserSpec, issue_user, write_key, write_pem
from tests.integration.conftest import Gateway, client_context

LIFE = 6  # seconds from issue to the certificate's notAfter: time for a handshake and a first request


def expiring_alice(lab: LabLayout, stem: Path, life: float) -> x509.Certificate:
    """A certificate of alice's (its own key, in `stem`.pem and `stem`.key) whose notAfter is `life` seconds from
    now."""
    key = ec.generate_private_key(ec.SECP256R1())
    issued = datetime.now(UTC)
    cert = issue_user(  # "valid" is a year from `now`: a `now` a year less `life` seconds back ends `life` s from here
        Pki.at(lab.pki_dir),
        UserSpec(upn="alice@lab.test", email=f"alice-{stem.name}@lab.test"),
        key,
        now=issued - timedelta(days=365) + timedelta(seconds=life),
    )
    write_pem(stem.with_suffix(".pem"), [cert])
    write_key(stem.with_suffix(".key"), key)
    return cert


def _expiring(
    lab: LabLayout, gateway: Gateway, tmp_path: Path, life: float
) -> tuple[x509.Certificate, http.client.HTTPSConnection]:
    """A certificate of alice's (its own key) whose notAfter is `life` seconds from now, and a connection to the
    gateway that will present it (not yet opened)."""
    cert = expiring_alice(lab, tmp_path / "expiring", life)
    conn = http.client.HTTPSConnection(
        "127.0.0.1", gateway.port, context=client_context(lab, str(tmp_path / "expiring")), timeout=30
    )
    return cert, conn


def test_a_certificate_expiring_on_an_open_connection_is_refused_on_it(
    lab: LabLayout, gateway: Gateway, tmp_path: Path
) -> None:
    """alice's certificate expires a few seconds after her connection's first request: the next request on the
    same TLS connection is refused (403, the certificate stage) instead of being served from the connection's
    memory, and the refusal is logged as an expired certificate.

    The certificate lives LIFE seconds from its issue; where the handshake and the first request take longer than
    that (a loaded machine), that request is refused for the certificate's end before the scenario began, and a
    certificate with twice the life is issued. A first request refused while the certificate was valid fails."""
    life, deadline = LIFE, time.monotonic() + 300
    while True:
        cert, conn = _expiring(lab, gateway, tmp_path, life)
        try:
            conn.request("GET", "/owa/")
            first = conn.getresponse()
            status, said = first.status, first.read()
        except OSError as e:  # the handshake refused the certificate (ssl.SSLError is an OSError)
            status, said = None, repr(e).encode()
        if status == 200:
            assert said != b""
            break
        conn.close()
        assert datetime.now(UTC) > cert.not_valid_after_utc, f"refused while valid: {status} {said[:300]!r}"
        assert time.monotonic() < deadline, "no first request came before its certificate's notAfter"
        life *= 2
    gateway.mark()  # the refusal awaited below is this connection's, not an attempt's before it
    try:
        assert conn.sock is not None
        local = conn.sock.getsockname()
        served = 1
        deadline = time.monotonic() + life + 30
        while True:  # the same connection, until the certificate's notAfter has passed
            sent = datetime.now(UTC)  # the gateway checks the certificate after this: a request sent past notAfter
            conn.request("GET", "/owa/")  # must be refused (the clock read after the answer could be seconds late)
            answer = conn.getresponse()
            body = answer.read().decode(errors="replace")
            if answer.status != 200:
                break
            assert sent <= cert.not_valid_after_utc, "served after notAfter"
            assert time.monotonic() < deadline
            served += 1
            time.sleep(0.2)
        assert conn.sock is not None
        assert conn.sock.getsockname() == local  # one TCP (and TLS) connection all along
        assert answer.status == 403, body
        assert answer.getheader("X-KCD-Refused-Stage") == "certificate"
        assert "expired" in body
        assert datetime.now(UTC) > cert.not_valid_after_utc
        assert served >= 2  # the connection's memory was used before it ended
        gateway.wait_event("certificate_rejected", cert_subject="CN=alice-expiring")
    finally:
        conn.close()
