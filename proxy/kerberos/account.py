"""The account the KDC impersonated: is it the one the certificate names?

Theory of operation. S4U2Self asks the KDC for a principal *name*; the identity stage built it from the
certificate (a UPN's local part and the realm `realm_map` gives its suffix, a common name and
`default_realm`), or the mapping stage from the directory (`sAMAccountName@REALM`). A name is not an account:
in Active Directory a UPN's local part need not be the account's name, so `alice@corp.example` sent to
`AD.TEST` by `realm_map` becomes `alice@AD.TEST`, which is whichever account is *called* alice. Mallory's
rightly issued certificate (her UPN is `alice@corp.example`) was served as alice that way.

The evidence ticket says which account the KDC chose. AD puts a PAC in it whose UPN_DNS_INFO names the
account's UPN (its implicit UPN, `sAMAccountName@dns.domain`, when it has none) and, since the 2021
updates, its sAMAccountName and SID (`proxy.kerberos.pac`). The gateway reads that PAC once per KDC
exchange anyway (`proxy.kerberos.delegate`, by accepting the ticket, addressed to itself, with its own
key); `kdc_account` compares it with what the certificate named, for every request, cached ticket or not
(about 4 µs, once per ticket and certificate name; the ticket remembers the answer, so a request on a
cached ticket pays a dictionary look-up, about 0.2 µs). The rule:

- the mapping stage proved an account (`identity.mapping = "strong"`): the PAC's sAMAccountName is that
  account's (`sam`; a PAC without one is compared by its UPN, as below), and so is the PAC's SID where the PAC
  has one (`AccountReplaced` otherwise: the account was deleted and made again under its name since the
  directory's answer, which the directory cache may have kept; docs/strong-mapping.md);
- otherwise a name with `@` (a UPN, or an e-mail address used as one): the PAC's UPN is that name (`upn`);
- otherwise a bare name (a common name, `DOMAIN\\user`): the PAC's sAMAccountName is that name (`sam`);
- whatever the name: the PAC's sAMAccountName is not a computer's or a trust's (ends in `$`,
  `require_user_account`): `dc1$@ad.test` is the DC's computer account's implicit UPN.

Names are compared without regard to ASCII case, as AD compares them (`ascii_lower`, the identity
stage's rule: Unicode case folding would make straße strasse's). A PAC the gateway could not read is refused
(`AccountMismatch`): evidence that cannot be read is never an admission.

A ticket that names no account: `kerberos.kdc_account` says what to do with it.
- `"auto"` (default): a PAC must be there. A PAC that names no account (no UPN_DNS_INFO) is MIT's (1.20 and
  later: the client's name and signatures only; AD's PAC always has UPN_DNS_INFO): the PAC states no account
  (`none`), so the evidence ticket's client principal is all that says whom the KDC impersonated, and it must
  be the principal the gateway asked for (`client_is_asked`), else the request is refused like another
  account's. *No PAC at all* is refused: AD leaves the PAC out of tickets to an account flagged
  NO_AUTH_DATA_REQUIRED, and a gateway account with that flag must not turn the check off silently. Each
  ticket is judged on its own, so the first request after a start is treated like any other.
- `"require"`: the PAC must name the account (Active Directory): MIT's tickets are refused.
- `"optional"`: a ticket without a PAC is served too (an MIT KDC before 1.20, or with `disable_pac`); the
  Kerberos stage logs a warning for each such ticket (`proxy.kerberos.delegate`). Its client principal is
  compared as under "auto".

The client principal is compared as the KDC writes it: MIT compares principal names byte for byte (case
included: `Alice@LAB.TEST` is another principal than `alice@LAB.TEST`), so the principal asked for must come
back exactly. An NT-ENTERPRISE name (`identity.enterprise_names`) comes back as one component holding the UPN
with its `@` escaped, in the KDC's realm (Samba: `carol\\@corp.example@AD.TEST`), so that is what it is
compared with; the realm may be the user's or the gateway's own.
Pure: the user, the PAC and the policy in, evidence or a refusal out.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Literal

from proxy.config import KdcAccountPolicy
from proxy.errors import AccountMismatch, AccountReplaced
from proxy.identity.principal import UserPrincipal, ascii_lower
from proxy.kerberos.pac import PacFacts

Rule = Literal["upn", "sam", "none"]

_FIX = (
    "the name the gateway built ({principal}) belongs to another account than the one the certificate names "
    "({wanted}): in Active Directory a UPN's local part need not be the account's name. Set "
    'identity.enterprise_names = true (the KDC then finds the account by its UPN) or identity.mapping = "strong" '
    "(the directory's account is impersonated); identity.realm_map fits only where every UPN's local part is "
    "its account's sAMAccountName"
)
_DIRECTORY_FIX = (
    "the directory's account for the certificate is {account}, and the KDC impersonated another for {principal}: "
    "does [directory] base_dn name the domain of the gateway's realm?"
)


@dataclass(frozen=True)
class KdcAccount:
    """Evidence: the account the evidence ticket's PAC names, and which of its names matched the certificate's."""

    rule: Rule
    name: str = ""  # the PAC's name that matched (its UPN or its sAMAccountName); "" when nothing was compared
    pac: bool = True  # whether the ticket carried a PAC at all
    client: str = ""  # rule none: the evidence ticket's client principal, found to be the one asked for

    @cached_property
    def text(self) -> str:
        """For the summary line: `upn alice@ad.test`, or that the ticket named no account (and its client)."""
        if self.name:
            return f"{self.rule} {self.name}"
        said = "carries no PAC" if not self.pac else "has no PAC naming an account"
        if self.client:
            return f"not stated (the ticket {said}; its client {self.client} is the principal asked for)"
        return f"not stated (the ticket {said})"

    def __str__(self) -> str:
        return self.text


_NO_PAC_FIX = (
    "the evidence ticket carries no PAC, so nothing says which account the KDC impersonated. Active Directory "
    "leaves the PAC out of tickets to an account flagged NO_AUTH_DATA_REQUIRED (userAccountControl 0x2000000): "
    "clear that flag on the gateway's account ({proxy}). An MIT KDC before 1.20, or one with disable_pac, issues "
    'no PAC at all: there set kerberos.kdc_account = "optional"'
)
_NO_NAME_FIX = (
    "the evidence ticket's PAC names no account (an MIT KDC's PAC holds the client's name and signatures only), "
    'and kerberos.kdc_account = "require" wants one: use "auto" for an MIT realm'
)


def kdc_account(
    user: UserPrincipal,
    pac: PacFacts | None,
    unreadable: str | None = None,
    *,
    client: str | None = None,
    policy: KdcAccountPolicy = "auto",
    proxy: str = "",
) -> KdcAccount:
    """The account the KDC impersonated for `user`, checked against the certificate's name; AccountMismatch if
    it is another account's, if the PAC could not be read (`unreadable` says why), or if the ticket names no
    account and `policy` wants one, or its client principal (`client`, None when unknown) is not the one asked
    for (see the module's docstring). `proxy` (the gateway's principal) is for the fix."""
    require_readable(user, unreadable)
    require_user_account(user, pac)
    if pac is None or (pac.upn is None and pac.sam_name is None):
        require_stated(user.principal, pac, policy=policy, proxy=proxy)
        require_client(user, client, proxy=proxy)
        return KdcAccount("none", pac=pac is not None, client=client or "")
    if user.account is not None and pac.sam_name is not None:
        fix = _DIRECTORY_FIX.format(principal=user.principal, account=user.account)
        found = _match(user, "sam", user.account, pac.sam_name, pac, fix)
        _same_account(user, pac)
        return found
    if "@" in user.upn:
        return _match(user, "upn", user.upn, pac.upn, pac, _FIX.format(principal=user.principal, wanted=user.upn))
    name = user.upn.rpartition("\\")[2]
    return _match(user, "sam", name, pac.sam_name, pac, _FIX.format(principal=user.principal, wanted=name))


def require_readable(user: UserPrincipal, unreadable: str | None) -> None:
    """AccountMismatch when the evidence ticket's PAC could not be read (`unreadable` says why: a malformed PAC):
    evidence that cannot be read is never an admission. Asked by the Kerberos stage right after S4U2Self, before
    S4U2Proxy, so that such a ticket is never kept. A ticket the gateway cannot open at all (a keytab without the key
    the KDC sealed it in, a clock off the KDC's) never gets here: the Kerberos stage makes that the operator's 502
    (`proxy.kerberos.hints.own_ticket_refused`, `clock_skew`)."""
    if unreadable is None:
        return
    raise AccountMismatch(
        f"the KDC's account for {user.principal} cannot be verified",
        hint=f"the evidence ticket's PAC could not be read ({unreadable})",
    )


def require_user_account(user: UserPrincipal, pac: PacFacts | None) -> None:
    """AccountMismatch when the evidence ticket's PAC names a computer or trust account: its sAMAccountName ends
    in `$`, as AD requires of computer accounts (since the CVE-2021-42278 updates) and writes for trust accounts.
    A certificate naming `dc1$@ad.test` (the implicit UPN of the DC's computer account) was served as the domain
    controller: the KDC impersonates a computer for S4U2Self as readily as a user, and its PAC's implicit UPN is the
    certificate's. A machine's account is never a device's user. Also asked by the Kerberos stage right after
    S4U2Self, before S4U2Proxy."""
    if pac is None or pac.sam_name is None or not pac.sam_name.endswith("$"):
        return
    raise AccountMismatch(
        f"the KDC's account for {user.principal} is a computer or trust account, not a user",
        hint=f"the evidence ticket's PAC names the account {pac.sam_name} ({pac.sid or 'no SID'}) for the "
        f"certificate's name {user.upn}: a sAMAccountName ending in '$' is a computer's or a trust's, and the "
        "gateway serves users only. A certificate naming it was issued by a template that lets the requester "
        "choose the name, or for the machine itself: revoke it and check the template",
    )


def require_stated(principal: str, pac: PacFacts | None, *, policy: KdcAccountPolicy, proxy: str = "") -> None:
    """AccountMismatch when the evidence ticket of `principal` names no account and `policy` wants one. It does
    not depend on the certificate, so the Kerberos stage also asks it right after S4U2Self, before S4U2Proxy."""
    if pac is not None and (pac.upn is not None or pac.sam_name is not None):
        return
    if policy == "require" or (pac is None and policy == "auto"):
        fix = _NO_PAC_FIX.format(proxy=proxy or "kerberos.principal") if pac is None else _NO_NAME_FIX
        raise AccountMismatch(f"the KDC's account for {principal} cannot be verified", hint=fix)


def require_client(user: UserPrincipal, client: str | None, *, proxy: str = "") -> None:
    """AccountMismatch unless `client`, the evidence ticket's client principal as the KDC returned it, is the
    principal the gateway asked to impersonate for `user` (`client_is_asked`). For a ticket whose PAC names
    no account: its client name is then the only word on whom the KDC impersonated. Also asked by the Kerberos
    stage right after S4U2Self, before S4U2Proxy."""
    if client is None:
        raise AccountMismatch(
            f"the KDC's account for {user.principal} cannot be verified",
            hint="the evidence ticket's PAC names no account and its client principal could not be read",
        )
    if client_is_asked(user, client, proxy=proxy):
        return
    asked = user.enterprise or user.principal
    raise AccountMismatch(
        f"the KDC's account for {user.principal} is not the certificate's",
        hint=f"the KDC impersonated {client} when asked for {asked}, and the evidence ticket's PAC names no "
        "account: a principal alias, or a KDC that canonicalises client names, maps the certificate's name to "
        "another principal; give the user a principal of that exact name (or no alias), or map the certificate "
        'with identity.mapping = "strong"',
    )


def client_is_asked(user: UserPrincipal, client: str, *, proxy: str = "") -> bool:
    """Whether `client` (as the KDC writes it, `krb5_unparse_name`'s form) is the principal asked for `user`:
    `user.principal` byte for byte, or with `user.enterprise` the escaped UPN in the user's or `proxy`'s realm."""
    if not user.enterprise:
        return client == user.principal
    name, realm = split_principal(client)
    realms = {user.realm, split_principal(proxy)[1]} - {""}
    return name == _unparsed_enterprise(user.enterprise) and realm in realms


def split_principal(principal: str) -> tuple[str, str]:
    """`carol\\@corp.example@AD.TEST` -> (`carol\\@corp.example`, `AD.TEST`): at the last '@' that no
    backslash escapes; ("name", "") when there is none."""
    escaped = False
    at = -1
    for i, ch in enumerate(principal):
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == "@":
            at = i
    return (principal, "") if at < 0 else (principal[:at], principal[at + 1 :])


def _unparsed_enterprise(upn: str) -> str:
    """An NT-ENTERPRISE name's single component as `krb5_unparse_name` writes it (its '@' escaped)."""
    return upn.replace("\\", "\\\\").replace("@", "\\@").replace("/", "\\/")


def _same_account(user: UserPrincipal, pac: PacFacts) -> None:
    """The mapping stage's account and the KDC's have one name: AccountReplaced unless they have one SID too (when
    both are known: a PAC without UPN_DNS_INFO's SID, from a DC before the 2021 updates, is not compared)."""
    if user.account_sid is None or pac.sid is None or pac.sid == user.account_sid:
        return
    raise AccountReplaced(
        f"the KDC's account for {user.principal} is not the one the directory named",
        hint=f"the evidence ticket's PAC names {pac.sam_name} with SID {pac.sid}, the mapping stage decided on "
        f"{user.account} with SID {user.account_sid} (the directory's answer, kept up to [directory] "
        "cache_seconds): the account was deleted and made again since, or the KDC and the directory server do "
        "not agree yet (replication). The directory's entry and the user's tickets are dropped; the next request "
        "is decided on a fresh look-up",
    )


def _match(user: UserPrincipal, rule: Rule, wanted: str, stated: str | None, pac: PacFacts, fix: str) -> KdcAccount:
    if stated is not None and ascii_lower(stated) == ascii_lower(wanted):
        return KdcAccount(rule, stated)
    said = f"UPN {pac.upn}, sAMAccountName {pac.sam_name}, SID {pac.sid}"
    raise AccountMismatch(
        f"the KDC's account for {user.principal} is not the certificate's",
        hint=f"the evidence ticket's PAC names {said}; {fix}",
    )
