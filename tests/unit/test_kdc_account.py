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


@pytest.mark.parametrize(
    "pac", [None, PacFacts(200, (("client-info", 20),))], ids=["no PAC (MIT)", "PAC without UPN_DNS_INFO"]
)
def test_a_ticket_naming_no_account_is_served_as_before(pac: PacFacts | None) -> None:
    """Nothing to compare (MIT's KDC): rule none, and the summary line says so."""
    account = kdc_account(MALLORY, pac)
    assert account.rule == "none"
    assert str(account).startswith("not stated")


def test_a_pac_that_cannot_be_read_is_never_an_admission() -> None:
    """The PAC was there but could not be read: refused, with why in the fix."""
    with pytest.raises(AccountMismatch) as refused:
        kdc_account(MALLORY, None, "the PAC is malformed: PAC truncated")
    assert "cannot be verified" in refused.value.reason
    assert "PAC truncated" in (refused.value.hint or "")
