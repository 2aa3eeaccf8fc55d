"""Revocation stage: has the issuer withdrawn this certificate, according to a CRL we can trust?

Theory of operation: CRLs are loaded at the edge (`load_crls`: files; a later fetcher: URLs) and sorted
once by `CrlSet.build`, which keeps only CRLs it can trust: the issuer is a configured CA, the
signature verifies with *that* CA's key (a CA's name alone proves nothing), the CA may sign CRLs, the CRL
is current at `at`, and it is a complete CRL (delta, indirect and reason-partitioned CRLs are refused;
a distribution point limited to user or CA certificates is honoured). Every refused CRL is reported
as a problem string for the operator. For each CA only the newest accepted CRL is kept.

`CrlSet.check` then takes the verified chain (from `chain.verify_chain`) and looks every certificate
below the anchor up in the CRL of the CA that actually signed it (matched by key, not only by name):
- a revoked leaf or revoked CA is refused (CertificateRevoked) under every policy but "off";
- a CA with no CRL loaded is passed: only the leaf's issuer must have a current CRL;
- a leaf whose issuer has no current CRL (none loaded, or past its nextUpdate at `at`) is refused
  under "require" and passed with UNKNOWN evidence under "best-effort".
It returns evidence (good / unknown, which CRL, its update times), not a boolean. `lookup` gives the
same evidence for one certificate without applying a policy (REVOKED included), for diagnostics.
"""

from __future__ import annotations

import enum
import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa

from proxy.certs.chain import TrustList, VerifiedCertificate, format_time
from proxy.errors import CertificateRevoked

RevocationPolicy = Literal["require", "best-effort", "off"]
Scope = Literal["all", "users", "cas"]
_PEM_CRL = re.compile(rb"-----BEGIN X509 CRL-----.+?-----END X509 CRL-----", re.DOTALL)


class RevocationStatus(enum.Enum):
    GOOD = "good"
    REVOKED = "revoked"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class RevocationEvidence:
    """What the revocation stage found out, and from which CRL."""

    status: RevocationStatus
    source: str  # where the CRL came from (file path or URL); "" if none was used
    detail: str
    crl_this_update: datetime | None = None
    crl_next_update: datetime | None = None
    revoked_at: datetime | None = None


@dataclass(frozen=True)
class _Crl:
    source: str
    crl: x509.CertificateRevocationList
    signer: x509.Certificate  # the trusted CA whose key verified it
    signer_key: bytes  # its SubjectPublicKeyInfo, DER: CRLs are matched to CAs by key, not only by name
    scope: Scope

    @property
    def number(self) -> int:
        try:
            return self.crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
        except x509.ExtensionNotFound:
            return -1

    def covers(self, cert: x509.Certificate) -> bool:
        is_ca = _is_ca(cert)
        return self.scope == "all" or (self.scope == "cas") == is_ca


class _Unusable(Exception):
    """Why a CRL was not accepted (becomes a problem string)."""


@dataclass(frozen=True)
class CrlSet:
    """The trusted, current CRLs, one per CA key and scope."""

    crls: tuple[_Crl, ...] = ()

    @classmethod
    def build(
        cls, crls: Sequence[tuple[str, x509.CertificateRevocationList]], trust: TrustList, *, at: datetime
    ) -> tuple[CrlSet, list[str]]:
        """Keep the CRLs that can be trusted at `at`; report the others as "<source>: <why>"."""
        at = _utc(at)
        kept: dict[tuple[bytes, bytes, Scope], _Crl] = {}
        problems: list[str] = []
        for source, crl in crls:
            try:
                accepted = _accept(source, crl, trust, at)
            except _Unusable as exc:
                problems.append(f"{source}: {exc}")
                continue
            key = (crl.issuer.public_bytes(), accepted.signer_key, accepted.scope)
            if key not in kept or _newer(accepted, kept[key]):
                kept[key] = accepted
        return cls(tuple(kept.values())), problems

    def lookup(self, cert: x509.Certificate, issuer: x509.Certificate, *, at: datetime) -> RevocationEvidence:
        """Is `cert` (signed by `issuer`) on its issuer's current CRL? No policy applied."""
        at = _utc(at)
        name = issuer.subject.rfc4514_string()
        found = self._current(cert, issuer, at)
        if found is None:
            return RevocationEvidence(
                RevocationStatus.UNKNOWN, "", f"no current CRL for issuer '{name}'{self._why(issuer, at)}"
            )
        times = {"crl_this_update": found.crl.last_update_utc, "crl_next_update": found.crl.next_update_utc}
        entry = found.crl.get_revoked_certificate_by_serial_number(cert.serial_number)
        if entry is None:
            detail = f"serial 0x{cert.serial_number:x} is not on CRL #{found.number} of '{name}'"
            return RevocationEvidence(RevocationStatus.GOOD, found.source, detail, **times)
        when = entry.revocation_date_utc
        detail = f"serial 0x{cert.serial_number:x} was revoked on {format_time(when)} (reason {_reason(entry)})"
        return RevocationEvidence(RevocationStatus.REVOKED, found.source, detail, **times, revoked_at=when)

    def check(self, verified: VerifiedCertificate, *, at: datetime, policy: RevocationPolicy) -> RevocationEvidence:
        """Apply `policy` to the verified chain: evidence for the leaf, or CertificateRevoked."""
        if policy == "off":
            return RevocationEvidence(RevocationStatus.UNKNOWN, "", "revocation checking is off")
        chain = verified.chain
        if len(chain) < 2:
            return RevocationEvidence(RevocationStatus.UNKNOWN, "", "the certificate is itself a trust anchor")
        for cert, issuer in itertools.pairwise(chain[1:]):  # each CA below the anchor, and its issuer
            evidence = self.lookup(cert, issuer, at=at)
            if evidence.status is RevocationStatus.REVOKED:
                raise CertificateRevoked(
                    f"issuing CA '{cert.subject.rfc4514_string()}' {evidence.detail}",
                    hint=f"from {evidence.source}; every certificate it issued is refused",
                )
        evidence = self.lookup(verified.leaf, chain[1], at=at)
        if evidence.status is RevocationStatus.REVOKED:
            raise CertificateRevoked(
                f"certificate {evidence.detail}", hint=f"{verified.subject}, from {evidence.source}"
            )
        if evidence.status is RevocationStatus.UNKNOWN and policy == "require":
            raise CertificateRevoked(
                evidence.detail, hint='publish or load a current CRL for this CA, or set revocation = "best-effort"'
            )
        return evidence

    def _current(self, cert: x509.Certificate, issuer: x509.Certificate, at: datetime) -> _Crl | None:
        candidates = [
            crl
            for crl in self._of(issuer)
            if crl.covers(cert) and crl.crl.last_update_utc <= at <= _next_update(crl.crl)
        ]
        return max(candidates, key=_age, default=None)

    def _of(self, issuer: x509.Certificate) -> list[_Crl]:
        key = _spki(issuer)
        return [crl for crl in self.crls if crl.signer_key == key and crl.crl.issuer == issuer.subject]

    def _why(self, issuer: x509.Certificate, at: datetime) -> str:
        stale = [crl for crl in self._of(issuer) if _next_update(crl.crl) < at]
        if not stale:
            return ""
        newest = max(stale, key=_age)
        return f" (the CRL from {newest.source} expired on {format_time(_next_update(newest.crl))})"


def load_crls(path: Path) -> list[x509.CertificateRevocationList]:
    """The CRLs in `path`: PEM with one or more CRLs, or one DER CRL."""
    data = path.read_bytes()
    blocks = _PEM_CRL.findall(data) if b"-----BEGIN" in data else [data]
    if not blocks:
        raise ValueError(f"{path}: PEM without a 'BEGIN X509 CRL' block")
    load = x509.load_pem_x509_crl if b"-----BEGIN" in data else x509.load_der_x509_crl
    try:
        return [load(block) for block in blocks]
    except ValueError as exc:
        raise ValueError(f"{path}: not a PEM or DER CRL ({exc})") from exc


# --- accepting a CRL -------------------------------------------------------------------------------


def _accept(source: str, crl: x509.CertificateRevocationList, trust: TrustList, at: datetime) -> _Crl:
    name = crl.issuer.rfc4514_string()
    cas = trust.named(crl.issuer)
    if not cas:
        raise _Unusable(f"CRL issuer '{name}' is not in the trust list")
    signer = next((ca for ca in cas if _signed_by(crl, ca)), None)
    if signer is None:
        raise _Unusable(f"CRL signature does not verify against the trusted '{name}' (signed with another key?)")
    try:
        usage = signer.extensions.get_extension_for_class(x509.KeyUsage).value
        if not usage.crl_sign:
            raise _Unusable(f"the key usage of '{name}' does not allow cRLSign")
    except x509.ExtensionNotFound:
        pass
    if crl.next_update_utc is None:
        raise _Unusable(f"CRL of '{name}' has no nextUpdate, so it is never known to be current")
    if crl.next_update_utc < at:
        raise _Unusable(f"CRL of '{name}' is stale: its nextUpdate was {format_time(crl.next_update_utc)}")
    if crl.last_update_utc > at:
        raise _Unusable(f"CRL of '{name}' is not valid yet: its thisUpdate is {format_time(crl.last_update_utc)}")
    return _Crl(source=source, crl=crl, signer=signer, signer_key=_spki(signer), scope=_scope(crl))


def _scope(crl: x509.CertificateRevocationList) -> Scope:
    try:
        extensions = list(crl.extensions)
    except ValueError as exc:
        raise _Unusable(f"CRL extensions cannot be parsed ({exc})") from exc
    scope: Scope = "all"
    for ext in extensions:
        value = ext.value
        if isinstance(value, x509.DeltaCRLIndicator):
            raise _Unusable("delta CRLs are not supported; load the full (base) CRL")
        if isinstance(value, x509.IssuingDistributionPoint):
            if value.indirect_crl or value.only_some_reasons or value.only_contains_attribute_certs:
                raise _Unusable("partitioned CRLs (indirect, by reason, attribute certificates) are not supported")
            scope = "users" if value.only_contains_user_certs else "cas" if value.only_contains_ca_certs else "all"
        elif ext.critical:
            raise _Unusable(f"CRL has an unsupported critical extension {ext.oid.dotted_string}")
    return scope


def _signed_by(crl: x509.CertificateRevocationList, ca: x509.Certificate) -> bool:
    key = ca.public_key()
    if not isinstance(
        key,
        rsa.RSAPublicKey
        | ec.EllipticCurvePublicKey
        | dsa.DSAPublicKey
        | ed25519.Ed25519PublicKey
        | ed448.Ed448PublicKey,
    ):
        return False
    try:
        return crl.is_signature_valid(key)
    except (ValueError, TypeError):
        return False


# --- small helpers ---------------------------------------------------------------------------------


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


def _reason(entry: x509.RevokedCertificate) -> str:
    try:
        return entry.extensions.get_extension_for_class(x509.CRLReason).value.reason.value
    except x509.ExtensionNotFound:
        return "unspecified"


def _spki(cert: x509.Certificate) -> bytes:
    return cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _age(crl: _Crl) -> tuple[int, datetime]:
    return crl.number, crl.crl.last_update_utc


def _newer(a: _Crl, b: _Crl) -> bool:
    return _age(a) > _age(b)


def _next_update(crl: x509.CertificateRevocationList) -> datetime:
    return crl.next_update_utc or datetime.min.replace(tzinfo=UTC)


def _utc(when: datetime) -> datetime:
    if when.tzinfo is None:
        raise ValueError("validation time must be timezone-aware")
    return when.astimezone(UTC)
