"""The KDC's account against the certificate's name (`proxy.kerberos.account`): pure, PAC facts in."""

from __future__ import annotations

import dataclasses

import pytest

from proxy.errors import AccountMismatch
from proxy.identity.principal import UserPrincipal, map_upn
from proxy.kerberos.account import kdc_account
from proxy.kerberos.pac import PacFacts

ALICE_PAC = PacFacts(900, (("upn-dns-info", 80),), "alice@ad.test", "ad.test", "alice", "S-1-5-21-1-2-3-1104")
MALLORY = map_upn("alice@corp.example", realm_map={"corp.example": "AD.TEST"})  # mallory's own UPN


def test_a_realm_map_name_that_is_another_accounts_is_refused() -> None:
    """mallory's UPN alice@corp.example mapped to alice@AD.TEST: the PAC names alice@ad.test, so 403 with the fix."""
    with pytest.raises(AccountMismatch) as refused:
        kdc_account(MALLORY, ALICE_PAC)
    assert refused.value.status == 403
    assert refused.value.reason == "the KDC's account for alice@AD.TEST is not the certificate's"
    assert refused.value.hint is not None
    assert "UPN alice@ad.test, sAMAccountName alice, SID S-1-5-21-1-2-3-1104" in refused.value.hint
    assert "enterprise_names" in refused.value.hint


def test_the_certificates_own_upn_matches_without_regard_to_case() -> None:
    """alice's certificate (ALICE@AD.TEST) and her PAC's alice@ad.test: the same account, rule upn."""
    account = kdc_account(map_upn("ALICE@AD.TEST", realm_map={}), ALICE_PAC)
    assert (account.rule, account.name, str(account)) == ("upn", "alice@ad.test", "upn alice@ad.test")


def test_only_ascii_case_is_ignored() -> None:
    """straße's certificate and a PAC naming strasse: Unicode case folding would call them one name; 403."""
    strasse = dataclasses.replace(ALICE_PAC, upn="strasse@ad.test", sam_name="strasse")
    with pytest.raises(AccountMismatch):
        kdc_account(map_upn("straße@AD.TEST", realm_map={}), strasse)


def test_a_proven_directory_account_is_compared_by_samaccountname() -> None:
    """Strong mapping impersonated sAMAccountName@REALM: the PAC's sAMAccountName must be that account's."""
    mallory = dataclasses.replace(MALLORY, principal="mallory@AD.TEST", account="mallory")
    mallory_pac = dataclasses.replace(ALICE_PAC, upn="alice@corp.example", sam_name="mallory")
    assert kdc_account(mallory, mallory_pac).rule == "sam"
    with pytest.raises(AccountMismatch) as refused:
        kdc_account(mallory, ALICE_PAC)
    assert "base_dn" in (refused.value.hint or "")


def test_a_bare_name_is_compared_with_the_samaccountname() -> None:
    """A common name (or DOMAIN\\user) is an account name: the PAC's sAMAccountName must be it."""
    cn = UserPrincipal(upn="ADTEST\\Alice", principal="Alice@AD.TEST", realm="AD.TEST", source="subject-cn")
    assert kdc_account(cn, ALICE_PAC).rule == "sam"
    with pytest.raises(AccountMismatch):
        kdc_account(dataclasses.replace(cn, upn="bob", principal="bob@AD.TEST"), ALICE_PAC)


MIT_PAC = PacFacts(144, (("ticket-checksum", 16), ("client-info", 20), ("server-checksum", 16)))  # MIT 1.20's


def test_a_ticket_without_any_pac_is_refused_by_default() -> None:
    """No PAC at all (AD leaves it out for a gateway account with NO_AUTH_DATA_REQUIRED): nothing says which
    account the KDC impersonated, so under the default (auto) mallory is refused, not served as alice; the fix
    names the flag and the setting for an MIT KDC that issues none."""
    with pytest.raises(AccountMismatch) as refused:
        kdc_account(MALLORY, None)
    assert refused.value.status == 403
    assert refused.value.reason == "the KDC's account for alice@AD.TEST cannot be verified"
    hint = refused.value.hint or ""
    assert "NO_AUTH_DATA_REQUIRED" in hint
    assert 'kerberos.kdc_account = "optional"' in hint


def test_mits_pac_naming_no_account_is_served_under_auto() -> None:
    """MIT 1.20's PAC (client name and signatures, no UPN_DNS_INFO; AD's always has one): nothing to compare,
    rule none, and the summary line says the account was not stated."""
    account = kdc_account(MALLORY, MIT_PAC)
    assert (account.rule, account.pac) == ("none", True)
    assert str(account).startswith("not stated")


def test_require_wants_a_pac_naming_the_account() -> None:
    """kdc_account = "require" (Active Directory): MIT's PAC naming nobody, or no PAC, is refused; alice's own
    PAC still matches."""
    for pac in (MIT_PAC, None):
        with pytest.raises(AccountMismatch, match="cannot be verified"):
            kdc_account(MALLORY, pac, policy="require")
    assert kdc_account(map_upn("alice@ad.test", realm_map={}), ALICE_PAC, policy="require").rule == "upn"


def test_optional_serves_a_ticket_without_a_pac_and_says_so() -> None:
    """kdc_account = "optional" (an MIT KDC before 1.20, or with disable_pac): no PAC is served, rule none,
    and the summary line says the ticket carried no PAC; a PAC naming another account is still refused."""
    account = kdc_account(MALLORY, None, policy="optional")
    assert (account.rule, account.pac) == ("none", False)
    assert str(account) == "not stated (the ticket carries no PAC)"
    with pytest.raises(AccountMismatch):
        kdc_account(MALLORY, ALICE_PAC, policy="optional")


def test_a_pac_that_cannot_be_read_is_never_an_admission() -> None:
    """The PAC was there but could not be read: refused, with why in the fix."""
    with pytest.raises(AccountMismatch) as refused:
        kdc_account(MALLORY, None, "the PAC is malformed: PAC truncated")
    assert "cannot be verified" in refused.value.reason
    assert "PAC truncated" in (refused.value.hint or "")
