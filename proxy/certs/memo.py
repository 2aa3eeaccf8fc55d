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

import weakref
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
        return self.verify_until(leaf, at=at)[0]

    def verify_until(self, leaf: x509.Certificate, *, at: datetime) -> tuple[VerifiedCertificate, datetime]:
        """`verify`, and the instant until which its answer holds (the earliest notAfter of the chain)."""
        key = leaf.signature
        known = self._known.get(key)
        if known is not None and at <= known[1] and known[0].leaf == leaf:  # the whole certificate, not its signature
            self._known.move_to_end(key)
            return known
        verified = verify_chain(leaf, self.trust, at=at)
        known = self._known[key] = (verified, min(cert.not_valid_after_utc for cert in verified.chain))
        while len(self._known) > self._size:
            self._known.popitem(last=False)
        return known

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


class Presented:
    """What one TLS connection's peer presented, as the certificate stages read it: the DER bytes, the parsed
    certificate and, once the chain was validated, the chain and the instant its validation stops holding."""

    __slots__ = ("der", "leaf", "tls", "until", "verified")

    def __init__(self, der: bytes, leaf: x509.Certificate) -> None:
        self.der = der
        self.leaf = leaf
        self.verified: VerifiedCertificate | None = None
        self.until: datetime | None = None
        self.tls: tuple[object, ...] | None = None  # the connection's TLS facts, as `proxy.pipeline` noted them


class PresentedCertificates:
    """The certificate stages' reading of each TLS connection's certificate, kept for the connection's life.

    Each request of a keep-alive connection used to parse the peer's certificate from its DER bytes (about
    1.5 µs) and find its chain in `VerifiedChains` by its signature bytes, comparing the whole certificate
    (about 2 µs). Here the connection's `ssl.SSLObject` (a weak key: forgotten with the connection) leads to
    both. Nothing rests on the certificate staying the same for a connection's life: every request reads the
    connection's peer certificate again and is given what is remembered only if its DER bytes are exactly the
    ones remembered, and the chain only while the request's time is at or before the chain's earliest notAfter;
    else the certificate is parsed, or validated, afresh. One per `Gateway` (its trust list): a reloaded
    configuration starts with none. Refusals are not remembered."""

    def __init__(self, chains: VerifiedChains, *, size: int = 10_000) -> None:
        self.chains = chains
        self._size = size
        self._known: weakref.WeakKeyDictionary[object, Presented] = weakref.WeakKeyDictionary()
        self._ders: dict[bytes, bytes] = {}  # one bytes object per certificate, however many connections present it

    def read(self, connection: object, der: bytes) -> Presented:
        """The certificate `connection` presents now (`der`): the one remembered for it if the bytes are equal."""
        known = self._known.get(connection)
        if known is not None and known.der == der:
            return known
        shared = self._ders.get(der)
        if shared is None:
            if len(self._ders) >= self._size:
                del self._ders[next(iter(self._ders))]
            shared = self._ders[der] = der
        known = self._known[connection] = Presented(shared, x509.load_der_x509_certificate(der))
        return known

    def verify(self, presented: Presented, *, at: datetime) -> VerifiedCertificate:
        """`VerifiedChains.verify` of the presented certificate, remembered with it until the chain's notAfter.

        Once validated, the connection holds the chain memo's certificate object (equal to its own, which the
        memo compared), not a parsed copy of its own: a held long-poll keeps no certificate of its own."""
        if presented.verified is not None and presented.until is not None and at <= presented.until:
            return presented.verified
        presented.verified, presented.until = self.chains.verify_until(presented.leaf, at=at)
        presented.leaf = presented.verified.leaf
        return presented.verified

    def __len__(self) -> int:
        return len(self._known)
