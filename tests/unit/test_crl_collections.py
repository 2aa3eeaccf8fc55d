"""Reading a large CRL's entries (a refresh's or a reload's, in a thread) sets off at most one full garbage collection,
not one at every quarter's growth: each walked every object made so far with the GIL held, and the event loop stood
still that long (left21; since perf11 the entries are ints the collector does not track, `revocation.Entries`)."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from datetime import timedelta

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from proxy.certs.chain import TrustList
from proxy.certs.revocation import accept_der
from proxy.lab.pki import Pki
from tests.pem import der_tlv, load_cert, load_key
from tests.unit.conftest import NOW

_ECDSA_WITH_SHA256 = der_tlv(0x30, der_tlv(0x06, bytes.fromhex("2a8648ce3d040302")))


def _large_crl(pki: Pki, entries: int) -> bytes:
    """A DER CRL of the issuing CA listing `entries` serials, current at NOW (written by hand: the builder is slow)."""
    issuing, key = load_cert(pki.issuing_cert), load_key(pki.issuing_key)
    assert isinstance(key, ec.EllipticCurvePrivateKey)

    def utc(delta: timedelta) -> bytes:
        return der_tlv(0x17, (NOW + delta).strftime("%y%m%d%H%M%SZ").encode())

    revoked_at = utc(timedelta(hours=-2))
    listed = b"".join(
        der_tlv(0x30, der_tlv(0x02, (10**30 + i).to_bytes(13, "big")) + revoked_at) for i in range(entries)
    )
    times = utc(timedelta(hours=-1)) + utc(timedelta(days=1))
    version = der_tlv(0x02, b"\x01")
    tbs = der_tlv(0x30, version + _ECDSA_WITH_SHA256 + issuing.subject.public_bytes() + times + der_tlv(0x30, listed))
    signature = key.sign(tbs, ec.ECDSA(hashes.SHA256()))
    return der_tlv(0x30, tbs + _ECDSA_WITH_SHA256 + der_tlv(0x03, b"\x00" + signature))


@pytest.fixture
def full_collections() -> Iterator[list[int]]:
    """The full collections (generation 2) that start while the test runs."""
    seen: list[int] = []

    def count(phase: str, info: dict[str, int]) -> None:
        if phase == "start" and info["generation"] == 2:
            seen.append(1)

    gc.callbacks.append(count)
    try:
        yield seen
    finally:
        gc.callbacks.remove(count)


def test_reading_a_large_crls_entries_sets_off_at_most_one_full_collection(
    pki: Pki, trust: TrustList, full_collections: list[int]
) -> None:
    """A 200,000-entry CRL read whole (`accept_der`, as a refresh's thread does): at most one full collection, the
    entries are kept as objects the collector does not track (there were four while they were read), every entry is
    held, and collections are on afterwards."""
    der = _large_crl(pki, 200_000)
    assert gc.isenabled()
    crl = accept_der("large.crl", der, trust, at=NOW)
    assert len(full_collections) <= 1, full_collections
    assert len(crl.entries) == 200_000
    assert gc.isenabled()
