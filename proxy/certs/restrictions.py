"""Certificate restrictions: which verified certificates the gateway admits at all.

Theory of operation. Forefront TMG let an administrator narrow "a certificate from a trusted CA" down
to "a certificate from *this* issuer, for *these* subjects, with *this* usage or template". Here that
is `[[client_certificates.restrictions]]`: with no rules every verified certificate is admitted; with
rules a certificate must match at least one of them, and a rule matches when every criterion it sets
holds:

- `issuer`: the certificate's issuer, or the subject of any CA in its verified chain, equals the RFC
  4514 name given (compared case-insensitively), so a rule can name an issuing CA or a root. Both as the request log
  shows the issuer in `cert_issuer`: invisible characters as escapes (`proxy.printable`), so that an issuer copied
  from the log matches, its JSON string copied whole, quotes included, being the TOML string for it; an issuer holding
  an invisible character itself is refused by the configuration, as a subject glob is;
- `subject`: a shell glob (`*`, `?`, `[...]`) over the subject in RFC 4514 form as the request log shows it
  in `cert_subject` (most specific attribute first: `CN=alice,OU=Devices,O=Corp`), invisible characters as the
  escapes the log writes (`proxy.printable`: `CN=alice\u202e` is the text backslash, u, 2, 0, 2, e), so that a
  subject copied from the log matches; its JSON string copied whole, quotes included, is the TOML string for it.
  `?` matches one character of that text (an escape is several), and a glob holding an invisible character itself
  is refused by the configuration (it would match nothing);
- `eku`: every extended key usage OID listed is in the certificate;
- `extension`: an extension with that OID is present and, when `value` is given, one reading of its
  DER value equals it (case-insensitively): its hex, the text of a string (Microsoft's v1 template
  name, `1.3.6.1.4.1.311.20.2`, a BMPString such as "User"), or the OID of an OID or of a SEQUENCE
  that begins with one (the v2 template, `1.3.6.1.4.1.311.21.7`, names its template by OID).

What it trusts: the chain stage ran first, so every name read here was vouched for by a configured CA
(a rogue CA copying the issuer's name never gets this far). What it refuses: a certificate matching no
rule, with 403 naming the rule set and its rules. Pure: no I/O, no time. This module and
`proxy.identity.upn` are the only readers of raw ASN.1.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase

from cryptography import x509
from pyasn1.codec.der import decoder as der_decoder
from pyasn1.error import PyAsn1Error
from pyasn1.type import char, univ

from proxy.certs.chain import VerifiedCertificate
from proxy.config import Restriction
from proxy.errors import CertificateRejected
from proxy.printable import printable

RULE_SET = "client_certificates.restrictions"


@dataclass(frozen=True)
class Admission:
    """Evidence of the restriction check: the rule that admitted the certificate (None: there are no rules)."""

    rule: str | None


def admit(verified: VerifiedCertificate, rules: Sequence[Restriction]) -> Admission:
    """The first rule the certificate matches, or CertificateRejected naming the rule set."""
    if not rules:
        return Admission(rule=None)
    try:
        for rule in rules:
            if matches(verified, rule):
                return Admission(rule=rule.name)
    except ValueError as e:  # an extension cryptography cannot parse
        raise CertificateRejected("the certificate's extensions cannot be read", hint=str(e)) from None
    names = ", ".join(rule.name for rule in rules)
    raise CertificateRejected(
        f"this certificate is not admitted by {RULE_SET} (rules: {names})",
        hint=f"{verified.subject} issued by {verified.issuer} matches none of the rules of {RULE_SET}: {names}",
    )


def matches(verified: VerifiedCertificate, rule: Restriction) -> bool:
    """Whether the certificate meets every criterion `rule` sets."""
    leaf = verified.leaf
    if rule.issuer is not None:  # the names as logged: invisible characters as escapes (module docstring)
        issuers = {verified.issuer, *(printable(ca.subject.rfc4514_string()) for ca in verified.chain[1:])}
        if rule.issuer.casefold() not in {name.casefold() for name in issuers}:
            return False
    if rule.subject is not None and not fnmatchcase(verified.subject.casefold(), rule.subject.casefold()):
        return False  # the subject as logged: invisible characters as escapes (module docstring)
    if rule.eku and not set(rule.eku) <= _ekus(leaf):
        return False
    if rule.extension_oid is not None:
        try:
            extension = leaf.extensions.get_extension_for_oid(x509.ObjectIdentifier(rule.extension_oid))
        except x509.ExtensionNotFound:
            return False
        if rule.extension_value is not None:
            readings = extension_readings(extension.value.public_bytes())
            return rule.extension_value.casefold() in {text.casefold() for text in readings}
    return True


def extension_readings(der: bytes) -> set[str]:
    """The ways an extension's DER value can be named in a rule: hex, a string's text, a (leading) OID."""
    readings = {der.hex()}
    try:
        value, rest = der_decoder.decode(der)
    except PyAsn1Error:
        return readings
    if rest:
        return readings
    if isinstance(value, univ.Sequence | univ.SequenceOf) and len(value) > 0:
        value = value[0]
    if isinstance(value, char.AbstractCharacterString | univ.ObjectIdentifier):
        readings.add(str(value))
    return readings


def _ekus(leaf: x509.Certificate) -> set[str]:
    try:
        usages = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return set()
    return {oid.dotted_string for oid in usages}
