"""What a KDC's refusal means, and what to change.

GSSAPI reports a failed S4U exchange as a major/minor status pair whose text is MIT's (or Heimdal's)
minor message. This module is the one boundary where those messages become the gateway's errors: a
client-visible reason, and for the log, `explain`, `doctor` and the trace page a hint that says the
cause and then the fix, in plain words ("cause: fix [library message]"). Pure: it sees only strings.

Whatever the step, a message naming a shortage of the gateway's own (MIT's strerror: "Too many open files",
"Cannot allocate memory") is its overload, 503 with Retry-After (`local_shortage`), never its set-up's 502.

One message means different things at different steps, so the caller that knows which step failed
(`proxy.kerberos.delegate`, `proxy.kerberos.probe`) passes `step`:
- `service`, the gateway's own credentials (an AS exchange with its keytab): whatever the KDC says is
  the operator's to fix (502), never the user's. "Client not found" there is Active Directory refusing
  a TGT to a bare SPN (`HTTP/proxy...`): AD issues one only to an account's name or UPN.
- `s4u2self`: `KDC policy rejects request` (KDC_ERR_POLICY) is the user's account (AD refuses S4U2Self
  for a disabled user: "Principal may not act as client"), not delegation; "Server not found" for a user
  of another realm is the client library looking for that realm's krbtgt because the UPN suffix is not
  the realm: the user's (403), fixed by `enterprise_names` or `realm_map`, never the SPN alarm.
- `s4u2proxy`: `KDC can't fulfill requested option` (KDC_ERR_BADOPTION) is either an SPN outside the
  delegation list or an evidence ticket that is not forwardable (no protocol transition, or a user marked
  sensitive); with `evidence_forwardable` the caller gets the one cause that applies.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from proxy.errors import (
    AccountRevoked,
    GatewayError,
    KdcUnavailable,
    KerberosMisconfigured,
    KerberosOverloaded,
    KerberosRefused,
    NotForwardable,
)

if TYPE_CHECKING:
    from proxy.kerberos.pac import PacFacts


@dataclass(frozen=True)
class _Rule:
    needle: str  # lower-case fragment of the minor message
    error: type[GatewayError]
    reason: str  # client-visible; {user} and {spn} are filled in
    hint: str  # for the administrator; {proxy} too


# What a client is told where the fault is the gateway's set-up, and where no KDC answers (also when no thread is left
# for a KDC call: proxy.kerberos.threads); the hint says the rest, to the administrator.
_SERVICE_REASON = "the gateway's Kerberos set-up is incomplete"
UNREACHABLE = "the authentication service is unreachable; try again shortly"

_RULES = (
    _Rule(
        "can't fulfill requested option",
        KerberosRefused,
        "the gateway may not act for {user} at {spn}",
        "the KDC refused constrained delegation (KDC_ERR_BADOPTION): add {spn} to the delegation list of "
        "{proxy} (krbAllowedToDelegateTo on MIT/LDAP, msDS-AllowedToDelegateTo in AD), and give {proxy} "
        "protocol transition (+ok_to_auth_as_delegate / TrustedToAuthForDelegation); a user marked "
        "sensitive ('cannot be delegated') is refused the same way",
    ),
    _Rule(
        "client not found in kerberos database",
        KerberosRefused,
        "no Kerberos account matches {user}",
        "the KDC does not know {user}: check the certificate's UPN and identity.realm_map",
    ),
    _Rule(
        "credentials have been revoked",
        AccountRevoked,
        "the account {user} is disabled or locked, or has expired",
        "the KDC reports {user} disabled, locked or expired (KDC_ERR_CLIENT_REVOKED), or outside its logon hours "
        "(AD's logonHours: Samba applies them to a password sign-in, not to S4U2Self); enable or unlock the account "
        "(Enable-ADAccount / Unlock-ADAccount; samba-tool user enable / unlock; MIT: kadmin.local -q "
        "'modprinc +allow_tix {user}')",
    ),
    _Rule(
        "password has expired",
        KerberosRefused,
        "the password of {user} has expired or must be changed",
        "the KDC refuses {user} until its password is changed (KDC_ERR_KEY_EXPIRED: expired under the password "
        "policy, or 'must change password at next logon', pwdLastSet = 0); Samba 4.17 refuses S4U2Self for it too, "
        "although no password is used: the user changes it (at a desktop, or OWA's password page). For a service "
        "account: set 'password never expires', or change it and export the keytab again",
    ),
    _Rule(
        "client's entry in database has expired",
        KerberosRefused,
        "the account {user} has expired",
        "the KDC reports {user}'s account expired",
    ),
    _Rule(
        "server not found in kerberos database",
        KerberosMisconfigured,
        "the gateway's Kerberos set-up for {spn} is incomplete",
        "the KDC does not know {spn} (or {proxy}): register the SPN on the backend's account (AD: setspn -S {spn} "
        "DOMAIN\\<account>; Samba: samba-tool spn add {spn} <account>; MIT: kadmin.local -q 'addprinc -randkey {spn}', "
        "then ktadd its key into the backend's keytab), or fix routes[].spn to one the account has "
        "(setspn -Q */<host>* lists them): AD compares SPNs without regard to case, but a short host name, another "
        "service class or a port (:443) is another SPN; an SPN registered on two accounts fails this way too on "
        "Windows (KDC event 11; setspn -X lists duplicates)",
    ),
    _Rule(
        "cannot contact any kdc",
        KdcUnavailable,
        UNREACHABLE,
        "no KDC answered for the realm: check krb5.conf's kdc entries and that the KDC is up",
    ),
    _Rule(
        "cannot find kdc",
        KdcUnavailable,
        UNREACHABLE,
        "no KDC is configured for the realm: add it to krb5.conf [realms]",
    ),
    _Rule(
        "clock skew too great",
        KerberosMisconfigured,
        "the gateway's clock disagrees with the authentication service",
        "the gateway's clock and the KDC's differ by more than the allowed skew: synchronise them (NTP)",
    ),
    _Rule(
        "no key table entry found",
        KerberosMisconfigured,
        _SERVICE_REASON,
        "the keytab holds no key for {proxy}: export it again (kadmin ktadd / ktpass / msktutil)",
    ),
    _Rule(
        "key table file",
        KerberosMisconfigured,
        _SERVICE_REASON,
        "the keytab cannot be read: check kerberos.keytab and its permissions",
    ),
    _Rule(
        "preauthentication failed",
        KerberosMisconfigured,
        _SERVICE_REASON,
        "the KDC rejected {proxy}'s own key: the keytab is stale (key version changed); export it again "
        "(samba-tool domain exportkeytab, ktpass, msktutil --update); the gateway does not offer these keys again "
        "until the keytab file changes, so the account is not locked out meanwhile",
    ),
    _Rule(
        "kdc policy rejects request",
        KerberosRefused,
        "the gateway may not act for {user} at {spn}",
        "the KDC's policy refused the request (KDC_ERR_POLICY), as AD does for delegation to {spn} that is "
        "not allowed, or for a user in Protected Users: check {proxy}'s delegation settings and the user's groups",
    ),
    _Rule(
        "no support for encryption type",
        KerberosMisconfigured,
        _SERVICE_REASON,
        "no encryption type is shared (KDC_ERR_ETYPE_NOSUPP): the keys or tickets of {proxy} or {spn} are of types "
        "the KDC or krb5.conf's permitted_enctypes no longer allow; AD issues RC4 unless an account's "
        "msDS-SupportedEncryptionTypes includes AES (24): Set-ADUser {account} -KerberosEncryptionType AES128,AES256 "
        "(and the same on the backend's account; Samba: ldbmodify msDS-SupportedEncryptionTypes: 24), then export "
        "the keytab again",
    ),
    _Rule(
        "integrity check failed",
        KerberosMisconfigured,
        _SERVICE_REASON,
        "a ticket did not decrypt with the key it names (KRB_AP_ERR_BAD_INTEGRITY): the keytab of {proxy} is "
        "stale or belongs to another account; export it again",
    ),
    _Rule(
        "ticket expired",
        KerberosMisconfigured,
        _SERVICE_REASON,
        "the KDC says a ticket of {proxy} has expired (KRB_AP_ERR_TKT_EXPIRED): check the gateway's clock "
        "against the KDC's",
    ),
)

# KDC_ERR_BADOPTION from S4U2Proxy, when it is known whether the evidence ticket was forwardable.
_BADOPTION = "can't fulfill requested option"
_NOT_FORWARDABLE_REASON = "the gateway may not act for {user}: its evidence ticket is not forwardable"
_NOT_FORWARDABLE_HINT = (
    "evidence ticket not forwardable: the service account {proxy} lacks protocol transition, or {user} is "
    "marked sensitive; give {proxy} protocol transition (MIT: kadmin.local -q 'modprinc +ok_to_auth_as_delegate "
    "{proxy}'; 'use any authentication protocol' / TrustedToAuthForDelegation in AD: Set-ADAccountControl {account} "
    "-TrustedToAuthForDelegation $true, or samba-tool delegation for-any-protocol {account} on), and clear "
    "'account is sensitive and cannot be delegated' on {user} (AD: Set-ADAccountControl <user> -AccountNotDelegated "
    "$false; MIT: kadmin.local -q 'modprinc +allow_forwardable {user}'), or take it out of Protected Users"
)
_NOT_FORWARDABLE_AD_HINT = (
    "evidence ticket not forwardable: the service account {proxy} lacks protocol transition, or {user} is "
    "marked sensitive or a member of Protected Users; give {proxy} 'Use any authentication protocol' (its Delegation "
    "tab; TRUSTED_TO_AUTH_FOR_DELEGATION: Set-ADAccountControl {account} -TrustedToAuthForDelegation $true, or "
    "samba-tool delegation for-any-protocol {account} on), and clear 'Account is sensitive and cannot be delegated' "
    "on {user} (Set-ADAccountControl {user_account} -AccountNotDelegated $false, or samba-tool user sensitive "
    "{user_account} off), or take it out of Protected Users; a [directory] lets the gateway name the one cause"
)
_NOT_DELEGABLE_HINT = (
    "{spn} is not in the delegation list of {proxy} (the evidence ticket was forwardable, so protocol "
    "transition is fine): add {spn} to the delegation list of {proxy} (krbAllowedToDelegateTo on MIT/LDAP, "
    "msDS-AllowedToDelegateTo in AD: Set-ADUser {account} -Add @{{'msDS-AllowedToDelegateTo'='{spn}'}}, or "
    "samba-tool delegation add-service {account} {spn}), or allow {proxy} on the backend's account "
    "(resource-based delegation, msDS-AllowedToActOnBehalfOfOtherIdentity: Windows honours it, Samba 4.17's KDC "
    "does not)"
)


def not_forwardable(*, user: str, proxy: str, active_directory: bool = False) -> tuple[str, str]:
    """(reason, hint) for an evidence ticket that came back without the forwardable flag: AD's commands alone where
    the realm is known to be AD (`active_directory`: `from_active_directory`), else MIT's and AD's, each labelled."""
    fill = {"user": user, "proxy": proxy, "account": _account(proxy), "user_account": _account(user)}
    hint = _NOT_FORWARDABLE_AD_HINT if active_directory else _NOT_FORWARDABLE_HINT
    return _NOT_FORWARDABLE_REASON.format(**fill), hint.format(**fill)


def from_active_directory(pac: PacFacts | None) -> bool:
    """Whether a ticket's PAC shows an Active Directory KDC (Windows or Samba): its logon-info buffer
    (KERB_VALIDATION_INFO, MS-PAC 2.5), which MIT's KDC never writes (its PAC, from 1.20, has none)."""
    return pac is not None and any(name == "logon-info" for name, _ in pac.buffers)


@dataclass(frozen=True)
class ProtectedUsers:
    """Whether an account is in the domain's Protected Users group (RID 525), and how, as the directory shows it
    (`proxy.directory.Directory.protected_users`): `member` from its `tokenGroups` (None: not readable); `group`,
    the group's (DN, sAMAccountName); `direct`, listed in the group itself; `through`, the (DN, sAMAccountName) of
    the account's own groups that are in it, directly or nested: the memberships to end to take the account out."""

    member: bool | None
    group: tuple[str, str] = ("", "")
    direct: bool = False
    through: tuple[tuple[str, str], ...] = ()


# userAccountControl ([MS-ADTS] 2.2.16): "Account is sensitive and cannot be delegated"
UF_NOT_DELEGATED = 0x100000
UF_TRUSTED_TO_AUTH_FOR_DELEGATION = 0x1000000  # "Use any authentication protocol": protocol transition
_SENSITIVE = "'Account is sensitive and cannot be delegated'"


def protected_users_in_question(user_account_control: int, gateway_control: int | None) -> bool:
    """Whether `not_forwardable_named` will suspect Protected Users, whose membership the caller then reads
    (`protected`): the user not marked sensitive and the gateway read with protocol transition."""
    return not user_account_control & UF_NOT_DELEGATED and bool(
        gateway_control is not None and gateway_control & UF_TRUSTED_TO_AUTH_FOR_DELEGATION
    )


def not_forwardable_named(
    *,
    user: str,
    proxy: str,
    dn: str,
    sam: str,
    user_account_control: int,
    gateway_control: int | None = None,
    protected: ProtectedUsers | None = None,
) -> str:
    """The hint for an evidence ticket without the forwardable flag when the directory has the user's account
    (`dn`, `sam`, its `userAccountControl`), and perhaps the gateway's (`gateway_control`, its userAccountControl;
    None when the directory did not give it): the causes that apply, in AD's words. The user's NOT_DELEGATED set: that
    is a cause, and the gateway's TRUSTED_TO_AUTH_FOR_DELEGATION read clear is another, named with it (the user's
    flag cleared alone, the user was refused again); read set, the gateway is said not to be the cause; unknown,
    nothing is said of it. Clear, and the gateway's TRUSTED_TO_AUTH_FOR_DELEGATION clear (or unknown): the gateway's
    protocol transition. Both fine: Protected Users, which that bit does not show
    (a Windows DC issues no forwardable ticket for its members; Samba 4.17 does), as `protected` shows it: a member
    itself, or through a group of its own (`_protected_users`)."""
    account = _account(proxy)
    if user_account_control & UF_NOT_DELEGATED:
        sensitive = (
            f"{user} is marked sensitive: {_SENSITIVE} is set on {dn} (NOT_DELEGATED in its userAccountControl), "
            f"so no KDC issues a forwardable ticket for it; clear it if the gateway should act for this user "
            f"(Active Directory Users and Computers: the account's Account tab; Set-ADAccountControl {sam} "
            f"-AccountNotDelegated $false; samba-tool user sensitive {sam} off)"
        )
        if gateway_control is None:  # not read: neither blamed nor cleared
            return sensitive
        if gateway_control & UF_TRUSTED_TO_AUTH_FOR_DELEGATION:
            return f"{sensitive}. {proxy}'s protocol transition is not the cause"
        return (
            f"{sensitive}; and {proxy} lacks protocol transition too (TRUSTED_TO_AUTH_FOR_DELEGATION is clear in its "
            f"userAccountControl): give it 'Use any authentication protocol' (Set-ADAccountControl {account} "
            f"-TrustedToAuthForDelegation $true, or samba-tool delegation for-any-protocol {account} on); both must "
            "change before the gateway can act for this user"
        )
    not_marked = f"{dn} is not marked {_SENSITIVE} (NOT_DELEGATED is clear in its userAccountControl)"
    if gateway_control is not None and gateway_control & UF_TRUSTED_TO_AUTH_FOR_DELEGATION:
        both = f"{not_marked}, and {proxy} has 'Use any authentication protocol' (TRUSTED_TO_AUTH_FOR_DELEGATION)"
        return f"{both}: {_protected_users(user, sam, protected)}"
    known = (
        " (TRUSTED_TO_AUTH_FOR_DELEGATION is clear in its userAccountControl)" if gateway_control is not None else ""
    )
    return (
        f"{not_marked}, so the cause is {proxy}: it lacks protocol transition{known}. Give it 'Use any "
        f"authentication protocol' (its Delegation tab, with 'Trust this user for delegation to specified services "
        f"only'; TRUSTED_TO_AUTH_FOR_DELEGATION in its userAccountControl): Set-ADAccountControl {account} "
        f"-TrustedToAuthForDelegation $true, or samba-tool delegation for-any-protocol {account} on. On a Windows "
        "DC a member of Protected Users is refused this way too: take the user out of that group"
    )


def _remove(group: str, sam: str) -> str:
    """The commands that take the account `sam` out of the group named `group` (its sAMAccountName)."""
    return f"Remove-ADGroupMember '{group}' {sam}; samba-tool group removemembers '{group}' {sam}"


def _protected_users(user: str, sam: str, protected: ProtectedUsers | None) -> str:
    """Protected Users as the cause left, told as the directory shows the membership: itself, through its own groups
    (Remove-ADGroupMember on Protected Users fails for a member through another group, and samba-tool's says it
    removed it and leaves it there), neither, or not known."""
    why = "whose members a Windows DC never lets be delegated"
    if protected is None or protected.member is None:
        return (
            f"{user} is then most likely a member of Protected Users, {why}; take it out of that group if the gateway "
            f"should act for it: {_remove('Protected Users', sam)} where it is a member itself, else leave the group "
            f"that makes it one (Get-ADPrincipalGroupMembership {sam}; the directory did not say)"
        )
    if not protected.member:
        return (
            f"{user} is not a member of Protected Users either (its tokenGroups, nested groups included): the "
            "directory shows no cause; the KDC may have read other accounts (another domain controller not yet "
            "replicated, or another account of that name): its log names the accounts it refused"
        )
    group_dn, group = protected.group
    ways = [_remove(group or "Protected Users", sam)] if protected.direct else []
    ways += [_remove(name, sam) for _, name in protected.through]
    how = []
    if protected.direct:
        how.append("itself")
    if protected.through:
        groups = ", ".join(dn for dn, _ in protected.through)
        how.append(f"through {groups}, its own group{'s' if len(protected.through) > 1 else ''} in it (nested)")
    shown = f" ({group_dn})" if group_dn else ""
    if not ways:  # tokenGroups said so, no listed membership did: its primary group, or groups we may not read
        return (
            f"{user} is a member of Protected Users{shown} ({why}), by no membership the directory lists to the "
            f"gateway (its primaryGroupID, or a group it may not read): Get-ADPrincipalGroupMembership {sam} shows it"
        )
    return (
        f"{user} is a member of Protected Users{shown} {' and '.join(how)}, {why}; take it out if the gateway "
        f"should act for it: {'; '.join(ways)}"
    )


_POLICY = "kdc policy rejects request"
_NO_KEY = "no key table entry found"
_INTEGRITY = "integrity check failed"
_AS_INTEGRITY_HINT = (
    "the KDC answered the gateway's own AS exchange (kerberos.keytab), but its answer did not decrypt with the "
    "keytab's key for {proxy} (KRB_AP_ERR_BAD_INTEGRITY): "
    "the keytab holds a key the account no longer has (its password or keys changed since the export, even at the "
    "same key version) or another account's; export it again (kadmin ktadd, samba-tool domain exportkeytab, ktpass, "
    "msktutil --update)"
)
_SERVER_NOT_FOUND = "server not found in kerberos database"
_CLIENT_NOT_FOUND = "not found in kerberos database"
_NO_KDC_FOR_REALM = "cannot find kdc"
_SELF_POLICY_REASON = "the account {user} is disabled or may not sign in"
_SELF_POLICY_HINT = (
    "the KDC refused S4U2Self for {user} (KDC_ERR_POLICY): the account is disabled, or restricted by logon "
    "hours or workstations (Samba's KDC logs 'Principal may not act as client'); enable {user} in the directory. "
    "Not a delegation setting: S4U2Self never got as far as {spn}"
)
_FOREIGN_REASON = "no Kerberos realm serves {user}'s UPN suffix"
_FOREIGN_HINT = (
    "S4U2Self asked for {user}, in a realm the KDC does not serve (the client library looked for "
    "krbtgt/{realm}): in Active Directory a UPN suffix that is not the realm (uPNSuffixes) is found only by its "
    "enterprise name; set identity.enterprise_names = true (identity.realm_map fits only a realm where each "
    "UPN's local part is its own account name: elsewhere it names another account, and the gateway refuses "
    "the certificate when the KDC's PAC names that other account). An MIT KDC has no enterprise names and its "
    'principals are local part@realm: there, identity.realm_map = {{ "{suffix}" = "{own_realm}" }} asks for '
    "the UPN's local part in the gateway's realm"
)
_REALM_CASE_HINT = (  # what reaches a request: proxy.config refuses a realm_map or default_realm written so
    "S4U2Self asked for {user}, whose realm {realm} is the gateway's realm {own_realm} in another case: Kerberos "
    "compares realm names with their case, so no KDC is configured for {realm}; write the realm where the "
    'configuration names it (identity.realm_map, identity.default_realm) as "{own_realm}", as kerberos.principal '
    "spells it (check-config refuses it written otherwise); a UPN suffix that no realm_map key names is taken as the "
    'realm in capitals: identity.realm_map = {{ "{suffix}" = "{own_realm}" }} maps it to the gateway\'s'
)
_SMALL_REALM = (  # a realm in small letters: identity.realm_map or default_realm written so (check-config warns)
    "; the realm {realm} is in small letters, and Kerberos realm names are case-sensitive: where the KDC's realm is "
    "{suffix_upper}, identity.realm_map or identity.default_realm should say so"
)
_SERVICE_NOT_FOUND_HINT = (
    "the KDC refused the gateway's own credentials: it has no account named {proxy}. Active Directory issues a "
    "ticket only to an account's name or UPN, never to a bare SPN: set kerberos.principal to the service "
    "account's name (e.g. svc-kcdproxy@CORP.EXAMPLE.COM) and export the keytab for it, or give the account "
    "that UPN"
)
_SERVICE_HINT = "the KDC refused the gateway's own credentials ({proxy}, kerberos.keytab): {hint}"
_NOT_A_KEYTAB = "unsupported key table format"
_NOT_A_KEYTAB_HINT = (
    "kerberos.keytab is not a keytab MIT can read (a keytab file starts with the bytes 05 02; this is another kind of "
    "file, or empty): no AS exchange was made; export {proxy}'s keytab again (kadmin ktadd -norandkey, samba-tool "
    "domain exportkeytab, ktpass, msktutil) and point kerberos.keytab at it"
)


def explain(
    message: str,
    *,
    user: str,
    spn: str,
    proxy: str,
    step: str | None = None,
    evidence_forwardable: bool | None = None,
    keytab: tuple[str, str] | None = None,
    active_directory: bool = False,
) -> GatewayError:
    """Turn a GSSAPI failure message into the gateway error that says what happened and what to fix.

    `step` ("service", "s4u2self" or "s4u2proxy") and `evidence_forwardable`, when the caller knows them,
    narrow an ambiguous refusal down to its one cause; `keytab`, (what is wrong, the fix) from
    `proxy.kerberos.keytab.missing_key`, says what the keytab holds when MIT found no key in it."""
    lowered = _unnamed(message.lower())
    realm, own_realm = user.rpartition("@")[2], proxy.rpartition("@")[2]
    fill = {"user": user, "spn": spn, "proxy": proxy, "realm": realm, "account": _account(proxy)}
    fill |= {"suffix": realm.lower(), "suffix_upper": realm.upper(), "own_realm": own_realm}
    shortage = local_shortage(message)
    if shortage is not None:
        return shortage
    if step == "service":
        return _service_error(message, fill, keytab)
    if step == "s4u2self" and _POLICY in lowered:
        hint = f"{_SELF_POLICY_HINT.format(**fill)} [{message}]"
        return KerberosRefused(_SELF_POLICY_REASON.format(**fill), hint=hint)
    # The KDC does not serve the user's realm ("Server not found"), or refers it to a realm krb5.conf gives no KDC
    # (Samba for its NetBIOS name, alice@ADTEST): either way the certificate's suffix, not a KDC outage (503).
    foreign = _SERVER_NOT_FOUND in lowered or _NO_KDC_FOR_REALM in lowered
    if step == "s4u2self" and foreign and realm != own_realm and _realm(user) == _realm(proxy):
        return KerberosMisconfigured(_SERVICE_REASON, hint=f"{_REALM_CASE_HINT.format(**fill)} [{message}]")
    if step == "s4u2self" and foreign and _realm(user) != _realm(proxy):
        hint = _FOREIGN_HINT.format(**fill) + (
            _SMALL_REALM.format(**fill) if realm == realm.lower() != realm.upper() else ""
        )
        return KerberosRefused(_FOREIGN_REASON.format(**fill), hint=f"{hint} [{message}]")
    if step == "s4u2proxy" and _BADOPTION in lowered and evidence_forwardable is not None:
        if not evidence_forwardable:  # the directory, where there is one, says which cause (proxy.pipeline)
            reason, hint = not_forwardable(user=user, proxy=proxy, active_directory=active_directory)
            return NotForwardable(reason, hint=f"{hint} [{message}]", user=user, message=message)
        reason, hint = f"the gateway may not act for {user} at {spn}", _NOT_DELEGABLE_HINT.format(**fill)
        return KerberosRefused(reason, hint=f"{hint} [{message}]")
    for rule in _RULES:
        if rule.needle in lowered:
            error = rule.error(rule.reason.format(**fill), hint=f"{rule.hint.format(**fill)} [{message}]")
            if isinstance(error, AccountRevoked):
                error.user = user  # the directory, where there is one, says which of the three (proxy.pipeline)
            return error
    return KerberosMisconfigured(
        "the gateway could not obtain a Kerberos ticket for this request",
        hint=f"unexpected Kerberos failure for {user} at {spn}: {message}",
    )


# The gateway's own shortages, as MIT words the errno of a call that failed on this machine (strerror, in the minor
# status): reading the keytab, krb5.conf or the ccache, or opening the socket to the KDC. Most specific first.
_SHORTAGES = (
    (
        "too many open files in system",
        "the machine's open-file table is full (ENFILE): raise fs.file-max, or find the process holding them",
    ),
    (
        "too many open files",
        "the gateway has no file descriptor left for its KDC call (EMFILE: its open-file limit is reached): raise "
        "the hard limit (LimitNOFILE= in the systemd unit, ulimit -Hn, a container's nofile: "
        "docs/throttles-and-limits.md#file-descriptors), or lower listener.max_connections",
    ),
    ("cannot allocate memory", "the gateway could not allocate memory (ENOMEM): give it more, or lower its load"),
    ("out of memory", "the gateway could not allocate memory: give it more, or lower its load"),
    ("no buffer space available", "the kernel has no socket buffer left (ENOBUFS): lower the machine's load"),
)


def local_shortage(message: str) -> KerberosOverloaded | None:
    """A KDC call that failed for want of the gateway's own resources (`message`, GSSAPI's): 503 and Retry-After,
    its own fix, not the keytab and krb5.conf (`kerberos_misconfigured`) nor the user's account; else None."""
    lowered = message.lower()
    for words, fix in _SHORTAGES:
        if words in lowered:
            return _overloaded(fix, message)
    return None


def no_descriptor_for_kdc(message: str) -> KerberosOverloaded:
    """MIT's "Cannot contact any KDC" (`message`) in a process that has no descriptor left: it could not open a socket
    to any KDC and says so in the words of a KDC outage, the errno lost (seen: S4U2Self with the gateway's TGT held,
    at the open-file limit)."""
    return _overloaded(_SHORTAGES[1][1], f"{message}; no descriptor could be opened either")


def _overloaded(fix: str, message: str) -> KerberosOverloaded:
    return KerberosOverloaded(
        "the gateway is overloaded; try again shortly", hint=f"not a Kerberos set-up problem: {fix} [{message}]"
    )


# MIT names the principal in some of these messages ("Server HTTP/x@R not found in Kerberos database", seen from
# S4U2Proxy for an SPN the KDC lacks, krb5 1.20) and not in others ("Server not found in Kerberos database"):
# the rules match the message without the name.
_NAMED = re.compile(r"\b(server|client) \S+ not found in kerberos database")


def _unnamed(lowered: str) -> str:
    return _NAMED.sub(r"\1 not found in kerberos database", lowered)


def _account(proxy: str) -> str:
    """The gateway's account as AD's tools name it: the principal without its realm (`svc-kcdproxy`)."""
    return proxy.rpartition("@")[0] or "<account>"


def _realm(principal: str) -> str:
    return principal.rpartition("@")[2].upper()


def _service_error(message: str, fill: dict[str, str], keytab: tuple[str, str] | None = None) -> GatewayError:
    """A failure of the gateway's own AS exchange: the operator's to fix (502), or the KDC is away (503). The rules'
    hints speak of the account the exchange was for, the gateway's (a "revoked" here is the gateway's account
    disabled or locked out, never the user's); no key in the keytab is told with what it holds (`keytab`)."""
    lowered = _unnamed(message.lower())
    fill = {**fill, "user": fill["proxy"]}
    if keytab is not None and _NO_KEY in lowered:
        what, fix = keytab
        hint = _SERVICE_HINT.format(hint=f"{what}: {fix}", **fill)
        return KerberosMisconfigured(_SERVICE_REASON, hint=f"{hint} [{message}]")
    if _NOT_A_KEYTAB in lowered:
        return KerberosMisconfigured(_SERVICE_REASON, hint=f"{_NOT_A_KEYTAB_HINT.format(**fill)} [{message}]")
    if _INTEGRITY in lowered:  # no ticket here: the AS reply is encrypted with the account's own key
        return KerberosMisconfigured(_SERVICE_REASON, hint=f"{_AS_INTEGRITY_HINT.format(**fill)} [{message}]")
    if _CLIENT_NOT_FOUND in lowered:
        return KerberosMisconfigured(_SERVICE_REASON, hint=f"{_SERVICE_NOT_FOUND_HINT.format(**fill)} [{message}]")
    for rule in _RULES:
        if rule.needle in lowered:
            if rule.error is KdcUnavailable:
                return rule.error(rule.reason.format(**fill), hint=f"{rule.hint.format(**fill)} [{message}]")
            hint = _SERVICE_HINT.format(hint=rule.hint.format(**fill), **fill)
            return KerberosMisconfigured(_SERVICE_REASON, hint=f"{hint} [{message}]")
    hint = _SERVICE_HINT.format(hint="check kerberos.principal, kerberos.keytab and krb5.conf", **fill)
    return KerberosMisconfigured(_SERVICE_REASON, hint=f"{hint} [{message}]")


def own_ticket_refused(
    message: str, *, proxy: str, keytab: str, sealed: int | None, held: set[int] | None
) -> KerberosMisconfigured:
    """The gateway could not open its own evidence ticket (`message`, GSSAPI's) with kerberos.keytab (`keytab`): the
    KDC sealed it in key version `sealed` of `proxy` (None: unknown), the keytab holds versions `held` (None: the file
    cannot be read). Every user's ticket alike: the operator's 502, never a user's 403 (it was `kdc_account_mismatch`,
    "the KDC's account ... cannot be verified"). Typically the key changed at the KDC (`ktadd`, a password reset, AD's
    machine password change) and the keytab was not rewritten yet, while the gateway's TGT is still good."""
    if sealed is not None and held is not None and sealed not in held:
        versions = ", ".join(str(v) for v in sorted(held)) or "none"
        cause = (
            f"the KDC sealed it in key version {sealed} of {proxy}, and {keytab} holds version "
            f"{versions} only: the account's key changed at the KDC (kadmin ktadd or cpw, a password reset) after the "
            "keytab was written"
        )
    else:
        cause = f"{keytab} holds no key that opens it (a stale keytab, or another account's)"
    return KerberosMisconfigured(
        _SERVICE_REASON,
        hint=f"the gateway cannot open its own evidence ticket with kerberos.keytab: {cause}; write the KDC's current "
        "key into the keytab (kadmin ktadd -norandkey, samba-tool domain exportkeytab, ktpass, msktutil --update); "
        f"`kcd-proxy doctor` compares the versions. Nothing of the exchange is kept: each user is served at their next "
        f"request once the keytab holds the key [{message}]",
    )


# What accepting a ticket says when the acceptor's clock is off the KDC's. MIT's client side corrects its own requests
# by the KDC's time (kdc_timesync), so with a skewed clock S4U2Self and S4U2Proxy succeed and this is the first sign.
CLOCK_WORDS = ("clock skew too great", "ticket not yet valid")


def is_clock_skew(message: str) -> bool:
    """Whether GSSAPI's `message` for a failed acceptance says the gateway's clock is off the KDC's (`clock_skew`)."""
    lowered = message.lower()
    return any(words in lowered for words in CLOCK_WORDS)


def clock_skew(message: str, *, proxy: str, offset: float | None) -> GatewayError:
    """The gateway's clock is off the KDC's (`offset`: the gateway's time minus the KDC's, in seconds, when known):
    the operator's to fix (502), for every user alike, never a user's 403."""
    off = "" if offset is None else f"about {abs(offset):.0f} s {'ahead of' if offset > 0 else 'behind'} the KDC's, "
    return KerberosMisconfigured(
        "the gateway's clock disagrees with the authentication service",
        hint=f"the gateway's clock is {off}more than the allowed skew (5 minutes in AD): the KDC answered (MIT "
        f"corrects its own requests by the KDC's time), but {proxy} cannot accept a ticket issued to it; synchronise "
        f"the gateway's clock with the domain's (NTP from the DCs or the PDC emulator) [{message}]",
    )
