"""Per-connection memory of the certificate stages (`PresentedCertificates`): checked against the bytes each time."""

from __future__ import annotations

import gc
from datetime import timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from proxy.certs.chain import TrustList
from proxy.certs.memo import PresentedCertificates, VerifiedChains
from proxy.errors import CertificateRejected
from proxy.lab.pki import Pki
from tests.unit.conftest import NOW


class Connection:
    """Stands for a connection's `ssl.SSLObject`: what the memory is keyed on (weakly)."""


@pytest.fixture
def presented(pki: Pki) -> PresentedCertificates:
    return PresentedCertificates(VerifiedChains(TrustList.load([pki.root_cert], [pki.issuing_cert])))


def _der(pki: Pki, name: str) -> bytes:
    """A fresh bytes object each time, as each request reads the peer's certificate anew."""
    return x509.load_pem_x509_certificate(pki.user_cert(name).read_bytes()).public_bytes(Encoding.DER)


def _forged(pki: Pki) -> bytes:
    """Alice's certificate with her name changed to mally under her signature bytes."""
    der = _der(pki, "alice")
    where = der.find(b"alice")
    assert where > 0
    return der[:where] + b"mally" + der[where + 5 :]


def test_a_connections_later_requests_read_nothing_again(presented: PresentedCertificates, pki: Pki) -> None:
    """The second request on a connection gets the very reading and chain of the first."""
    conn = Connection()
    first = presented.read(conn, _der(pki, "alice"))
    verified = presented.verify(first, at=NOW)
    again = presented.read(conn, _der(pki, "alice"))
    assert again is first
    assert presented.verify(again, at=NOW + timedelta(hours=1)) is verified


def test_other_bytes_on_the_same_connection_are_read_and_validated_afresh(
    presented: PresentedCertificates, pki: Pki
) -> None:
    """A connection that presents another certificate than before (no assumption that it cannot) gets that
    certificate's own chain, and a forged body under alice's signature is refused, then alice is read again."""
    conn = Connection()
    alice = presented.verify(presented.read(conn, _der(pki, "alice")), at=NOW)
    bob = presented.verify(presented.read(conn, _der(pki, "bob")), at=NOW)
    assert bob.subject == "CN=bob"
    for _ in range(2):
        with pytest.raises(CertificateRejected):
            presented.verify(presented.read(conn, _forged(pki)), at=NOW)
    assert presented.verify(presented.read(conn, _der(pki, "alice")), at=NOW) is alice


def test_the_memory_ends_when_the_chain_expires(presented: PresentedCertificates, pki: Pki) -> None:
    """A request after the earliest notAfter of the chain validates afresh, and is refused (one microsecond after)."""
    reading = presented.read(Connection(), _der(pki, "alice"))
    presented.verify(reading, at=NOW)
    assert reading.until is not None
    assert presented.verify(reading, at=reading.until) is reading.verified
    with pytest.raises(CertificateRejected, match="expired"):
        presented.verify(reading, at=reading.until + timedelta(microseconds=1))


def test_refusals_are_not_remembered(presented: PresentedCertificates, pki: Pki) -> None:
    """A refused certificate is refused again on the same connection: nothing validated is kept for it."""
    conn = Connection()
    for _ in range(2):
        reading = presented.read(conn, _der(pki, "noclientauth"))
        with pytest.raises(CertificateRejected):
            presented.verify(reading, at=NOW)
        assert reading.verified is None


def test_a_connection_keeps_no_certificate_of_its_own_and_is_forgotten_with_it(
    presented: PresentedCertificates, pki: Pki
) -> None:
    """Two connections of one certificate share its bytes and the chain memo's certificate object (a held
    long-poll's connection holds no copy), and a connection gone is forgotten."""
    one, two = Connection(), Connection()
    first = presented.read(one, _der(pki, "alice"))
    second = presented.read(two, _der(pki, "alice"))
    assert first.der is second.der
    verified = presented.verify(first, at=NOW)
    presented.verify(second, at=NOW)
    assert first.leaf is second.leaf is verified.leaf
    assert len(presented) == 2
    del one, first
    gc.collect()
    assert len(presented) == 1
