"""`[admin] crls`: an operator's certificate checked against the CRLs of `admin.client_ca`'s CAs (`proxy.admin`)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from proxy.admin import AdminCrls, admin_revocation
from proxy.config import Admin

NOW = datetime.now(UTC)
Issued = tuple[x509.Certificate, ec.EllipticCurvePrivateKey]


def _issue(subject: str, issuer: Issued | None, *, ca: bool, serial: int) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    signer = issuer[1] if issuer is not None else key
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer[0].subject if issuer is not None else name)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(NOW - timedelta(days=1))
        .not_valid_after(NOW + timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()),
            critical=False,
        )
    )
    if ca:
        usage = x509.KeyUsage(False, False, False, False, False, True, True, False, False)
        builder = builder.add_extension(usage, critical=True)
    else:
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    return builder.sign(signer, hashes.SHA256()), key


def _crl(path: Path, issuer: Issued, revoked: tuple[int, ...]) -> Path:
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer[0].subject)
        .last_update(NOW - timedelta(minutes=5))
        .next_update(NOW + timedelta(days=1))
        .add_extension(x509.CRLNumber(1), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer[1].public_key()), critical=False)
    )
    for serial in revoked:
        entry = x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(NOW - timedelta(minutes=10))
        builder = builder.add_revoked_certificate(entry.build())
    path.write_bytes(builder.sign(issuer[1], hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
    return path


def test_an_operator_under_a_revoked_intermediate_of_the_client_ca_bundle_is_refused(tmp_path: Path) -> None:
    """`admin.client_ca` is the operators' root and intermediate in one bundle (as documented), `[admin] crls` the
    root's CRL, which revokes the intermediate: an operator certificate the intermediate issued is refused. Failed
    before the fix: every certificate of the bundle was a trust anchor, the chain ended at the intermediate, and the
    root's verdict on it was never asked."""
    root = _issue("operators root", None, ca=True, serial=1)
    intermediate = _issue("operators issuing", root, ca=True, serial=2)
    operator = _issue("operator", intermediate, ca=False, serial=3)
    bundle = tmp_path / "admin-ca.pem"
    bundle.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (root[0], intermediate[0])))
    root_crl = _crl(tmp_path / "root.crl", root, revoked=(2,))
    issuing_crl = _crl(tmp_path / "issuing.crl", intermediate, revoked=())
    admin = Admin(host="127.0.0.1", port=0, client_ca=bundle, crls=(root_crl, issuing_crl))
    device_side = SimpleNamespace(revocation="off", crl_refresh_seconds=300)  # the device CRLs not asked
    live: Any = SimpleNamespace(gateway=None, config=SimpleNamespace(client_certificates=device_side))
    crls = AdminCrls(live, admin)
    assert crls.store.load_files(now=NOW) == []
    revoked = admin_revocation(live, operator[0], crls.store)
    assert revoked is not None
    assert "operators issuing" in revoked, revoked
