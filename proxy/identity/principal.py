"""From a UPN to the Kerberos principal the gateway will impersonate.

Theory of operation: a UPN `local@suffix` becomes the principal `local@REALM`. The local part is kept
exactly as the certificate has it (the KDC decides whether it knows that user); the realm is the
administrator's mapping for the suffix (`realm_map`, matched without regard to ASCII case), else the
suffix in upper case, which is the Active Directory convention for a domain's own UPNs. Case is mapped
for ASCII letters only: Unicode's mapping makes `lab.te` + U+017F (long s) + `t` into `LAB.TEST`, so a
certificate for a look-alike suffix would be served as a user of the real realm. A suffix with
non-ASCII letters is therefore refused unless `realm_map` names it. Names without a domain
(a certificate's common name, `alice` or `LAB\\alice` in Basic credentials) go through `map_name` into
the configured default realm, or the realm a down-level domain names (`domain_realm`: a `realm_map` key, a
realm's own name, the default realm's NetBIOS name); another domain is refused. A name read from a
certificate first passes `map_certificate_name`: one plain name for its source (no `DOMAIN\\` in a CN, an
'@' in a UPN or address, an address's domain that the configuration names).

What it trusts: the UPN was read from a certificate that the certificate stage verified, so the CA
vouched for it. What it still refuses (IdentityRejected): anything that would change what the
resulting name means to Kerberos. A principal name's components are separated by '/', '\\' escapes,
'@' starts the realm: a crafted UPN such as `krbtgt/LAB.TEST@lab.test` or `HTTP/cas.lab.test@lab.test`
must never become a service principal, so those characters, whitespace, control and format
characters (including zero-width ones), a second '@' and empty parts are refused outright rather than
escaped or stripped.
"""

from __future__ import annotations

import string
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from proxy.errors import IdentityRejected
from proxy.printable import printable

if TYPE_CHECKING:  # proxy.config folds realm_map's keys with ascii_lower: no import back at run time
    from proxy.config import Identity

_FORBIDDEN = {"/": "'/'", "\\": "'\\'"}


@dataclass(frozen=True)
class UserPrincipal:
    """Evidence of the identity stage: who the certificate names, and as which Kerberos principal."""

    upn: str  # as read from the certificate
    principal: str  # e.g. "alice@LAB.TEST"
    realm: str  # e.g. "LAB.TEST"
    source: str  # which name in the certificate it came from, e.g. "san-upn", or "basic" for a login
    enterprise: str | None = None  # identity.enterprise_names: the UPN, sent to the KDC as an NT-ENTERPRISE name
    account: str | None = None  # strong mapping: the sAMAccountName of the account the certificate was proven to be
    account_sid: str | None = None  # and its objectSid, as the mapping stage read it (the KDC's must be the same)


def map_upn(upn: str, *, realm_map: Mapping[str, str], source: str = "san-upn") -> UserPrincipal:
    """Map `local@suffix` to `local@REALM`, refusing any UPN that is not a plain user name."""
    problem = _problem(upn)
    if problem:
        raise IdentityRejected(f"UPN {upn!r} is not usable: {problem}", hint=f"identity source {source}")
    local, suffix = upn.split("@")
    realms = {ascii_lower(key): value for key, value in realm_map.items()}
    realm = realms.get(ascii_lower(suffix))
    if realm is None:
        if not suffix.isascii():
            raise IdentityRejected(
                f"UPN {upn!r} is not usable: its domain part is not ASCII and no realm is mapped for it",
                hint=f"identity source {source}; if {suffix!r} is a real UPN suffix, name it in identity.realm_map",
            )
        realm = ascii_upper(suffix)
    return UserPrincipal(upn=upn, principal=f"{local}@{realm}", realm=realm, source=source)


def map_name(name: str, identity: Identity, *, source: str) -> UserPrincipal:
    """Any user name the gateway accepts, to a principal, as configured in `identity`.

    `user@suffix` is a UPN (`map_upn`); `DOMAIN\\user` (the down-level logon name devices send in Basic
    credentials) belongs to the realm its domain names (`domain_realm`; any other domain is refused), a bare
    `user` (a certificate's common name) to `identity.default_realm`. With `enterprise_names`, a UPN is also
    kept as the NT-ENTERPRISE name to send, which lets Active Directory find users by UPN suffixes that are
    not its realm.
    """
    domain, backslash, user = name.rpartition("\\")
    if "@" in name:
        mapped = map_upn(name, realm_map=identity.realm_map, source=source)
        return replace(mapped, enterprise=name) if identity.enterprise_names else mapped
    realm = identity.default_realm
    if backslash and domain:
        realm = domain_realm(domain, identity, down_level=True) or ""
        if not realm:
            raise IdentityRejected(
                f"user name {name!r} is not usable: the domain {domain!r} is not one this gateway serves",
                hint=f"identity source {source}; {configured_domains(identity)}",
            )
    if (backslash and not domain) or not realm:
        raise IdentityRejected(f"user name {name!r} is not usable: no realm for it", hint=f"identity source {source}")
    mapped = map_upn(f"{user}@{realm}", realm_map={}, source=source)
    return replace(mapped, upn=name, realm=realm, principal=f"{user}@{realm}")


def domain_realm(domain: str, identity: Identity, *, down_level: bool) -> str | None:
    """The configured realm a user name's domain names, or None: a key of `identity.realm_map` (a UPN suffix or a
    down-level domain), a configured realm by its own name (the default realm, a `realm_map` realm), and, for
    the DOMAIN of `DOMAIN\\user` (`down_level`), the default realm's NetBIOS name: its first label, the name AD
    gives a domain unless told otherwise (another one belongs in `realm_map`). ASCII case is ignored."""
    key = ascii_lower(domain)
    if key in identity.realm_map:
        return identity.realm_map[key]
    realms = [identity.default_realm, *identity.realm_map.values()]
    named = next((realm for realm in realms if realm and ascii_lower(realm) == key), None)
    if named is None and down_level and identity.default_realm:
        netbios = identity.default_realm.partition(".")[0]
        named = identity.default_realm if key == ascii_lower(netbios) else None
    return named


def shown_name(name: str, identity: Identity | None = None) -> str:
    """How a user name nobody has vouched for (a Basic name the KDC did not know, or refused before it was asked) is
    shown in a log line, a trace or a fix: its local part as its first character and its length (`W…[11]`), its
    domain as typed where the gateway knows it (`LAB\\b…[3]`, `b…[3]@lab.test`: `domain_realm` finds it in
    `identity`), else shortened the same way (`P@ssw0rd`, a password typed as a name: `P…[1]@s…[6]`). A user who
    typed the password into the name field ("Winter2026!") leaves no password in the log, and an operator still
    matches a help-desk call ("bob, three letters"). Without `identity`, the name is a principal whose realm the
    gateway chose (`alice@LAB.TEST`): its realm is shown. Invisible characters are escapes (`proxy.printable`): the
    name is anyone's to write, and its first character was shown as sent (U+202E, ESC). Pure."""
    domain, backslash, local = name.rpartition("\\")
    if not backslash:
        local, at, domain = name.rpartition("@") if "@" in name else (name, "", "")
        shown = _first_and_length(local) + (f"@{_shown_domain(domain, identity, down_level=False)}" if at else "")
    else:
        shown = f"{_shown_domain(domain, identity, down_level=True)}\\{_first_and_length(local)}"
    return printable(shown)


def _first_and_length(text: str) -> str:
    return f"{text[:1]}…[{len(text)}]"


def _shown_domain(domain: str, identity: Identity | None, *, down_level: bool) -> str:
    """`domain` as typed if the gateway knows it (or was given no `identity` to ask), else its first character and
    length."""
    if identity is None or domain_realm(domain, identity, down_level=down_level) is not None:
        return domain
    return _first_and_length(domain)


def configured_domains(identity: Identity) -> str:
    """The domains `domain_realm` knows, for a log line that says what would have been accepted."""
    netbios = identity.default_realm.partition(".")[0]
    names = sorted({*identity.realm_map, *(ascii_lower(realm) for realm in identity.realm_map.values())})
    return (
        f"accepted: {netbios}\\user and user@{ascii_lower(identity.default_realm)} (identity.default_realm), "
        f"and the domains and realms of identity.realm_map ({', '.join(names) or 'none'}); a domain of your users' "
        "directory belongs in identity.realm_map"
    )


def map_certificate_name(name: str, source: str, identity: Identity) -> UserPrincipal:
    """A name read from a certificate's `source` (san-upn, san-email, subject-cn), to a principal, refusing a
    name that is not a plain one for that source (the rules, per source, are in docs/hardening.md):

    - san-upn: `user@suffix`, exactly one '@' (a bare `alice` or a down-level `LAB\\alice` is not a UPN; read
      as one it became a user of the default realm); the suffix maps as `map_upn` says (the CA vouched for it);
    - san-email: `user@domain`, exactly one '@', and a domain the configuration names: a key of
      `identity.realm_map`, or the default realm's own name. A mail domain is not a Kerberos realm: upper-casing
      one (`alice@evil.test` as `alice@EVIL.TEST`) is a guess that sends the KDC to a realm nobody configured;
    - subject-cn: a bare account name of `identity.default_realm`: no '@' (a UPN belongs in the subjectAltName)
      and no '\\' (`EVIL\\alice` was alice of the default realm: the CN cannot choose the domain).
    """
    if source == "subject-cn":
        for char, what in (("\\", "'\\' (a DOMAIN\\user name)"), ("@", "'@' (a UPN or an address)")):
            if char in name:
                raise IdentityRejected(
                    f"common name {name!r} is not a plain user name: it contains {what}",
                    hint=f"identity source subject-cn reads the CN as an account of {identity.default_realm}; "
                    "issue certificates with the account name alone as CN, or use identity.source san-upn",
                )
    elif "@" not in name:
        kind = "UPN" if source == "san-upn" else "e-mail address"
        raise IdentityRejected(
            f"{kind} {name!r} is not usable: expected exactly one '@', found 0",
            hint=f"identity source {source}: a name without its domain would be guessed into {identity.default_realm}",
        )
    elif source == "san-email":
        domain = ascii_lower(name.rpartition("@")[2])
        configured = {ascii_lower(key) for key in identity.realm_map} | {ascii_lower(identity.default_realm)}
        if domain not in configured:
            raise IdentityRejected(
                f"e-mail address {name!r} is not usable: its domain {domain!r} is not mapped to a realm",
                hint=f"identity source san-email; if {domain} is a mail domain of your users, name it in "
                "identity.realm_map with their realm",
            )
    return map_name(name, identity, source=source)


_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)
_UPPER = str.maketrans(string.ascii_lowercase, string.ascii_uppercase)


def ascii_lower(name: str) -> str:
    """`name` with A-Z lowered and nothing else touched (Unicode case mapping turns U+017F into 's').

    An ASCII name is `str.lower`'s, which touches A-Z alone there: `translate` looks every character up in its
    table through a Python dictionary (a KeyError for each one not in it), 9,900 instructions for a principal,
    and a request compared two (docs/performance.md, "Instructions per request, counted")."""
    return name.lower() if name.isascii() else name.translate(_LOWER)


def ascii_upper(name: str) -> str:
    """`name` with a-z raised and nothing else touched (`'lab.te\u017ft'.upper()` is 'LAB.TEST'); an ASCII name
    is `str.upper`'s (`ascii_lower`)."""
    return name.upper() if name.isascii() else name.translate(_UPPER)


def _problem(upn: str) -> str | None:
    if upn.count("@") != 1:
        return f"expected exactly one '@', found {upn.count('@')}"
    local, suffix = upn.split("@")
    if not local:
        return "empty user part"
    if not suffix:
        return "empty domain part"
    if any(not label for label in suffix.split(".")):
        return "empty label in the domain part"
    for ch in upn:
        if ch in _FORBIDDEN:
            return f"contains {_FORBIDDEN[ch]}, which separates or escapes Kerberos name components"
        if ch.isspace() or unicodedata.category(ch)[0] in "CZ":
            return f"contains the character U+{ord(ch):04X} ({unicodedata.name(ch, 'unnamed')})"
    return None
