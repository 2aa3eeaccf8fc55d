"""`altSecurityIdentities`: certificates an administrator bound to an account by hand.

Theory of operation. An account's multi-valued `altSecurityIdentities` attribute lists certificates that
belong to it. Microsoft documents six X.509 forms (KB5014754, "certificate mappings"), and says which are
strong, that is which the holder of some other certificate from the same CA cannot satisfy:

| kind (KB5014754)        | value                              | strong | what it names                            |
|-------------------------|------------------------------------|--------|------------------------------------------|
| X509IssuerSerialNumber  | `X509:<I>issuer<SR>serial`         | yes    | one certificate: its issuer and serial   |
| X509SKI                 | `X509:<SKI>hex`                    | yes    | the subject key identifier extension     |
| X509SHA1PublicKey       | `X509:<SHA1-PUKEY>hex`             | yes    | the certificate's SHA-1 hash (see below) |
| X509IssuerSubject       | `X509:<I>issuer<S>subject`         | no     | any certificate with that subject        |
| X509SubjectOnly         | `X509:<S>subject`                  | no     | the same, from any issuer                |
| X509RFC822              | `X509:<RFC822>user@example.com`    | no     | an e-mail address                        |

The details that trip people up, as Windows reads them:
- `<SR>` is the serial number's bytes in REVERSED order, in hex (CryptoAPI keeps serials little-endian):
  a certificate whose serial is `12:34:56` is written `<SR>563412`. CryptoAPI reverses the serial's DER
  content octets, so a serial whose high bit is set ends in the sign byte: `80:01` is `<SR>018000`; the
  value is compared as a number, so the entry matches with or without that trailing `00`.
- Issuer and subject names are written the way Windows prints them, most significant part first
  (`DC=com,DC=example,CN=Example CA`), the reverse of RFC 4514; some tools write RFC 4514 order. A name
  matches in either order, attribute values compared case-insensitively. Windows (CertNameToStr) quotes a
  value holding `,` `+` `=` `"` and the like (`O="Corp, Inc."`, a quote inside doubled) and joins the parts of
  a multi-valued RDN with ` + `; RFC 4514 escapes with `\\` and joins with `+`. Both are read.
- `<SHA1-PUKEY>`: despite the name, Windows compares the SHA-1 hash of the whole certificate (its
  "thumbprint"). The SHA-1 hash of the certificate's public key (SubjectPublicKeyInfo) is accepted too:
  it binds the entry to the key just as firmly, and tools differ on which they write.
- Hex is compared case-insensitively; spaces and colons some tools put between bytes are ignored.

Entries of other kinds (`Kerberos:...`, `X509:<I>..<S>..<SR>..` which Windows never matches) are parsed as
`unknown` and never count. Pure: no I/O.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

Kind = Literal[
    "X509IssuerSerialNumber",
    "X509SKI",
    "X509SHA1PublicKey",
    "X509IssuerSubject",
    "X509SubjectOnly",
    "X509RFC822",
    "unknown",
]
STRONG_KINDS: frozenset[Kind] = frozenset({"X509IssuerSerialNumber", "X509SKI", "X509SHA1PublicKey"})

_HEX = re.compile(r"[0-9A-Fa-f]+")
_ATTRIBUTE = re.compile(r" *((?:OID\.)?[0-9]+(?:\.[0-9]+)+|[A-Za-z][A-Za-z0-9-]*) *= *", re.IGNORECASE)
# Windows writes a few attribute types by names RFC 4514 does not know.
_WINDOWS_ATTRIBUTES = {
    "E": NameOID.EMAIL_ADDRESS,
    "S": NameOID.STATE_OR_PROVINCE_NAME,
    "EMAIL": NameOID.EMAIL_ADDRESS,
    "SERIALNUMBER": NameOID.SERIAL_NUMBER,
    "G": NameOID.GIVEN_NAME,
    "SN": NameOID.SURNAME,
}


@dataclass(frozen=True)
class AltSecurityIdentity:
    """One parsed `altSecurityIdentities` value."""

    kind: Kind
    raw: str
    issuer: str | None = None
    subject: str | None = None
    value: str | None = None  # hex (serial as written, SKI, SHA-1) or the RFC822 address

    @property
    def strong(self) -> bool:
        return self.kind in STRONG_KINDS


def parse(raw: str) -> AltSecurityIdentity:
    """One value to its kind and parts. Malformed strong-looking entries become `unknown` (they never match)."""
    if raw[:5].upper() != "X509:":
        return AltSecurityIdentity("unknown", raw)
    body = raw[5:]
    upper = body.upper()
    if upper.startswith("<SKI>"):
        return _hex_entry("X509SKI", raw, body[5:])
    if upper.startswith("<SHA1-PUKEY>"):
        return _hex_entry("X509SHA1PublicKey", raw, body[12:])
    if upper.startswith("<RFC822>"):
        return AltSecurityIdentity("X509RFC822", raw, value=body[8:])
    if upper.startswith("<S>"):
        return AltSecurityIdentity("X509SubjectOnly", raw, subject=body[3:])
    if upper.startswith("<I>"):
        rest = body[3:]
        serial_at, subject_at = rest.upper().find("<SR>"), rest.upper().find("<S>")
        if serial_at >= 0 and subject_at < 0:
            entry = _hex_entry("X509IssuerSerialNumber", raw, rest[serial_at + 4 :])
            return AltSecurityIdentity(entry.kind, raw, issuer=rest[:serial_at], value=entry.value)
        if subject_at >= 0 and serial_at < 0:
            return AltSecurityIdentity(
                "X509IssuerSubject", raw, issuer=rest[:subject_at], subject=rest[subject_at + 3 :]
            )
    return AltSecurityIdentity("unknown", raw)


def _hex_entry(kind: Kind, raw: str, text: str) -> AltSecurityIdentity:
    cleaned = re.sub(r"[\s:]", "", text)
    if not _HEX.fullmatch(cleaned) or len(cleaned) % 2:
        return AltSecurityIdentity("unknown", raw)
    return AltSecurityIdentity(kind, raw, value=cleaned.lower())


def reversed_serial(cert: x509.Certificate) -> str:
    """The certificate's serial as `<SR>` writes it: the DER content octets of the serial, reversed, in hex."""
    n = cert.serial_number
    octets = n.to_bytes(n.bit_length() // 8 + 1, "big", signed=True) if n else b"\x00"
    return octets[::-1].hex()


def _serial_value(reversed_hex: str) -> int:
    """The serial number an `<SR>` value stands for (with or without the DER sign byte, which is 00)."""
    return int.from_bytes(bytes.fromhex(reversed_hex)[::-1], "big")


def sha1_thumbprint(cert: x509.Certificate) -> str:
    """The SHA-1 hash of the certificate (what Windows calls its thumbprint), in hex."""
    return hashlib.sha1(cert.public_bytes(serialization.Encoding.DER), usedforsecurity=False).hexdigest()


def sha1_public_key(cert: x509.Certificate) -> str:
    """The SHA-1 hash of the certificate's SubjectPublicKeyInfo, in hex."""
    spki = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha1(spki, usedforsecurity=False).hexdigest()


def subject_key_identifier(cert: x509.Certificate) -> str | None:
    try:
        return cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest.hex()
    except x509.ExtensionNotFound:
        return None


def _rdns(text: str) -> tuple[tuple[tuple[str, str], ...], ...] | None:
    """A distinguished name as comparable RDNs (OID, value case-folded), or None when it does not parse."""
    rfc4514 = _as_rfc4514(text)
    if rfc4514 is None:
        return None
    try:
        name = x509.Name.from_rfc4514_string(rfc4514, attr_name_overrides=_WINDOWS_ATTRIBUTES)
    except ValueError:
        return None
    return _name_rdns(name)


def _as_rfc4514(text: str) -> str | None:
    """A name as Windows writes it (CertNameToStr, CERT_X500_NAME_STR) in the RFC 4514 syntax cryptography
    reads; None when it is neither. Windows separates RDNs with `, ` (`;` with another flag) and the parts of a
    multi-valued RDN with ` + `, and quotes a value holding `,` `+` `=` `"` `<` `>` `#` `;` or leading or
    trailing spaces (`O="Corp, Inc."`, a `"` inside written `""`); RFC 4514 escapes them with `\\` instead,
    which is read as written. Attribute types in any case (`cn=`), or as a dotted OID (`OID.2.5.4.3=`)."""
    rdns: list[list[str]] = [[]]
    at, end = 0, len(text)
    while True:
        found = _ATTRIBUTE.match(text, at)
        if found is None:
            return None
        kind = found.group(1).upper().removeprefix("OID.")
        at = found.end()
        quoted = text.startswith('"', at)
        value, at = _quoted(text, at) if quoted else _unquoted(text, at)
        if value is None:
            return None
        rdns[-1].append(f"{kind}={_escape(value) if quoted else value}")
        at = _skip_spaces(text, at)
        if at == end:
            return ",".join("+".join(rdn) for rdn in rdns)
        if text[at] == "+":
            at += 1
        elif text[at] in ",;":
            rdns.append([])
            at += 1
        else:
            return None


def _quoted(text: str, at: int) -> tuple[str | None, int]:
    """The value of a quoted string starting at `at` (`""` and `\\"` are a quote), and where it ends."""
    value: list[str] = []
    at += 1
    while at < len(text):
        char = text[at]
        if char == '"' and text.startswith('""', at):
            value.append('"')
            at += 2
        elif char == '"':
            return "".join(value), at + 1
        elif char == "\\" and at + 1 < len(text):
            value.append(text[at + 1])
            at += 2
        else:
            value.append(char)
            at += 1
    return None, at  # no closing quote


def _unquoted(text: str, at: int) -> tuple[str | None, int]:
    """An unquoted value from `at` up to the next separator not escaped, as written (RFC 4514 escapes kept),
    without the spaces around it; and where it ends."""
    start = at
    while at < len(text) and text[at] not in ",;+":
        if text[at] == "\\":
            at += 1
            if at == len(text):
                return None, at
        at += 1
    value = text[start:at].lstrip(" ")
    while value.endswith(" ") and not value.endswith("\\ "):
        value = value[:-1]
    return value, at


def _skip_spaces(text: str, at: int) -> int:
    while at < len(text) and text[at] == " ":
        at += 1
    return at


def _escape(value: str) -> str:
    """A value in RFC 4514's escaped form."""
    escaped = re.sub(r'([\\"+,;<>=])', r"\\\1", value).replace("\0", "\\00")
    if escaped.startswith((" ", "#")):
        escaped = "\\" + escaped
    if escaped.endswith(" "):  # re.sub escapes no space, so the last one is unescaped
        escaped = escaped[:-1] + "\\ "
    return escaped


def _name_rdns(name: x509.Name) -> tuple[tuple[tuple[str, str], ...], ...]:
    return tuple(
        tuple(sorted((a.oid.dotted_string, str(a.value).strip().casefold()) for a in rdn)) for rdn in name.rdns
    )


def same_name(written: str, name: x509.Name) -> bool:
    """Whether a name as written in an entry is `name`, in Windows' order or in RFC 4514 order."""
    rdns = _rdns(written)
    if not rdns:
        return False
    actual = _name_rdns(name)
    return rdns in (actual, actual[::-1])


def matches(entry: AltSecurityIdentity, cert: x509.Certificate) -> bool:
    """Whether a STRONG entry names this certificate. Weak and unknown entries never match here."""
    if entry.kind == "X509IssuerSerialNumber":
        return _serial_value(entry.value or "") == cert.serial_number and same_name(entry.issuer or "", cert.issuer)
    if entry.kind == "X509SKI":
        return entry.value == subject_key_identifier(cert)
    if entry.kind == "X509SHA1PublicKey":
        return entry.value in (sha1_thumbprint(cert), sha1_public_key(cert))
    return False


def serial_slip(entry: AltSecurityIdentity, cert: x509.Certificate) -> tuple[str, str] | None:
    """How an `<I>..<SR>..` entry that does not name `cert` nearly does, as administrators slip: (the slip in a few
    words, the same for the administrator), or None. The serial written in the order openssl, certutil and the
    certificate dialog print it, where `<SR>` takes its bytes reversed; or this serial under another issuer (the root,
    or another CA's name, where the entry must name the CA that signed the certificate)."""
    if entry.kind != "X509IssuerSerialNumber" or not entry.value:
        return None
    printed = int(entry.value, 16) == cert.serial_number
    if not printed and _serial_value(entry.value) != cert.serial_number:
        return None
    issuer = ",".join(rdn.rfc4514_string() for rdn in cert.issuer.rdns)
    slips = []
    if printed:
        slips.append(
            f"its serial {entry.value} is this certificate's in the order openssl and certutil print it, "
            "while <SR> takes the serial's bytes reversed (as Windows writes it)"
        )
    if not same_name(entry.issuer or "", cert.issuer):
        slips.append(
            f"its <I> {entry.issuer!r} is not the certificate's issuer {issuer} (the CA that signed it, not its root)"
        )
    if not slips:
        return None
    short = "an entry has this serial in printed order" if printed else "an entry has this serial under another issuer"
    return short, "; ".join(slips)


def weakly_matches(entry: AltSecurityIdentity, cert: x509.Certificate) -> bool:
    """Whether a WEAK entry would name this certificate (reported, never admitted on)."""
    if entry.kind == "X509SubjectOnly":
        return same_name(entry.subject or "", cert.subject)
    if entry.kind == "X509IssuerSubject":
        return same_name(entry.issuer or "", cert.issuer) and same_name(entry.subject or "", cert.subject)
    if entry.kind == "X509RFC822":
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except (x509.ExtensionNotFound, ValueError):
            return False
        return (entry.value or "").casefold() in (e.casefold() for e in san.get_values_for_type(x509.RFC822Name))
    return False


def issuer_serial_entry(cert: x509.Certificate) -> str:
    """The strong entry an administrator writes for this certificate (the fix text and the lab use it)."""
    issuer = ",".join(rdn.rfc4514_string() for rdn in cert.issuer.rdns)  # most significant first, as Windows
    return f"X509:<I>{issuer}<SR>{reversed_serial(cert)}"
