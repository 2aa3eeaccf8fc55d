"""The KDC's account against the certificate's name (`proxy.kerberos.account`): pure, PAC facts in."""

from __future__ import annotations

import dataclasses

import pytest

from proxy.config import KdcAccountPolicy
from proxy.errors import AccountMismatch, AccountReplaced
from proxy.identity.principal import UserPrincipal, map_upn
from proxy.kerberos.account import client_is_asked, kdc_account, split_principal
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


def test_a_directory_account_made_again_under_its_name_is_not_the_one_looked_up() -> None:
    """The mapping stage decided on the account with SID ...-1104 (perhaps from the directory cache); the KDC
    impersonated an account of the same sAMAccountName whose SID is ...-1190 (deleted and made again since):
    AccountReplaced (a 403 AccountMismatch), saying both SIDs; the same SID, or a PAC without one, is served."""
    alice = UserPrincipal(
        "alice@ad.test", "alice@AD.TEST", "AD.TEST", "san-upn", account="alice", account_sid="S-1-5-21-1-2-3-1104"
    )
    assert kdc_account(alice, ALICE_PAC).rule == "sam"
    remade = dataclasses.replace(ALICE_PAC, sid="S-1-5-21-1-2-3-1190")
    with pytest.raises(AccountReplaced) as refused:
        kdc_account(alice, remade)
    assert isinstance(refused.value, AccountMismatch)
    assert refused.value.status == 403
    assert refused.value.hint is not None
    assert "S-1-5-21-1-2-3-1190" in refused.value.hint
    assert "S-1-5-21-1-2-3-1104" in refused.value.hint
    assert kdc_account(alice, dataclasses.replace(ALICE_PAC, sid=None)).rule == "sam"  # a DC before the 2021 updates


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
    """MIT 1.20's PAC (client name and signatures, no UPN_DNS_INFO; AD's always has one): the PAC states no
    account (rule none), the ticket's client is the principal asked for, and the summary line says both."""
    account = kdc_account(MALLORY, MIT_PAC, client="alice@AD.TEST")
    assert (account.rule, account.pac, account.client) == ("none", True, "alice@AD.TEST")
    assert str(account).startswith("not stated")
    assert "its client alice@AD.TEST is the principal asked for" in str(account)


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
    account = kdc_account(MALLORY, None, policy="optional", client="alice@AD.TEST")
    assert (account.rule, account.pac) == ("none", False)
    assert str(account) == "not stated (the ticket carries no PAC; its client alice@AD.TEST is the principal asked for)"
    with pytest.raises(AccountMismatch):
        kdc_account(MALLORY, ALICE_PAC, policy="optional")


def test_a_pac_that_cannot_be_read_is_never_an_admission() -> None:
    """The PAC was there but could not be read: refused, with why in the fix."""
    with pytest.raises(AccountMismatch) as refused:
        kdc_account(MALLORY, None, "the PAC is malformed: PAC truncated")
    assert "cannot be verified" in refused.value.reason
    assert "PAC truncated" in (refused.value.hint or "")


LAB_ALICE = map_upn("alice@lab.test", realm_map={})  # alice@LAB.TEST, an MIT realm's user


@pytest.mark.parametrize("policy", ["auto", "optional"])
@pytest.mark.parametrize(
    "client",
    [
        "bob@LAB.TEST",  # another user's ticket
        "Alice@LAB.TEST",  # MIT compares names byte for byte: another principal
        "alice@lab.test",  # the realm too
        "alice@OTHER.TEST",
        "alice/admin@LAB.TEST",
        "alice\\@lab.test@LAB.TEST",  # the enterprise form, when a plain principal was asked for
        "alice",
        "",
    ],
)
def test_mits_pac_with_another_client_is_refused(policy: KdcAccountPolicy, client: str) -> None:
    """MIT's PAC names no account, so the evidence ticket's client principal is the only word on whom the KDC
    impersonated: any other name than the one asked for (alice@LAB.TEST) is 403 kdc_account_mismatch."""
    pac = MIT_PAC if policy == "auto" else None
    with pytest.raises(AccountMismatch) as refused:
        kdc_account(LAB_ALICE, pac, client=client, policy=policy)
    assert refused.value.status == 403
    assert refused.value.event == "kdc_account_mismatch"
    assert refused.value.reason == "the KDC's account for alice@LAB.TEST is not the certificate's"
    assert f"impersonated {client} when asked for alice@LAB.TEST" in (refused.value.hint or "")


def test_an_unknown_client_with_mits_pac_is_never_an_admission() -> None:
    """A PAC naming no account and no client name to compare (a caller that could not read it): refused."""
    with pytest.raises(AccountMismatch, match="cannot be verified"):
        kdc_account(LAB_ALICE, MIT_PAC)


def test_the_client_is_not_compared_when_the_pac_names_the_account() -> None:
    """AD's PAC names the account (rule upn): Windows may canonicalise the client name, the PAC decides."""
    alice = map_upn("alice@ad.test", realm_map={})
    assert kdc_account(alice, ALICE_PAC, client="ALICE@AD.TEST").rule == "upn"


def test_an_enterprise_name_comes_back_escaped_in_the_kdcs_realm() -> None:
    """identity.enterprise_names: Samba answers carol\\@corp.example@AD.TEST for NT-ENTERPRISE carol@corp.example;
    that is the name asked for, in the user's or the gateway's realm, and nothing else is."""
    carol = dataclasses.replace(map_upn("carol@corp.example", realm_map={}), enterprise="carol@corp.example")
    assert client_is_asked(carol, "carol\\@corp.example@AD.TEST", proxy="HTTP/proxy.ad.test@AD.TEST")
    assert client_is_asked(carol, "carol\\@corp.example@CORP.EXAMPLE")
    for other in (
        "carol@AD.TEST",  # canonicalised to an account name: the PAC must say which (MIT's does not)
        "carol\\@corp.example@EVIL.TEST",
        "Carol\\@corp.example@AD.TEST",
        "mallory\\@corp.example@AD.TEST",
        "carol@corp.example",
    ):
        assert not client_is_asked(carol, other, proxy="HTTP/proxy.ad.test@AD.TEST"), other


def test_split_principal_honours_escapes() -> None:
    """The realm starts at the last '@' no backslash escapes."""
    assert split_principal("carol\\@corp.example@AD.TEST") == ("carol\\@corp.example", "AD.TEST")
    assert split_principal("a\\\\@B") == ("a\\\\", "B")
    assert split_principal("carol\\@corp.example") == ("carol\\@corp.example", "")


@pytest.mark.parametrize("sam", ["DC1$", "EXCH01$", "ADTEST$"])
def test_a_computer_or_trust_account_is_never_a_user(sam: str) -> None:
    """A PAC whose sAMAccountName ends in `$` (a computer's, a trust's) is refused even when its implicit UPN is the
    certificate's own name, and whatever the mapping proved: the gateway serves users only."""
    pac = dataclasses.replace(ALICE_PAC, upn=f"{sam.lower()}@ad.test", sam_name=sam)
    with pytest.raises(AccountMismatch) as refused:
        kdc_account(map_upn(f"{sam.lower()}@ad.test", realm_map={}), pac)
    assert "is a computer or trust account" in refused.value.reason
    assert sam in (refused.value.hint or "")
    proven = UserPrincipal("x@ad.test", f"{sam}@AD.TEST", "AD.TEST", "san-upn", account=sam, account_sid=pac.sid)
    with pytest.raises(AccountMismatch):
        kdc_account(proven, pac)
