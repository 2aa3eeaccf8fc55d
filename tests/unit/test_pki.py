"""The lab PKI: the files it writes, their profiles, idempotence, and revoke()."""

from __future__ import annotations

import ipaddress
import json
import shutil
import subprocess
from datetime import timedelta
from pathlib import Path
from typing import TypeVar

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID

from proxy.certs.revocation import load_crls
from proxy.lab.pki import P12_PASSWORD, USER_CERTIFICATES, Pki, make_pki, revoke
from tests.pem import load_cert
from tests.unit.conftest import NOW

E = TypeVar("E", bound=x509.ExtensionType)


def ext(certificate: x509.Certificate, kind: type[E]) -> x509.Extension[E]:
    return certificate.extensions.get_extension_for_class(kind)


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_files_written_and_keys_private(pki: Pki) -> None:
    """Every listed file exists; private keys are readable by their owner only."""
    files = [pki.root_cert, pki.root_key, pki.issuing_cert, pki.issuing_key, pki.server_cert, pki.server_key]
    files += [pki.server_chain, pki.crls, pki.issuing_crl, pki.root_crl, pki.revocation_record]
    files += [pki.rogue_root_cert, pki.rogue_root_key, pki.rogue_issuing_cert, pki.rogue_issuing_key]
    files += [f(name) for name in USER_CERTIFICATES for f in (pki.user_cert, pki.user_key, pki.user_p12)]
    assert [f for f in files if not f.is_file()] == []
    assert {oct(f.stat().st_mode & 0o777) for f in pki.directory.rglob("*.key")} == {"0o600"}


def test_ca_profiles(pki: Pki) -> None:
    """Root and issuing CA carry critical CA basicConstraints (pathlen 0 below the root) and chained key ids."""
    root, issuing = load_cert(pki.root_cert), load_cert(pki.issuing_cert)
    assert (root.subject.rfc4514_string(), issuing.subject.rfc4514_string()) == ("CN=Lab Root CA", "CN=Lab Issuing CA")
    root_bc, issuing_bc = ext(root, x509.BasicConstraints), ext(issuing, x509.BasicConstraints)
    assert (root_bc.critical, root_bc.value) == (True, x509.BasicConstraints(ca=True, path_length=None))
    assert (issuing_bc.critical, issuing_bc.value) == (True, x509.BasicConstraints(ca=True, path_length=0))
    usage = ext(root, x509.KeyUsage)
    assert (usage.critical, usage.value.key_cert_sign, usage.value.crl_sign) == (True, True, True)
    assert not usage.value.digital_signature
    root_ski = ext(root, x509.SubjectKeyIdentifier).value.digest
    assert ext(issuing, x509.AuthorityKeyIdentifier).value.key_identifier == root_ski
    cdp = ext(issuing, x509.CRLDistributionPoints).value[0].full_name
    assert cdp == [x509.UniformResourceIdentifier("http://127.0.0.1:8082/root.crl")]


def test_user_certificate_profile(pki: Pki) -> None:
    """A user certificate: CN, UPN otherName as DER UTF8String, e-mail, clientAuth, critical digitalSignature."""
    alice = load_cert(pki.user_cert("alice"))
    assert alice.subject.rfc4514_string() == "CN=alice"
    san = ext(alice, x509.SubjectAlternativeName).value
    (upn,) = san.get_values_for_type(x509.OtherName)
    assert upn.type_id.dotted_string == "1.3.6.1.4.1.311.20.2.3"
    assert upn.value == b"\x0c\x0ealice@lab.test"  # UTF8String tag, length 14, the bytes
    assert san.get_values_for_type(x509.RFC822Name) == ["alice@lab.test"]
    assert list(ext(alice, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    usage = ext(alice, x509.KeyUsage)
    assert (usage.critical, usage.value.digital_signature, usage.value.key_cert_sign) == (True, True, False)
    cdp = ext(alice, x509.CRLDistributionPoints).value[0].full_name
    assert cdp == [x509.UniformResourceIdentifier("http://127.0.0.1:8082/issuing.crl")]


def test_p12_holds_key_certificate_and_chain(pki: Pki) -> None:
    """users/<name>.p12 opens with the lab password and carries the key, certificate and CA chain."""
    key, certificate, chain = pkcs12.load_key_and_certificates(pki.user_p12("bob").read_bytes(), P12_PASSWORD)
    assert certificate == load_cert(pki.user_cert("bob"))
    assert key is not None
    assert key.public_key() == certificate.public_key()
    assert chain == [load_cert(pki.issuing_cert), load_cert(pki.root_cert)]


def test_server_certificate(pki: Pki) -> None:
    """The gateway's certificate: proxy.lab.test, localhost, 127.0.0.1, serverAuth; its chain file adds the CA."""
    server = load_cert(pki.server_cert)
    san = ext(server, x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["proxy.lab.test", "localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert list(ext(server, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert x509.load_pem_x509_certificates(pki.server_chain.read_bytes()) == [server, load_cert(pki.issuing_cert)]


def test_variants_break_one_thing_each(pki: Pki) -> None:
    """expired, notyet, noupn, noclientauth, untrusted and other-realm differ from a good user as named."""
    assert load_cert(pki.user_cert("expired")).not_valid_after_utc < NOW
    assert load_cert(pki.user_cert("notyet")).not_valid_before_utc > NOW
    assert (
        ext(load_cert(pki.user_cert("noupn")), x509.SubjectAlternativeName).value.get_values_for_type(x509.OtherName)
        == []
    )
    noclient = ext(load_cert(pki.user_cert("noclientauth")), x509.ExtendedKeyUsage).value
    assert list(noclient) == [ExtendedKeyUsageOID.SERVER_AUTH]
    rogue_root, root = load_cert(pki.rogue_root_cert), load_cert(pki.root_cert)
    untrusted, rogue_issuing = load_cert(pki.user_cert("untrusted")), load_cert(pki.rogue_issuing_cert)
    assert rogue_root.subject == root.subject
    assert rogue_root.public_key() != root.public_key()
    assert untrusted.issuer == load_cert(pki.issuing_cert).subject
    untrusted.verify_directly_issued_by(rogue_issuing)
    assert (USER_CERTIFICATES["other-realm"].upn, USER_CERTIFICATES["ghost"].upn) == (
        "alice@corp.example",
        "ghost@lab.test",
    )


def test_crls_current_and_listing_revoked(pki: Pki) -> None:
    """crls.pem: the root's empty CRL and the issuing CA's CRL listing `revoked`, current at now; DER copies agree."""
    root_crl, issuing_crl = load_crls(pki.crls)
    assert list(root_crl) == []
    assert [entry.serial_number for entry in issuing_crl] == [load_cert(pki.user_cert("revoked")).serial_number]
    for crl in (root_crl, issuing_crl):
        assert (crl.last_update_utc, crl.next_update_utc) == (NOW - timedelta(hours=1), NOW + timedelta(days=7))
    assert load_crls(pki.issuing_crl) == [issuing_crl]
    assert load_crls(pki.root_crl) == [root_crl]
    root_key = load_cert(pki.root_cert).public_key()
    assert isinstance(root_key, ec.EllipticCurvePublicKey)
    assert root_crl.is_signature_valid(root_key)


def test_make_pki_is_idempotent(pki: Pki) -> None:
    """A second call at a time the files are still good returns the same Pki and rewrites nothing."""
    before = snapshot(pki.directory)
    assert make_pki(pki.directory, now=NOW + timedelta(days=1)) == pki
    assert snapshot(pki.directory) == before


def test_due_crls_are_reissued_and_certificates_kept(tmp_path: Path) -> None:
    """When only the CRLs are about to expire, they are reissued from the record; certificates stay."""
    pki = make_pki(tmp_path, now=NOW)
    alice, old_crls = pki.user_cert("alice").read_bytes(), pki.crls.read_bytes()
    make_pki(tmp_path, now=NOW + timedelta(days=6, hours=12))
    assert pki.user_cert("alice").read_bytes() == alice
    assert pki.crls.read_bytes() != old_crls
    issuing_crl = load_crls(pki.crls)[1]
    assert issuing_crl.next_update_utc == NOW + timedelta(days=13, hours=12)
    assert [entry.serial_number for entry in issuing_crl] == [load_cert(pki.user_cert("revoked")).serial_number]


def test_expiring_pki_is_remade(tmp_path: Path) -> None:
    """When user certificates are within a day of expiry, everything is made afresh with new keys."""
    pki = make_pki(tmp_path, now=NOW)
    old_root = load_cert(pki.root_cert)
    make_pki(tmp_path, now=NOW + timedelta(days=365))
    assert load_cert(pki.root_cert).public_key() != old_root.public_key()
    assert load_cert(pki.user_cert("alice")).not_valid_after_utc > NOW + timedelta(days=366)


def test_revoke_records_serial_and_bumps_crl_number(tmp_path: Path) -> None:
    """revoke() records the serial beside the CA, bumps the CRL number, and refuses a foreign certificate."""
    pki = make_pki(tmp_path, now=NOW)
    revoke(pki, pki.user_cert("carol"), now=NOW)
    record = json.loads(pki.revocation_record.read_text())
    carol = load_cert(pki.user_cert("carol"))
    assert record["crl_number"] == 2
    assert f"{carol.serial_number:x}" in [entry["serial"] for entry in record["revoked"]]
    assert x509.load_der_x509_crl(pki.issuing_crl.read_bytes()).get_revoked_certificate_by_serial_number(
        carol.serial_number
    )
    with pytest.raises(ValueError, match="not issued by the lab's issuing CA"):
        revoke(pki, pki.user_cert("untrusted"), now=NOW)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="the openssl CLI is not installed")
def test_openssl_agrees_with_lab_pki(pki: Pki, tmp_path: Path) -> None:
    """OpenSSL's own verifier accepts alice and the server, and refuses revoked and untrusted, with the lab CRLs."""
    bundle = tmp_path / "cas.pem"
    bundle.write_bytes(pki.root_cert.read_bytes() + pki.issuing_cert.read_bytes())

    def verify(path: Path, purpose: str) -> str:
        args = ["-attime", str(int(NOW.timestamp())), "-CAfile", str(bundle), "-purpose", purpose]
        args += ["-crl_check_all", "-CRLfile", str(pki.crls), str(path)]
        done = subprocess.run(["openssl", "verify", *args], capture_output=True, text=True, check=False)
        return done.stdout + done.stderr

    assert verify(pki.user_cert("alice"), "sslclient").endswith(": OK\n")
    assert verify(pki.server_cert, "sslserver").endswith(": OK\n")
    assert "certificate revoked" in verify(pki.user_cert("revoked"), "sslclient")
    assert "OK" not in verify(pki.user_cert("untrusted"), "sslclient")
