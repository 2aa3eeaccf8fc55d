"""Per-certificate memory: validated chains and decoded names, computed once per certificate."""

from __future__ import annotations

from datetime import timedelta

import pytest
from cryptography import x509

from proxy.certs.chain import TrustList
from proxy.certs.memo import VerifiedChains
from proxy.errors import CertificateRejected
from proxy.identity.upn import certificate_name
from proxy.lab.pki import Pki
from tests.unit.conftest import NOW


@pytest.fixture
def chains(pki: Pki) -> VerifiedChains:
    return VerifiedChains(TrustList.load([pki.root_cert], [pki.issuing_cert]), size=2)


def _user(pki: Pki, name: str) -> x509.Certificate:
    """A fresh object each time, as each request parses the peer's certificate anew."""
    return x509.load_pem_x509_certificate(pki.user_cert(name).read_bytes())


def test_a_certificate_is_validated_once(chains: VerifiedChains, pki: Pki) -> None:
    """A second request with the same certificate gets the very evidence of the first."""
    first = chains.verify(_user(pki, "alice"), at=NOW)
    assert chains.verify(_user(pki, "alice"), at=NOW + timedelta(hours=1)) is first
    assert len(chains) == 1


def test_the_memory_ends_when_the_certificate_expires(chains: VerifiedChains, pki: Pki) -> None:
    """After the leaf's notAfter the certificate is validated afresh, and refused."""
    leaf = _user(pki, "alice")
    chains.verify(leaf, at=NOW)
    with pytest.raises(CertificateRejected, match="expired"):
        chains.verify(leaf, at=leaf.not_valid_after_utc + timedelta(seconds=1))


def test_refusals_are_not_remembered(chains: VerifiedChains, pki: Pki) -> None:
    """A refused certificate is refused again, and takes no room."""
    for _ in range(2):
        with pytest.raises(CertificateRejected):
            chains.verify(_user(pki, "noclientauth"), at=NOW)
    assert len(chains) == 0


def test_least_recently_used_goes_first(chains: VerifiedChains, pki: Pki) -> None:
    """Beyond `size` certificates the one unused longest is forgotten."""
    alice = chains.verify(_user(pki, "alice"), at=NOW)
    bob = chains.verify(_user(pki, "bob"), at=NOW)
    assert chains.verify(_user(pki, "alice"), at=NOW) is alice
    chains.verify(_user(pki, "carol"), at=NOW)  # bob is the least recently used now
    assert len(chains) == 2
    assert chains.verify(_user(pki, "alice"), at=NOW) is alice
    assert chains.verify(_user(pki, "bob"), at=NOW) is not bob


def test_a_certificates_names_are_decoded_once(pki: Pki) -> None:
    """The identity stage reads the UPN of a certificate it has seen before from memory."""
    before = certificate_name.cache_info().hits
    first = certificate_name(_user(pki, "bob"), ("san-upn",))
    assert certificate_name(_user(pki, "bob"), ("san-upn",)) == first == ("bob@lab.test", "san-upn")
    assert certificate_name.cache_info().hits == before + 1


def _with_alices_signature(pki: Pki, name: str) -> x509.Certificate:
    """`name`'s certificate body under alice's signature bytes: what a memo keyed on the signature alone
    would take for alice's certificate."""
    from cryptography.hazmat.primitives.serialization import Encoding

    alice, other = _user(pki, "alice"), _user(pki, name)
    der = alice.public_bytes(Encoding.DER)
    tbs = alice.tbs_certificate_bytes
    forged_tbs = bytearray(tbs)
    where = forged_tbs.find(b"alice")
    assert where > 0
    forged_tbs[where : where + 5] = b"mally"  # same length: the DER lengths stay as they are
    forged = x509.load_der_x509_certificate(der.replace(tbs, bytes(forged_tbs)))
    assert forged.signature == alice.signature
    assert forged != alice
    assert other.subject != forged.subject
    return forged


def test_a_certificate_carrying_anothers_signature_is_validated_afresh(chains: VerifiedChains, pki: Pki) -> None:
    """Alice's signature bytes on another certificate body (her subject changed to mally) do not fetch alice's
    remembered chain: the body is checked, its signature fails, and alice's chain stays remembered."""
    alice = chains.verify(_user(pki, "alice"), at=NOW)
    forged = _with_alices_signature(pki, "bob")
    for _ in range(2):
        with pytest.raises(CertificateRejected):
            chains.verify(forged, at=NOW)
    assert chains.verify(_user(pki, "alice"), at=NOW) is alice


def test_two_users_get_their_own_chains(chains: VerifiedChains, pki: Pki) -> None:
    """Interleaved requests of two users: each gets the chain of the certificate it presented."""
    for _ in range(3):
        for name in ("alice", "bob"):
            verified = chains.verify(_user(pki, name), at=NOW)
            assert verified.leaf == _user(pki, name)
            assert verified.subject == f"CN={name}"
