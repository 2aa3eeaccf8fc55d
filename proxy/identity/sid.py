"""Security identifiers: the directory's binary `objectSid`, its string form, and the certificate's SID extension.

Theory of operation. Active Directory names an account for good by its SID, `S-1-5-21-<domain>-<RID>`. The
directory stores it as `objectSid` in binary ([MS-DTYP] 2.4.2.2): a revision byte (1), a count of
sub-authorities (at most 15), a 48-bit identifier authority in big-endian order, then each sub-authority as a
32-bit little-endian integer. Its string form ([MS-DTYP] 2.4.2.1) is `S-1-<authority>-<sub>-<sub>...`, the
authority in decimal below 2^32 and in hexadecimal (`0x...`) above.

Since the May 2022 update (KB5014754) AD CS writes the SID of the account a certificate was issued for into
the certificate, in the extension `szOID_NTDS_CA_SECURITY_EXT` (1.3.6.1.4.1.311.25.2, [MS-WCCE] 2.2.2.7.7.4).
Its value has the shape of a GeneralNames holding one otherName whose type is `szOID_NTDS_OBJECTSID`
(1.3.6.1.4.1.311.25.2.1) and whose value is an OCTET STRING carrying the SID's string form in ASCII:

    SEQUENCE { [0] { OID 1.3.6.1.4.1.311.25.2.1, [0] EXPLICIT OCTET STRING "S-1-5-21-..." } }

Since 2023 Windows also reads the SID from a subjectAltName URL, `tag:microsoft.com,2022-09-14:sid:<SID>`
(a tag URI, RFC 4151; the prefix is matched without regard to case, as Windows matches it), for CAs that cannot
write the extension. `read_certificate_sid` reads both. One URL of that kind at most, holding exactly one SID
string; when the extension and the URL are both there they must name the same SID (`SidConflict`
otherwise: a certificate that names two accounts names none).

What it refuses (`MalformedSid`, a `ValueError` naming the form, extension or URL, which the mapping stage
turns into a refusal that names it): anything but exactly that shape,
a value that is not a well-formed SID string, two SID URLs, and binary SIDs with a wrong length, revision or
count. A certificate with two SID extensions never reaches this module (cryptography refuses duplicate
extensions). The SID decides which account a certificate belongs to, so nothing is guessed at.

Why not `bonsai.active_directory.SID`: it ignores trailing bytes and prints every revision as 1; a value that
decides admission has to be read strictly. The codec is a few lines.
"""

from __future__ import annotations

import base64
import re
import struct
from dataclasses import dataclass
from typing import Literal

from cryptography import x509
from pyasn1.codec.der import decoder as der_decoder
from pyasn1.codec.der import encoder as der_encoder
from pyasn1.error import PyAsn1Error
from pyasn1.type import univ

SID_EXTENSION_OID = x509.ObjectIdentifier("1.3.6.1.4.1.311.25.2")  # szOID_NTDS_CA_SECURITY_EXT
SID_URL_PREFIX = "tag:microsoft.com,2022-09-14:sid:"  # the subjectAltName URL form (KB5014754, 2023)
OBJECTSID_OID = "1.3.6.1.4.1.311.25.2.1"  # szOID_NTDS_OBJECTSID, the otherName type inside it

_MAX_SUB_AUTHORITIES = 15
_SID_STRING = re.compile(r"[Ss]-1-(0[xX][0-9A-Fa-f]{1,12}|[0-9]{1,15})((?:-[0-9]{1,10}){1,15})")


@dataclass(frozen=True, order=True)
class Sid:
    """A security identifier: its identifier authority and sub-authorities (revision 1, the only one)."""

    authority: int
    sub_authorities: tuple[int, ...]

    def __post_init__(self) -> None:
        if not 0 <= self.authority < 2**48:
            raise ValueError(f"SID identifier authority out of range: {self.authority}")
        if not 1 <= len(self.sub_authorities) <= _MAX_SUB_AUTHORITIES:
            raise ValueError(f"a SID has 1 to 15 sub-authorities, not {len(self.sub_authorities)}")
        if any(not 0 <= s < 2**32 for s in self.sub_authorities):
            raise ValueError("SID sub-authority out of range")

    def __str__(self) -> str:
        authority = str(self.authority) if self.authority < 2**32 else f"0x{self.authority:012X}"
        return "-".join(["S", "1", authority, *map(str, self.sub_authorities)])

    @property
    def rid(self) -> int:
        """The relative identifier: the account's number within its domain (the last sub-authority)."""
        return self.sub_authorities[-1]

    @classmethod
    def parse(cls, text: str) -> Sid:
        """`S-1-5-21-...` (or `s-1-...`, as ConvertStringSidToSid also takes) to a Sid; anything else (other
        revisions, spaces, empty parts) is a ValueError."""
        match = _SID_STRING.fullmatch(text)
        if match is None:
            raise ValueError(f"not a SID string: {text[:80]!r}{_base64_note(text)}")
        authority, subs = match.groups()
        return cls(int(authority, 0), tuple(int(s) for s in subs[1:].split("-")))

    @classmethod
    def from_bytes(cls, data: bytes) -> Sid:
        """The binary `objectSid` ([MS-DTYP] 2.4.2.2) to a Sid; the length must be exactly right."""
        if len(data) < 8:
            raise ValueError(f"a binary SID has at least 8 bytes, not {len(data)}")
        revision, count = data[0], data[1]
        if revision != 1:
            raise ValueError(f"SID revision {revision}; only revision 1 exists")
        if len(data) != 8 + 4 * count:
            raise ValueError(f"a binary SID with {count} sub-authorities has {8 + 4 * count} bytes, not {len(data)}")
        return cls(int.from_bytes(data[2:8], "big"), struct.unpack(f"<{count}I", data[8:]))

    def to_bytes(self) -> bytes:
        """The binary form the directory stores as `objectSid`."""
        head = bytes([1, len(self.sub_authorities)]) + self.authority.to_bytes(6, "big")
        return head + struct.pack(f"<{len(self.sub_authorities)}I", *self.sub_authorities)


def _base64_note(text: str) -> str:
    """What a text that is no SID string is, when it is the base64 of a binary SID: ldapsearch prints `objectSid::`
    so, and an administrator may copy it into a CA's template. Said, never accepted."""
    try:
        sid = Sid.from_bytes(base64.b64decode(text, validate=True))
    except ValueError:  # binascii.Error is one
        return ""
    return f" (it is the base64 of the binary SID {sid}, as ldapsearch prints objectSid, not its string form)"


def sid_extension_value(sid: Sid) -> bytes:
    """The DER value of the SID extension for `sid`, as AD CS writes it (the lab PKI uses this)."""
    from pyasn1_modules import rfc5280  # here, not at the top: 50 ms of a start's CPU, for SID extensions only

    names = rfc5280.GeneralNames()
    name = names.componentType.clone()
    other = name["otherName"]
    other["type-id"] = univ.ObjectIdentifier(OBJECTSID_OID)
    other["value"] = der_encoder.encode(univ.OctetString(str(sid).encode("ascii")))
    names.append(name)
    encoded: bytes = der_encoder.encode(names)
    return encoded


def sid_extension(sid: Sid) -> x509.UnrecognizedExtension:
    """The extension itself, for `CertificateBuilder.add_extension(..., critical=False)`."""
    return x509.UnrecognizedExtension(SID_EXTENSION_OID, sid_extension_value(sid))


def sid_from_extension_value(der: bytes) -> Sid:
    """The SID an extension value carries; ValueError for any other shape (see the module docstring)."""
    from pyasn1_modules import rfc5280  # here, not at the top: 50 ms of a start's CPU, for SID extensions only

    try:
        names, rest = der_decoder.decode(der, asn1Spec=rfc5280.GeneralNames())
    except PyAsn1Error as e:
        raise ValueError(f"the SID extension is not a GeneralNames: {e}") from None
    if rest:
        raise ValueError("the SID extension has trailing bytes")
    if len(names) != 1 or names[0].getName() != "otherName":
        raise ValueError("the SID extension must hold exactly one otherName")
    other = names[0]["otherName"]
    if str(other["type-id"]) != OBJECTSID_OID:
        raise ValueError(f"the SID extension's otherName has type {other['type-id']}, not {OBJECTSID_OID}")
    try:
        value, rest = der_decoder.decode(bytes(other["value"]), asn1Spec=univ.OctetString())
    except PyAsn1Error as e:
        raise ValueError(f"the SID extension's value is not an OCTET STRING: {e}") from None
    if rest:
        raise ValueError("the SID extension's value has trailing bytes")
    try:
        text = bytes(value).decode("ascii")
    except UnicodeDecodeError:
        raise ValueError("the SID extension's value is not ASCII") from None
    return Sid.parse(text)


class SidConflict(ValueError):
    """The SID extension and the subjectAltName URL name two different SIDs."""


class MalformedSid(ValueError):
    """The certificate's SID cannot be read; `form` says which of its two forms was malformed."""

    def __init__(self, message: str, form: Literal["extension", "url"]) -> None:
        super().__init__(message)
        self.form = form


SidSource = Literal["extension", "url", "both"]


@dataclass(frozen=True)
class CertificateSid:
    """Evidence: the SID a certificate carries, and where it was written (the extension, the URL, or both)."""

    sid: Sid
    source: SidSource


def certificate_sid(cert: x509.Certificate) -> Sid | None:
    """The SID the certificate carries (extension or URL); None when it has none; ValueError when malformed."""
    found = read_certificate_sid(cert)
    return found.sid if found is not None else None


def read_certificate_sid(cert: x509.Certificate) -> CertificateSid | None:
    """The SID of the SID extension and of the subjectAltName SID URL, which must agree; None when neither is
    there; MalformedSid (a ValueError) naming the form that is malformed, SidConflict when they name different
    SIDs."""
    extension, url = _extension_sid(cert), _url_sid(cert)
    if extension is not None and url is not None and extension != url:
        raise SidConflict(f"the SID extension names {extension} and the subjectAltName URL names {url}")
    if extension is not None:
        return CertificateSid(extension, "both" if url is not None else "extension")
    return CertificateSid(url, "url") if url is not None else None


def _extension_sid(cert: x509.Certificate) -> Sid | None:
    try:
        ext = cert.extensions.get_extension_for_oid(SID_EXTENSION_OID)
    except x509.ExtensionNotFound:
        return None
    value = ext.value
    assert isinstance(value, x509.UnrecognizedExtension)  # cryptography has no class of its own for it
    try:
        return sid_from_extension_value(value.value)
    except ValueError as e:
        raise MalformedSid(str(e), "extension") from None


def _url_sid(cert: x509.Certificate) -> Sid | None:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    except ValueError as e:  # a subjectAltName that does not parse hides whatever SID URL it holds
        raise MalformedSid(f"the subjectAltName cannot be parsed: {e}", "url") from None
    urls = [url for url in san.get_values_for_type(x509.UniformResourceIdentifier) if _is_sid_url(url)]
    if len(urls) > 1:
        raise MalformedSid(f"the subjectAltName carries {len(urls)} SID URLs; expected one", "url")
    try:
        return Sid.parse(urls[0][len(SID_URL_PREFIX) :]) if urls else None
    except ValueError as e:
        raise MalformedSid(f"the subjectAltName SID URL: {e}", "url") from None


def _is_sid_url(url: str) -> bool:
    return url[: len(SID_URL_PREFIX)].lower() == SID_URL_PREFIX
