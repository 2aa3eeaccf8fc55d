"""The listener's TLS objects keep the client certificate as DER only (proxy.tls.server._PeerSSLObject)."""

from __future__ import annotations

import contextlib
import ssl
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from proxy import config
from proxy.tls.server import server_context
from tests.unit.test_config import GOOD, _write


def _pem(path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey | None = None) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if key is not None:
        pkcs8 = serialization.PrivateFormat.PKCS8
        key_pem = key.private_bytes(serialization.Encoding.PEM, pkcs8, serialization.NoEncryption())
        path.with_suffix(".key").write_bytes(key_pem)


def _cert(
    subject: str, key: ec.EllipticCurvePrivateKey, issuer: str, signer: ec.EllipticCurvePrivateKey, *, ca: bool
) -> x509.Certificate:
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        eku = [ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH]
        builder = builder.add_extension(x509.ExtendedKeyUsage(eku), critical=False)
    return builder.sign(signer, hashes.SHA256())


def test_the_peer_certificate_is_kept_as_der_and_no_dict_is_made(tmp_path: Path) -> None:
    """After a real handshake with the listener's context: the DER of the client's certificate is there for
    the certificate stages, and the decoded dict asyncio would keep per connection (about 2.7 KiB) is empty."""
    path = _write(tmp_path, GOOD)
    ca_key, server_key, client_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    ca = _cert("test CA", ca_key, "test CA", ca_key, ca=True)
    for name in ("pki/root.pem", "pki/issuing.pem"):
        _pem(tmp_path / name, ca)
    _pem(tmp_path / "tls/server.pem", _cert("server", server_key, "test CA", ca_key, ca=False), server_key)
    (tmp_path / "tls/server-chain.pem").write_bytes((tmp_path / "tls/server.pem").read_bytes())
    client = _cert("alice", client_key, "test CA", ca_key, ca=False)
    _pem(tmp_path / "client.pem", client, client_key)

    server_ctx = server_context(config.load(path))
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.check_hostname = False
    client_ctx.verify_mode = ssl.CERT_NONE
    client_ctx.load_cert_chain(tmp_path / "client.pem", tmp_path / "client.key")
    to_server, to_client = ssl.MemoryBIO(), ssl.MemoryBIO()
    server = server_ctx.wrap_bio(to_server, to_client, server_side=True)
    peer = client_ctx.wrap_bio(to_client, to_server)
    for _ in range(10):  # TLS 1.3 with a client certificate: a few round trips between the two objects
        for side in (peer, server):
            with contextlib.suppress(ssl.SSLWantReadError):
                side.do_handshake()
    assert server.getpeercert(binary_form=True) == client.public_bytes(serialization.Encoding.DER)
    assert server.getpeercert() == {}
    assert isinstance(server, ssl.SSLObject)  # proxy.tls.peer and the admin listener check for it
