"""Names a client certificate carries: the UPN, the e-mail address, the common name.

Theory of operation: this stage runs after the certificate stage, so the certificate it reads is one
whose chain, validity and EKU were already verified; what it reads is what the issuing CA vouched for.
Microsoft's smartcard and device certificates name their user with a subjectAltName otherName of type
`1.3.6.1.4.1.311.20.2.3` (szOID_NT_PRINCIPAL_NAME) whose value is a UTF8String. `cryptography` hands
otherName values over as raw DER (it has no schema for them), so the UTF8String is decoded here with
pyasn1, strictly: a value that is not exactly one UTF8String is refused, not guessed at.

What it refuses (IdentityRejected): a malformed UPN value (one whose bytes are not UTF-8 too, or an empty
one: it is a UPN that names nobody, not an absent UPN that lets the next source speak), more than one
value for the source being read (several UPNs, several e-mail addresses, several CNs: which one would be
the user? software disagrees on first or last), a subjectAltName that cannot be parsed. Whether the one
value is a plain name for its source (no backslash, '@' only where the source has one, a configured
domain) is `proxy.identity.principal.map_certificate_name`'s to decide. An
absent UPN is not an error here: the functions return None and the caller decides (another identity
source, or a refusal): `certificate_name` reads the sources in the order `identity.source` lists
them, and the first name present wins, so `["san-upn", "san-email"]` never looks at the e-mail of a
certificate that has a UPN.

The lab PKI uses `upn_other_name` to write the same encoding it reads.
"""

from __future__ import annotations

import functools

from cryptography import x509
from cryptography.x509.oid import NameOID
from pyasn1.codec.der import decoder as der_decoder
from pyasn1.codec.der import encoder as der_encoder
from pyasn1.error import PyAsn1Error, PyAsn1UnicodeDecodeError
from pyasn1.type import char

from proxy.config import IdentitySource
from proxy.errors import IdentityRejected

UPN_OID = x509.ObjectIdentifier("1.3.6.1.4.1.311.20.2.3")


def upn_other_name(upn: str) -> x509.OtherName:
    """The subjectAltName entry that carries `upn`, encoded as Windows expects (a DER UTF8String)."""
    return x509.OtherName(UPN_OID, der_encoder.encode(char.UTF8String(upn)))


def upn_from_certificate(cert: x509.Certificate) -> str | None:
    """The UPN of the subjectAltName otherName, or None if the certificate has none."""
    san = _subject_alt_name(cert)
    others = san.get_values_for_type(x509.OtherName) if san else []
    values = [name.value for name in others if name.type_id == UPN_OID]
    if not values:
        return None
    if len(values) > 1:
        raise IdentityRejected(
            f"certificate carries {len(values)} UPNs; expected one",
            hint="ask the CA to issue one UPN per certificate",
        )
    upn = _decode_utf8_string(values[0])
    if not upn:
        raise IdentityRejected(
            "certificate UPN is empty", hint="the CA wrote a UPN otherName that names nobody; ask for a new certificate"
        )
    return upn


def email_from_certificate(cert: x509.Certificate) -> str | None:
    """The rfc822Name of the subjectAltName, or None; IdentityRejected if there are several (which would be the
    user? software disagrees: some read the first, some the last)."""
    san = _subject_alt_name(cert)
    emails = san.get_values_for_type(x509.RFC822Name) if san else []
    if len(emails) > 1:
        raise IdentityRejected(
            f"certificate carries {len(emails)} e-mail addresses; expected one",
            hint="with identity.source san-email the address names the user: ask the CA for one rfc822Name",
        )
    return emails[0] if emails else None


def common_name(cert: x509.Certificate) -> str | None:
    """The subject's common name, or None; IdentityRejected if there are several (most software reads the last,
    some the first: a CA that lets the requester add RDNs lets them pick) or its bytes are not a name."""
    values = [attr.value for attr in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if not values:
        return None
    if len(values) > 1:
        raise IdentityRejected(
            f"certificate subject carries {len(values)} common names; expected one",
            hint="with identity.source subject-cn the CN names the user: ask the CA for one CN in the subject",
        )
    value = values[0]
    if isinstance(value, str):
        return value
    try:  # cryptography gives bytes only for string types it does not decode itself
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise IdentityRejected(
            "certificate common name is not UTF-8", hint="the CA wrote bytes that are not a name"
        ) from None


SOURCE_NAMES: dict[IdentitySource, str] = {
    "san-upn": "user principal name (SubjectAltName otherName UPN)",
    "san-email": "e-mail address (SubjectAltName rfc822Name)",
    "subject-cn": "subject common name",
}


@functools.lru_cache(maxsize=10_000)
def certificate_name(cert: x509.Certificate, sources: tuple[IdentitySource, ...]) -> tuple[str, IdentitySource] | None:
    """The first name of `sources` (identity.source) that the certificate carries, and which source it was.

    Remembered per certificate (they hash by their DER encoding): a device sends the same one on every
    request, and decoding its names was a tenth of a request's CPU (bench/run.py). Refusals are not kept.
    """
    readers = {"san-upn": upn_from_certificate, "san-email": email_from_certificate, "subject-cn": common_name}
    for source in sources:
        name = readers[source](cert)
        if name:
            return name, source
    return None


def _subject_alt_name(cert: x509.Certificate) -> x509.SubjectAlternativeName | None:
    try:
        return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    except ValueError as exc:  # a duplicate or undecodable extension
        raise IdentityRejected("certificate subjectAltName cannot be parsed", hint=str(exc)) from exc


def _decode_utf8_string(der: bytes) -> str:
    try:
        value, rest = der_decoder.decode(der, asn1Spec=char.UTF8String())
    except PyAsn1UnicodeDecodeError:  # a UTF8String whose bytes are not UTF-8: no name can be read from it
        raise IdentityRejected("certificate UPN is not UTF-8", hint="the CA wrote bytes that are not a name") from None
    except PyAsn1Error as exc:
        raise IdentityRejected("certificate UPN is not a DER UTF8String", hint=str(exc)) from exc
    if rest:  # cryptography already refuses such values when parsing; kept so no byte goes unread
        raise IdentityRejected("certificate UPN has trailing bytes after its UTF8String")
    return str(value)
