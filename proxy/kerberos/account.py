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
  account's (`sam`; a PAC without one is compared by its UPN, as below);
- otherwise a name with `@` (a UPN, or an e-mail address used as one): the PAC's UPN is that name (`upn`);
- otherwise a bare name (a common name, `DOMAIN\\user`): the PAC's sAMAccountName is that name (`sam`).

Names are compared without regard to ASCII case, as AD compares them (`ascii_lower`, the identity
stage's rule: Unicode case folding would make straße strasse's). A ticket without a PAC, or whose PAC has
no UPN_DNS_INFO, states no account: nothing is compared (`none`) and the request goes on as before; MIT's
KDC issues such tickets, and has no UPNs. A PAC the gateway could not read is refused (`AccountMismatch`):
evidence that cannot be read is never an admission. Pure: the user and the PAC in, evidence or a refusal out.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Literal

from proxy.errors import AccountMismatch
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

    @cached_property
    def text(self) -> str:
        """For the summary line: `upn alice@ad.test`, or that the ticket named no account."""
        return f"{self.rule} {self.name}" if self.name else "not stated (the ticket has no PAC naming an account)"

    def __str__(self) -> str:
        return self.text


def kdc_account(user: UserPrincipal, pac: PacFacts | None, unreadable: str | None = None) -> KdcAccount:
    """The account the KDC impersonated for `user`, checked against the certificate's name; AccountMismatch if
    it is another account's, or if the PAC could not be read (`unreadable` says why)."""
    if unreadable is not None:
        raise AccountMismatch(
            f"the KDC's account for {user.principal} cannot be verified",
            hint=f"the evidence ticket's PAC could not be read ({unreadable}); is kerberos.keytab current?",
        )
    if pac is None or (pac.upn is None and pac.sam_name is None):
        return KdcAccount("none")
    if user.account is not None and pac.sam_name is not None:
        fix = _DIRECTORY_FIX.format(principal=user.principal, account=user.account)
        return _match(user, "sam", user.account, pac.sam_name, pac, fix)
    if "@" in user.upn:
        return _match(user, "upn", user.upn, pac.upn, pac, _FIX.format(principal=user.principal, wanted=user.upn))
    name = user.upn.rpartition("\\")[2]
    return _match(user, "sam", name, pac.sam_name, pac, _FIX.format(principal=user.principal, wanted=name))


def _match(user: UserPrincipal, rule: Rule, wanted: str, stated: str | None, pac: PacFacts, fix: str) -> KdcAccount:
    if stated is not None and ascii_lower(stated) == ascii_lower(wanted):
        return KdcAccount(rule, stated)
    said = f"UPN {pac.upn}, sAMAccountName {pac.sam_name}, SID {pac.sid}"
    raise AccountMismatch(
        f"the KDC's account for {user.principal} is not the certificate's",
        hint=f"the evidence ticket's PAC names {said}; {fix}",
    )
