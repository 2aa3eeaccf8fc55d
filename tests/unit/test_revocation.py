"""The revocation stage: which CRLs are trusted, and what each policy does without a current one."""

from __future__ import annotations

import shutil
import subprocess
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from proxy.certs.chain import TrustList, VerifiedCertificate, verify_chain
from proxy.certs.revocation import CrlSet, RevocationPolicy, RevocationStatus, load_crls
from proxy.errors import CertificateRevoked
from proxy.lab.pki import Pki, make_pki, revoke
from tests.pem import load_cert, load_key
from tests.unit.conftest import NOW

LATER = NOW + timedelta(days=8)  # past the lab CRLs' nextUpdate (NOW + 7 days)


@pytest.fixture(scope="module")
def crls(pki: Pki, trust: TrustList) -> CrlSet:
    crl_set, problems = CrlSet.build(lab_crls(pki), trust, at=NOW)
    assert problems == []
    return crl_set


def lab_crls(pki: Pki) -> list[tuple[str, x509.CertificateRevocationList]]:
    return [(str(pki.crls), crl) for crl in load_crls(pki.crls)]


def verified(pki: Pki, trust: TrustList, name: str) -> VerifiedCertificate:
    return verify_chain(load_cert(pki.user_cert(name)), trust, at=NOW)


def make_crl(
    issuer: x509.Name,
    signer: ec.EllipticCurvePrivateKey,
    revoked_serials: tuple[int, ...] = (),
    *extensions: tuple[x509.ExtensionType, bool],
) -> x509.CertificateRevocationList:
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer)
        .last_update(NOW - timedelta(hours=1))
        .next_update(NOW + timedelta(days=1))
    )
    for serial in revoked_serials:
        entry = x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(NOW - timedelta(hours=2))
        builder = builder.add_revoked_certificate(entry.build())
    for value, critical in extensions:
        builder = builder.add_extension(value, critical=critical)
    return builder.sign(signer, hashes.SHA256())


def test_good_certificate_evidence(pki: Pki, trust: TrustList, crls: CrlSet) -> None:
    """A certificate not on its issuer's current CRL gets GOOD evidence naming that CRL and its times."""
    evidence = crls.check(verified(pki, trust, "alice"), at=NOW, policy="require")
    assert evidence.status is RevocationStatus.GOOD
    assert evidence.source == str(pki.crls)
    assert (evidence.crl_this_update, evidence.crl_next_update) == (NOW - timedelta(hours=1), NOW + timedelta(days=7))
    assert evidence.revoked_at is None
    assert "is not on CRL #1 of 'CN=Lab Issuing CA'" in evidence.detail


@pytest.mark.parametrize("policy", ["require", "best-effort"])
def test_revoked_certificate_refused(pki: Pki, trust: TrustList, crls: CrlSet, policy: RevocationPolicy) -> None:
    """A listed certificate is refused with its serial, date and reason, under require and best-effort."""
    serial = load_cert(pki.user_cert("revoked")).serial_number
    with pytest.raises(CertificateRevoked) as info:
        crls.check(verified(pki, trust, "revoked"), at=NOW, policy=policy)
    expected = f"certificate serial 0x{serial:x} was revoked on 2025-06-01T10:00:00Z (reason keyCompromise)"
    assert info.value.reason == expected


def test_lookup_reports_revoked_without_raising(pki: Pki, trust: TrustList, crls: CrlSet) -> None:
    """lookup() is the policy-free view: REVOKED evidence with the revocation time."""
    chain = verified(pki, trust, "revoked").chain
    evidence = crls.lookup(chain[0], chain[1], at=NOW, anchor=chain[-1])
    assert evidence.status is RevocationStatus.REVOKED
    assert evidence.revoked_at == NOW - timedelta(hours=2)


def test_off_policy_checks_nothing(pki: Pki, trust: TrustList, crls: CrlSet) -> None:
    """Under "off" even a revoked certificate passes, with UNKNOWN evidence that says why."""
    evidence = crls.check(verified(pki, trust, "revoked"), at=NOW, policy="off")
    assert (evidence.status, evidence.detail) == (RevocationStatus.UNKNOWN, "revocation checking is off")


def test_revoke_reissues_crl_and_newest_crl_wins(tmp_path: Path) -> None:
    """After revoke(), the new CRL (#2) lists the certificate and takes precedence over the old one."""
    pki = make_pki(tmp_path, now=NOW)
    trust = TrustList.load([pki.root_cert], [pki.issuing_cert])
    old = lab_crls(pki)
    bob = verified(pki, trust, "bob")
    assert CrlSet.build(old, trust, at=NOW)[0].check(bob, at=NOW, policy="require").status is RevocationStatus.GOOD

    revoke(pki, pki.user_cert("bob"), now=NOW + timedelta(minutes=5))
    crls, problems = CrlSet.build([*old, *lab_crls(pki)], trust, at=NOW + timedelta(minutes=5))
    assert problems == []
    with pytest.raises(CertificateRevoked, match=f"certificate serial 0x{bob.serial:x} was revoked"):
        crls.check(bob, at=NOW + timedelta(minutes=5), policy="require")
    issuing_crl = x509.load_der_x509_crl(pki.issuing_crl.read_bytes())
    assert issuing_crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == 2
    assert issuing_crl.get_revoked_certificate_by_serial_number(load_cert(pki.user_cert("revoked")).serial_number)


def test_stale_crl_refused_under_require(pki: Pki, trust: TrustList, crls: CrlSet) -> None:
    """Past the CRL's nextUpdate, "require" refuses and says which CRL expired when."""
    alice = verify_chain(load_cert(pki.user_cert("alice")), trust, at=LATER)
    with pytest.raises(CertificateRevoked) as info:
        crls.check(alice, at=LATER, policy="require")
    assert info.value.reason == (
        "the revocation status could not be determined: "
        f"no current CRL for issuer 'CN=Lab Issuing CA' (the CRL from {pki.crls} expired on 2025-06-08T12:00:00Z)"
    )


def test_stale_crl_unknown_under_best_effort(pki: Pki, trust: TrustList, crls: CrlSet) -> None:
    """Past the CRL's nextUpdate, "best-effort" passes the certificate with UNKNOWN evidence."""
    alice = verify_chain(load_cert(pki.user_cert("alice")), trust, at=LATER)
    evidence = crls.check(alice, at=LATER, policy="best-effort")
    assert evidence.status is RevocationStatus.UNKNOWN
    assert evidence.detail.startswith("no current CRL for issuer 'CN=Lab Issuing CA'")


def test_build_reports_stale_crls(pki: Pki, trust: TrustList) -> None:
    """CrlSet.build rejects CRLs already past nextUpdate and reports each one."""
    crls, problems = CrlSet.build(lab_crls(pki), trust, at=LATER)
    assert crls.crls == ()
    assert problems == [
        f"{pki.crls}: CRL of 'CN=Lab Root CA' is stale: its nextUpdate was 2025-06-08T12:00:00Z",
        f"{pki.crls}: CRL of 'CN=Lab Issuing CA' is stale: its nextUpdate was 2025-06-08T12:00:00Z",
    ]


def test_crl_signed_by_wrong_key_rejected(pki: Pki, trust: TrustList) -> None:
    """A CRL naming the trusted issuing CA but signed by the rogue CA's key is rejected and reported."""
    forged = make_crl(load_cert(pki.issuing_cert).subject, load_key(pki.rogue_issuing_key))
    crls, problems = CrlSet.build([("forged.crl", forged)], trust, at=NOW)
    assert crls.crls == ()
    assert problems == [
        "forged.crl: CRL signature does not verify against the trusted 'CN=Lab Issuing CA' (signed with another key?)"
    ]
    with pytest.raises(CertificateRevoked, match="no current CRL for issuer 'CN=Lab Issuing CA'"):
        crls.check(verified(pki, trust, "alice"), at=NOW, policy="require")


def test_crl_from_unknown_issuer_rejected(pki: Pki, trust: TrustList) -> None:
    """A CRL from a CA outside the trust list is rejected and reported."""
    stranger = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "Stranger CA")])
    _, problems = CrlSet.build([("x.crl", make_crl(stranger, ec.generate_private_key(ec.SECP256R1())))], trust, at=NOW)
    assert problems == ["x.crl: CRL issuer 'CN=Stranger CA' is not in the trust list"]


def test_missing_crl_for_issuer(pki: Pki, trust: TrustList) -> None:
    """With only the root's CRL loaded, the leaf's issuer has none: require refuses, its status unknown."""
    root_only = [(source, crl) for source, crl in lab_crls(pki) if crl.issuer == load_cert(pki.root_cert).subject]
    crls, _ = CrlSet.build(root_only, trust, at=NOW)
    with pytest.raises(CertificateRevoked) as info:
        crls.check(verified(pki, trust, "alice"), at=NOW, policy="require")
    assert (
        info.value.reason
        == "the revocation status could not be determined: no current CRL for issuer 'CN=Lab Issuing CA'"
    )
    assert info.value.revocation == "unknown"  # the log's `revocation`: nothing was revoked


def test_revoked_issuing_ca_refused(pki: Pki, trust: TrustList) -> None:
    """If the root's CRL lists the issuing CA, every certificate under it is refused, as revoked."""
    issuing = load_cert(pki.issuing_cert)
    root_crl = make_crl(load_cert(pki.root_cert).subject, load_key(pki.root_key), (issuing.serial_number,))
    issuing_crl = [(s, crl) for s, crl in lab_crls(pki) if crl.issuer == issuing.subject]
    crls, problems = CrlSet.build([("root.crl", root_crl), *issuing_crl], trust, at=NOW)
    # A revoked CA's own CRL is not believed either (RFC 5280 6.3.3 (f)): it is reported, and dropped.
    assert [p.split(": ", 1)[1].split(":", 1)[0] for p in problems] == [
        "the certificate that signed CRL #1 of 'CN=Lab Issuing CA' is revoked"
    ]
    with pytest.raises(CertificateRevoked) as info:
        crls.check(verified(pki, trust, "alice"), at=NOW, policy="best-effort")
    assert info.value.reason.startswith(
        f"issuing CA 'CN=Lab Issuing CA' serial 0x{issuing.serial_number:x} was revoked"
    )
    assert info.value.revocation == "revoked"


def test_load_crls_reads_pem_bundle_and_der(pki: Pki, tmp_path: Path) -> None:
    """load_crls reads several CRLs from PEM, one from DER, and names the file it cannot read."""
    assert [crl.issuer.rfc4514_string() for crl in load_crls(pki.crls)] == ["CN=Lab Root CA", "CN=Lab Issuing CA"]
    assert load_crls(pki.issuing_crl)[0].issuer.rfc4514_string() == "CN=Lab Issuing CA"
    junk = tmp_path / "junk.crl"
    junk.write_bytes(b"not a CRL")
    with pytest.raises(ValueError, match=r"junk\.crl: not a PEM or DER CRL"):
        load_crls(junk)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="the openssl CLI is not installed")
def test_openssl_ca_crl_accepted(pki: Pki, trust: TrustList, tmp_path: Path) -> None:
    """A CRL made by `openssl ca -revoke` + `-gencrl` (v1, no CRL number) is trusted and revokes."""
    for src, dst in [(pki.issuing_cert, "ca.pem"), (pki.issuing_key, "ca.key"), (pki.user_cert("carol"), "carol.pem")]:
        shutil.copy(src, tmp_path / dst)
    (tmp_path / "index.txt").write_text("")
    (tmp_path / "ca.cnf").write_text(
        "[ca]\ndefault_ca = lab\n[lab]\ndatabase = index.txt\ncertificate = ca.pem\nprivate_key = ca.key\n"
        "default_md = sha256\ndefault_crl_days = 7\n"
    )
    for args in (["-revoke", "carol.pem"], ["-gencrl", "-out", "crl.pem"]):
        subprocess.run(["openssl", "ca", "-config", "ca.cnf", *args], cwd=tmp_path, check=True, capture_output=True)
    (crl,) = load_crls(tmp_path / "crl.pem")
    assert list(crl.extensions) == []  # openssl ca's defaults: a v1 CRL, no CRL number, no AKI
    now = crl.last_update_utc + timedelta(minutes=1)
    carol = verify_chain(load_cert(pki.user_cert("carol")), trust, at=NOW)
    crls, problems = CrlSet.build([("crl.pem", crl)], trust, at=now)
    assert problems == []
    with pytest.raises(CertificateRevoked, match=f"serial 0x{carol.serial:x} was revoked"):
        crls.check(carol, at=now, policy="require")


def test_a_revoked_certificates_fix_says_what_to_do(pki: Pki, trust: TrustList, crls: CrlSet) -> None:
    """The fix of a revoked leaf (the log's `fix`, `explain`, the trace) was 'CN=erin, from crls.pem': where, not what
    to do. It names the certificate and the CRL, and says the user needs a new certificate."""
    with pytest.raises(CertificateRevoked) as info:
        crls.check(verified(pki, trust, "revoked"), at=NOW, policy="require")
    assert info.value.hint is not None
    assert "new certificate" in info.value.hint, info.value.hint
