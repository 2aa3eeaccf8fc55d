"""What an anonymous client's certificate says reaches the log escaped: a certificate refused in the TLS handshake
(an issuer nobody configured) is named in `tls_handshake_refused` by its subject, and that subject is the client's
to write. Like a CRL issuer's name (left17's `proxy.printable`), its invisible characters are shown as escapes."""

from __future__ import annotations

import socket
import ssl
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from proxy.lab.layout import LabLayout
from tests.integration.conftest import client_context, free_port, lab_config, start_gateway

INVISIBLE = "\u202eexe.txt\x1b[31m\u200b\u2028"  # a right-to-left override, ESC, a zero-width space, a line separator


def _stranger(directory: Path) -> Path:
    """A self-signed client certificate (and its key beside it) whose subject and issuer hold `INVISIBLE`."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mallory" + INVISIBLE)])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(5)
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    (directory / "mallory.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    (directory / "mallory.key").write_bytes(private)
    return directory / "mallory"


def _present(device: ssl.SSLContext, port: int) -> None:
    """A request on a connection whose handshake presents `device`'s certificate."""
    with device.wrap_socket(
        socket.create_connection(("127.0.0.1", port), timeout=30), server_hostname="proxy.lab.test"
    ) as tls:
        tls.sendall(b"GET /owa/ HTTP/1.1\r\nHost: proxy.lab.test\r\n\r\n")
        tls.recv(100)


def test_a_refused_certificates_subject_is_logged_with_its_invisible_characters_escaped(
    lab: LabLayout, tmp_path: Path
) -> None:
    """A client presenting a self-signed certificate whose subject holds U+202E, ESC, a zero-width space and U+2028
    is refused in the handshake (unknown CA), and `tls_handshake_refused` names the certificate with those characters
    as escapes (`\\u202e`, `\\x1b`, ...), none of them raw. Before, the subject was logged as the client wrote it: a
    log viewer showed the rest of the line reversed, a terminal took the ESC sequence."""
    gw = start_gateway(lab, tmp_path / "gw", lab_config(lab, port=free_port()))
    try:
        gw.mark()
        with pytest.raises((ssl.SSLError, ConnectionError)):  # the alert, at the handshake or the first read
            _present(client_context(lab, str(_stranger(tmp_path))), gw.port)
        line = gw.wait_event("tls_handshake_refused")
        shown = line["certificate"]
        assert shown == "CN=mallory\\u202eexe.txt\\x1b[31m\\u200b\\u2028", shown
        assert all(c.isprintable() for c in line["fix"])
    finally:
        gw.stop()
