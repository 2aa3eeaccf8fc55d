"""CRL evaluation beyond one complete CRL per CA: delta CRLs, scopes, reasons, indirect and separate-key CRLs."""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from proxy.certs.chain import TrustList, VerifiedCertificate, verify_chain
from proxy.certs.revocation import CrlSet, RevocationStatus
from proxy.errors import CertificateRevoked
from proxy.lab.pki import Pki
from tests.pem import load_cert, load_key
from tests.unit.conftest import NOW

F = x509.ReasonFlags
Ext = tuple[x509.ExtensionType, bool]
Listed = tuple[int, F | None] | tuple[int, F | None, x509.Name]  # serial, reason, certificate issuer


def crl(
    issuer: x509.Name,
    key: ec.EllipticCurvePrivateKey,
    entries: Sequence[Listed] = (),
    *extensions: Ext,
    number: int = 1,
    next_update: datetime = NOW + timedelta(days=1),
) -> x509.CertificateRevocationList:
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer)
        .last_update(NOW - timedelta(hours=1))
        .next_update(next_update)
        .add_extension(x509.CRLNumber(number), critical=False)
    )
    for entry in entries:
        revoked = x509.RevokedCertificateBuilder().serial_number(entry[0]).revocation_date(NOW - timedelta(hours=2))
        if entry[1] is not None:
            revoked = revoked.add_extension(x509.CRLReason(entry[1]), critical=False)
        if len(entry) == 3:
            revoked = revoked.add_extension(x509.CertificateIssuer([x509.DirectoryName(entry[2])]), critical=True)
        builder = builder.add_revoked_certificate(revoked.build())
    for value, critical in extensions:
        builder = builder.add_extension(value, critical=critical)
    return builder.sign(key, hashes.SHA256())


def leaf(pki: Pki, *extensions: Ext) -> x509.Certificate:
    """A client certificate from the lab's issuing CA, with extra extensions (e.g. a distribution point)."""
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test")]))
        .issuer_name(load_cert(pki.issuing_cert).subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - timedelta(days=1))
        .not_valid_after(NOW + timedelta(days=30))
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    )
    for value, critical in extensions:
        builder = builder.add_extension(value, critical=critical)
    return builder.sign(load_key(pki.issuing_key), hashes.SHA256())


def idp(**kwargs: object) -> Ext:
    fields: dict[str, object] = {
        "full_name": None,
        "relative_name": None,
        "only_contains_user_certs": False,
        "only_contains_ca_certs": False,
        "only_some_reasons": None,
        "indirect_crl": False,
        "only_contains_attribute_certs": False,
    }
    fields.update(kwargs)
    return x509.IssuingDistributionPoint(**fields), True  # type: ignore[arg-type]


def status(crls: CrlSet, v: VerifiedCertificate) -> RevocationStatus:
    return crls.lookup(v.leaf, v.chain[1], at=NOW, anchor=v.chain[-1]).status


@pytest.fixture(scope="module")
def alice(pki: Pki, trust: TrustList) -> VerifiedCertificate:
    return verify_chain(load_cert(pki.user_cert("alice")), trust, at=NOW)


def issuing(pki: Pki) -> tuple[x509.Name, ec.EllipticCurvePrivateKey]:
    return load_cert(pki.issuing_cert).subject, load_key(pki.issuing_key)


def test_delta_crl_revokes_on_top_of_its_base(pki: Pki, trust: TrustList, alice: VerifiedCertificate) -> None:
    """A certificate listed only on a delta CRL (base #1, delta #2) is revoked; the evidence names the delta."""
    name, key = issuing(pki)
    base = crl(name, key, number=1)
    delta = crl(name, key, [(alice.serial, F.key_compromise)], (x509.DeltaCRLIndicator(1), True), number=2)
    crls, problems = CrlSet.build([("base.crl", base), ("delta.crl", delta)], trust, at=NOW)
    assert problems == []
    with pytest.raises(CertificateRevoked, match="reason keyCompromise") as info:
        crls.check(alice, at=NOW, policy="require")
    assert "delta.crl" in str(info.value.hint)


def test_delta_remove_from_crl_lifts_a_hold(pki: Pki, trust: TrustList, alice: VerifiedCertificate) -> None:
    """On hold in the base CRL, removeFromCRL in the delta: good again, and the evidence says both CRLs."""
    name, key = issuing(pki)
    base = crl(name, key, [(alice.serial, F.certificate_hold)], number=3)
    delta = crl(name, key, [(alice.serial, F.remove_from_crl)], (x509.DeltaCRLIndicator(3), True), number=4)
    crls, _ = CrlSet.build([("base.crl", base), ("delta.crl", delta)], trust, at=NOW)
    evidence = crls.check(alice, at=NOW, policy="require")
    assert evidence.status is RevocationStatus.GOOD
    assert evidence.detail.endswith("is not on CRL #3 of 'CN=Lab Issuing CA' nor on its delta CRL #4")


def test_stale_delta_makes_status_unknown(pki: Pki, trust: TrustList, alice: VerifiedCertificate) -> None:
    """A base CRL whose delta CRL has passed its nextUpdate gives no status (something may be missing)."""
    name, key = issuing(pki)
    base = crl(name, key, number=1)
    delta = crl(name, key, (), (x509.DeltaCRLIndicator(1), True), number=2)
    crls, _ = CrlSet.build([("base.crl", base), ("delta.crl", delta)], trust, at=NOW)
    assert status(crls, alice) is RevocationStatus.GOOD
    later = delta.next_update_utc
    assert later is not None
    assert (
        crls.lookup(alice.leaf, alice.chain[1], at=later + timedelta(seconds=1), anchor=alice.chain[-1]).status
        is RevocationStatus.UNKNOWN
    )


def test_delta_older_than_base_is_ignored(pki: Pki, trust: TrustList, alice: VerifiedCertificate) -> None:
    """A delta CRL whose number is not above the base CRL's adds nothing (its revocations are in the base)."""
    name, key = issuing(pki)
    base = crl(name, key, number=5)
    delta = crl(name, key, [(alice.serial, None)], (x509.DeltaCRLIndicator(1), True), number=4)
    crls, _ = CrlSet.build([("base.crl", base), ("delta.crl", delta)], trust, at=NOW)
    assert status(crls, alice) is RevocationStatus.GOOD


def test_delta_alone_is_no_crl(pki: Pki, trust: TrustList, alice: VerifiedCertificate) -> None:
    """Without its base CRL a delta CRL tells nothing: UNKNOWN, refused under require."""
    name, key = issuing(pki)
    delta = crl(name, key, (), (x509.DeltaCRLIndicator(1), True), number=2)
    crls, _ = CrlSet.build([("delta.crl", delta)], trust, at=NOW)
    with pytest.raises(CertificateRevoked, match="no current CRL for issuer 'CN=Lab Issuing CA'"):
        crls.check(alice, at=NOW, policy="require")


@pytest.mark.parametrize(
    ("scope", "expected"),
    [
        ({"only_contains_user_certs": True}, RevocationStatus.GOOD),
        ({"only_contains_ca_certs": True}, RevocationStatus.UNKNOWN),
        ({"only_contains_attribute_certs": True}, RevocationStatus.UNKNOWN),
    ],
)
def test_crl_scope_limits_whom_it_speaks_for(
    pki: Pki, trust: TrustList, alice: VerifiedCertificate, scope: dict[str, bool], expected: RevocationStatus
) -> None:
    """A user-certificates-only CRL covers a user certificate; a CA-only or attribute-only CRL does not."""
    name, key = issuing(pki)
    crls, _ = CrlSet.build([("scoped.crl", crl(name, key, (), idp(**scope)))], trust, at=NOW)
    assert status(crls, alice) is expected


def test_reason_partitioned_crls_must_cover_every_reason(
    pki: Pki, trust: TrustList, alice: VerifiedCertificate
) -> None:
    """A CRL for keyCompromise only is not enough; with a second CRL for the other reasons the status is known."""
    name, key = issuing(pki)
    compromise = frozenset({F.key_compromise, F.ca_compromise})
    first = crl(name, key, (), idp(only_some_reasons=compromise))
    rest = crl(
        name, key, (), idp(only_some_reasons=frozenset(set(F) - compromise - {F.unspecified, F.remove_from_crl}))
    )
    crls, _ = CrlSet.build([("compromise.crl", first)], trust, at=NOW)
    evidence = crls.lookup(alice.leaf, alice.chain[1], at=NOW, anchor=alice.chain[-1])
    assert evidence.status is RevocationStatus.UNKNOWN
    assert "do not cover every revocation reason (missing: aACompromise, affiliationChanged" in evidence.detail
    crls, _ = CrlSet.build([("compromise.crl", first), ("rest.crl", rest)], trust, at=NOW)
    assert status(crls, alice) is RevocationStatus.GOOD


def test_idp_name_must_match_the_certificates_distribution_point(pki: Pki, trust: TrustList) -> None:
    """A CRL for distribution point A does not speak for a certificate that names distribution point B."""
    name, key = issuing(pki)

    def point(url: str) -> Ext:
        dp = x509.DistributionPoint([x509.UniformResourceIdentifier(url)], None, None, None)
        return x509.CRLDistributionPoints([dp]), False

    cert_a = verify_chain(leaf(pki, point("http://pki/a.crl")), trust, at=NOW)
    cert_b = verify_chain(leaf(pki, point("http://pki/b.crl")), trust, at=NOW)
    partition_a = crl(name, key, (), idp(full_name=[x509.UniformResourceIdentifier("http://pki/a.crl")]))
    crls, _ = CrlSet.build([("a.crl", partition_a)], trust, at=NOW)
    assert (status(crls, cert_a), status(crls, cert_b)) == (RevocationStatus.GOOD, RevocationStatus.UNKNOWN)


def test_indirect_crl_names_the_certificate_issuer_per_entry(pki: Pki, trust: TrustList) -> None:
    """The root publishes an indirect CRL for the issuing CA's certificates (cRLIssuer in the distribution point)."""
    root, root_key = load_cert(pki.root_cert), load_key(pki.root_key)
    issuing_name = load_cert(pki.issuing_cert).subject
    dp = x509.DistributionPoint(None, None, None, [x509.DirectoryName(root.subject)])
    revoked_one = verify_chain(leaf(pki, (x509.CRLDistributionPoints([dp]), False)), trust, at=NOW)
    good_one = verify_chain(leaf(pki, (x509.CRLDistributionPoints([dp]), False)), trust, at=NOW)
    # The first entry names no certificate issuer, so it is one of the root's own certificates even though its
    # serial is good_one's; the second names the issuing CA, and so revokes revoked_one.
    entries: list[Listed] = [(good_one.serial, F.superseded), (revoked_one.serial, F.key_compromise, issuing_name)]
    indirect = crl(root.subject, root_key, entries, idp(indirect_crl=True))
    crls, problems = CrlSet.build([("indirect.crl", indirect)], trust, at=NOW)
    assert problems == []
    assert (status(crls, revoked_one), status(crls, good_one)) == (RevocationStatus.REVOKED, RevocationStatus.GOOD)
    # Without the indirectCRL flag the same CRL may not speak for another CA's certificates.
    direct = crl(root.subject, root_key, entries[:1])
    crls, _ = CrlSet.build([("direct.crl", direct)], trust, at=NOW)
    assert status(crls, good_one) is RevocationStatus.UNKNOWN


def test_separate_crl_signing_key_of_the_same_ca(pki: Pki) -> None:
    """A CA may sign CRLs with a second key certified by its root under the same name (PKITS 4.4.19)."""
    root = load_cert(pki.root_cert)
    name, _ = issuing(pki)
    crl_signer, crl_key = _same_name_ca(pki)
    trust = TrustList(anchors=(root,), intermediates=(load_cert(pki.issuing_cert), crl_signer))
    alice = verify_chain(load_cert(pki.user_cert("alice")), trust, at=NOW)
    crls, problems = CrlSet.build([("separate.crl", crl(name, crl_key, [(alice.serial, None)]))], trust, at=NOW)
    assert problems == []
    assert status(crls, alice) is RevocationStatus.REVOKED
    assert crls.crls[0].signer == crl_signer


def test_unknown_critical_entry_extension_makes_crl_unusable(pki: Pki, trust: TrustList) -> None:
    """An entry with a critical extension we do not implement: the whole CRL is refused (RFC 5280 5.3)."""
    name, key = issuing(pki)
    odd = x509.UnrecognizedExtension(x509.ObjectIdentifier("1.3.6.1.4.1.99999.1"), b"\x05\x00")
    entry = x509.RevokedCertificateBuilder().serial_number(7).revocation_date(NOW - timedelta(hours=2))
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(name)
        .last_update(NOW - timedelta(hours=1))
        .next_update(NOW + timedelta(days=1))
        .add_revoked_certificate(entry.add_extension(odd, critical=True).build())
    )
    _, problems = CrlSet.build([("odd.crl", builder.sign(key, hashes.SHA256()))], trust, at=NOW)
    assert problems == ["odd.crl: a CRL entry has an unsupported critical extension 1.3.6.1.4.1.99999.1"]


def test_lookup_is_fast_on_a_large_crl(pki: Pki, trust: TrustList, alice: VerifiedCertificate) -> None:
    """With 50,000 revoked serials, a per-request check stays well under a millisecond (a dict lookup)."""
    name, key = issuing(pki)
    big = crl(name, key, [(serial, None) for serial in range(1, 50_001)])
    crls, _ = CrlSet.build([("big.crl", big)], trust, at=NOW)
    n = 2000
    start = time.perf_counter()
    for _ in range(n):
        crls.check(alice, at=NOW, policy="require")
    per_check = (time.perf_counter() - start) / n
    assert per_check < 0.001, f"{per_check * 1e6:.0f} µs per check"


def test_every_current_crl_of_the_issuer_is_consulted(pki: Pki) -> None:
    """After a CA key renewal each key's CRL lists its own certificates: the other key's newer CRL hides none."""
    root = load_cert(pki.root_cert)
    name, old_key = issuing(pki)
    renewed, new_key = _same_name_ca(pki)
    trust = TrustList(anchors=(root,), intermediates=(load_cert(pki.issuing_cert), renewed))
    alice = verify_chain(load_cert(pki.user_cert("alice")), trust, at=NOW)
    old_crl = crl(name, old_key, [(alice.serial, F.key_compromise)], number=7)
    new_crl = crl(name, new_key, (), number=8)
    crls, problems = CrlSet.build([("old-key.crl", old_crl), ("new-key.crl", new_crl)], trust, at=NOW)
    assert problems == []
    assert status(crls, alice) is RevocationStatus.REVOKED


def _same_name_ca(pki: Pki, *extensions: Ext) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A second CA certificate with the issuing CA's name and a key of its own, certified by the root."""
    root, root_key = load_cert(pki.root_cert), load_key(pki.root_key)
    name, _ = issuing(pki)
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(root.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - timedelta(days=1))
        .not_valid_after(NOW + timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
    )
    for value, critical in extensions:
        builder = builder.add_extension(value, critical=critical)
    return builder.sign(root_key, hashes.SHA256()), key


def test_a_renewed_keys_crl_does_not_vouch_for_the_old_keys_certificates(pki: Pki) -> None:
    """After a CA key renewal the new key's CRL lists what the new key signed: alone, it leaves a certificate of the
    old key unknown (it was "good", a revoked one too), and the reason says whose CRL is missing."""
    renewed, new_key = _same_name_ca(pki)
    name, _ = issuing(pki)
    trust = TrustList(anchors=(load_cert(pki.root_cert),), intermediates=(load_cert(pki.issuing_cert), renewed))
    alice = verify_chain(load_cert(pki.user_cert("alice")), trust, at=NOW)
    crls, problems = CrlSet.build([("new-key.crl", crl(name, new_key, (), number=8))], trust, at=NOW)
    assert problems == []
    evidence = crls.lookup(alice.leaf, alice.chain[1], at=NOW, anchor=alice.chain[-1])
    assert evidence.status is RevocationStatus.UNKNOWN
    assert "signed with the key that signed the certificate" in evidence.detail
    assert "new-key.crl is another key's" in evidence.detail


def test_a_separate_crl_signer_vouches_for_its_cas_certificates(pki: Pki) -> None:
    """A second certificate of the CA's name whose keyUsage allows cRLSign and not keyCertSign signs CRLs only
    (PKITS 4.4.19): its CRL says a certificate it does not list is good."""
    crl_only = x509.KeyUsage(False, False, False, False, False, False, True, False, False)
    signer, signer_key = _same_name_ca(pki, (crl_only, True))
    name, _ = issuing(pki)
    trust = TrustList(anchors=(load_cert(pki.root_cert),), intermediates=(load_cert(pki.issuing_cert), signer))
    alice = verify_chain(load_cert(pki.user_cert("alice")), trust, at=NOW)
    crls, problems = CrlSet.build([("crl-key.crl", crl(name, signer_key, ()))], trust, at=NOW)
    assert problems == []
    assert status(crls, alice) is RevocationStatus.GOOD


def _other_anchor() -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A second trust anchor (a partner's root), self-signed."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Partner Root CA")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - timedelta(days=1))
        .not_valid_after(NOW + timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def test_a_crl_signer_certified_under_another_trust_anchor_does_not_vouch(pki: Pki) -> None:
    """RFC 5280 6.3.3 (f): a CRL's signer must chain to the trust anchor of the certificate it speaks for. A partner's
    root, trusted for its own users, certifies a cRLSign-only key under the issuing CA's name: its CRL (listing
    nothing) said alice was "good" with her own CA's CRL missing; now she is unknown (refused under "require"). A CRL
    of that signer that lists her still revokes her."""
    partner, partner_key = _other_anchor()
    name, _ = issuing(pki)
    signer_key = ec.generate_private_key(ec.SECP256R1())
    signer = _crl_signer(name, signer_key.public_key(), partner, partner_key)
    trust = TrustList(anchors=(load_cert(pki.root_cert), partner), intermediates=(load_cert(pki.issuing_cert), signer))
    alice = verify_chain(load_cert(pki.user_cert("alice")), trust, at=NOW)
    crls, problems = CrlSet.build([("partner.crl", crl(name, signer_key, ()))], trust, at=NOW)
    assert problems == []
    evidence = crls.lookup(alice.leaf, alice.chain[1], at=NOW, anchor=alice.chain[-1])
    assert evidence.status is RevocationStatus.UNKNOWN, evidence
    with pytest.raises(CertificateRevoked, match="no current CRL for issuer"):
        crls.check(alice, at=NOW, policy="require")
    listed = crl(name, signer_key, [(alice.serial, F.key_compromise)], number=2)
    crls, _ = CrlSet.build([("partner.crl", listed)], trust, at=NOW)
    assert status(crls, alice) is RevocationStatus.REVOKED  # a CRL that lists it still revokes (the safe side)


def test_an_indirect_crl_from_under_another_trust_anchor_does_not_vouch(pki: Pki) -> None:
    """RFC 5280 6.3.3 (f) for indirect CRLs: alice's distribution point names a CRL issuer, and a partner's root
    (trusted for its own users) holds a CA of that name. Its indirect CRL listing nothing said "good"; it is not of
    alice's trust anchor, so she is unknown."""
    partner, partner_key = _other_anchor()
    delegate = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Corp CRL Issuer")])
    dp = x509.CRLDistributionPoints([x509.DistributionPoint(None, None, None, [x509.DirectoryName(delegate)])])
    signer_key = ec.generate_private_key(ec.SECP256R1())
    signer = _crl_signer(delegate, signer_key.public_key(), partner, partner_key)
    trust = TrustList(anchors=(load_cert(pki.root_cert), partner), intermediates=(load_cert(pki.issuing_cert), signer))
    alice = verify_chain(leaf(pki, (dp, False)), trust, at=NOW)
    indirect = crl(delegate, signer_key, (), idp(indirect_crl=True))
    crls, problems = CrlSet.build([("partner-indirect.crl", indirect)], trust, at=NOW)
    assert problems == []
    assert status(crls, alice) is RevocationStatus.UNKNOWN


def test_a_delta_crl_of_another_key_neither_lifts_nor_shadows_the_base_crls_entries(pki: Pki) -> None:
    """RFC 5280 5.2.4: a delta CRL updates only complete CRLs signed with its own key. A second CA certificate of the
    issuing CA's name (a renewed key, or a partner's) signed a delta CRL on top of the issuing key's CRL #1: its
    removeFromCRL entry lifted alice's keyCompromise revocation, and its higher number hid the issuing key's own delta
    listing bob; both were "good". Now the other key's delta applies to no CRL of the issuing key."""
    renewed, new_key = _same_name_ca(pki)
    name, key = issuing(pki)
    trust = TrustList(anchors=(load_cert(pki.root_cert),), intermediates=(load_cert(pki.issuing_cert), renewed))
    alice = verify_chain(load_cert(pki.user_cert("alice")), trust, at=NOW)
    bob = verify_chain(leaf(pki), trust, at=NOW)
    base = crl(name, key, [(alice.serial, F.key_compromise)], number=1)
    own_delta = crl(name, key, [(bob.serial, F.key_compromise)], (x509.DeltaCRLIndicator(1), True), number=2)
    lifting = crl(name, new_key, [(alice.serial, F.remove_from_crl)], (x509.DeltaCRLIndicator(1), True), number=99)
    crls, problems = CrlSet.build(
        [("base.crl", base), ("own-delta.crl", own_delta), ("other-key-delta.crl", lifting)], trust, at=NOW
    )
    assert problems == []
    assert status(crls, alice) is RevocationStatus.REVOKED
    assert status(crls, bob) is RevocationStatus.REVOKED


def _crl_signer(
    name: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    issuer: x509.Certificate,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    not_after: datetime = NOW + timedelta(days=30),
) -> x509.Certificate:
    """A cRLSign-only certificate for `public_key` under the name `name` (a CA's separate CRL signer), from `issuer`."""
    crl_only = x509.KeyUsage(False, False, False, False, False, False, True, False, False)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(min(NOW - timedelta(days=1), not_after - timedelta(days=1)))
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(crl_only, critical=True)
        .sign(issuer_key, hashes.SHA256())
    )


def _signer_certified_twice(
    pki: Pki, partner_first: bool
) -> tuple[TrustList, VerifiedCertificate, x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A separate CRL signer's key for the issuing CA's name, certified by the own root and by a partner's root (listed
    first when `partner_first`): the trust list, alice verified under it, the own root's certificate of the key, and
    the key."""
    partner, partner_key = _other_anchor()
    name, _ = issuing(pki)
    root, root_key = load_cert(pki.root_cert), load_key(pki.root_key)
    signer_key = ec.generate_private_key(ec.SECP256R1())
    own = _crl_signer(name, signer_key.public_key(), root, root_key)
    partners = _crl_signer(name, signer_key.public_key(), partner, partner_key)
    signers = (partners, own) if partner_first else (own, partners)
    trust = TrustList(anchors=(root, partner), intermediates=(load_cert(pki.issuing_cert), *signers))
    return trust, verify_chain(load_cert(pki.user_cert("alice")), trust, at=NOW), own, signer_key


@pytest.mark.parametrize("partner_first", [True, False])
def test_a_crl_signer_key_also_certified_under_another_anchor_still_vouches_under_its_own(
    pki: Pki, partner_first: bool
) -> None:
    """The issuing CA's separate CRL signer, certified by the own root, whose public key a partner's root certified as
    well (a public key is anyone's to certify): its CRL is alice's whatever the order of the intermediates. With the
    partner's certificate listed first its anchor alone was recorded, and alice was unknown (refused under
    "require"); the order of a bundle, or of a reload, decided."""
    trust, alice, _, signer_key = _signer_certified_twice(pki, partner_first)
    name, _ = issuing(pki)
    crls, problems = CrlSet.build([("crl-key.crl", crl(name, signer_key, ()))], trust, at=NOW)
    assert problems == []
    assert status(crls, alice) is RevocationStatus.GOOD


@pytest.mark.parametrize("partner_first", [True, False])
def test_a_crl_signer_whose_own_certificate_is_revoked_does_not_vouch_through_another_anchors(
    pki: Pki, partner_first: bool
) -> None:
    """The own root revoked its certificate for the CRL signer's key; the partner's certificate for the same key stays
    valid. The key's CRL is not alice's in either order: it speaks only under the partner's anchor (unknown)."""
    trust, alice, own, signer_key = _signer_certified_twice(pki, partner_first)
    name, _ = issuing(pki)
    root, root_key = load_cert(pki.root_cert), load_key(pki.root_key)
    root_crl = crl(root.subject, root_key, [(own.serial_number, F.key_compromise)])
    crls, _ = CrlSet.build([("root.crl", root_crl), ("crl-key.crl", crl(name, signer_key, ()))], trust, at=NOW)
    assert status(crls, alice) is RevocationStatus.UNKNOWN


def test_a_crl_signer_certificate_renewed_on_the_same_key_vouches_with_the_expired_one_still_listed(pki: Pki) -> None:
    """A separate CRL signer's certificate renewed on the same key, the expired one still first in the intermediates
    bundle: the CRL is vouched for by the current certificate. It was dropped ("the certificate that signed it has no
    valid path": the expired one was taken as its signer) and alice was unknown under "require"."""
    name, _ = issuing(pki)
    root, root_key = load_cert(pki.root_cert), load_key(pki.root_key)
    signer_key = ec.generate_private_key(ec.SECP256R1())
    expired = _crl_signer(name, signer_key.public_key(), root, root_key, not_after=NOW - timedelta(days=1))
    renewed = _crl_signer(name, signer_key.public_key(), root, root_key)
    trust = TrustList(anchors=(root,), intermediates=(load_cert(pki.issuing_cert), expired, renewed))
    alice = verify_chain(load_cert(pki.user_cert("alice")), trust, at=NOW)
    crls, problems = CrlSet.build([("crl-key.crl", crl(name, signer_key, ()))], trust, at=NOW)
    assert problems == []
    assert status(crls, alice) is RevocationStatus.GOOD
    assert crls.crls[0].signer == renewed


def test_a_cas_own_crl_is_used_with_its_expired_certificate_of_the_same_key_listed_first(pki: Pki) -> None:
    """The issuing CA's certificate renewed on the same key (AD CS "renew with the same key pair"), the expired one
    still first in the bundle: the CA's own CRL stays in use. It was dropped (its signer taken to be the expired
    certificate, with no valid path) and every user was unknown under "require"."""
    name, key = issuing(pki)
    root, root_key = load_cert(pki.root_cert), load_key(pki.root_key)
    current = load_cert(pki.issuing_cert)
    expired = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(root.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - timedelta(days=400))
        .not_valid_after(NOW - timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(root_key, hashes.SHA256())
    )
    trust = TrustList(anchors=(root,), intermediates=(expired, current))
    alice = verify_chain(load_cert(pki.user_cert("alice")), trust, at=NOW)
    crls, problems = CrlSet.build([("issuing.crl", crl(name, key, ()))], trust, at=NOW)
    assert problems == []
    assert status(crls, alice) is RevocationStatus.GOOD


def test_a_reload_that_certifies_the_crl_signer_under_the_own_root_makes_its_held_crl_vouch(pki: Pki) -> None:
    """A CRL accepted while only a partner's root certified its signer's key, then a reload whose bundle adds the own
    root's certificate for that key (the CRL is held across it, `CrlStore.inherit`): the held CRL is alice's. The
    anchor worked out when it was first read was kept, and alice stayed unknown until the CRL was read again."""
    partner, partner_key = _other_anchor()
    name, _ = issuing(pki)
    root, root_key = load_cert(pki.root_cert), load_key(pki.root_key)
    signer_key = ec.generate_private_key(ec.SECP256R1())
    partners = _crl_signer(name, signer_key.public_key(), partner, partner_key)
    before = TrustList(anchors=(root, partner), intermediates=(load_cert(pki.issuing_cert), partners))
    held, problems = CrlSet.build([("crl-key.crl", crl(name, signer_key, ()))], before, at=NOW)
    assert problems == []
    own = _crl_signer(name, signer_key.public_key(), root, root_key)
    after = TrustList(anchors=(root, partner), intermediates=(load_cert(pki.issuing_cert), partners, own))
    alice = verify_chain(load_cert(pki.user_cert("alice")), after, at=NOW)
    assert status(held, alice) is RevocationStatus.UNKNOWN  # under the partner's root alone: not alice's
    reloaded, problems = CrlSet.of(held.crls, after, at=NOW)
    assert problems == []
    assert status(reloaded, alice) is RevocationStatus.GOOD
