"""What a KDC's refusal means, and what to change.

GSSAPI reports a failed S4U exchange as a major/minor status pair whose text is MIT's (or Heimdal's)
minor message. This module is the one boundary where those messages become the gateway's errors: a
client-visible reason, and for the log a hint that names the fix. Pure: it sees only strings.
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
)


def explain(message: str, *, user: str, spn: str, proxy: str) -> GatewayError:
    """Turn a GSSAPI failure message into the gateway error that says what happened and what to fix."""
    lowered = message.lower()
    fill = {"user": user, "spn": spn, "proxy": proxy}
    for rule in _RULES:
        if rule.needle in lowered:
            return rule.error(rule.reason.format(**fill), hint=f"{rule.hint.format(**fill)} [{message}]")
    return KerberosMisconfigured(
        "the gateway could not obtain a Kerberos ticket for this request",
        hint=f"unexpected Kerberos failure for {user} at {spn}: {message}",
    )
