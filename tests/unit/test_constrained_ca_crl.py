"""A name-constrained CA's CRLs are used (`proxy.certs.chain`'s profile for a CRL signer's own path)."""

from __future__ import annotations

from datetime import timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from proxy.certs.chain import TrustList, verify_chain
from tests.unit.test_name_constraints import EMAIL_PARTNER, NOW, PARTNER_KEY, ROOT, user


def test_a_name_constrained_cas_crl_is_used() -> None:
    """A CRL signed by a CA that carries nameConstraints is accepted and answers for its users (the CRL signer's
    path used to be checked with the web-PKI end-entity profile, which prohibits nameConstraints: every CRL of
    a constrained CA went unused, and under "require" all its users were refused)."""
    from proxy.certs.revocation import CrlSet, RevocationStatus

    crl = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(EMAIL_PARTNER.subject)
        .last_update(NOW - timedelta(hours=1))
        .next_update(NOW + timedelta(days=1))
        .add_extension(x509.CRLNumber(1), critical=False)
        .sign(PARTNER_KEY, hashes.SHA256())
    )
    trust = TrustList(anchors=(ROOT,), intermediates=(EMAIL_PARTNER,))
    crls, problems = CrlSet.build([("partner.crl", crl)], trust, at=NOW)
    assert problems == []
    verified = verify_chain(user("bob@partner.test"), trust, at=NOW)
    assert crls.check(verified, policy="require", at=NOW).status is RevocationStatus.GOOD
