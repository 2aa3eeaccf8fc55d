"""Delegated OCSP responders against a real gateway: is the responder's own certificate revoked (RFC 6960 4.2.2.2.1)?

Responder certificates minted with the openssl CLI by the lab's issuing CA (id-kp-OCSPSigning; with or without
id-pkix-ocsp-nocheck and a CRL distribution point), each serving `openssl ocsp` for a certificate of alice's that
names it; the gateway's CRLs (a file signed by the issuing CA, listing the responder or not) judge a responder without
id-pkix-ocsp-nocheck, as CryptoAPI does; curl is the device.
"""

from __future__ import annotations

import contextlib
import secrets
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from proxy.lab.layout import LabLayout
from proxy.lab.pki import Pki
from tests.integration.conftest import free_port
from tests.integration.test_revocation import (
    alice_reissued,
    crl_url,
    curl_with,
    gateway_with,
    signed_crl,
    wait_for_openssl_ocsp,
)


def responder_certificate(lab: LabLayout, directory: Path, *, nocheck: bool, distribution_point: bool) -> Path:
    """A delegated responder's certificate and key (`responder.pem`, `responder.key` in `directory`), issued by the
    lab's issuing CA with the openssl CLI for OCSP signing, with id-pkix-ocsp-nocheck and a CRL distribution point
    (the lab's issuing CRL) as asked."""
    pki = Pki.at(lab.pki_dir)
    directory.mkdir(parents=True, exist_ok=True)
    lines = ["[responder]", "basicConstraints = critical,CA:FALSE", "keyUsage = critical,digitalSignature"]
    lines += ["extendedKeyUsage = OCSPSigning", "subjectKeyIdentifier = hash", "authorityKeyIdentifier = keyid"]
    if nocheck:
        lines.append("noCheck = ignored")  # id-pkix-ocsp-nocheck: NULL; openssl ignores the value
    if distribution_point:
        lines.append(f"crlDistributionPoints = URI:{crl_url(lab, 'issuing.crl')}")
    (directory / "responder.cnf").write_text("\n".join(lines) + "\n")
    key, csr, cert = directory / "responder.key", directory / "responder.csr", directory / "responder.pem"
    req = ["openssl", "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    subprocess.run(
        [*req, "-keyout", str(key), "-subj", "/CN=OCSP responder", "-out", str(csr)], check=True, capture_output=True
    )
    sign = ["openssl", "x509", "-req", "-in", str(csr), "-CA", str(pki.issuing_cert), "-CAkey", str(pki.issuing_key)]
    sign += ["-days", "30", "-set_serial", f"0x{secrets.token_hex(16)}", "-extfile", str(directory / "responder.cnf")]
    subprocess.run([*sign, "-extensions", "responder", "-out", str(cert)], check=True, capture_output=True)
    return cert


@contextlib.contextmanager
def good_for_alice(lab: LabLayout, tmp_path: Path, signer: Path) -> Iterator[tuple[Path, Path]]:
    """`openssl ocsp` signing with the responder certificate `signer` (its key `responder.key` beside it), answering
    "good" for a certificate of alice's that names it: (alice's certificate, her key)."""
    directory = signer.parent
    port = free_port()
    cert, key = alice_reissued(lab, tmp_path / "alice", "alice", responder=f"http://127.0.0.1:{port}")
    alice = x509.load_pem_x509_certificate(cert.read_bytes())
    serial = f"{alice.serial_number:X}"
    expiry = alice.not_valid_after_utc.strftime("%y%m%d%H%M%SZ")
    (directory / "index.txt").write_text(f"V\t{expiry}\t\t{'0' * (len(serial) % 2)}{serial}\tunknown\t/CN=alice\n")
    (directory / "index.txt.attr").write_text("unique_subject = no\n")
    pki = Pki.at(lab.pki_dir)
    argv = ["openssl", "ocsp", "-index", directory / "index.txt", "-port", str(port), "-CA", pki.issuing_cert]
    argv += ["-rsigner", signer, "-rkey", directory / "responder.key", "-ignore_err", "-timeout", "3"]
    log = directory / "ocsp.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([str(a) for a in argv], stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for_openssl_ocsp(proc, log)
        yield cert, key
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def responder(lab: LabLayout, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[Path, Path, Path]]:
    """`openssl ocsp` signing with a responder certificate of `request.param`'s kind (nocheck, distribution point),
    answering "good" for a certificate of alice's that names it: (alice's certificate, her key, the responder's)."""
    nocheck, distribution_point = request.param
    signer = responder_certificate(lab, tmp_path / "responder", nocheck=nocheck, distribution_point=distribution_point)
    with good_for_alice(lab, tmp_path, signer) as (cert, key):
        yield cert, key, signer


def crl_listing(lab: LabLayout, tmp_path: Path, *certificates: Path) -> Path:
    """A current CRL of the issuing CA (signed with its key) listing these certificates."""
    now = datetime.now(UTC)
    tmp_path.mkdir(parents=True, exist_ok=True)
    serials = [x509.load_pem_x509_certificate(c.read_bytes()).serial_number for c in certificates]
    issuing_key = Pki.at(lab.pki_dir).issuing_key
    this, next_ = now - timedelta(minutes=1), now + timedelta(days=1)
    return signed_crl(lab, tmp_path, key_path=issuing_key, this=this, next_=next_, serials=serials)


NOCHECK, CHECKED_BY_CRL, UNCHECKABLE = (True, False), (False, True), (False, False)


def alice_served(lab: LabLayout, directory: Path, settings: str, cert: Path, key: Path) -> dict[str, Any]:
    """A gateway with `settings` serves alice's certificate `cert` (200): her request's summary line."""
    gw = gateway_with(lab, directory, settings)
    try:
        assert curl_with(lab, gw, cert, key)[0] == 200
        return gw.wait_event("request", principal="alice@LAB.TEST")
    finally:
        assert gw.stop() == 0


@pytest.mark.parametrize("responder", [NOCHECK], indirect=True, ids=["nocheck"])
@pytest.mark.parametrize("revoked", [False, True], ids=["not-listed", "listed"])
def test_a_nocheck_responder_is_trusted_for_its_lifetime(
    lab: LabLayout, tmp_path: Path, responder: tuple[Path, Path, Path], revoked: bool
) -> None:
    """A responder certificate with id-pkix-ocsp-nocheck is not checked for revocation (RFC 6960 4.2.2.2.1, and
    CryptoAPI): its "good" is believed under ocsp = "require", with no CRL at all, and even where a CRL lists it."""
    cert, key, signer = responder
    crls = f'crls = ["{crl_listing(lab, tmp_path, signer)}"]\nrevocation = "best-effort"\n'
    settings = (crls if revoked else 'revocation = "off"\n') + 'ocsp = "require"\n'
    summary = alice_served(lab, tmp_path / "gw", settings, cert, key)
    assert summary["revocation"] == "good"
    assert summary["revocation_source"].startswith("http://127.0.0.1:")


@pytest.mark.parametrize("responder", [CHECKED_BY_CRL], indirect=True, ids=["distribution-point"])
def test_a_revoked_responders_answer_is_not_believed(
    lab: LabLayout, tmp_path: Path, responder: tuple[Path, Path, Path]
) -> None:
    """A responder certificate without id-pkix-ocsp-nocheck that the gateway's CRL lists as revoked: its "good" is
    not believed (403 under ocsp = "require", naming the revoked responder); under "prefer" the CRLs decide (alice is
    not on them: 200, the CRL as evidence). Not listed, the same responder is believed."""
    cert, key, signer = responder
    crl = crl_listing(lab, tmp_path, signer)
    gw = gateway_with(lab, tmp_path / "require", f'crls = ["{crl}"]\nrevocation = "best-effort"\nocsp = "require"\n')
    try:
        status, body = curl_with(lab, gw, cert, key)
        assert status == 403, body
        assert "the OCSP responder's certificate is revoked" in body
        failed = gw.wait_event("ocsp_failed")
        assert "the OCSP responder's certificate is revoked" in failed["error"]
    finally:
        assert gw.stop() == 0
    settings = f'crls = ["{crl}"]\nrevocation = "require"\nocsp = "prefer"\n'
    summary = alice_served(lab, tmp_path / "prefer", settings, cert, key)
    assert (summary["revocation"], summary["revocation_source"]) == ("good", str(crl))
    clean = crl_listing(lab, tmp_path / "clean")
    settings = f'crls = ["{clean}"]\nrevocation = "best-effort"\nocsp = "require"\n'
    summary = alice_served(lab, tmp_path / "clean", settings, cert, key)
    assert summary["revocation_source"].startswith("http://127.0.0.1:")


@pytest.mark.parametrize("responder", [UNCHECKABLE], indirect=True, ids=["no-nocheck-no-distribution-point"])
def test_a_responder_whose_revocation_cannot_be_checked_is_not_believed(
    lab: LabLayout, tmp_path: Path, responder: tuple[Path, Path, Path]
) -> None:
    """A responder certificate with neither id-pkix-ocsp-nocheck nor a CRL distribution point, and no CRL loaded:
    its revocation cannot be checked, so its answer is not believed under ocsp = "require" (403 naming the fix)."""
    cert, key, _ = responder
    gw = gateway_with(lab, tmp_path / "gw", 'revocation = "off"\nocsp = "require"\n')
    try:
        status, body = curl_with(lab, gw, cert, key)
        assert status == 403, body
        assert "the OCSP responder's certificate cannot be checked for revocation" in body
    finally:
        assert gw.stop() == 0


@pytest.mark.parametrize("responder", [UNCHECKABLE], indirect=True, ids=["no-nocheck-no-distribution-point"])
def test_a_responder_whose_cas_crl_is_stale_is_not_believed(
    lab: LabLayout, tmp_path: Path, responder: tuple[Path, Path, Path]
) -> None:
    """A responder certificate without id-pkix-ocsp-nocheck, and the issuing CA's CRL loaded but stale (its
    nextUpdate an hour ago, not listing the responder): no current CRL speaks for it, so its "good" is not believed
    under ocsp = "require" (403 naming the fix), revocation = "best-effort" notwithstanding."""
    cert, key, _ = responder
    now = datetime.now(UTC)
    issuing_key = Pki.at(lab.pki_dir).issuing_key
    this, next_ = now - timedelta(days=2), now - timedelta(hours=1)
    (tmp_path / "stale").mkdir()
    stale = signed_crl(lab, tmp_path / "stale", key_path=issuing_key, this=this, next_=next_, serials=[])
    gw = gateway_with(lab, tmp_path / "gw", f'crls = ["{stale}"]\nrevocation = "best-effort"\nocsp = "require"\n')
    try:
        status, body = curl_with(lab, gw, cert, key)
        assert status == 403, body
        assert "the OCSP responder's certificate cannot be checked for revocation" in body
    finally:
        assert gw.stop() == 0


def odd_responder_certificate(lab: LabLayout, directory: Path, kind: str) -> Path:
    """A responder certificate and key (`responder.pem`, `responder.key`) that must not be believed for alice's
    issuing CA, each with id-pkix-ocsp-nocheck (so no CRL decides): `root` issued for OCSP signing by the lab's root,
    which is on the trust list but did not issue alice's certificate; `no-eku` issued by her CA without
    id-kp-OCSPSigning; `expired` issued by her CA for OCSP signing, its notAfter an hour ago."""
    pki = Pki.at(lab.pki_dir)
    ca_cert, ca_key_path = (pki.root_cert, pki.root_key) if kind == "root" else (pki.issuing_cert, pki.issuing_key)
    ca = x509.load_pem_x509_certificate(ca_cert.read_bytes())
    ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, f"OCSP responder ({kind})")]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=2))
        .not_valid_after(now - timedelta(hours=1) if kind == "expired" else now + timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.OCSPNoCheck(), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    )
    if kind != "no-eku":
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.OCSP_SIGNING]), critical=False)
    directory.mkdir(parents=True, exist_ok=True)
    cert, key_path = directory / "responder.pem", directory / "responder.key"
    cert.write_bytes(builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert


@pytest.mark.parametrize(
    ("kind", "why"),
    [
        ("root", "the responder's certificate was not issued by the certificate's CA"),
        ("no-eku", "the responder's certificate is not issued for OCSP signing"),
        ("expired", "the responder's certificate is outside its validity period"),
    ],
)
def test_a_responder_certificate_not_authorised_for_alices_ca_now_is_not_believed(
    lab: LabLayout, tmp_path: Path, kind: str, why: str
) -> None:
    """`openssl ocsp` answering "good" for alice, signing with a responder certificate that carries
    id-pkix-ocsp-nocheck but is issued by another CA of the trust list (the root), or by her CA without
    id-kp-OCSPSigning, or expired an hour ago: under ocsp = "require" with no CRL, 403, and `ocsp_failed` names the
    reason (RFC 6960 4.2.2.2: the nocheck extension is no licence for these)."""
    signer = odd_responder_certificate(lab, tmp_path / "responder", kind)
    with good_for_alice(lab, tmp_path, signer) as (cert, key):
        gw = gateway_with(lab, tmp_path / "gw", 'revocation = "off"\nocsp = "require"\n')
        try:
            status, body = curl_with(lab, gw, cert, key)
            assert status == 403, body
            assert why in gw.wait_event("ocsp_failed")["error"]
        finally:
            assert gw.stop() == 0
