"""Certificate stage: is this client certificate one our PKI issued for client authentication?

Theory of operation: the TLS handshake gives us the client's leaf certificate. We build its chain to a
trust anchor *only* from the CA certificates the administrator configured (`TrustList`), never from
certificates the client sent: a client cannot bring its own intermediates, and so cannot make chain
building slow with crafted ones either (depth is also capped at `MAX_CHAIN_DEPTH`). The path itself is
validated by `cryptography.x509.verification` at the time `at` given by the caller.

What it trusts: the configured anchors, and intermediates that chain to them.
What it refuses (CertificateRejected, with a reason the device owner or the administrator can act on):
- a leaf outside its validity period at `at`, or any CA in its chain outside its own;
- a leaf without the clientAuth extended key usage. RFC 5280 reads a missing EKU as "any purpose";
  the gateway does not: a certificate must have been issued for client authentication;
- a leaf whose key usage, when present, lacks digitalSignature (the key signs the TLS handshake), whose Netscape
  certificate type, when present, names no SSL client (OpenSSL's handshake refuses it), or whose key
  OpenSSL's handshake refuses as too weak (RSA or DSA under 2048 bits, a curve under 224);
- an issuer that is not in the trust list, or one whose name matches a trusted CA but whose key
  did not sign the leaf (the classic forgery: a private CA copying a trusted CA's name);
- CA certificates without basicConstraints cA=TRUE, or beyond a path length constraint, or whose extended key
  usage (when they have one) lacks clientAuth: OpenSSL's handshake applies a CA's EKU to the certificates below it
  and refuses such a chain, so `explain` must too;
- what the verifier's web-PKI profile refuses and we kept (weak keys, SHA-1 signatures, X.509 v1,
  unknown critical extensions). It accepts signatures of RSA (PKCS#1 v1.5 or PSS) and ECDSA with SHA-256, -384
  or -512 only (PSS with MGF1 of the same hash and a salt of the hash's length, not the openssl CLI's default
  salt, the longest the key allows), so a CA with an Ed25519, Ed448 or DSA key cannot sign a usable certificate
  (a leaf's own key may be of any kind OpenSSL takes in the handshake: it signs nothing the verifier checks); the
  refusal names the certificate and the algorithm (PSS: its parameters), not the verifier's words.

The web-PKI profile is relaxed where enterprise CAs (Active Directory Certificate Services, or the
openssl CLI with its default settings) legitimately differ from the CA/Browser Forum's rules: a CA
certificate may lack keyUsage (openssl's `req -x509` adds none) and may have a non-critical
basicConstraints; AKI/SKI may be absent or in any form; a leaf may lack a subjectAltName (the
identity stage decides what a usable name is). Revocation is a separate stage (`revocation.py`):
the verifier checks none.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, SignatureAlgorithmOID
from cryptography.x509.verification import (
    ClientVerifier,
    Criticality,
    ExtensionPolicy,
    Policy,
    PolicyBuilder,
    Store,
    VerificationError,
)
from pyasn1.codec.der import decoder as der_decoder
from pyasn1.error import PyAsn1Error
from pyasn1.type import univ

from proxy.errors import CertificateRejected
from proxy.files import read_bounded
from proxy.printable import printable

Purpose = Literal["client", "any"]
MAX_CHAIN_DEPTH = 5  # intermediates between leaf and anchor; enterprise PKIs use one or two
_EKU_NAMES = {
    ExtendedKeyUsageOID.CLIENT_AUTH: "clientAuth",
    ExtendedKeyUsageOID.SERVER_AUTH: "serverAuth",
    ExtendedKeyUsageOID.EMAIL_PROTECTION: "emailProtection",
    ExtendedKeyUsageOID.CODE_SIGNING: "codeSigning",
    ExtendedKeyUsageOID.SMARTCARD_LOGON: "smartcardLogon",
    ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE: "anyExtendedKeyUsage",
}


@dataclass(frozen=True)
class TrustList:
    """The CA certificates the administrator configured: anchors end a chain, intermediates link one."""

    anchors: tuple[x509.Certificate, ...]
    intermediates: tuple[x509.Certificate, ...] = ()

    def __post_init__(self) -> None:
        if not self.anchors:
            raise ValueError("a trust list needs at least one trust anchor")

    @classmethod
    def load(cls, anchor_paths: Iterable[Path], intermediate_paths: Iterable[Path] = ()) -> TrustList:
        """Read PEM bundles (one or more certificates) or single DER certificates."""
        anchors = tuple(cert for path in anchor_paths for cert in load_certificates(path))
        intermediates = tuple(cert for path in intermediate_paths for cert in load_certificates(path))
        return cls(anchors=anchors, intermediates=intermediates)

    @property
    def certificates(self) -> tuple[x509.Certificate, ...]:
        return self.anchors + self.intermediates

    def named(self, name: x509.Name) -> list[x509.Certificate]:
        """The configured CA certificates whose subject is `name` (several after a CA renewal)."""
        return [cert for cert in self.certificates if cert.subject == name]

    def is_anchor(self, cert: x509.Certificate) -> bool:
        return cert in self.anchors

    @cached_property
    def store(self) -> Store:
        return Store(list(self.anchors))


@dataclass(frozen=True)
class VerifiedCertificate:
    """Evidence of the certificate stage: the leaf and the chain that vouches for it."""

    leaf: x509.Certificate
    chain: tuple[x509.Certificate, ...]  # leaf first, trust anchor last
    subject: str  # RFC 4514, invisible characters as escapes (`proxy.printable`): as logs and hints show it
    issuer: str  # RFC 4514, likewise
    serial: int
    fingerprint_sha256: str  # hex, of the DER certificate

    @cached_property
    def serial_hex(self) -> str:
        """The serial number as the summary line shows it, rendered once per certificate (the chain memo keeps this
        object), not once per request: a held long-poll's trace then holds no copy of its own."""
        return format(self.serial, "x")


MAX_CA_FILE_BYTES = 16 * 1024 * 1024  # a CA file of the configuration: 10,000 CA certificates in PEM take about 7 MiB


def load_certificates(path: Path) -> list[x509.Certificate]:
    """The certificates in `path`: a PEM bundle, or one DER certificate. ValueError naming the file and what is wrong
    (not a regular file, more than MAX_CA_FILE_BYTES, neither PEM nor DER)."""
    try:
        data = read_bounded(path, MAX_CA_FILE_BYTES)
    except OSError as exc:
        raise ValueError(f"{path}: {exc.strerror or exc}") from None
    try:
        return parse_certificates(data)
    except ValueError as exc:
        raise ValueError(f"{path}: not a PEM or DER certificate ({exc})") from None


def parse_certificates(data: bytes) -> list[x509.Certificate]:
    """The certificates of a PEM bundle, or the one DER certificate `data` is (and nothing after it)."""
    if b"-----BEGIN" in data:
        return x509.load_pem_x509_certificates(data)
    if tail := _after_der(data):  # the library's word for it is "ParseError { kind: ExtraData }"
        raise ValueError(f"{tail} bytes after the end of the DER certificate")
    return [x509.load_der_x509_certificate(data)]


def _after_der(data: bytes) -> int:
    """How many bytes follow the DER SEQUENCE `data` starts with, as its length octets count it (0 when it is not one:
    the parser then says why)."""
    if len(data) < 2 or data[0] != 0x30:
        return 0
    if data[1] < 0x80:
        start, size = 2, data[1]
    else:
        octets = data[1] & 0x7F
        if not 0 < octets <= 4 or len(data) < 2 + octets:
            return 0
        start, size = 2 + octets, int.from_bytes(data[2 : 2 + octets], "big")
    return max(len(data) - start - size, 0)


def verify_chain(
    leaf: x509.Certificate, trust: TrustList, *, at: datetime, purpose: Purpose = "client"
) -> VerifiedCertificate:
    """Build and validate the leaf's chain to a configured anchor at time `at`, or refuse.

    `purpose` "client" is the gateway's: a client certificate with clientAuth. "any" drops the leaf's
    usage checks; it validates a CRL signer's own path, and the NIST PKITS corpus whose end entities
    carry no extended key usage.
    """
    at = as_utc(at)
    _check_extensions(leaf)
    _check_period(leaf, at, "certificate")
    if purpose == "client":
        _check_leaf_usage(leaf)
        _check_netscape_type(leaf)
        _check_leaf_key(leaf)
    issuer = _signing_issuer(leaf, trust)
    try:
        verified = _verifier(trust, at, purpose).verify(leaf, list(trust.intermediates))
    except VerificationError as exc:
        # Say what is wrong higher up the chain if we can; else pass the verifier's own words on.
        _diagnose_issuers(issuer, trust, at)
        message = str(exc).split(" (encountered processing", 1)[0]  # the rest repeats a certificate's repr
        if "Forbidden signature algorithm" in message or "Forbidden public key algorithm" in message:
            _diagnose_algorithms(leaf, trust)
        if "unaccounted-for critical extensions" in message:
            _diagnose_critical(leaf, trust, message)
        if "CA extended key usage lacks clientAuth" in message:
            _diagnose_ca_usage(leaf, trust)
        raise CertificateRejected(
            f"certificate chain does not validate: {message}", hint=f"{_describe(leaf)}; {exc}"
        ) from exc
    return VerifiedCertificate(
        leaf=leaf,
        chain=tuple(verified.chain),
        # as logs, hints and traces show them: a subject the enrollee supplied may hold invisible characters
        subject=printable(leaf.subject.rfc4514_string()),
        issuer=printable(leaf.issuer.rfc4514_string()),
        serial=leaf.serial_number,
        fingerprint_sha256=hashlib.sha256(leaf.public_bytes(serialization.Encoding.DER)).hexdigest(),
    )


def is_ca(cert: x509.Certificate) -> bool:
    """Whether basicConstraints asserts cA (a certificate without the extension is not a CA)."""
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


def format_time(when: datetime) -> str:
    """2025-01-01T00:00:00Z: how reasons and evidence print instants."""
    return as_utc(when).strftime("%Y-%m-%dT%H:%M:%SZ")


# --- precise reasons for the common failures, checked before the verifier runs -------------------


def _check_period(cert: x509.Certificate, at: datetime, what: str) -> None:
    if at < cert.not_valid_before_utc:
        raise CertificateRejected(
            f"{what} not valid before {format_time(cert.not_valid_before_utc)}",
            hint=f"{_describe(cert)}; is the gateway's or the issuer's clock wrong?",
        )
    if at > cert.not_valid_after_utc:
        fix = (
            "renew that CA, configure its new certificate (client_certificates.trust_anchors or intermediates) and "
            "reissue the certificates it signed"
            if is_ca(cert)
            else "the certificate expired: issue the user a new one"
        )
        raise CertificateRejected(
            f"{what} expired on {format_time(cert.not_valid_after_utc)}", hint=f"{_describe(cert)}; {fix}"
        )


def _check_extensions(cert: x509.Certificate) -> None:
    """Refuse a certificate whose extensions do not parse, or that carries one extension twice (RFC 5280 4.2:
    "MUST NOT"). OpenSSL 3.0's handshake and cryptography's verifier both let duplicates through, and every later
    stage reads extensions (two SID extensions: which one names the account?); cryptography raises
    DuplicateExtension, which is not a ValueError, so it is caught here once for all of them."""
    try:
        _ = cert.extensions
    except x509.DuplicateExtension as exc:
        raise CertificateRejected(
            f"certificate carries the extension {exc.oid.dotted_string} twice",
            hint=f"{_describe(cert)}; RFC 5280 4.2: a certificate MUST NOT include more than one instance of an "
            "extension; revoke it and check the CA and template that wrote it",
        ) from None
    except ValueError as exc:
        raise CertificateRejected("certificate extensions cannot be parsed", hint=f"{_describe(cert)}; {exc}") from None


def _check_leaf_usage(leaf: x509.Certificate) -> None:
    try:
        eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        raise CertificateRejected(
            "certificate has no extended key usage; the gateway requires clientAuth",
            hint=f"{_describe(leaf)}; RFC 5280 reads a missing EKU as any purpose, the gateway does not",
        ) from None
    except ValueError as exc:  # duplicate or undecodable extensions
        raise CertificateRejected("certificate extensions cannot be parsed", hint=str(exc)) from exc
    if ExtendedKeyUsageOID.CLIENT_AUTH not in eku:
        have = ", ".join(_EKU_NAMES.get(oid, oid.dotted_string) for oid in eku) or "none"
        raise CertificateRejected(
            f"certificate lacks the clientAuth extended key usage (it has: {have})",
            hint=f"{_describe(leaf)}; reissue it from a template with Client Authentication (clientAuth)",
        )
    try:
        key_usage = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return
    if not key_usage.digital_signature:
        raise CertificateRejected(
            "certificate key usage lacks digitalSignature",
            hint=f"{_describe(leaf)}; reissue it with digitalSignature in its key usage (a TLS client signs with it)",
        )


def _check_netscape_type(leaf: x509.Certificate) -> None:
    """Refuse a leaf whose Netscape certificate type names no SSL client, as OpenSSL's handshake does (its client
    purpose check), so that `explain` stops where a request does."""
    if netscape_type_excludes_client(leaf):
        raise CertificateRejected(
            "certificate's Netscape certificate type does not include SSL client",
            hint=f"{_describe(leaf)}; reissue it without the Netscape certificate type (nsCertType, an obsolete "
            "extension) or with SSL client in it",
        )


NETSCAPE_CERT_TYPE = x509.ObjectIdentifier("2.16.840.1.113730.1.1")


def netscape_type_excludes_client(cert: x509.Certificate) -> bool:
    """Whether `cert` carries a Netscape certificate type (a BIT STRING whose first bit is SSL client) without that
    bit, or one that does not decode: OpenSSL then refuses it for a TLS client whatever its extended key usage says
    (an empty BIT STRING names no type; a value that is no BIT STRING, or has more than 7 unused bits, is an invalid
    extension). Decoded by pyasn1, as OpenSSL's d2i does (a long-form length, a constructed BIT STRING, bytes after
    it ignored): the first content byte read at a fixed offset was a length byte once the BIT STRING was 128 bytes or
    more, and a client certificate every handshake passes was refused, a server one every handshake refuses served."""
    try:
        value = cert.extensions.get_extension_for_oid(NETSCAPE_CERT_TYPE).value
    except x509.ExtensionNotFound:
        return False
    der = value.value if isinstance(value, x509.UnrecognizedExtension) else b""
    try:
        bits, _ = der_decoder.decode(der, asn1Spec=univ.BitString())
    except PyAsn1Error:
        return True
    return not (len(bits) > 0 and bits[0])


def _check_leaf_key(leaf: x509.Certificate) -> None:
    """Refuse the keys OpenSSL's handshake refuses at its default security level 2 ("EE certificate key too weak":
    RSA and DSA under 2048 bits, elliptic curves under 224), so that `explain` stops where a request does; the
    verifier checks only the keys of CAs, which sign something it verifies."""
    try:
        key = leaf.public_key()
    except (ValueError, UnsupportedAlgorithm):
        return  # a key type OpenSSL may know and cryptography not: the handshake decides
    if isinstance(key, rsa.RSAPublicKey | dsa.DSAPublicKey):
        kind, bits, least = ("RSA" if isinstance(key, rsa.RSAPublicKey) else "DSA"), key.key_size, 2048
    elif isinstance(key, ec.EllipticCurvePublicKey):
        kind, bits, least = f"elliptic-curve ({key.curve.name})", key.curve.key_size, 224
    else:
        return
    if bits < least:
        raise CertificateRejected(
            f"certificate has a {bits}-bit {kind} key; the gateway's TLS requires {least} bits or more",
            hint=f"{_describe(leaf)}; OpenSSL's security level 2 refuses it in the handshake: issue the user a "
            "certificate with a 2048-bit or larger RSA key, or an ECDSA P-256 key",
        )


def _signing_issuer(cert: x509.Certificate, trust: TrustList) -> x509.Certificate:
    """The configured CA that signed `cert`, or the reason there is none."""
    candidates = trust.named(cert.issuer)
    issuer = printable(cert.issuer.rfc4514_string())
    if not candidates:
        raise CertificateRejected(
            f"issuer '{issuer}' is not in the trust list",
            hint=f"{_describe(cert)}; add its CA to client_certificates.trust_anchors or intermediates, "
            "or the certificate was not issued by our PKI",
        )
    for candidate in candidates:
        try:
            cert.verify_directly_issued_by(candidate)
        except Exception:  # noqa: BLE001, S112 -- InvalidSignature, or a key type it cannot use: try the next
            continue
        return candidate
    raise CertificateRejected(
        f"signature does not verify against the trusted '{issuer}' (a certificate copying a trusted CA's name?)",
        hint=f"{_describe(cert)}; a forged certificate, or one from another CA of the same name: if that CA is "
        "yours (a renewed key), add its certificate to client_certificates.intermediates or trust_anchors",
    )


def _diagnose_issuers(issuer: x509.Certificate, trust: TrustList, at: datetime) -> None:
    """Walk up from the leaf's issuer and raise the first precise reason found, if any."""
    for _ in range(MAX_CHAIN_DEPTH + 1):
        _check_period(issuer, at, f"issuing CA '{issuer.subject.rfc4514_string()}'")
        if trust.is_anchor(issuer):
            return
        issuer = _signing_issuer(issuer, trust)


# What the verifier accepts (cryptography's web-PKI profile): the signature algorithms, and the kinds of CA keys.
_ACCEPTED_SIGNATURES = frozenset(
    {
        SignatureAlgorithmOID.RSA_WITH_SHA256,
        SignatureAlgorithmOID.RSA_WITH_SHA384,
        SignatureAlgorithmOID.RSA_WITH_SHA512,
        SignatureAlgorithmOID.RSASSA_PSS,
        SignatureAlgorithmOID.ECDSA_WITH_SHA256,
        SignatureAlgorithmOID.ECDSA_WITH_SHA384,
        SignatureAlgorithmOID.ECDSA_WITH_SHA512,
    }
)
_KEY_NAMES = (
    (ed25519.Ed25519PublicKey, "Ed25519"),
    (ed448.Ed448PublicKey, "Ed448"),
    (dsa.DSAPublicKey, "DSA"),
)
_ALGORITHM_FIX = (
    "the gateway accepts certificates signed with RSA (PKCS#1 v1.5, or PSS with MGF1 of the same hash and a salt of "
    "the hash's length: openssl's -sigopt rsa_pss_saltlen:digest) or ECDSA, with SHA-256, SHA-384 or SHA-512: reissue"
)
# RSASSA-PSS as the verifier takes it (the CA/Browser Forum's profile): a hash of these, MGF1 with that hash, a salt of
# the hash's size
_PSS_SALTS = {"2.16.840.1.101.3.4.2.1": 32, "2.16.840.1.101.3.4.2.2": 48, "2.16.840.1.101.3.4.2.3": 64}
_HASH_NAMES = {
    "1.3.14.3.2.26": "SHA-1",
    "2.16.840.1.101.3.4.2.4": "SHA-224",
    "2.16.840.1.101.3.4.2.1": "SHA-256",
    "2.16.840.1.101.3.4.2.2": "SHA-384",
    "2.16.840.1.101.3.4.2.3": "SHA-512",
}


def _diagnose_algorithms(leaf: x509.Certificate, trust: TrustList) -> None:
    """Walk up from the leaf through the configured CAs and raise for the first signature algorithm, or the first
    CA key, the verifier does not accept (its own message names neither the certificate nor, readably, the
    algorithm); nothing if none is found."""
    cert = leaf
    for _ in range(MAX_CHAIN_DEPTH + 2):
        issuer = next(iter(trust.named(cert.issuer)), None)
        if issuer is not None and (kind := _refused_key(issuer)):  # its signatures are of that kind too: fix the CA
            raise CertificateRejected(
                f"certificate chain does not validate: CA '{issuer.subject.rfc4514_string()}' has an {kind} key, "
                "which the gateway does not accept for signing certificates",
                hint=f"{_describe(issuer)}; {_ALGORITHM_FIX} that CA with an RSA (2048 bits or more) or ECDSA key",
            )
        if algorithm := _refused_signature(cert):
            raise CertificateRejected(
                f"certificate chain does not validate: certificate '{cert.subject.rfc4514_string()}' is signed with "
                f"{algorithm}, which the gateway does not accept",
                hint=f"{_describe(cert)}; {_ALGORITHM_FIX} it",
            )
        if issuer is None or trust.is_anchor(issuer) or issuer.subject == issuer.issuer:
            return
        cert = issuer


def unusable_ca(ca: x509.Certificate, *, anchor: bool) -> str | None:
    """Why no certificate below this configured CA can pass the certificate stage ("CA '...' has an Ed25519 key",
    "CA '...' is signed with RSA-PSS (...)"; a trust anchor's own signature is not checked), or None. For
    check-config: the verifier refuses such a chain for every device under it."""
    subject = ca.subject.rfc4514_string()
    if kind := _refused_key(ca):
        return f"CA '{subject}' has an {kind} key"
    if not anchor and (algorithm := _refused_signature(ca)):
        return f"CA '{subject}' is signed with {algorithm}"
    return None


def _refused_key(ca: x509.Certificate) -> str | None:
    """The kind of the CA's key where the verifier takes no signature made with it (Ed25519, ...), else None."""
    key = ca.public_key()
    if isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
        return None
    return next((name for cls, name in _KEY_NAMES if isinstance(key, cls)), type(key).__name__)


def _refused_signature(cert: x509.Certificate) -> str | None:
    """The certificate's signature algorithm, named, where the verifier does not take it, else None."""
    oid = cert.signature_algorithm_oid
    if oid == SignatureAlgorithmOID.RSASSA_PSS:
        return _pss_refused(cert)
    return None if oid in _ACCEPTED_SIGNATURES else getattr(oid, "_name", None) or oid.dotted_string


def _pss_refused(cert: x509.Certificate) -> str | None:
    """The RSASSA-PSS parameters of the certificate's signature, named ("RSA-PSS (SHA-256, MGF1 with SHA-256, a salt
    of 222 bytes)"), where the verifier refuses them; None where it takes them. RFC 4055's defaults (SHA-1, MGF1 with
    SHA-1, 20 bytes) stand for what is left out."""
    from pyasn1_modules import rfc4055, rfc5280  # a refusal's path only: a start need not load them

    try:
        outer, _ = der_decoder.decode(cert.public_bytes(serialization.Encoding.DER), asn1Spec=rfc5280.Certificate())
        params, _ = der_decoder.decode(
            bytes(outer["signatureAlgorithm"]["parameters"]), asn1Spec=rfc4055.RSASSA_PSS_params()
        )
        digest = str(params["hashAlgorithm"]["algorithm"] if params["hashAlgorithm"].isValue else rfc4055.id_sha1)
        mask = params["maskGenAlgorithm"]
        if not mask.isValue:
            mgf = f"MGF1 with {_HASH_NAMES[str(rfc4055.id_sha1)]}"
        elif mask["algorithm"] == rfc4055.id_mgf1:
            inner, _ = der_decoder.decode(bytes(mask["parameters"]), asn1Spec=rfc5280.AlgorithmIdentifier())
            mgf = f"MGF1 with {_HASH_NAMES.get(str(inner['algorithm']), str(inner['algorithm']))}"
        else:
            mgf = f"mask function {mask['algorithm']}"
        salt = int(params["saltLength"])
    except (PyAsn1Error, TypeError, ValueError):
        return "RSA-PSS parameters that cannot be read"
    name = _HASH_NAMES.get(digest, digest)
    if _PSS_SALTS.get(digest) == salt and mgf == f"MGF1 with {name}":
        return None
    return f"RSA-PSS ({name}, {mgf}, a salt of {salt} bytes)"


_POLICY_EXTENSIONS = {
    "2.5.29.32": "certificatePolicies",
    "2.5.29.33": "policyMappings",
    "2.5.29.36": "policyConstraints",
    "2.5.29.54": "inhibitAnyPolicy",
}


def _diagnose_critical(leaf: x509.Certificate, trust: TrustList, message: str) -> None:
    """The verifier's "invalid extension: <oid>: certificate contains unaccounted-for critical extensions" names the
    extension, not the certificate: find the first certificate on the leaf's way up that marks it critical and raise
    naming both; nothing if none is found. The verifier does no certificate-policy processing (nor does OpenSSL's
    handshake by default), so a critical policy extension, which RFC 5280 makes policyConstraints and
    inhibitAnyPolicy always, is refused rather than ignored."""
    dotted = message.split("invalid extension: ", 1)[-1].split(":", 1)[0].strip()
    name = _POLICY_EXTENSIONS.get(dotted, "an extension")
    cert: x509.Certificate | None = leaf
    for _ in range(MAX_CHAIN_DEPTH + 2):
        if cert is None:
            return
        try:
            critical = any(ext.critical and ext.oid.dotted_string == dotted for ext in cert.extensions)
        except ValueError:
            critical = False
        if critical:
            who = "certificate" if cert is leaf else "CA"
            why = "no certificate-policy processing" if dotted in _POLICY_EXTENSIONS else "nothing with it"
            raise CertificateRejected(
                f"certificate chain does not validate: {who} '{cert.subject.rfc4514_string()}' marks {name} "
                f"({dotted}) critical, which the gateway does not process",
                hint=f"{_describe(cert)}; the gateway does {why} and refuses a critical extension it does not process "
                "rather than ignore it: reissue that certificate without it, or with it non-critical where RFC 5280 "
                "allows",
            )
        if trust.is_anchor(cert) or cert.subject == cert.issuer:
            return
        cert = next(iter(trust.named(cert.issuer)), None)


def _diagnose_ca_usage(leaf: x509.Certificate, trust: TrustList) -> None:
    """Raise naming the first CA above the leaf whose extended key usage lacks clientAuth; nothing if none does."""
    cert = leaf
    for _ in range(MAX_CHAIN_DEPTH + 1):
        if trust.is_anchor(cert) or cert.subject == cert.issuer:
            return
        ca = next(iter(trust.named(cert.issuer)), None)
        if ca is None:
            return
        try:
            usage = ca.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        except (x509.ExtensionNotFound, ValueError):
            usage = None
        if usage is not None and ExtendedKeyUsageOID.CLIENT_AUTH not in usage:
            have = ", ".join(_EKU_NAMES.get(oid, oid.dotted_string) for oid in usage) or "none"
            raise CertificateRejected(
                f"certificate chain does not validate: CA '{ca.subject.rfc4514_string()}' has an extended key usage "
                f"without clientAuth (it has: {have})",
                hint=f"{_describe(ca)}; a CA's extended key usage applies to every certificate below it (OpenSSL's "
                "handshake and Windows read it so; anyExtendedKeyUsage on a CA is not clientAuth to OpenSSL): reissue "
                "that CA without an extended key usage, or with clientAuth in it",
            )
        cert = ca


def _describe(cert: x509.Certificate) -> str:
    return printable(
        f"subject '{cert.subject.rfc4514_string()}', issuer '{cert.issuer.rfc4514_string()}', "
        f"serial 0x{cert.serial_number:x}"
    )


def as_utc(when: datetime) -> datetime:
    """`when` in UTC; ValueError for a naive time (the verifier's and the revocation stage's `at`)."""
    if when.tzinfo is None:
        raise ValueError("validation time must be timezone-aware")
    return when.astimezone(UTC)


# --- the verifier's extension profile --------------------------------------------------------------
# Validators raise to refuse; the verifier reports "Python extension validator failed: <message>".


def _ca_basic_constraints(_policy: Policy, _cert: x509.Certificate, value: x509.BasicConstraints) -> None:
    if not value.ca:
        raise ValueError("basicConstraints does not assert cA: not a CA certificate")


def _ca_key_usage(_policy: Policy, _cert: x509.Certificate, value: x509.KeyUsage | None) -> None:
    if value is not None and not value.key_cert_sign:
        raise ValueError("CA key usage lacks keyCertSign")


def _ca_extended_key_usage(_policy: Policy, _cert: x509.Certificate, value: x509.ExtendedKeyUsage | None) -> None:
    if value is not None and ExtendedKeyUsageOID.CLIENT_AUTH not in value:
        raise ValueError("CA extended key usage lacks clientAuth")


def _ee_extended_key_usage(_policy: Policy, _cert: x509.Certificate, value: x509.ExtendedKeyUsage) -> None:
    if ExtendedKeyUsageOID.CLIENT_AUTH not in value:
        raise ValueError("leaf lacks the clientAuth extended key usage")


def _ee_key_usage(_policy: Policy, _cert: x509.Certificate, value: x509.KeyUsage | None) -> None:
    if value is not None and (not value.digital_signature or value.key_cert_sign):
        raise ValueError("leaf key usage must assert digitalSignature and not keyCertSign")


_CA_POLICY = (
    ExtensionPolicy.webpki_defaults_ca()
    .require_present(x509.BasicConstraints, Criticality.AGNOSTIC, _ca_basic_constraints)
    .may_be_present(x509.KeyUsage, Criticality.AGNOSTIC, _ca_key_usage)
    .may_be_present(x509.AuthorityKeyIdentifier, Criticality.AGNOSTIC, None)
    .may_be_present(x509.SubjectKeyIdentifier, Criticality.AGNOSTIC, None)
)
# The gateway's own chains: a CA's extended key usage, when it has one, must include clientAuth, as OpenSSL's handshake
# requires (cryptography's default takes anyExtendedKeyUsage on a CA, which OpenSSL refuses: explain would then pass a
# chain the handshake ends). Chains of purpose "any" (a CRL signer's, PKITS) keep the default.
_CLIENT_CA_POLICY = _CA_POLICY.may_be_present(x509.ExtendedKeyUsage, Criticality.AGNOSTIC, _ca_extended_key_usage)
_EE_POLICY = (
    ExtensionPolicy.webpki_defaults_ee()
    .require_present(x509.ExtendedKeyUsage, Criticality.AGNOSTIC, _ee_extended_key_usage)
    .may_be_present(x509.KeyUsage, Criticality.AGNOSTIC, _ee_key_usage)
    .may_be_present(x509.SubjectAlternativeName, Criticality.AGNOSTIC, None)
    .may_be_present(x509.AuthorityKeyIdentifier, Criticality.AGNOSTIC, None)
    .may_be_present(x509.SubjectKeyIdentifier, Criticality.AGNOSTIC, None)
)

_ANY_EE_POLICY = (  # "any" purpose: whatever the leaf's usage, even a CA certificate (a CRL signer)
    ExtensionPolicy.webpki_defaults_ee()
    .may_be_present(x509.BasicConstraints, Criticality.AGNOSTIC, None)
    # a CA's own name constraints bind the certificates it issues, not its signature on a CRL; the web-PKI
    # end-entity profile prohibits them, which left every CRL of a name-constrained CA unused
    .may_be_present(x509.NameConstraints, Criticality.AGNOSTIC, None)
    .may_be_present(x509.ExtendedKeyUsage, Criticality.AGNOSTIC, None)
    .may_be_present(x509.KeyUsage, Criticality.AGNOSTIC, None)
    .may_be_present(x509.SubjectAlternativeName, Criticality.AGNOSTIC, None)
    .may_be_present(x509.AuthorityKeyIdentifier, Criticality.AGNOSTIC, None)
    .may_be_present(x509.SubjectKeyIdentifier, Criticality.AGNOSTIC, None)
)


def _verifier(trust: TrustList, at: datetime, purpose: Purpose = "client") -> ClientVerifier:
    return (
        PolicyBuilder()
        .store(trust.store)
        .time(at)
        .max_chain_depth(MAX_CHAIN_DEPTH)
        .extension_policies(
            ca_policy=_CLIENT_CA_POLICY if purpose == "client" else _CA_POLICY,
            ee_policy=_EE_POLICY if purpose == "client" else _ANY_EE_POLICY,
        )
        .build_client_verifier()
    )
