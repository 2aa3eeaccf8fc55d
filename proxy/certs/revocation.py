"""Revocation stage: has the issuer withdrawn this certificate, according to a CRL we can trust?

Theory of operation. CRLs arrive from the edge (`load_crls` for files; `proxy.certs.sources` fetches
URLs and refreshes both) and are vetted one by one by `accept`, which keeps only what it can trust:
- the CRL's signer is a configured CA certificate named as the CRL's issuer whose key verifies the
  signature (a name alone proves nothing) and which may sign CRLs (keyUsage cRLSign, when present).
  That is usually the issuing CA itself; it may also be a second certificate of the same CA with a
  separate CRL key, or an indirect CRL issuer. A signer that is not a trust anchor must itself have a
  valid path to one at `at`, and must not be revoked (`CrlSet.of` drops its CRLs otherwise);
- it is current at `at` (thisUpdate <= at <= nextUpdate; a CRL without nextUpdate never is);
- every critical extension, of the CRL and of each entry, is one we implement.
A fetched CRL's signature is checked first over its DER as it came, before cryptography reads the CRL (`accept_der`:
an outline of its headers gives the issuer and the algorithm; `_screened`: hashlib, then a prehashed verification),
so that one signed by another key is refused for a hash's cost: reading it holds the GIL 0.2-0.33 s for millions of
entries, and cryptography's `is_signature_valid` encodes the whole tbsCertList again holding it (seconds); it decides
only what the screen cannot (an algorithm it does not know).
Everything else becomes a problem string for the operator and is never used.

`CrlSet.of` then indexes what was accepted, newest CRL per issuer, signer key and scope, and
`CrlSet.lookup` answers for one certificate with RFC 5280 section 6.3.3: the CRLs that may speak for
it are the complete CRLs of its issuer, or of an indirect CRL issuer its CRL distribution point names;
of its issuer's own CRLs, those signed with the key that signed the certificate, or by a certificate that
cannot sign certificates (keyUsage without keyCertSign: a separate CRL key, PKITS 4.4.19) whose path ends at the
certificate's own trust anchor, as an indirect CRL's signer's must (6.3.3 (f): a partner's root, trusted for its
own users, that certifies a key under your CA's name is no delegate of your CA). A CA renewed with
a new key (AD CS's "new key pair") publishes one CRL per key, each listing what that key signed, and Windows
matches a CRL to a certificate by that key: the new key's CRL cannot say that a certificate of the old key
is good (it never lists it, revoked or not). Any accepted CRL of the issuer's name that lists the serial
still revokes it (the safe side);
a CRL's issuingDistributionPoint must match the certificate (distribution point name, user or CA
certificates only, never attribute certificates); a CRL limited to some reasons counts for those
reasons only, and status is known once the CRLs found cover every reason. A delta CRL is applied to
the complete CRL it extends (signed with the same key, base CRL number <= complete number < delta number); a
delta CRL that has gone stale makes that pair unusable, and an entry with reason removeFromCRL lifts a hold. The serial
lookups are dictionary lookups: this runs on every request.

`CrlSet.check` applies the policy to a verified chain (from `chain.verify_chain`):
- a revoked leaf or revoked CA is refused (CertificateRevoked) under every policy but "off";
- a CA whose status is unknown is passed: only the leaf must have current revocation information;
- a leaf with no current CRL (none loaded, past nextUpdate, or reasons not all covered) is refused
  under "require" and passed with UNKNOWN evidence under "best-effort".
It returns evidence (good / unknown, which CRL, its update times), not a boolean.

`check` runs on every request, and a device sends the same certificate on each (the chain memo,
`proxy.certs.memo`, hands out the same `VerifiedCertificate` for it). A set is immutable and its answer
depends on the time only through which of its CRLs are current (thisUpdate less the clock skew <= t <=
nextUpdate). So a set remembers each answer it gave (not refusals) with the span of time around it in
which none of its CRLs becomes or stops being current, and gives it again for a time in that span: an
expired CRL, one that became current or a delta that went stale is a new answer. A refresh that brings a new
CRL makes a new set, which remembers nothing: a certificate a new CRL lists is refused on its next request; one that
brings none keeps the set, its index and its answers (`CrlSet.of`'s `previous`). Indexing costs no more than the
number of CRLs: each CRL's entries are its own dictionary, which a look-up asks, not a set made again of all.

Why not a library. cryptography's verifier (`x509.verification`, which builds the chain: `proxy.certs.chain`)
checks no revocation. OpenSSL's CRL check in the handshake (`ssl.VERIFY_CRL_CHECK_LEAF`) has no "best-effort" (a
missing or expired CRL ends the handshake), answers with an X.509 error code rather than evidence (which CRL, its
update times: the summary line, traces, /readyz), and reads CRLs from the context's store, from which Python removes
none: each refresh would need a new context. pyhanko-certvalidator checks revocation, but on a path it builds itself
over its own ASN.1 objects (asn1crypto): every request's chain would be built and decoded a second time.
"""

from __future__ import annotations

import binascii
import contextlib
import dataclasses
import enum
import functools
import hashlib
import itertools
import operator
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric import utils as asym_utils

from proxy.certs.chain import TrustList, VerifiedCertificate, as_utc, format_time, is_ca, verify_chain
from proxy.certs.der import inside, tlv, whole
from proxy.errors import CertificateRejected, CertificateRevoked
from proxy.files import read_bounded
from proxy.printable import printable

RevocationPolicy = Literal["require", "best-effort", "off"]
Scope = Literal["all", "users", "cas", "attributes"]
_F = x509.ReasonFlags
MAX_NAME_SHOWN = 256  # characters of an unverified CRL's issuer name in an error (a label, a log line, /readyz)
MAX_CRL_BYTES = 64 * 1024 * 1024  # a large enterprise CRL is a few MiB (a file or a URL's answer; start and reload)
MAX_ERROR_SHOWN = 300  # characters of a fetch's error (a CRL's last error, an OCSP failure sent to the device)
CLOCK_SKEW = timedelta(minutes=5)  # a CRL issued "now" by a CA whose clock runs a little ahead is usable
_US = timedelta(microseconds=1)  # datetime's resolution: t <= end is t < end + 1 µs
_REMEMBERED = 10_000  # answers a set keeps (about one per certificate in use)
ALL_REASONS = frozenset(set(_F) - {_F.unspecified, _F.remove_from_crl})  # RFC 5280's "all-reasons"
_KNOWN_CRL_EXTENSIONS = (
    x509.CRLNumber,
    x509.DeltaCRLIndicator,
    x509.IssuingDistributionPoint,
    x509.AuthorityKeyIdentifier,
    x509.AuthorityInformationAccess,
    x509.FreshestCRL,
    x509.IssuerAlternativeName,
)


# The fix of a leaf refused under revocation = "require" for want of a current CRL (here and in `proxy.certs.live`).
UNDETERMINED = "the revocation status could not be determined"  # a refusal for want of a current CRL: none revoked
NO_CURRENT_CRL_FIX = 'publish or load a current CRL for this CA, or set revocation = "best-effort"'


def revoked_fix(verified: VerifiedCertificate, source: str) -> str:
    """The fix a revoked certificate's refusal names: the user's, not the gateway's."""
    return (
        f"{verified.subject} is revoked by its CA ({source}): the user needs a new certificate; "
        "if it was revoked by mistake, that is the CA's to undo (a certificate on hold: remove it from the CRL)"
    )


class RevocationStatus(enum.Enum):
    GOOD = "good"
    REVOKED = "revoked"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class RevocationEvidence:
    """What the revocation stage found out, and from which CRL (or OCSP responder)."""

    status: RevocationStatus
    source: str  # where the CRL came from (file path or URL), or the OCSP responder; "" if none was used
    detail: str
    crl_this_update: datetime | None = None
    crl_next_update: datetime | None = None
    revoked_at: datetime | None = None


@dataclass(frozen=True)
class Entry:
    """One revoked certificate, as a CRL lists it."""

    revoked_at: datetime
    reason: x509.ReasonFlags  # unspecified when the entry names none


IssuerSerial = tuple[x509.Name, int]  # (the certificate's issuer, its serial): how entries are keyed
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_REASONS = tuple(_F)  # an entry's reason, by its index in this tuple
_REASON_INDEX = {reason: i for i, reason in enumerate(_REASONS)}


class Entries:
    """A CRL's entries, as `Entry`s keyed by `IssuerSerial`, held where the garbage collector does not look.

    Per certificate issuer (one, unless the CRL is indirect), a dictionary of serial -> one int: the revocation time
    in microseconds since the epoch, shifted left four bits, or'ed with the reason's index. Ints are not containers,
    so the collector tracks neither them nor a dictionary holding only them. Kept as an `Entry` each (a tuple key and
    a dataclass), 200,000 entries were 400,000 tracked objects: a refresh that read them ran nine full collections in
    its thread, each walking all of them while holding the GIL (the event loop stood still up to 0.24 s at each, 0.3-1.6
    s on a loaded machine), and every later full collection walked them again. An `Entry` is made when asked for."""

    __slots__ = ("_by_issuer", "_count")

    def __init__(self) -> None:
        self._by_issuer: dict[x509.Name, dict[int, int]] = {}
        self._count = 0

    def add(self, issuer: x509.Name, serial: int, revoked_at: datetime, reason: x509.ReasonFlags) -> None:
        """The entry of (`issuer`, `serial`); a later one of the same key replaces it."""
        serials = self._by_issuer.get(issuer)
        if serials is None:
            serials = self._by_issuer[issuer] = {}
        self._count += serial not in serials
        serials[serial] = (revoked_at - _EPOCH) // _US << 4 | _REASON_INDEX[reason]

    def get(self, key: IssuerSerial) -> Entry | None:
        serials = self._by_issuer.get(key[0])
        packed = None if serials is None else serials.get(key[1])
        if packed is None:
            return None
        return Entry(_EPOCH + (packed >> 4) * _US, _REASONS[packed & 15])

    def __contains__(self, key: IssuerSerial) -> bool:
        serials = self._by_issuer.get(key[0])
        return serials is not None and key[1] in serials

    def __iter__(self) -> Iterator[IssuerSerial]:
        return ((issuer, serial) for issuer, serials in self._by_issuer.items() for serial in serials)

    def __len__(self) -> int:
        return self._count


@dataclass(frozen=True, eq=False)
class Crl:
    """An accepted CRL: verified, and read once into what lookups need."""

    source: str
    crl: x509.CertificateRevocationList
    signer: x509.Certificate  # a configured certificate whose key verified it (`CrlSet.of`: one with a valid path)
    signer_key: bytes  # its SubjectPublicKeyInfo, DER
    signer_certifies: bool  # a certificate of that key may sign certificates (keyUsage keyCertSign, or no keyUsage)
    # SubjectPublicKeyInfo of each trust anchor a path of a certificate of the signer's key ends at (one key may be
    # certified under two anchors, or twice under one: renewed). `accept` leaves it empty for a certificate-signing
    # CA's own CRL, which vouches by its key alone; `CrlSet.of` keeps the anchors of the paths no CRL revokes.
    signer_anchors: frozenset[bytes]
    number: int  # cRLNumber, -1 when absent (openssl ca's v1 CRLs)
    delta_base: int | None  # a delta CRL's base CRL number; None for a complete CRL
    scope: Scope
    idp_names: frozenset[x509.GeneralName]  # the IDP's distribution point names; empty: not limited
    reasons: frozenset[x509.ReasonFlags]  # onlySomeReasons, or all
    indirect: bool
    entries: Entries = field(repr=False)
    # Read once from the CRL: each access to the CRL object itself decodes again.
    issuer: x509.Name = field(init=False, repr=False)
    this_update: datetime = field(init=False, repr=False)
    next_update: datetime = field(init=False, repr=False)
    plain: bool = field(init=False, repr=False)  # a complete CRL for every certificate and reason of its issuer

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "issuer", self.crl.issuer)
        set_(self, "this_update", self.crl.last_update_utc)
        set_(self, "next_update", self.crl.next_update_utc or datetime.min.replace(tzinfo=UTC))
        plain = self.scope == "all" and not self.idp_names and self.reasons == ALL_REASONS and not self.indirect
        set_(self, "plain", plain)

    def current(self, at: datetime) -> bool:
        return self.this_update - CLOCK_SKEW <= at <= self.next_update

    def vouches_for(self, issuer_key: bytes, anchor_key: bytes) -> bool:
        """Whether this CRL of a certificate's own issuer can say the certificate is good: it was signed with the key
        that signed the certificate (`issuer_key`, its SubjectPublicKeyInfo), or by a separate CRL signer that cannot
        have signed the certificate and whose path ends at the certificate's own trust anchor (`anchor_key`; RFC 5280
        6.3.3 (f): another anchor's CA of that name is no delegate of the issuer). Another certificate-signing key of
        the same CA name lists only what it signed."""
        return self.signer_key == issuer_key or (not self.signer_certifies and anchor_key in self.signer_anchors)

    def delegated_for(self, issuer_key: bytes, anchor_key: bytes) -> bool:
        """Whether this indirect CRL, of a CRL issuer the certificate's distribution point names, can say it is good:
        signed with the issuer's own key, or by a signer whose path ends at the certificate's trust anchor (RFC 5280
        6.3.3 (f))."""
        return self.signer_key == issuer_key or anchor_key in self.signer_anchors

    @property
    def partition(self) -> tuple[object, ...]:
        """What makes two CRLs of one issuer and key alternatives (newest wins) rather than partners."""
        return (self.scope, self.idp_names, self.reasons, self.indirect, self.delta_base is not None)

    @functools.cached_property
    def label(self) -> str:
        kind = "delta CRL" if self.delta_base is not None else "CRL"
        number = f" #{self.number}" if self.number >= 0 else ""
        return f"{kind}{number} of '{self.issuer.rfc4514_string()}'"


class CrlUnusable(Exception):
    """Why a CRL was not accepted (becomes a problem string)."""


@dataclass(frozen=True)
class _Point:
    """A certificate's CRL distribution point, reduced to what matching needs (RFC 5280 6.3.3)."""

    names: frozenset[x509.GeneralName]  # its distributionPoint names; empty when it has none
    crl_issuers: tuple[x509.Name, ...]  # its cRLIssuer names; empty: the certificate's issuer
    reasons: frozenset[x509.ReasonFlags]


@dataclass(frozen=True)
class _Verdict:
    """An answer of `CrlSet.check`, and the span [since, until) of times in which it holds."""

    verified: VerifiedCertificate  # held, so that the id the verdict is filed under stays this chain's
    policy: RevocationPolicy
    evidence: RevocationEvidence
    since: datetime
    until: datetime


@dataclass(frozen=True)
class CrlSet:
    """The accepted CRLs, indexed by issuer name for per-request lookups."""

    crls: tuple[Crl, ...] = ()
    _complete: dict[x509.Name, tuple[Crl, ...]] = field(default_factory=dict, repr=False, compare=False)
    _deltas: dict[x509.Name, tuple[Crl, ...]] = field(default_factory=dict, repr=False, compare=False)
    _plain: dict[x509.Name, tuple[Crl, ...]] = field(default_factory=dict, repr=False, compare=False)
    _verdicts: dict[int, _Verdict] = field(default_factory=dict, repr=False, compare=False)  # id(chain) ->
    _may_list: dict[int, tuple[VerifiedCertificate, bool]] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def build(
        cls, crls: Sequence[tuple[str, x509.CertificateRevocationList]], trust: TrustList, *, at: datetime
    ) -> tuple[CrlSet, list[str]]:
        """Keep the CRLs that can be trusted at `at`; report the others as "<source>: <why>"."""
        accepted: list[Crl] = []
        problems: list[str] = []
        for source, crl in crls:
            try:
                accepted.append(accept(source, crl, trust, at=at))
            except CrlUnusable as exc:
                problems.append(f"{source}: {exc}")
        crl_set, dropped = cls.of(accepted, trust, at=at)
        return crl_set, problems + dropped

    @classmethod
    def of(
        cls, accepted: Iterable[Crl], trust: TrustList, *, at: datetime, previous: CrlSet | None = None
    ) -> tuple[CrlSet, list[str]]:
        """Index accepted CRLs: the newest per issuer, key and partition, each with the signers `trust` holds for it
        at `at` (`_vetted`); drop those whose every signer is revoked or has no valid path.

        `previous` (the set this one replaces, made with the same `trust`) is returned itself when what is kept is
        the very CRLs it holds, in its order: a refresh that brought no new CRL keeps the index and the answers it
        remembers. The signers are vetted at `at` all the same (a signer's certificate may have expired meanwhile)."""
        newest: dict[tuple[x509.Name, bytes, tuple[object, ...]], Crl] = {}
        for crl in accepted:
            key = (crl.issuer, crl.signer_key, crl.partition)
            if key not in newest or _age(crl) > _age(newest[key]):
                newest[key] = crl
        preliminary = cls._index(tuple(newest.values()))
        kept: list[Crl] = []
        problems: list[str] = []
        for crl in newest.values():
            vetted = preliminary._vetted(crl, trust, at)
            if isinstance(vetted, str):
                problems.append(f"{crl.source}: {vetted}")
            else:
                kept.append(vetted)
        if previous is not None and len(kept) == len(previous.crls) and all(map(operator.is_, kept, previous.crls)):
            return previous, problems
        return cls._index(tuple(kept)), problems

    @classmethod
    def _index(cls, crls: tuple[Crl, ...]) -> CrlSet:
        complete: dict[x509.Name, list[Crl]] = {}
        deltas: dict[x509.Name, list[Crl]] = {}
        for crl in crls:
            (complete if crl.delta_base is None else deltas).setdefault(crl.issuer, []).append(crl)
        # Issuers whose every CRL is plain (no indirect CRL anywhere): looked up without matching
        # distribution points, newest CRL first. That is the common case, and the per-request path.
        indirect = any(crl.indirect for crl in crls)
        plain = {
            name: tuple(sorted(group, key=_age, reverse=True))
            for name, group in complete.items()
            if not indirect and all(crl.plain for crl in group)
        }
        return cls(
            crls,
            {k: tuple(v) for k, v in complete.items()},
            {k: tuple(v) for k, v in deltas.items()},
            plain,
        )

    def lookup(
        self, cert: x509.Certificate, issuer: x509.Certificate, *, at: datetime, anchor: x509.Certificate
    ) -> RevocationEvidence:
        """Is `cert` (signed by `issuer`, on a path to `anchor`) revoked, per the CRLs current at `at`? No policy
        applied. Only a CRL of the issuer's own key, or of a signer under the same `anchor`, says "good"."""
        at = as_utc(at)
        key = (cert.issuer, cert.serial_number)
        # Every current CRL that speaks for the certificate is consulted, not only the newest: after a CA
        # renews its key, each key's CRL lists the certificates that key signed.
        issuer_key, anchor_key = _key_of(issuer), _key_of(anchor)
        plain = self._plain.get(cert.issuer)
        if plain is not None:
            good: tuple[Crl, Crl | bool | None] | None = None
            for crl in plain:
                if not crl.current(at) or (delta := self._delta_for(crl, at)) is False:
                    continue
                if (entry := _entry(key, delta, crl)) is not None:
                    return self._revoked(cert, crl, delta, entry)
                if good is None and crl.vouches_for(issuer_key, anchor_key):
                    good = (crl, delta)
            return self._good(cert, *good) if good else self._unknown(cert, issuer, anchor_key, at, [])
        cert_is_ca = is_ca(cert)
        covered: set[x509.ReasonFlags] = set()
        used: list[tuple[Crl, Crl | bool | None]] = []
        for point in _points(cert):
            for crl in self._candidates(cert, point):
                if not crl.current(at) or not _applies(crl, cert, point, cert_is_ca):
                    continue
                delta = self._delta_for(crl, at)
                if delta is False:  # a delta CRL was issued for it, but has gone stale
                    continue
                if (entry := _entry(key, delta, crl)) is not None:
                    return self._revoked(cert, crl, delta, entry)
                if not point.crl_issuers and not crl.vouches_for(issuer_key, anchor_key):
                    continue  # another certificate-signing key of the issuer's name: it lists only what it signed
                if point.crl_issuers and not crl.delegated_for(issuer_key, anchor_key):
                    continue  # a CA of the named CRL issuer's name under another trust anchor: no delegate
                covered |= crl.reasons & point.reasons
                used.append((crl, delta))
        if used and covered >= ALL_REASONS:
            return self._good(cert, *used[0])
        return self._unknown(cert, issuer, anchor_key, at, [crl for crl, _ in used])

    def _unknown(
        self, cert: x509.Certificate, issuer: x509.Certificate, anchor_key: bytes, at: datetime, used: list[Crl]
    ) -> RevocationEvidence:
        name = issuer.subject.rfc4514_string()
        if used:
            covered = frozenset().union(*(crl.reasons for crl in used))
            missing = ", ".join(sorted(r.value for r in ALL_REASONS - covered))
            detail = f"the current CRLs for issuer '{name}' do not cover every revocation reason (missing: {missing})"
            return RevocationEvidence(RevocationStatus.UNKNOWN, used[0].source, detail)
        detail = f"no current CRL for issuer '{name}'{self._why(cert, issuer, anchor_key, at)}"
        return RevocationEvidence(RevocationStatus.UNKNOWN, "", detail)

    def check(self, verified: VerifiedCertificate, *, at: datetime, policy: RevocationPolicy) -> RevocationEvidence:
        """Apply `policy` to the verified chain: evidence for the leaf, or CertificateRevoked.

        The answer for the same chain object is remembered until a CRL here changes state (module docstring)."""
        known = self._verdicts.get(id(verified))
        if (
            known is not None
            and known.verified is verified
            and known.policy == policy
            and at.tzinfo is not None
            and known.since <= at < known.until
        ):
            return known.evidence
        evidence = self._check(verified, at=at, policy=policy)
        if len(self._verdicts) >= _REMEMBERED:
            del self._verdicts[next(iter(self._verdicts))]  # the oldest answer
        self._verdicts[id(verified)] = _Verdict(verified, policy, evidence, *self._steady(as_utc(at)))
        return evidence

    def _steady(self, at: datetime) -> tuple[datetime, datetime]:
        """The span [since, until) around `at` in which no CRL here becomes current or stops being current.

        A CRL is current for start <= t <= end (`Crl.current`); with datetime's microsecond resolution
        that is start <= t < end + 1 µs, so the span is half-open too."""
        since, until = datetime.min.replace(tzinfo=UTC), datetime.max.replace(tzinfo=UTC)
        for crl in self.crls:
            for edge in (crl.this_update - CLOCK_SKEW, crl.next_update + _US):
                if edge <= at:
                    since = max(since, edge)
                else:
                    until = min(until, edge)
        return since, until

    def _check(self, verified: VerifiedCertificate, *, at: datetime, policy: RevocationPolicy) -> RevocationEvidence:
        if policy == "off":
            return RevocationEvidence(RevocationStatus.UNKNOWN, "", "revocation checking is off")
        chain = verified.chain
        if len(chain) < 2:
            return RevocationEvidence(RevocationStatus.UNKNOWN, "", "the certificate is itself a trust anchor")
        for cert, issuer in itertools.pairwise(chain[1:]):  # each CA below the anchor, and its issuer
            evidence = self.lookup(cert, issuer, at=at, anchor=chain[-1])
            if evidence.status is RevocationStatus.REVOKED:
                raise CertificateRevoked(
                    f"issuing CA '{cert.subject.rfc4514_string()}' {evidence.detail}",
                    hint=f"from {evidence.source}; every certificate it issued is refused",
                    revocation="revoked",
                )
        evidence = self.lookup(verified.leaf, chain[1], at=at, anchor=chain[-1])
        if evidence.status is RevocationStatus.REVOKED:
            fix = revoked_fix(verified, evidence.source)
            raise CertificateRevoked(f"certificate {evidence.detail}", hint=fix, revocation="revoked")
        if evidence.status is RevocationStatus.UNKNOWN and policy == "require":
            raise CertificateRevoked(
                f"{UNDETERMINED}: {evidence.detail}", hint=NO_CURRENT_CRL_FIX, revocation="unknown"
            )
        return evidence

    def may_list(self, verified: VerifiedCertificate) -> bool:
        """Whether any CRL here lists a certificate of this chain (a cheap pre-filter for re-checks).

        The answer depends on nothing but this set and the chain, so it is remembered per chain object (held, so
        its id stays its own), as `check`'s are: the look-up made an issuer `Name` per certificate and hashed it
        (cryptography hashes a name by walking its attributes), about 2% of a keep-alive request (py-spy). Each CRL's
        own entries are asked: a set of every entry of every CRL, made with each set, cost a refresh 0.13 s of CPU
        per 200,000 entries, changed or not."""
        known = self._may_list.get(id(verified))
        if known is not None and known[0] is verified:
            return known[1]
        keys = [(cert.issuer, cert.serial_number) for cert in verified.chain[:-1]]
        listed = any(key in crl.entries for crl in self.crls for key in keys)
        if len(self._may_list) >= _REMEMBERED:
            del self._may_list[next(iter(self._may_list))]  # the oldest answer
        self._may_list[id(verified)] = (verified, listed)
        return listed

    # --- the pieces of RFC 5280 6.3.3 ------------------------------------------------------------

    def _candidates(self, cert: x509.Certificate, point: _Point) -> Iterator[Crl]:
        if not point.crl_issuers:
            yield from self._complete.get(cert.issuer, ())
            return
        for name in point.crl_issuers:  # (b)(1): an indirect CRL of the issuer the point names
            yield from (crl for crl in self._complete.get(name, ()) if crl.indirect)

    def _delta_for(self, crl: Crl, at: datetime) -> Crl | bool | None:
        """The newest delta CRL extending `crl`; False if that delta is stale; None if there is none.

        Only a delta signed with `crl`'s own key extends it (RFC 5280 5.2.4): another key of the issuer's name (a
        renewed CA's, a partner's CA of that name) would otherwise lift the base's entries with removeFromCRL, or hide
        the real delta behind a higher number."""
        deltas = [
            d
            for d in self._deltas.get(crl.issuer, ())
            if d.signer_key == crl.signer_key
            and d.partition[:4] == crl.partition[:4]
            and d.delta_base is not None
            and d.delta_base <= crl.number < d.number
        ]
        if not deltas:
            return None
        newest = max(deltas, key=_age)
        return newest if newest.current(at) else False

    def _revoked(self, cert: x509.Certificate, crl: Crl, delta: Crl | bool | None, entry: Entry) -> RevocationEvidence:
        on = delta if isinstance(delta, Crl) and _entry((cert.issuer, cert.serial_number), delta, None) else crl
        detail = (
            f"serial 0x{cert.serial_number:x} was revoked on {format_time(entry.revoked_at)} "
            f"(reason {entry.reason.value})"
        )
        return RevocationEvidence(
            RevocationStatus.REVOKED,
            on.source,
            detail,
            crl_this_update=on.this_update,
            crl_next_update=on.next_update,
            revoked_at=entry.revoked_at,
        )

    def _good(self, cert: x509.Certificate, crl: Crl, delta: Crl | bool | None) -> RevocationEvidence:
        detail = f"serial 0x{cert.serial_number:x} is not on {crl.label}"
        if isinstance(delta, Crl):
            detail += f" nor on its delta CRL #{delta.number}"
        return RevocationEvidence(
            RevocationStatus.GOOD,
            crl.source,
            detail,
            crl_this_update=crl.this_update,
            crl_next_update=min(crl.next_update, delta.next_update) if isinstance(delta, Crl) else crl.next_update,
        )

    def _why(self, cert: x509.Certificate, issuer: x509.Certificate, anchor_key: bytes, at: datetime) -> str:
        issuer_key = _key_of(issuer)
        complete = self._complete.get(cert.issuer, ())
        stale = [crl for crl in complete if crl.next_update < at and crl.vouches_for(issuer_key, anchor_key)]
        if stale:
            newest = max(stale, key=_age)
            return f" (the CRL from {newest.source} expired on {format_time(newest.next_update)})"
        others = [crl for crl in complete if crl.current(at) and not crl.vouches_for(issuer_key, anchor_key)]
        if any(crl.signer_certifies for crl in others):
            crl = next(crl for crl in others if crl.signer_certifies)
            return (
                f" signed with the key that signed the certificate (the current CRL from {crl.source} is another "
                "key's of that CA name, and lists only what that key signed: load the CRL of the certificate's own key)"
            )
        if others:
            return (
                f" of its own trust anchor (the current CRL from {others[0].source} is signed by a CRL signer of that "
                f"CA name certified under another trust anchor, '{others[0].signer.issuer.rfc4514_string()}', which "
                "cannot speak for this CA's certificates: load the CA's own CRL)"
            )
        return ""

    def _vetted(self, crl: Crl, trust: TrustList, at: datetime) -> Crl | str:
        """`crl` resting on the certificates of its signer's key that `trust` holds and that may sign CRLs, each with
        a valid path at `at` that the other CRLs here do not revoke: the first of them its `signer`, their paths'
        anchors its `signer_anchors`; or why none is left. One key may be certified twice (renewed: the expired
        certificate still in the bundle; or under two trust anchors): the order of the bundle decides nothing."""
        signers: list[x509.Certificate] = []
        anchors: set[bytes] = set()
        problems: list[str] = []
        for candidate in signer_certificates(crl.signer_key, crl.issuer, trust):
            anchor = self._signer_path(crl, candidate, trust, at)
            if isinstance(anchor, str):
                problems.append(anchor)
            else:
                signers.append(candidate)
                anchors.add(anchor)
        if not signers:
            return problems[0] if problems else f"the certificate that signed {crl.label} is no longer configured"
        kept = frozenset(anchors) if crl.indirect or not crl.signer_certifies else frozenset()
        if signers[0] == crl.signer and kept == crl.signer_anchors:
            return crl  # the same object: `CrlStore` tells its listeners of a change by the CRLs' identities
        return dataclasses.replace(crl, signer=signers[0], signer_anchors=kept)

    def _signer_path(self, crl: Crl, signer: x509.Certificate, trust: TrustList, at: datetime) -> bytes | str:
        """The anchor (its SubjectPublicKeyInfo) of `signer`'s valid path at `at`, or why it cannot vouch for `crl`:
        no valid path, or a certificate on it revoked, judged by the other CRLs here."""
        if trust.is_anchor(signer):
            return _spki(signer)
        try:
            path = verify_chain(signer, trust, at=at, purpose="any")
        except CertificateRejected as exc:
            return f"the certificate that signed {crl.label} has no valid path: {exc.reason}"
        for i, (cert, issuer) in enumerate(itertools.pairwise(path.chain)):
            # The signer itself is judged by the other CRLs: one cannot vouch for its own signer.
            judge = self if i else CrlSet._index(tuple(c for c in self.crls if c is not crl))
            evidence = judge.lookup(cert, issuer, at=at, anchor=path.chain[-1])
            if evidence.status is RevocationStatus.REVOKED:
                return f"the certificate that signed {crl.label} is revoked: {evidence.detail}"
        return _spki(path.chain[-1])


def load_crls(path: Path) -> list[x509.CertificateRevocationList]:
    """The CRLs in `path`: PEM with one or more CRLs, or one DER CRL. OSError (`strerror` says why) for a file over
    `MAX_CRL_BYTES`, as the gateway's CRL refreshes read it (`proxy.certs.sources`): a start read it whole, then served
    without its CRLs (`crl_fetch_failed`), where a reload refused it."""
    return parse_crls(read_bounded(path, MAX_CRL_BYTES), str(path))


def parse_crls(data: bytes, source: str) -> list[x509.CertificateRevocationList]:
    """The CRLs in `data` (PEM with one or more CRLs, or one DER CRL); ValueError naming `source`."""
    return [crl for crl, _ in read_crls(data, source)]


def read_crls(data: bytes, source: str) -> list[tuple[x509.CertificateRevocationList, bytes]]:
    """`parse_crls`, each CRL with its DER: `accept` checks the signature over those bytes (`_signed_by`)."""
    return [(_read(der, source), der) for der in crl_ders(data, source)]


def crl_ders(data: bytes, source: str) -> list[bytes]:
    """The DER of each CRL in `data` (PEM with one or more CRLs, or one DER CRL), none read yet (`accept_der`);
    ValueError naming `source`."""
    return _pem_crls(data, source) if _find(data, b"-----BEGIN") >= 0 else [data]


def crl_pem(der: bytes) -> bytes:
    """One CRL's DER as a PEM block as openssl and cryptography write it (64 characters a line), encoded a line at a
    time: the event loop's thread may take the GIL between two (`_find`)."""
    lines = (binascii.b2a_base64(der[at : at + 48]) for at in range(0, len(der), 48))
    return b"".join((_BEGIN_CRL, b"\n", *lines, _END_CRL, b"\n"))


def _read(der: bytes, source: str) -> x509.CertificateRevocationList:
    try:
        return x509.load_der_x509_crl(der)
    except ValueError as exc:
        raise ValueError(f"{source}: not a PEM or DER CRL ({exc})") from exc


_BEGIN_CRL, _END_CRL = b"-----BEGIN X509 CRL-----", b"-----END X509 CRL-----"
_HEADERS_END = re.compile(rb"\r?\n[ \t]*\r?\n")  # the empty line after a PEM block's RFC 1421 headers
MAX_PEM_HEADERS = 64 * 1024  # bytes of a PEM block's headers looked through for their end
_STEP = 1024 * 1024  # bytes of base64 decoded at a time (a multiple of 4)


def _pem_crls(data: bytes, source: str) -> list[bytes]:
    """The DER of each `BEGIN X509 CRL` block of a PEM file, found with `bytes.find` and decoded by binascii: a regular
    expression over the file, then cryptography's PEM reader and our own base64 for the screen (`_screened`), held
    the GIL 1.3-1.5 s at a time for a 60 MB PEM CRL that anyone on a distribution point's path may send at each
    refresh. ValueError for a file without a CRL block or cut short, or a block that is not base64."""
    ders: list[bytes] = []
    outside: list[bytes] = []
    at = 0
    while (begin := _find(data, _BEGIN_CRL, at)) >= 0:
        end = _find(data, _END_CRL, begin + len(_BEGIN_CRL))
        if end < 0:
            break
        outside.append(data[at:begin])
        ders.append(_base64_body(memoryview(data)[begin + len(_BEGIN_CRL) : end], source))
        at = end + len(_END_CRL)
    if not ders:
        raise ValueError(f"{source}: PEM without a 'BEGIN X509 CRL' block")
    _whole(b"".join([*outside, data[at:]]), source)
    return ders


def _base64_body(block: memoryview, source: str) -> bytes:
    """The DER of a PEM block's body (between its BEGIN and END lines), RFC 1421 headers (`Proc-Type: ...`, up to the
    first empty line) set aside; a PEM with headers once went unscreened."""
    first_line = bytes(block[:MAX_PEM_HEADERS]).lstrip(b" \t\r\n").partition(b"\n")[0]
    if b":" in first_line:
        headers_end = _HEADERS_END.search(block, 0, MAX_PEM_HEADERS)
        if headers_end is None:
            raise ValueError(f"{source}: a PEM CRL block's headers without the empty line that ends them")
        block = block[headers_end.end() :]
    # a megabyte at a time, the base64 never copied whole: each call and each copy holds the GIL, and the event loop's
    # thread waits for it (a copy of the whole block, then of its base64, held it 60-90 ms on a loaded machine)
    der: list[bytes] = []
    rest = b""  # the base64 characters of a step past its last whole group of four
    try:
        for i in range(0, len(block), _STEP):
            text = rest + bytes(block[i : i + _STEP]).translate(None, b" \t\r\n\f\v")
            whole_groups = len(text) - len(text) % 4
            der.append(binascii.a2b_base64(text[:whole_groups], strict_mode=True))
            rest = text[whole_groups:]
        der.append(binascii.a2b_base64(rest, strict_mode=True))
    except binascii.Error as exc:
        raise ValueError(f"{source}: a PEM CRL block that is not base64 ({exc})") from exc
    return b"".join(der)


def _find(data: bytes, needle: bytes, start: int = 0) -> int:
    """`data.find(needle, start)`, a megabyte at a time (the event loop's thread may take the GIL between two): one
    look for a PEM block's BEGIN or END line through a 64 MB CRL held it 80 ms on a loaded machine."""
    for at in range(start, len(data), _STEP):
        if (found := data.find(needle, at, at + _STEP + len(needle) - 1)) >= 0:
            return found
    return -1


def _whole(rest: bytes, source: str) -> None:
    """ValueError if what is left of a PEM file once its CRL blocks are taken out holds the start of one more: a file
    cut short (a copy interrupted, a full disk) would otherwise be read as the CRLs before the cut, and a source's
    CRLs are replaced as a whole: the issuer whose CRL was cut off would have none."""
    last = rest.rstrip().rpartition(b"\n")[2].strip()
    if b"X509 CRL" in rest or (len(last) >= 5 and _BEGIN_CRL.startswith(last)):
        raise ValueError(f"{source}: a CRL block without its END line (the file cut short?)")


def shown_error(text: str) -> str:
    """A fetch's error as logs, /metrics, /readyz and a device's refusal may show it: on one line, invisible characters
    as escapes (`proxy.printable.printable`), `MAX_ERROR_SHOWN` characters at most. aiohttp's errors quote what the
    server sent (a refused header line, 8 KB of the server's choosing, over several lines) and anyone on a plain-HTTP
    path is that server."""
    text = " ".join(text.split())
    text = printable(text)
    return text if len(text) <= MAX_ERROR_SHOWN else f"{text[: MAX_ERROR_SHOWN - 30]}... ({len(text)} characters)"


# --- accepting a CRL -------------------------------------------------------------------------------


def accept(
    source: str, crl: x509.CertificateRevocationList, trust: TrustList, *, at: datetime, der: bytes = b""
) -> Crl:
    """Vet one CRL (signer, signature, currency, extensions) and read it; CrlUnusable says why not. With its `der`
    (`read_crls`), a signature that does not verify costs a hash (`_signed_by`)."""
    return _accepted(
        source, crl, trust, as_utc(at), [ca for ca in _named(crl.issuer, trust) if _signed_by(crl, ca, der)]
    )


def accept_der(
    source: str, der: bytes, trust: TrustList, *, at: datetime, before_reading: Callable[[Crl], None] | None = None
) -> Crl:
    """`accept` for a CRL as it came (its DER, from `crl_ders`), its signature checked before cryptography reads it:
    `_outline` gives the issuer, signature algorithm and signature for the price of a few hundred bytes, `_screened`
    verifies the signature over the tbsCertList's bytes, and only a CRL whose signature verifies with a configured key
    of its issuer's (or whose algorithm the screen leaves to cryptography) is read whole. Reading a 64 MB CRL of 2.8
    million entries held the GIL 0.2-0.33 s (seconds on a loaded machine), and anyone on a distribution point's path
    could send one, signed by a key of their own, at each refresh: every device waited that long. A signature the
    screen verified is not checked again by `is_signature_valid` (2.4 s holding the GIL for such a CRL): cryptography
    reads the tbsCertList from those very bytes, the DER being strict, and refuses a CertificateList whose inner and
    outer signature algorithms differ. ValueError for bytes that are not a CRL, CrlUnusable as `accept`.

    `before_reading`, once the screen verified the signature, is given the CRL as its outline with its extensions shows
    it (number, thisUpdate, issuer, signer, partition: all but its entries, which it has none of) and may refuse it
    (CrlUnusable) before the entries are read: a genuine CRL older than the one held, replayed on a distribution
    point's path at each refresh, cost a whole read each time (200,000 entries: 0.65 s of CPU) before it was refused."""
    outline = _outline(der, source)
    cas = _named(outline.issuer, trust)
    verdicts = {ca: _screen(outline, ca, der) for ca in cas}
    if not any(verdict is not False for verdict in verdicts.values()):
        raise CrlUnusable(_not_verified(outline))
    screened = [ca for ca in cas if verdicts[ca]]
    if before_reading is not None and screened:  # the extensions only now: a forged CRL's are never read
        headers = _outline(der, source, extensions=True)
        before_reading(_accepted(source, headers, trust, as_utc(at), screened, entries=False))
    crl = _read(der, source)
    signers = [ca for ca in cas if verdicts[ca] or (verdicts[ca] is None and _signed_by(crl, ca))]
    return _accepted(source, crl, trust, as_utc(at), signers)


def _named(issuer: x509.Name, trust: TrustList) -> list[x509.Certificate]:
    """The configured CA certificates named as a CRL's `issuer`; CrlUnusable if there are none."""
    cas = trust.named(issuer)
    if not cas:  # anyone on an http source's path sends any name: it is shown cut short (a label, a log line)
        name = issuer.rfc4514_string()
        shown = name if len(name) <= MAX_NAME_SHOWN else f"{name[:MAX_NAME_SHOWN]}... ({len(name)} characters)"
        raise CrlUnusable(f"CRL issuer '{shown}' is not in the trust list")
    return cas


def _not_verified(crl: x509.CertificateRevocationList) -> str:
    name = crl.issuer.rfc4514_string()
    return f"CRL signature does not verify against the trusted '{name}' (signed with another key?)"


def _outline(der: bytes, source: str, *, extensions: bool = False) -> x509.CertificateRevocationList:
    """The CRL in `der` cut down to what the signature screen asks of it: a CertificateList whose tbsCertList keeps
    the version, signature algorithm, issuer and update times of the CRL's, without its revokedCertificates and (unless
    `extensions`) its crlExtensions, and whose signatureAlgorithm and signatureValue are the CRL's as they came (its
    signature is not over this tbsCertList: only the screen, given `der`, checks it). ValueError naming `source` for
    bytes of another shape."""
    try:
        return x509.load_der_x509_crl(_outline_der(der, extensions=extensions))
    except ValueError as exc:
        raise ValueError(f"{source}: not a PEM or DER CRL ({exc})") from exc


def _outline_der(der: bytes, *, extensions: bool = False) -> bytes:
    """`_outline`'s DER, found by the CRL's headers alone."""
    parts = inside(der, whole(der))  # CertificateList: tbsCertList, signatureAlgorithm, signatureValue
    if len(parts) != 3:
        raise ValueError(f"a CertificateList of {len(parts)} elements, not 3")
    tbs, algorithm, signature = parts
    head = inside(der, tbs)  # [version], signature, issuer, thisUpdate, [nextUpdate], [revoked], [extensions]
    kept = 3 if head and head[0][0] == _INTEGER else 2
    while kept < len(head) and head[kept][0] in _TIMES:
        kept += 1
    if kept > len(head):
        raise ValueError("a tbsCertList cut short")
    tbs_kept = der[head[0][1] : head[kept - 1][2]]
    if extensions and len(head) > kept and head[-1][0] == _EXTENSIONS:  # [0] crlExtensions, the tbsCertList's last
        tbs_kept += der[head[-1][1] : head[-1][2]]
    return tlv(_SEQUENCE, tlv(_SEQUENCE, tbs_kept) + der[algorithm[1] : signature[2]])


_INTEGER, _SEQUENCE, _TIMES = 0x02, 0x30, (0x17, 0x18)  # DER tags: INTEGER, SEQUENCE, UTCTime and GeneralizedTime
_EXTENSIONS = 0xA0  # [0] EXPLICIT, constructed: a tbsCertList's crlExtensions


def _accepted(
    source: str,
    crl: x509.CertificateRevocationList,
    trust: TrustList,
    at: datetime,
    signers: list[x509.Certificate],
    *,
    entries: bool = True,
) -> Crl:
    """`accept`, once the certificates among the issuer's whose key verifies the signature are known (`signers`);
    without its `entries` (none read: `accept_der`'s outline)."""
    name = crl.issuer.rfc4514_string()
    if not signers:
        raise CrlUnusable(_not_verified(crl))
    allowed = [ca for ca in signers if _may_sign_crls(ca)]
    if not allowed:
        raise CrlUnusable(f"the key usage of '{name}' does not allow cRLSign")
    if crl.next_update_utc is None:
        raise CrlUnusable(f"CRL of '{name}' has no nextUpdate, so it is never known to be current")
    if crl.next_update_utc < at:
        raise CrlUnusable(f"CRL of '{name}' is stale: its nextUpdate was {format_time(crl.next_update_utc)}")
    if crl.last_update_utc > at + CLOCK_SKEW:
        raise CrlUnusable(f"CRL of '{name}' is not valid yet: its thisUpdate is {format_time(crl.last_update_utc)}")
    number, delta_base, idp = _crl_extensions(crl)
    indirect = bool(idp and idp.indirect_crl)
    certifies = any(_may_sign_certificates(ca) for ca in allowed)
    # the signers' paths, where more than one certificate has the key or the anchor matters: the first with a valid
    # path signs (an expired certificate of a renewed key is still in the bundle); their revocation is `CrlSet.of`'s
    paths = _anchor_keys(allowed, trust, at) if len(allowed) > 1 or indirect or not certifies else {}
    signer = next(iter(paths), allowed[0])
    return Crl(
        source=source,
        crl=crl,
        signer=signer,
        signer_key=_spki(signer),
        signer_certifies=certifies,
        # only asked of a separate CRL signer's CRL and of an indirect one (a CA's own CRL vouches by its key)
        signer_anchors=frozenset(paths.values()) if indirect or not certifies else frozenset(),
        number=number,
        delta_base=delta_base,
        scope=_scope(idp),
        idp_names=_idp_names(idp, crl.issuer),
        reasons=frozenset(idp.only_some_reasons) if idp and idp.only_some_reasons else ALL_REASONS,
        indirect=indirect,
        entries=_entries(crl, indirect) if entries else Entries(),
    )


def _crl_extensions(
    crl: x509.CertificateRevocationList,
) -> tuple[int, int | None, x509.IssuingDistributionPoint | None]:
    try:
        extensions = list(crl.extensions)
    except ValueError as exc:
        raise CrlUnusable(f"CRL extensions cannot be parsed ({exc})") from exc
    number, delta_base, idp = -1, None, None
    for ext in extensions:
        value = ext.value
        if isinstance(value, x509.CRLNumber):
            number = value.crl_number
        elif isinstance(value, x509.DeltaCRLIndicator):
            delta_base = value.crl_number
        elif isinstance(value, x509.IssuingDistributionPoint):
            idp = value
        elif ext.critical and not isinstance(value, _KNOWN_CRL_EXTENSIONS):
            raise CrlUnusable(f"CRL has an unsupported critical extension {ext.oid.dotted_string}")
    if delta_base is not None and number < 0:
        raise CrlUnusable("delta CRL without a CRL number")
    return number, delta_base, idp


def _entries(crl: x509.CertificateRevocationList, indirect: bool) -> Entries:
    """Serial -> entry, keyed by the certificate issuer (which an indirect CRL's entries may change)."""
    entries = Entries()
    issuer = crl.issuer
    try:
        for revoked in crl:
            reason = _F.unspecified
            for ext in revoked.extensions:
                value = ext.value
                if isinstance(value, x509.CRLReason):
                    reason = value.reason
                elif isinstance(value, x509.CertificateIssuer):
                    if not indirect:
                        raise CrlUnusable("a CRL entry names a certificate issuer, but the CRL is not indirect")
                    names = [n.value for n in value if isinstance(n, x509.DirectoryName)]
                    if not names:
                        raise CrlUnusable("a CRL entry's certificate issuer has no directory name")
                    issuer = names[0]
                elif ext.critical and not isinstance(value, x509.InvalidityDate):
                    raise CrlUnusable(f"a CRL entry has an unsupported critical extension {ext.oid.dotted_string}")
            entries.add(issuer, revoked.serial_number, revoked.revocation_date_utc, reason)
    except ValueError as exc:  # undecodable or duplicate entry extensions
        raise CrlUnusable(f"CRL entries cannot be parsed ({exc})") from exc
    return entries


def _scope(idp: x509.IssuingDistributionPoint | None) -> Scope:
    if idp is None:
        return "all"
    if idp.only_contains_attribute_certs:
        return "attributes"
    return "users" if idp.only_contains_user_certs else "cas" if idp.only_contains_ca_certs else "all"


def _idp_names(idp: x509.IssuingDistributionPoint | None, crl_issuer: x509.Name) -> frozenset[x509.GeneralName]:
    if idp is None:
        return frozenset()
    return _point_names(idp.full_name, idp.relative_name, crl_issuer)


def _point_names(
    full: Iterable[x509.GeneralName] | None, relative: x509.RelativeDistinguishedName | None, base: x509.Name
) -> frozenset[x509.GeneralName]:
    """A distribution point's names; a name relative to the CRL issuer is made whole (RFC 5280 4.2.1.13)."""
    if full:
        return frozenset(full)
    if relative is not None:
        return frozenset({x509.DirectoryName(x509.Name([*base.rdns, relative]))})
    return frozenset()


def _points(cert: x509.Certificate) -> list[_Point]:
    """The certificate's distribution points, then the notional one RFC 5280 adds: its issuer's name."""
    points: list[_Point] = []
    try:
        cdp = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    except x509.ExtensionNotFound:
        cdp = None
    for dp in cdp or ():
        crl_issuers = tuple(n.value for n in dp.crl_issuer or () if isinstance(n, x509.DirectoryName))
        base = crl_issuers[0] if crl_issuers else cert.issuer
        reasons = frozenset(dp.reasons) if dp.reasons else ALL_REASONS
        points.append(_Point(_point_names(dp.full_name, dp.relative_name, base), crl_issuers, reasons))
    points.append(_Point(frozenset({x509.DirectoryName(cert.issuer)}), (), ALL_REASONS))
    return points


def _applies(crl: Crl, cert: x509.Certificate, point: _Point, cert_is_ca: bool) -> bool:
    """RFC 5280 6.3.3 (b)(2): does this CRL's issuing distribution point speak for this certificate?"""
    if point.crl_issuers and crl.issuer not in point.crl_issuers:
        return False
    if crl.idp_names:
        names = point.names or frozenset(x509.DirectoryName(n) for n in point.crl_issuers)
        if not crl.idp_names & names:
            return False
    if crl.scope == "attributes":
        return False
    return crl.scope == "all" or (crl.scope == "cas") == cert_is_ca


def _entry(key: IssuerSerial, delta: Crl | bool | None, crl: Crl | None) -> Entry | None:
    """The certificate's entry: the delta CRL's first, then the complete CRL's; removeFromCRL lifts it."""
    if isinstance(delta, Crl) and (entry := delta.entries.get(key)) is not None:
        return None if entry.reason is _F.remove_from_crl else entry
    entry = crl.entries.get(key) if crl is not None else None
    if entry is None or entry.reason is _F.remove_from_crl:
        return None
    return entry


_Key = rsa.RSAPublicKey | ec.EllipticCurvePublicKey | dsa.DSAPublicKey | ed25519.Ed25519PublicKey | ed448.Ed448PublicKey


def _signed_by(crl: x509.CertificateRevocationList, ca: x509.Certificate, der: bytes = b"") -> bool:
    """Does `ca`'s key verify the CRL's signature? cryptography's `is_signature_valid` decides; with the CRL's `der`,
    `_screened` first refuses what it would refuse, for a hash's cost (module docstring)."""
    key = ca.public_key()
    if not isinstance(key, _Key):
        return False
    try:
        if der and _screened(crl, key, der) is False:
            return False
        return crl.is_signature_valid(key)
    except (ValueError, TypeError, UnsupportedAlgorithm):  # anything but True from cryptography is "does not verify"
        return False


def _screen(outline: x509.CertificateRevocationList, ca: x509.Certificate, der: bytes) -> bool | None:
    """`_screened` for `ca`'s key (`accept_der`): False for a key of no kind a CRL is signed with, or an error."""
    key = ca.public_key()
    if not isinstance(key, _Key):
        return False
    try:
        return _screened(outline, key, der)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        return False


def _screened(crl: x509.CertificateRevocationList, key: object, der: bytes) -> bool | None:
    """The CRL's signature checked with `key` over its signed bytes as they came (the DER is strict: they are what
    cryptography would encode again): True where it verifies, False where it does not; for RSA, EC and DSA keys hashed
    by hashlib, which lets go of the GIL (a DSA key was once let through to cryptography alone: 1.8 s for a forged 64
    MB CRL), for Ed25519 and Ed448 (which sign the bytes themselves: no prehash) by cryptography's `verify`, which
    lets go of it too (measured: 0.1-0.3 s for 64 MB, the event loop's thread waiting 15 ms at most). `crl` gives the
    signature algorithm and value only: the CRL read, or its `_outline`. `is_signature_valid` encodes the whole
    tbsCertList again first, holding the GIL: 2.4 s for a 64 MB CRL of 2.8 million entries, which anyone on a
    distribution point's path could send under the CA's name at each refresh, stalling every device (its thread did
    not help). None where the screen cannot tell (then cryptography decides), as for a signature algorithm
    cryptography does not know: `is_signature_valid` answers False for it, where asking for its hash raises
    UnsupportedAlgorithm (which left the refresh round, and a gateway's start, before any CRL was used)."""
    try:
        params, algorithm = crl.signature_algorithm_parameters, crl.signature_hash_algorithm
    except UnsupportedAlgorithm:
        return None
    signed = inside(der, whole(der))[0]  # CertificateList: tbsCertList, signatureAlgorithm, signatureValue
    data = memoryview(der)[signed[1] : signed[2]]
    if isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):  # no prehash: the bytes themselves
        try:
            key.verify(crl.signature, data)
        except InvalidSignature:
            return False
        return True
    if algorithm is None:
        return False
    try:
        digest = hashlib.new(algorithm.name, data).digest()
    except ValueError:  # a hash hashlib does not have
        try:
            hasher = hashes.Hash(algorithm)
        except UnsupportedAlgorithm:  # nor OpenSSL: cryptography's check decides
            return None
        hasher.update(data)
        digest = hasher.finalize()
    prehashed = asym_utils.Prehashed(algorithm)
    try:
        if isinstance(key, rsa.RSAPublicKey) and isinstance(params, padding.PKCS1v15 | padding.PSS):
            key.verify(crl.signature, digest, params, prehashed)
        elif isinstance(key, ec.EllipticCurvePublicKey) and isinstance(params, ec.ECDSA):
            key.verify(crl.signature, digest, ec.ECDSA(prehashed))
        elif isinstance(key, dsa.DSAPublicKey) and params is None:
            key.verify(crl.signature, digest, prehashed)
        else:
            return False  # a signature algorithm of another kind of key
    except InvalidSignature:
        return False
    return True


def _anchor_keys(signers: list[x509.Certificate], trust: TrustList, at: datetime) -> dict[x509.Certificate, bytes]:
    """Each of a CRL's `signers` that has a valid path at `at`, in their order, with the SubjectPublicKeyInfo of the
    trust anchor it ends at (none: `CrlSet.of` drops its CRLs, saying why)."""
    anchors: dict[x509.Certificate, bytes] = {}
    for signer in signers:
        if trust.is_anchor(signer):
            anchors[signer] = _spki(signer)
            continue
        with contextlib.suppress(CertificateRejected):
            anchors[signer] = _spki(verify_chain(signer, trust, at=at, purpose="any").chain[-1])
    return anchors


def signer_certificates(key: bytes, name: x509.Name, trust: TrustList) -> list[x509.Certificate]:
    """The configured certificates named `name` with the public key `key` (its SubjectPublicKeyInfo) that may sign
    CRLs, in the trust list's order."""
    return [ca for ca in trust.named(name) if _key_of(ca) == key and _may_sign_crls(ca)]


def _may_sign_certificates(cert: x509.Certificate) -> bool:
    try:
        return cert.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    except x509.ExtensionNotFound:
        return True


def _may_sign_crls(cert: x509.Certificate) -> bool:
    try:
        return cert.extensions.get_extension_for_class(x509.KeyUsage).value.crl_sign
    except x509.ExtensionNotFound:
        return True


# --- small helpers ---------------------------------------------------------------------------------


def _spki(cert: x509.Certificate) -> bytes:
    return cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


@functools.lru_cache(maxsize=1024)
def _key_of(cert: x509.Certificate) -> bytes:
    """`_spki` of a CA certificate, remembered: it is asked for on every revocation look-up."""
    return _spki(cert)


def _age(crl: Crl) -> tuple[int, datetime]:
    return crl.number, crl.this_update
