"""KDC failure messages become errors that say what to fix."""

from __future__ import annotations

import pytest

from proxy.errors import (
    AccountRevoked,
    GatewayError,
    KdcUnavailable,
    KerberosMisconfigured,
    KerberosOverloaded,
    KerberosRefused,
    NotForwardable,
)
from proxy.kerberos.hints import (
    UF_NOT_DELEGATED,
    UF_TRUSTED_TO_AUTH_FOR_DELEGATION,
    ProtectedUsers,
    clock_skew,
    explain,
    not_forwardable_named,
    own_ticket_refused,
    protected_users_in_question,
)


@pytest.mark.parametrize(
    ("message", "kind", "status", "in_reason", "in_hint"),
    [
        (
            "Unspecified GSS failure.  Minor code may provide more information, KDC can't fulfill requested option",
            KerberosRefused,
            403,
            "may not act for alice@LAB.TEST at HTTP/cas.lab.test",
            "add HTTP/cas.lab.test to the delegation list of HTTP/proxy.lab.test@LAB.TEST",
        ),
        ("Client not found in Kerberos database", KerberosRefused, 403, "no Kerberos account", "realm_map"),
        (
            "Client's credentials have been revoked",
            AccountRevoked,
            403,
            "alice@LAB.TEST is disabled or locked, or has expired",
            "CLIENT_REVOKED",
        ),
        ("Cannot contact any KDC for realm 'LAB.TEST'", KdcUnavailable, 503, "unreachable", "KDC is up"),
        ("Server not found in Kerberos database", KerberosMisconfigured, 502, "incomplete", "register the SPN"),
        ("Clock skew too great", KerberosMisconfigured, 502, "clock", "NTP"),
        ("something nobody has seen", KerberosMisconfigured, 502, "could not obtain", "something nobody has seen"),
    ],
)
def test_kdc_messages_map_to_errors_with_fixes(
    message: str, kind: type[GatewayError], status: int, in_reason: str, in_hint: str
) -> None:
    """Each known KDC refusal gets its class, status, a client reason and an administrator's fix."""
    err = explain(message, user="alice@LAB.TEST", spn="HTTP/cas.lab.test", proxy="HTTP/proxy.lab.test@LAB.TEST")
    assert type(err) is kind
    assert err.status == status
    assert in_reason in err.reason
    assert err.hint is not None
    assert in_hint in err.hint


def test_a_revoked_account_names_all_three_states_and_keeps_the_principal() -> None:
    """KDC_ERR_CLIENT_REVOKED is Samba's and Windows' one code for disabled, locked out and expired accounts: the
    reason names all three (it said 'disabled or locked' to an expired account's user), and the error keeps the
    principal so that a configured directory can name the one that holds (proxy.pipeline.account_named)."""
    err = explain("Client's credentials have been revoked", user="ivan@AD.TEST", spn="krbtgt", proxy="svc@AD.TEST")
    assert isinstance(err, AccountRevoked)
    assert err.reason == "the account ivan@AD.TEST is disabled or locked, or has expired"
    assert err.user == "ivan@AD.TEST"


def test_kdc_unavailable_tells_the_client_when_to_retry() -> None:
    """An unreachable KDC is a 503 with Retry-After, never a 401."""
    err = explain("Cannot contact any KDC", user="a@B", spn="HTTP/x", proxy="HTTP/p@B")
    assert err.status == 503
    assert "Retry-After" in err.headers


BADOPTION = "Unspecified GSS failure.  Minor code may provide more information, KDC can't fulfill requested option"


def _explain(message: str, *, step: str | None = None, evidence_forwardable: bool | None = None) -> GatewayError:
    proxy = "HTTP/proxy.lab.test@LAB.TEST"
    spn = "HTTP/cas.lab.test"
    return explain(
        message, user="eve@LAB.TEST", spn=spn, proxy=proxy, step=step, evidence_forwardable=evidence_forwardable
    )


def test_badoption_after_a_not_forwardable_evidence_ticket_names_protocol_transition_or_a_sensitive_user() -> None:
    """S4U2Proxy refused and the evidence ticket was not forwardable: that cause alone, with its fix."""
    err = _explain(BADOPTION, step="s4u2proxy", evidence_forwardable=False)
    assert type(err) is NotForwardable  # a KerberosRefused a configured directory can name the cause of
    assert isinstance(err, KerberosRefused)
    assert (err.user, err.message) == ("eve@LAB.TEST", BADOPTION)
    assert err.reason == "the gateway may not act for eve@LAB.TEST: its evidence ticket is not forwardable"
    assert err.hint is not None
    assert err.hint.startswith("evidence ticket not forwardable: the service account HTTP/proxy.lab.test@LAB.TEST")
    assert "lacks protocol transition, or eve@LAB.TEST is marked sensitive" in err.hint
    assert "delegation list" not in err.hint


def test_the_not_forwardable_fix_gives_mits_commands_as_it_gives_ads() -> None:
    """On the MIT lab the fix named bare flags (`+ok_to_auth_as_delegate`, `+allow_forwardable`) where AD got commands:
    a learner gets the kadmin command for each, for the gateway's principal and for the user."""
    err = _explain(BADOPTION, step="s4u2proxy", evidence_forwardable=False)
    assert err.hint is not None
    assert "kadmin.local -q 'modprinc +ok_to_auth_as_delegate HTTP/proxy.lab.test@LAB.TEST'" in err.hint
    assert "kadmin.local -q 'modprinc +allow_forwardable eve@LAB.TEST'" in err.hint


def test_badoption_after_a_forwardable_evidence_ticket_names_the_delegation_list_only() -> None:
    """S4U2Proxy refused although the evidence ticket was forwardable: the SPN is not allowed."""
    err = _explain(BADOPTION, step="s4u2proxy", evidence_forwardable=True)
    assert err.reason == "the gateway may not act for eve@LAB.TEST at HTTP/cas.lab.test"
    assert err.hint is not None
    assert "add HTTP/cas.lab.test to the delegation list of HTTP/proxy.lab.test@LAB.TEST" in err.hint
    assert "sensitive" not in err.hint


@pytest.mark.parametrize(
    ("message", "kind", "in_hint"),
    [
        ("KDC policy rejects request", KerberosRefused, "KDC_ERR_POLICY"),
        ("KDC has no support for encryption type", KerberosMisconfigured, "KDC_ERR_ETYPE_NOSUPP"),
        ("Decrypt integrity check failed", KerberosMisconfigured, "stale"),
        ("Ticket expired", KerberosMisconfigured, "clock"),
    ],
)
def test_more_kdc_refusals_have_a_cause_and_a_fix(message: str, kind: type[GatewayError], in_hint: str) -> None:
    """Policy, enctype, integrity and expiry failures each name their cause and what to change."""
    err = _explain(message)
    assert type(err) is kind
    assert err.hint is not None
    assert in_hint in err.hint
    assert err.hint.endswith(f"[{message}]")


# -- Active Directory's answers, as Samba's KDC gave them (tests/integration/test_ad.py sees them live) --------

_POLICY = "Major (851968): Unspecified GSS failure, Minor (2529638924): KDC policy rejects request"
_SERVER_NOT_FOUND = "Minor (2529638919): Server not found in Kerberos database"
_CLIENT_NOT_FOUND = "Minor (2529638918): Client 'HTTP/proxy.ad.test@AD.TEST' not found in Kerberos database"
_SPN, _PROXY = "HTTP/cas.ad.test", "svc-kcdproxy@AD.TEST"


def test_policy_refusal_of_s4u2self_is_the_users_account_not_delegation() -> None:
    """KDC_ERR_POLICY from S4U2Self (a disabled AD user): a 403 about the account, not delegation or Protected Users."""
    error = explain(_POLICY, user="dave@AD.TEST", step="s4u2self", spn=_SPN, proxy=_PROXY)
    assert isinstance(error, KerberosRefused)
    assert error.status == 403
    assert "disabled" in error.reason
    assert error.hint is not None
    assert "enable dave@AD.TEST" in error.hint
    assert "Protected Users" not in error.hint
    assert "delegation list" not in error.hint


def test_policy_refusal_of_s4u2proxy_still_points_at_delegation() -> None:
    """KDC_ERR_POLICY from S4U2Proxy keeps the delegation explanation."""
    error = explain(_POLICY, user="alice@AD.TEST", step="s4u2proxy", spn=_SPN, proxy=_PROXY)
    assert isinstance(error, KerberosRefused)
    assert error.hint is not None
    assert "delegation" in error.hint


def test_upn_suffix_outside_the_realm_is_a_user_side_403_naming_enterprise_names() -> None:
    """'Server not found' from S4U2Self for carol@CORP.EXAMPLE is the user's 403 (enterprise_names, realm_map), never
    the operator's kerberos_misconfigured alarm about the backend SPN."""
    error = explain(_SERVER_NOT_FOUND, user="carol@CORP.EXAMPLE", step="s4u2self", spn=_SPN, proxy=_PROXY)
    assert isinstance(error, KerberosRefused)
    assert not isinstance(error, KerberosMisconfigured)
    assert error.status == 403
    assert error.event == "kerberos_refused"
    assert error.hint is not None
    assert "enterprise_names" in error.hint
    assert "realm_map" in error.hint
    assert "krbtgt/CORP.EXAMPLE" in error.hint
    assert "HTTP/cas.ad.test" not in error.hint


def test_upn_suffix_outside_the_realm_gives_the_realm_map_line_for_an_mit_kdc() -> None:
    """Against an MIT KDC, which has no enterprise names, the fix for a UPN suffix outside the realm is a realm_map
    entry: the hint gives the line to write, the suffix mapped to the gateway's own realm. Failed before: the hint
    named enterprise_names first (which MIT cannot resolve) and realm_map only in general words."""
    proxy = "HTTP/kcd-gw.nc4.test@NC4.TEST"
    error = explain(_SERVER_NOT_FOUND, user="alice@CORP.NC4.EXAMPLE", step="s4u2self", spn=_SPN, proxy=proxy)
    assert isinstance(error, KerberosRefused)
    assert error.hint is not None
    assert 'identity.realm_map = { "corp.nc4.example" = "NC4.TEST" }' in error.hint, error.hint
    assert "MIT" in error.hint, error.hint
    assert "enterprise_names" in error.hint, error.hint


def test_server_not_found_in_the_gateways_own_realm_is_still_misconfiguration() -> None:
    """The same message for a user of the gateway's realm (or from S4U2Proxy) stays the SPN misconfiguration."""
    for step in ("s4u2self", "s4u2proxy"):
        error = explain(_SERVER_NOT_FOUND, user="alice@AD.TEST", step=step, spn=_SPN, proxy=_PROXY)
        assert isinstance(error, KerberosMisconfigured), step


def test_mits_server_not_found_naming_the_spn_is_the_spn_misconfiguration() -> None:
    """MIT 1.20's S4U2Proxy message names the SPN the KDC lacks ("Server HTTP/x@R not found in Kerberos database"):
    still the SPN misconfiguration with its fix, not an 'unexpected Kerberos failure' (seen from outside with a
    route whose default SPN, HTTP/<upstream host>, is not registered)."""
    message = (
        "Major (851968): Unspecified GSS failure.  Minor code may provide more information, "
        "Minor (100005): Server HTTP/127.0.0.1@LAB.TEST not found in Kerberos database"
    )
    error = explain(message, user="alice@LAB.TEST", step="s4u2proxy", spn="HTTP/127.0.0.1", proxy=_PROXY)
    assert isinstance(error, KerberosMisconfigured)
    assert error.hint is not None
    assert "the KDC does not know HTTP/127.0.0.1" in error.hint
    assert "routes[].spn" in error.hint
    named_client = explain(
        "Client 'ghost@LAB.TEST' not found in Kerberos database", user="ghost@LAB.TEST", spn=_SPN, proxy=_PROXY
    )
    assert isinstance(named_client, KerberosRefused)


def test_an_spn_the_kdc_lacks_gets_mits_command_too() -> None:
    """The unknown-SPN fix gave AD's and Samba's commands only; on the MIT lab (doctor with a route to an SPN no
    principal has) a learner gets kadmin's as well."""
    error = explain(
        "Server HTTP/nothere.lab.test@LAB.TEST not found in Kerberos database",
        user="alice@LAB.TEST",
        step="s4u2proxy",
        spn="HTTP/nothere.lab.test",
        proxy=_PROXY,
    )
    assert error.hint is not None
    assert "MIT: kadmin.local -q 'addprinc -randkey HTTP/nothere.lab.test'" in error.hint


def test_gateways_own_principal_unknown_is_misconfiguration_naming_the_account() -> None:
    """'Client not found' for the gateway's own AS exchange is a 502 telling the operator to use the account's name
    (AD gives no TGT to a bare SPN), not the user's 'no Kerberos account matches'."""
    error = explain(
        _CLIENT_NOT_FOUND,
        user="alice@AD.TEST",
        spn="HTTP/cas.ad.test",
        proxy="HTTP/proxy.ad.test@AD.TEST",
        step="service",
    )
    assert isinstance(error, KerberosMisconfigured)
    assert error.status == 502
    assert "alice" not in error.reason
    assert error.hint is not None
    assert "svc-kcdproxy@CORP.EXAMPLE.COM" in error.hint
    assert "kerberos.principal" in error.hint
    assert "UPN" in error.hint


def test_an_as_reply_the_keytab_cannot_decrypt_is_named_as_such_not_as_a_ticket() -> None:
    """'Decrypt integrity check failed' in the gateway's own AS exchange (a keytab whose key is not the account's:
    seen on the MIT lab with a keytab of the right name and version and another key) is the KDC's reply failing to
    decrypt with the keytab's key; the fix said "a ticket did not decrypt with the key it names"."""
    error = explain("Decrypt integrity check failed", user="alice@LAB.TEST", spn=_SPN, proxy=_PROXY, step="service")
    assert isinstance(error, KerberosMisconfigured)
    assert error.hint is not None
    assert "a ticket did not decrypt" not in error.hint
    assert f"its answer did not decrypt with the keytab's key for {_PROXY}" in error.hint
    assert "the KDC refused" not in error.hint
    assert "export it again" in error.hint


def test_gateways_own_credentials_without_a_kdc_is_still_unavailable() -> None:
    """No KDC for the gateway's own AS exchange stays a 503 with Retry-After."""
    error = explain(
        "Cannot contact any KDC for realm 'AD.TEST'", user="alice@AD.TEST", step="service", spn=_SPN, proxy=_PROXY
    )
    assert isinstance(error, KdcUnavailable)
    assert error.status == 503


@pytest.mark.parametrize(
    ("offset", "words"), [(601.4, "about 601 s ahead of the KDC's"), (-599.6, "about 600 s behind")]
)
def test_a_skewed_clock_is_the_operators_502_with_the_offset(offset: float, words: str) -> None:
    """Accepting a ticket failed on the clock: 502 kerberos_misconfigured, the offset and the NTP fix in the hint."""
    err = clock_skew("Clock skew too great", proxy="svc-kcdproxy@AD.TEST", offset=offset)
    assert (type(err), err.status) == (KerberosMisconfigured, 502)
    assert err.hint is not None
    assert words in err.hint
    assert "synchronise the gateway's clock" in err.hint
    unknown = clock_skew("Ticket not yet valid", proxy="svc-kcdproxy@AD.TEST", offset=None)
    assert unknown.hint is not None
    assert unknown.hint.startswith("the gateway's clock is more than the allowed skew")


def test_an_evidence_ticket_the_keytab_cannot_open_is_the_operators_502_naming_the_key_versions() -> None:
    """The gateway's own evidence ticket sealed in a key version its keytab lacks: 502 kerberos_misconfigured whose fix
    names both versions and the keytab's path; versions unknown (or the one the KDC used held), a stale or foreign
    keytab, still the operator's 502."""
    message = "Request ticket server HTTP/proxy.lab.test@LAB.TEST kvno 3 not found in keytab"
    proxy, keytab = "HTTP/proxy.lab.test@LAB.TEST", "/etc/kcd-proxy/proxy.keytab"
    err = own_ticket_refused(message, proxy=proxy, keytab=keytab, sealed=3, held={1, 2})
    assert (type(err), err.status, err.event) == (KerberosMisconfigured, 502, "kerberos_misconfigured")
    assert err.hint is not None
    assert f"key version 3 of {proxy}, and {keytab} holds version 1, 2 only" in err.hint
    assert "ktadd -norandkey" in err.hint
    assert err.hint.endswith(f"[{message}]")
    for sealed, held in ((None, {1}), (3, None), (3, {3})):
        other = own_ticket_refused(message, proxy=proxy, keytab=keytab, sealed=sealed, held=held)
        assert other.status == 502
        assert f"{keytab} holds no key that opens it" in (other.hint or "")


def test_no_kdc_for_the_users_own_realm_at_s4u2self_is_the_certificates_suffix_not_an_outage() -> None:
    """S4U2Self for alice@ADTEST (Samba refers its NetBIOS name to a realm krb5.conf gives no KDC): 403 naming the
    suffix; the same words for the gateway's own realm, or outside S4U2Self, stay a KDC that cannot be found (503)."""
    message = "Unspecified GSS failure.  Minor code may provide more information, Cannot find KDC for requested realm"

    def explained(user: str, step: str) -> GatewayError:
        return explain(message, user=user, spn="HTTP/cas.ad.test", proxy="svc-kcdproxy@AD.TEST", step=step)

    refused = explained("alice@ADTEST", "s4u2self")
    assert isinstance(refused, KerberosRefused)
    assert refused.reason == "no Kerberos realm serves alice@ADTEST's UPN suffix"
    assert isinstance(explained("alice@AD.TEST", "s4u2self"), KdcUnavailable)
    assert isinstance(explained("alice@ADTEST", "s4u2proxy"), KdcUnavailable)


def test_the_users_realm_in_another_case_than_the_gateways_is_the_configuration_not_an_outage() -> None:
    """S4U2Self for alice@ad.test with the gateway in AD.TEST (a realm_map value in lower case): 502 naming the case and
    the keys, not 503 "unreachable"; the realm in capitals stays a KDC that cannot be found (503)."""
    message = "Unspecified GSS failure.  Minor code may provide more information, Cannot find KDC for requested realm"

    def explained(user: str) -> GatewayError:
        return explain(message, user=user, spn="HTTP/cas.ad.test", proxy="svc-kcdproxy@AD.TEST", step="s4u2self")

    refused = explained("alice@ad.test")
    assert (type(refused), refused.status) == (KerberosMisconfigured, 502)
    assert "ad.test is the gateway's realm AD.TEST in another case" in (refused.hint or "")
    assert '(identity.realm_map, identity.default_realm) as "AD.TEST"' in (refused.hint or "")
    assert isinstance(explained("alice@AD.TEST"), KdcUnavailable)


def test_a_upn_suffix_taken_in_capitals_beside_a_gateway_realm_in_small_letters_is_told_the_realm_map_line() -> None:
    """What still reaches a request once check-config refuses a realm_map or default_realm in another case than
    kerberos.principal's: a gateway whose (MIT) realm is in small letters and a UPN suffix no realm_map key names,
    taken as its realm in capitals. A 502 whose fix gives the realm_map line that maps the suffix to the gateway's
    realm as written, and never sends the operator to capitals."""
    message = "Unspecified GSS failure.  Minor code may provide more information, Cannot find KDC for requested realm"
    refused = explain(
        message, user="alice@LAB.TEST", spn="HTTP/cas.lab.test", proxy="HTTP/proxy.lab.test@lab.test", step="s4u2self"
    )
    assert (type(refused), refused.status) == (KerberosMisconfigured, 502)
    assert 'identity.realm_map = { "lab.test" = "lab.test" }' in (refused.hint or ""), refused.hint
    assert "in capitals" in (refused.hint or ""), refused.hint
    assert "Active Directory" not in (refused.hint or ""), refused.hint


@pytest.mark.parametrize("step", ["service", "s4u2self", "s4u2proxy", None])
@pytest.mark.parametrize(
    ("minor", "in_hint"),
    [
        ("Too many open files", "EMFILE"),
        ("Too many open files in system", "ENFILE"),
        ("Cannot allocate memory", "ENOMEM"),
        ("No buffer space available", "ENOBUFS"),
    ],
)
def test_a_local_shortage_in_a_kdc_call_is_the_gateways_overload_not_its_set_up(
    step: str | None, minor: str, in_hint: str
) -> None:
    """The gateway out of descriptors or memory in a KDC call (MIT's strerror in the minor status) is its own
    overload, 503 with Retry-After and a fix of its own: it was `kerberos_misconfigured` (502), the keytab blamed."""
    message = f"Major (458752): No credentials were supplied, or the credentials were unavailable, Minor (24): {minor}"
    err = explain(message, user="a@B", spn="HTTP/x", proxy="HTTP/p@B", step=step)
    assert type(err) is KerberosOverloaded
    assert (err.status, err.event, err.headers) == (503, "kerberos_resources_exhausted", {"Retry-After": "30"})
    assert err.reason == "the gateway is overloaded; try again shortly"
    assert err.hint is not None
    assert in_hint in err.hint
    assert "keytab" not in err.hint
    assert minor in err.hint


def test_a_ticket_not_forwardable_from_an_ad_kdc_gives_ads_commands_only() -> None:
    """No directory to name the cause: where the evidence ticket's PAC shows an AD KDC (`active_directory`) the fix
    gives AD's commands for both causes (PowerShell, samba-tool) and no MIT kadmin; where the realm is not known,
    both realms' commands, each labelled."""

    def fix(active_directory: bool) -> str:
        err = explain(
            BADOPTION,
            user="erin@AD.TEST",
            spn="HTTP/cas.ad.test",
            proxy="svc-gw@AD.TEST",
            step="s4u2proxy",
            evidence_forwardable=False,
            active_directory=active_directory,
        )
        assert err.reason == "the gateway may not act for erin@AD.TEST: its evidence ticket is not forwardable"
        return err.hint or ""

    ad, unknown = fix(True), fix(False)
    assert "kadmin" not in ad
    assert "Set-ADAccountControl svc-gw -TrustedToAuthForDelegation $true" in ad
    assert "samba-tool delegation for-any-protocol svc-gw on" in ad
    assert "Set-ADAccountControl erin -AccountNotDelegated $false" in ad
    assert "samba-tool user sensitive erin off" in ad
    assert "Protected Users" in ad
    assert "MIT: kadmin.local -q 'modprinc +ok_to_auth_as_delegate svc-gw@AD.TEST'" in unknown
    assert "MIT: kadmin.local -q 'modprinc +allow_forwardable erin@AD.TEST'" in unknown
    assert "AD: Set-ADAccountControl" in unknown


def test_the_directory_names_the_one_cause_of_a_ticket_not_forwardable() -> None:
    """With the user's account from the directory: NOT_DELEGATED set is the user's flag alone (the gateway's protocol
    transition, not read, neither blamed nor cleared); clear, it is the gateway account's protocol transition, in AD's
    words and commands."""
    dn = "CN=erin,CN=Users,DC=ad,DC=test"
    named = {
        uac: not_forwardable_named(
            user="erin@AD.TEST", proxy="svc-gw@AD.TEST", dn=dn, sam="erin", user_account_control=uac
        )
        for uac in (0x200 | UF_NOT_DELEGATED, 0x200)
    }
    sensitive, plain = named[0x200 | UF_NOT_DELEGATED], named[0x200]
    assert f"'Account is sensitive and cannot be delegated' is set on {dn} (NOT_DELEGATED" in sensitive
    assert "Set-ADAccountControl erin -AccountNotDelegated $false" in sensitive
    assert "samba-tool user sensitive erin off" in sensitive
    assert "not the cause" not in sensitive  # the gateway's account not read: neither blamed nor cleared
    assert "TrustedToAuthForDelegation" not in sensitive
    assert f"{dn} is not marked 'Account is sensitive and cannot be delegated'" in plain
    assert "so the cause is svc-gw@AD.TEST: it lacks protocol transition" in plain
    assert "'Use any authentication protocol'" in plain
    assert "Set-ADAccountControl svc-gw -TrustedToAuthForDelegation $true" in plain
    assert "samba-tool delegation for-any-protocol svc-gw on" in plain
    assert "Protected Users" in plain
    assert "TRUSTED_TO_AUTH_FOR_DELEGATION is clear" not in plain  # the gateway's account unknown: not claimed


def test_the_gateway_accounts_own_flag_decides_between_protocol_transition_and_protected_users() -> None:
    """The user not marked sensitive: with the gateway account's userAccountControl read too, protocol transition clear
    is named as read; set, the cause left is Protected Users (not shown by any bit), never the gateway's flag."""
    dn = "CN=pat,CN=Users,DC=ad,DC=test"

    def named(gateway_control: int) -> str:
        return not_forwardable_named(
            user="pat@AD.TEST",
            proxy="svc-gw@AD.TEST",
            dn=dn,
            sam="pat",
            user_account_control=0x200,
            gateway_control=gateway_control,
        )

    lacking = named(0x200)
    assert "so the cause is svc-gw@AD.TEST: it lacks protocol transition (TRUSTED_TO_AUTH_FOR_DELEGATION is clear" in (
        lacking
    )
    member = named(0x200 | UF_TRUSTED_TO_AUTH_FOR_DELEGATION)
    assert "svc-gw@AD.TEST has 'Use any authentication protocol' (TRUSTED_TO_AUTH_FOR_DELEGATION)" in member
    assert "most likely a member of Protected Users" in member
    assert (
        "Remove-ADGroupMember 'Protected Users' pat; samba-tool group removemembers 'Protected Users' pat where"
        in member
    )
    assert "Get-ADPrincipalGroupMembership pat" in member  # a nested member leaves another group
    assert "lacks protocol transition" not in member


_GROUP = ("CN=Protected Users,CN=Users,DC=ad,DC=test", "Protected Users")
_TEAM = ("CN=team,OU=Groups,DC=ad,DC=test", "team-sam")


def _protected_hint(protected: ProtectedUsers) -> str:
    return not_forwardable_named(
        user="quinn@AD.TEST",
        proxy="svc-gw@AD.TEST",
        dn="CN=quinn,CN=Users,DC=ad,DC=test",
        sam="quinn",
        user_account_control=0x200,
        gateway_control=0x200 | UF_TRUSTED_TO_AUTH_FOR_DELEGATION,
        protected=protected,
    )


def test_the_protected_users_hint_says_how_the_user_is_a_member() -> None:
    """A member itself: Protected Users' removal; through a group of its own: that group's (by its sAMAccountName),
    never Protected Users', which fails for a nested member; both: both; not a member: no removal at all; a member
    by no listed membership: how to find it."""
    direct = _protected_hint(ProtectedUsers(True, _GROUP, direct=True))
    assert f"is a member of Protected Users ({_GROUP[0]}) itself" in direct
    assert "Remove-ADGroupMember 'Protected Users' quinn; samba-tool group removemembers 'Protected Users' quinn" in (
        direct
    )
    nested = _protected_hint(ProtectedUsers(True, _GROUP, through=(_TEAM,)))
    assert f"through {_TEAM[0]}, its own group in it (nested)" in nested
    assert "Remove-ADGroupMember 'team-sam' quinn; samba-tool group removemembers 'team-sam' quinn" in nested
    assert "'Protected Users' quinn" not in nested
    both = _protected_hint(ProtectedUsers(True, _GROUP, direct=True, through=(_TEAM,)))
    assert "itself and through" in both
    assert "Remove-ADGroupMember 'Protected Users' quinn" in both
    assert "Remove-ADGroupMember 'team-sam' quinn" in both
    absent = _protected_hint(ProtectedUsers(False))
    assert "is not a member of Protected Users either" in absent
    assert "Remove-ADGroupMember" not in absent
    unlisted = _protected_hint(ProtectedUsers(True, _GROUP))
    assert "by no membership the directory lists" in unlisted
    assert "Get-ADPrincipalGroupMembership quinn" in unlisted
    assert "Remove-ADGroupMember" not in unlisted


def test_protected_users_is_read_only_where_it_is_the_cause_in_question() -> None:
    """The membership is looked up only for a user not marked sensitive behind a gateway read with protocol
    transition: elsewhere the hint names another cause, and the directory is not asked."""
    assert protected_users_in_question(0x200, 0x200 | UF_TRUSTED_TO_AUTH_FOR_DELEGATION)
    assert not protected_users_in_question(0x200 | UF_NOT_DELEGATED, 0x200 | UF_TRUSTED_TO_AUTH_FOR_DELEGATION)
    assert not protected_users_in_question(0x200, 0x200)
    assert not protected_users_in_question(0x200, None)


def test_a_sensitive_user_behind_a_gateway_without_protocol_transition_is_told_both_causes() -> None:
    """erin marked sensitive (NOT_DELEGATED) and the gateway's account read without TRUSTED_TO_AUTH_FOR_DELEGATION: both
    are causes, and both are named with their commands; the gateway's protocol transition is said not to be the cause
    only where its flag was read set. Before, the hint said "svc-gw's protocol transition is not the cause" whatever
    the gateway's account showed: the administrator cleared erin's flag and she was refused again, for the gateway's."""
    dn = "CN=erin,CN=Users,DC=ad,DC=test"

    def named(gateway_control: int | None) -> str:
        return not_forwardable_named(
            user="erin@AD.TEST",
            proxy="svc-gw@AD.TEST",
            dn=dn,
            sam="erin",
            user_account_control=0x200 | UF_NOT_DELEGATED,
            gateway_control=gateway_control,
        )

    both = named(0x200)
    assert f"'Account is sensitive and cannot be delegated' is set on {dn} (NOT_DELEGATED" in both
    assert "samba-tool user sensitive erin off" in both
    assert "svc-gw@AD.TEST lacks protocol transition too (TRUSTED_TO_AUTH_FOR_DELEGATION is clear" in both
    assert "Set-ADAccountControl svc-gw -TrustedToAuthForDelegation $true" in both
    assert "samba-tool delegation for-any-protocol svc-gw on" in both
    assert "not the cause" not in both
    assert "svc-gw@AD.TEST's protocol transition is not the cause" in named(0x200 | UF_TRUSTED_TO_AUTH_FOR_DELEGATION)
    unknown = named(None)
    assert "not the cause" not in unknown
    assert "lacks protocol transition too" not in unknown


def test_a_user_realm_in_small_letters_is_named_in_the_foreign_realms_hint() -> None:
    """S4U2Self for alice@corp.example (a realm_map realm in small letters) where the KDC serves no such realm: the
    403's hint says realm names are case-sensitive and names CORP.EXAMPLE; a realm in capitals gets no such words."""
    message = "Unspecified GSS failure.  Minor code may provide more information, Server not found in Kerberos database"

    def hint(user: str) -> str:
        refused = explain(
            message, user=user, spn="HTTP/cas.lab.test", proxy="HTTP/proxy.lab.test@LAB.TEST", step="s4u2self"
        )
        assert isinstance(refused, KerberosRefused)
        return refused.hint or ""

    assert (
        "the realm corp.example is in small letters, and Kerberos realm names are case-sensitive: where the KDC's "
        "realm is CORP.EXAMPLE, identity.realm_map or identity.default_realm should say so"
        in hint("alice@corp.example")
    )
    assert "small letters" not in hint("alice@CORP.EXAMPLE")
