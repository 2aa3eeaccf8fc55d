"""Chain validation once per certificate, not once per request.

A device sends the same certificate on every request of every connection, and validating its chain
(two ECDSA or RSA signature checks and the verifier's policy) was the largest single cost of a request
(bench/run.py, py-spy). The result depends only on the certificate, the trust list and the time, and on
the time only through validity periods: a chain that validated at one instant still validates at any
later instant before the first of its certificates expires. So a `VerifiedChains` remembers each
validated certificate until then, at most `size` of them, least recently used out first.

What is not remembered: refusals (a refused certificate is checked afresh each time, as before) and
revocation, which is the next stage and runs on every request. A new trust list (a reloaded
configuration) comes with a new `VerifiedChains`, since each belongs to one `TrustList`.
"""

from __future__ import annotations

from collections import OrderedDict
from datetime import datetime

from cryptography import x509

from proxy.certs.chain import TrustList, VerifiedCertificate, verify_chain


class VerifiedChains:
    def __init__(self, trust: TrustList, *, size: int = 10_000) -> None:
        self.trust = trust
        self._size = size
        self._known: OrderedDict[x509.Certificate, tuple[VerifiedCertificate, datetime]] = OrderedDict()

    def verify(self, leaf: x509.Certificate, *, at: datetime) -> VerifiedCertificate:
        """`verify_chain(leaf, trust, at=at)`, from memory while every certificate of the chain is valid."""
        known = self._known.get(leaf)  # certificates hash and compare by their DER encoding
        if known is not None and at <= known[1]:
            self._known.move_to_end(leaf)
            return known[0]
        verified = verify_chain(leaf, self.trust, at=at)
        self._known[leaf] = (verified, min(cert.not_valid_after_utc for cert in verified.chain))
        while len(self._known) > self._size:
            self._known.popitem(last=False)
        return verified

    def __len__(self) -> int:
        return len(self._known)
