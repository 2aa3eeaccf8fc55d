"""What a KDC's refusal means, and what to change.

GSSAPI reports a failed S4U exchange as a major/minor status pair whose text is MIT's (or Heimdal's)
minor message. This module is the one boundary where those messages become the gateway's errors: a
client-visible reason, and for the log, `explain`, `doctor` and the trace page a hint that says the
cause and then the fix, in plain words ("cause: fix [library message]"). Pure: it sees only strings.

One message means different things at different steps: `KDC can't fulfill requested option`
(KDC_ERR_BADOPTION) from S4U2Proxy is either an SPN outside the delegation list or an evidence ticket
that is not forwardable (no protocol transition, or a user marked sensitive). The caller that knows
which step failed and whether the evidence ticket was forwardable (`proxy.kerberos.delegate`) passes
`step` and `evidence_forwardable`, and gets the one cause that applies.
"""

from __future__ import annotations

from dataclasses import dataclass

from proxy.errors import GatewayError, KdcUnavailable, KerberosMisconfigured, KerberosRefused


@dataclass(frozen=True)
class _Rule:
    needle: str  # lower-case fragment of the minor message
    error: type[GatewayError]
    reason: str  # client-visible; {user} and {spn} are filled in
    hint: str  # for the administrator; {proxy} too


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
        KerberosRefused,
        "the account {user} is disabled or locked",
        "the KDC reports {user} disabled, locked or expired (KDC_ERR_CLIENT_REVOKED)",
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
        "the KDC does not know {spn} (or {proxy}): register the SPN on the backend's account, or fix routes[].spn",
    ),
    _Rule(
        "cannot contact any kdc",
        KdcUnavailable,
        "the authentication service is unreachable; try again shortly",
        "no KDC answered for the realm: check krb5.conf's kdc entries and that the KDC is up",
    ),
    _Rule(
        "cannot find kdc",
        KdcUnavailable,
        "the authentication service is unreachable; try again shortly",
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
        "the gateway's Kerberos set-up is incomplete",
        "the keytab holds no key for {proxy}: export it again (kadmin ktadd / ktpass / msktutil)",
    ),
    _Rule(
        "key table file",
        KerberosMisconfigured,
        "the gateway's Kerberos set-up is incomplete",
        "the keytab cannot be read: check kerberos.keytab and its permissions",
    ),
    _Rule(
        "preauthentication failed",
        KerberosMisconfigured,
        "the gateway's Kerberos set-up is incomplete",
        "the KDC rejected {proxy}'s own key: the keytab is stale (key version changed); export it again",
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
        "the gateway's Kerberos set-up is incomplete",
        "no encryption type is shared (KDC_ERR_ETYPE_NOSUPP): the keys of {proxy} or {spn} are of types the "
        "KDC or krb5.conf's permitted_enctypes no longer allow; create AES keys and export the keytab again",
    ),
    _Rule(
        "integrity check failed",
        KerberosMisconfigured,
        "the gateway's Kerberos set-up is incomplete",
        "a ticket did not decrypt with the key it names (KRB_AP_ERR_BAD_INTEGRITY): the keytab of {proxy} is "
        "stale or belongs to another account; export it again",
    ),
    _Rule(
        "ticket expired",
        KerberosMisconfigured,
        "the gateway's Kerberos set-up is incomplete",
        "the KDC says a ticket of {proxy} has expired (KRB_AP_ERR_TKT_EXPIRED): check the gateway's clock "
        "against the KDC's",
    ),
)

# KDC_ERR_BADOPTION from S4U2Proxy, when it is known whether the evidence ticket was forwardable.
_BADOPTION = "can't fulfill requested option"
_NOT_FORWARDABLE_REASON = "the gateway may not act for {user}: its evidence ticket is not forwardable"
_NOT_FORWARDABLE_HINT = (
    "evidence ticket not forwardable: the service account {proxy} lacks protocol transition, or {user} is "
    "marked sensitive; give {proxy} protocol transition (+ok_to_auth_as_delegate on MIT, 'use any "
    "authentication protocol' / TrustedToAuthForDelegation in AD), and clear 'account is sensitive and cannot "
    "be delegated' on {user} (MIT: +allow_forwardable), or take it out of Protected Users"
)
_NOT_DELEGABLE_HINT = (
    "{spn} is not in the delegation list of {proxy} (the evidence ticket was forwardable, so protocol "
    "transition is fine): add {spn} to the delegation list of {proxy} (krbAllowedToDelegateTo on MIT/LDAP, "
    "msDS-AllowedToDelegateTo in AD), or allow {proxy} on the backend's account (resource-based delegation)"
)


def not_forwardable(*, user: str, proxy: str) -> tuple[str, str]:
    """(reason, hint) for an evidence ticket that came back without the forwardable flag."""
    fill = {"user": user, "proxy": proxy}
    return _NOT_FORWARDABLE_REASON.format(**fill), _NOT_FORWARDABLE_HINT.format(**fill)


def explain(
    message: str,
    *,
    user: str,
    spn: str,
    proxy: str,
    step: str | None = None,
    evidence_forwardable: bool | None = None,
) -> GatewayError:
    """Turn a GSSAPI failure message into the gateway error that says what happened and what to fix.

    `step` ("s4u2self" or "s4u2proxy") and `evidence_forwardable`, when the caller knows them, narrow an
    ambiguous refusal down to its one cause."""
    lowered = message.lower()
    fill = {"user": user, "spn": spn, "proxy": proxy}
    if step == "s4u2proxy" and _BADOPTION in lowered and evidence_forwardable is not None:
        if evidence_forwardable:
            reason, hint = f"the gateway may not act for {user} at {spn}", _NOT_DELEGABLE_HINT.format(**fill)
        else:
            reason, hint = not_forwardable(user=user, proxy=proxy)
        return KerberosRefused(reason, hint=f"{hint} [{message}]")
    for rule in _RULES:
        if rule.needle in lowered:
            return rule.error(rule.reason.format(**fill), hint=f"{rule.hint.format(**fill)} [{message}]")
    return KerberosMisconfigured(
        "the gateway could not obtain a Kerberos ticket for this request",
        hint=f"unexpected Kerberos failure for {user} at {spn}: {message}",
    )
