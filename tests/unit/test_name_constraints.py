"""A CA's e-mail and DNS name constraints applied to the UPN (`proxy.identity.constraints`), and in the chain."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from proxy.certs.chain import TrustList, verify_chain
from proxy.config import Identity
from proxy.errors import IdentityRejected
from proxy.identity.constraints import require_within
from proxy.identity.upn import upn_other_name
from proxy.pipeline import identify

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
ROOT_KEY = ec.generate_private_key(ec.SECP256R1())
PARTNER_KEY = ec.generate_private_key(ec.SECP256R1())


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(
    subject: str, issuer: str, key: ec.EllipticCurvePrivateKey, signer: ec.EllipticCurvePrivateKey, *exts: object
) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - timedelta(days=1))
        .not_valid_after(NOW + timedelta(days=30))
    )
    for ext in exts:
        assert isinstance(ext, tuple)
        builder = builder.add_extension(ext[0], critical=ext[1])
    return builder.sign(signer, hashes.SHA256())


ROOT = _cert("Root", "Root", ROOT_KEY, ROOT_KEY, (x509.BasicConstraints(ca=True, path_length=None), True))


def partner(permitted: list[x509.GeneralName] | None, excluded: list[x509.GeneralName] | None) -> x509.Certificate:
    """A partner CA under ROOT with these nameConstraints."""
    constraints = x509.NameConstraints(permitted_subtrees=permitted, excluded_subtrees=excluded)
    return _cert(
        "Partner CA",
        "Root",
        PARTNER_KEY,
        ROOT_KEY,
        (x509.BasicConstraints(ca=True, path_length=0), True),
        (constraints, True),
    )


def user(upn: str) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    eku = (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False)
    san = (x509.SubjectAlternativeName([upn_other_name(upn)]), False)
    return _cert("crafted", "Partner CA", key, PARTNER_KEY, eku, san)


EMAIL_PARTNER = partner([x509.RFC822Name(".partner.test"), x509.RFC822Name("partner.test")], None)
NOT_LAB = partner(None, [x509.RFC822Name("lab.test"), x509.RFC822Name(".lab.test")])
DNS_PARTNER = partner([x509.DNSName("partner.test")], None)
LAB = Identity(sources=("san-upn",), realm_map={"lab.test": "LAB.TEST", "partner.test": "LAB.TEST"})


@pytest.mark.parametrize(
    ("ca", "upn"),
    [
        (EMAIL_PARTNER, "alice@lab.test"),  # permitted e-mail subtrees name only the partner's domain
        (EMAIL_PARTNER, "alice@partner.test.lab.test"),
        (NOT_LAB, "alice@lab.test"),  # the CA is barred from naming lab.test's users
        (NOT_LAB, "alice@sub.lab.test"),
        (NOT_LAB, "alice@LAB.TEST"),  # domains compare without regard to ASCII case
        (DNS_PARTNER, "alice@lab.test"),
        (DNS_PARTNER, "alice@notpartner.test"),
    ],
)
def test_a_upn_outside_its_cas_constraints_is_refused(ca: x509.Certificate, upn: str) -> None:
    """The chain validates (RFC 5280 leaves a UPN unconstrained by e-mail and DNS subtrees), but the UPN is one
    the CA may not name: IdentityRejected, naming the CA, never a principal."""
    leaf = user(upn)
    verified = verify_chain(leaf, TrustList(anchors=(ROOT,), intermediates=(ca,)), at=NOW)
    with pytest.raises(IdentityRejected) as refused:
        identify(leaf, LAB, cas=verified.chain[1:])
    assert refused.value.reason == f"the UPN {upn} is outside the name constraints of CA 'CN=Partner CA'"


@pytest.mark.parametrize(
    ("ca", "upn"),
    [
        (EMAIL_PARTNER, "bob@partner.test"),
        (EMAIL_PARTNER, "bob@eu.partner.test"),
        (NOT_LAB, "bob@partner.test"),
        (NOT_LAB, "bob@notlab.test"),
        (DNS_PARTNER, "bob@partner.test"),
        (DNS_PARTNER, "bob@eu.PARTNER.test"),
    ],
)
def test_a_upn_within_its_cas_constraints_is_served(ca: x509.Certificate, upn: str) -> None:
    """The partner CA's own users pass: their UPN lies within every constraint."""
    leaf = user(upn)
    verified = verify_chain(leaf, TrustList(anchors=(ROOT,), intermediates=(ca,)), at=NOW)
    assert identify(leaf, LAB, cas=verified.chain[1:]).upn == upn


def test_mailbox_subtrees_match_the_local_part_exactly() -> None:
    """A permitted mailbox admits that mailbox only: its local part exactly, its domain in any ASCII case."""
    ca = partner([x509.RFC822Name("Bob@partner.test")], None)
    require_within("Bob@PARTNER.test", [ca])
    for upn in ("bob@partner.test", "alice@partner.test"):
        with pytest.raises(IdentityRejected):
            require_within(upn, [ca])


def test_a_ca_without_constraints_constrains_nothing() -> None:
    """The root (no nameConstraints) leaves every UPN alone."""
    require_within("anyone@anywhere.test", [ROOT])


def cn_user(cn: str) -> x509.Certificate:
    """A partner-issued certificate whose only user name is its CN (the SAN names a device)."""
    key = ec.generate_private_key(ec.SECP256R1())
    eku = (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False)
    san = (x509.SubjectAlternativeName([x509.DNSName("device.partner.test")]), False)
    return _cert(cn, "Partner CA", key, PARTNER_KEY, eku, san)


CN = Identity(sources=("subject-cn",), realm_map={"partner.test": "PARTNER.TEST"}, default_realm="LAB.TEST")


@pytest.mark.parametrize("ca", [EMAIL_PARTNER, NOT_LAB])
def test_a_common_name_is_held_to_its_cas_constraints_as_an_address_of_the_default_realm(ca: x509.Certificate) -> None:
    """CN=alice becomes alice@LAB.TEST: a CA permitted only partner.test addresses, or barred from lab.test's, may
    not name her by CN either (as alice@lab.test); an unconstrained CA may."""
    with pytest.raises(IdentityRejected, match=r"common name alice \(as alice@lab.test\) is outside"):
        identify(cn_user("alice"), CN, cas=[ca])
    assert identify(cn_user("alice"), CN, cas=[ROOT]).principal == "alice@LAB.TEST"
