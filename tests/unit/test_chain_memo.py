"""Per-certificate memory: validated chains and decoded names, computed once per certificate."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509

from proxy.certs.chain import TrustList
from proxy.certs.memo import VerifiedChains
from proxy.errors import CertificateRejected
from proxy.identity.upn import certificate_name
from proxy.lab.pki import Pki, make_pki

NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"), now=NOW)


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
