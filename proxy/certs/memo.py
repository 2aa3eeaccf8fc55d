"""Chain validation once per certificate, not once per request.

A device sends the same certificate on every request of every connection, and validating its chain
(two ECDSA or RSA signature checks and the verifier's policy) was the largest single cost of a request
(bench/run.py, py-spy). The result depends only on the certificate, the trust list and the time, and on
the time only through validity periods: a chain that validated at one instant still validates at any
later instant before the first of its certificates expires. So a `VerifiedChains` remembers each
validated certificate until then, at most `size` of them, least recently used out first.

Certificates are filed under their signature bytes, not the certificate object: cryptography hashes a
certificate by reading all of it again (about 2 µs, as long as the equality check that any dictionary
look-up adds). A remembered chain is given out only to a certificate equal to the one it was validated
for; another body under the same signature bytes (a forgery) is validated afresh, and fails.

What is not remembered: refusals (a refused certificate is checked afresh each time, as before) and
revocation, which is the next stage and runs on every request. A new trust list (a reloaded
configuration) comes with a new `VerifiedChains`, since each belongs to one `TrustList`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from datetime import datetime
from typing import Generic, TypeVar

from cryptography import x509

from proxy.certs.chain import TrustList, VerifiedCertificate, verify_chain

T = TypeVar("T")


class VerifiedChains:
    def __init__(self, trust: TrustList, *, size: int = 10_000) -> None:
        self.trust = trust
        self._size = size
        self._known: OrderedDict[bytes, tuple[VerifiedCertificate, datetime]] = OrderedDict()  # by signature

    def verify(self, leaf: x509.Certificate, *, at: datetime) -> VerifiedCertificate:
        """`verify_chain(leaf, trust, at=at)`, from memory while every certificate of the chain is valid."""
        key = leaf.signature
        known = self._known.get(key)
        if known is not None and at <= known[1] and known[0].leaf == leaf:  # the whole certificate, not its signature
            self._known.move_to_end(key)
            return known[0]
        verified = verify_chain(leaf, self.trust, at=at)
        self._known[key] = (verified, min(cert.not_valid_after_utc for cert in verified.chain))
        while len(self._known) > self._size:
            self._known.popitem(last=False)
        return verified

    def __len__(self) -> int:
        return len(self._known)


class ChainFacts(Generic[T]):
    """Something computed from a verified chain alone, remembered per chain object.

    `VerifiedChains` hands out the same `VerifiedCertificate` for every request of a certificate, so what the
    restriction and identity stages make of it (under one configuration: each `Gateway` has its own) is
    computed once and found by the object's identity, a dictionary look-up on an integer: looking it up by
    the certificate cost about 2 µs a request (cryptography hashes a certificate by reading all of it).
    The chain is held with its answer, so the identity it is filed under cannot pass to another object.
    Refusals (the computation raised) are not remembered. At most `size`, the oldest out first."""

    def __init__(self, compute: Callable[[VerifiedCertificate], T], *, size: int = 10_000) -> None:
        self._compute = compute
        self._size = size
        self._known: dict[int, tuple[VerifiedCertificate, T]] = {}

    def __call__(self, verified: VerifiedCertificate) -> T:
        known = self._known.get(id(verified))
        if known is not None and known[0] is verified:
            return known[1]
        value = self._compute(verified)
        if len(self._known) >= self._size:
            del self._known[next(iter(self._known))]
        self._known[id(verified)] = (verified, value)
        return value

    def __len__(self) -> int:
        return len(self._known)
