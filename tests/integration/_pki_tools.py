"""Certificates and CRLs that tests make for themselves with the lab's CA keys (the lab's own files are left alone)."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.pem import load_cert, load_key


def load_ca(directory: Path, name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    return load_cert(directory / f"{name}.pem"), load_key(directory / f"{name}.key")


def write_crl(
    path: Path,
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
    *,
    revoked: Iterable[int] = (),
    this_update: datetime | None = None,
    next_update: datetime | None = None,
    number: int = 1000,
) -> Path:
    """A CRL issued in `ca`'s name and signed with its key (PEM), revoking the serials given."""
    now = datetime.now(UTC)
    cert, key = ca
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(cert.subject)
        .last_update(this_update or now - timedelta(minutes=5))
        .next_update(next_update or now + timedelta(days=1))
        .add_extension(x509.CRLNumber(number), critical=False)
    )
    for serial in revoked:
        entry = x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now - timedelta(minutes=10))
        builder = builder.add_revoked_certificate(entry.build())
    path.write_bytes(builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
    return path


def write_server_certificate(
    directory: Path,
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
    *,
    cn: str = "proxy.lab.test",
    local: bool = True,
    not_after: datetime | None = None,
) -> tuple[Path, Path, x509.Certificate]:
    """A fresh server certificate for `cn` issued by `ca`, and (`local`) for 127.0.0.1 and localhost too: (chain
    file, key file, leaf). Without `local` it names `cn` alone, as a production server's does. Valid for two days,
    or until `not_after`."""
    now = datetime.now(UTC)
    cert, ca_key = ca
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [x509.DNSName(cn)]
    if local:
        names += [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(not_after or now + timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    chain, key_file = directory / f"{cn}-chain.pem", directory / f"{cn}.key"
    chain.write_bytes(leaf.public_bytes(serialization.Encoding.PEM) + cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return chain, key_file, leaf
