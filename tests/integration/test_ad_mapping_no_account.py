"""A certificate whose UPN names no user account, and whose SID says whose it is: the real Samba AD DC.

`strong-or-audit` serves a certificate whose name no user account under `base_dn` has as weakly mapped, and lets
the KDC decide (an account outside `base_dn` keeps working during the audit). The KDC knows more names than the
directory's user filter finds: a computer account (`ws01$`), a managed service account. A certificate issued to
bob through a template that lets the requester write the subjectAltName (ESC1) carries bob's SID, which AD CS
writes for the requester, and any UPN bob chose. These tests mint such certificates with the openssl CLI and send
them through a real `strong-or-audit` gateway, curl as the device.
"""

from __future__ import annotations

import secrets
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from proxy.lab import ad, ad_mapping
from tests.integration.ad_fixtures import AD_TIMEOUT, AdProcess
from tests.integration.test_ad_mapping import served_as, start_gateway
from tests.integration.test_ad_openssl_mapping import curl, mint, sid_extension_text, upn_line

pytestmark = pytest.mark.timeout(AD_TIMEOUT)


@pytest.fixture(scope="module")
def realm(ad_mapping_realm: ad.AdRealm) -> ad.AdRealm:
    return ad_mapping_realm


@pytest.fixture(scope="module")
def audit(realm: ad.AdRealm, ad_backend: AdProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AdProcess]:
    """`strong-or-audit`, asking the directory on every request."""
    table = ad_mapping.directory_table(realm, cache_seconds=0)
    gw = start_gateway(realm, tmp_path_factory.mktemp("no-account-audit"), ad_backend, "strong-or-audit", table)
    yield gw
    gw.stop()


@pytest.fixture(scope="module")
def users_only(
    realm: ad.AdRealm, ad_backend: AdProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[AdProcess]:
    """`strong-or-audit` with `base_dn` narrowed to CN=Users (an operator's "our users are in there"): a user
    elsewhere in the domain is outside it, which the audit still serves."""
    table = ad_mapping.directory_table(realm, cache_seconds=0)
    table = table.replace(f'base_dn = "{realm.base_dn}"', f'base_dn = "CN=Users,{realm.base_dn}"')
    gw = start_gateway(realm, tmp_path_factory.mktemp("no-account-users"), ad_backend, "strong-or-audit", table)
    yield gw
    gw.stop()


@pytest.fixture(scope="module")
def outsider(realm: ad.AdRealm) -> Iterator[str]:
    """A user in an OU of this module's own, outside CN=Users (its sAMAccountName); deleted after, with the OU."""
    name, ou = f"ou{secrets.token_hex(3)}", f"OU=Out{secrets.token_hex(3)}"
    realm.samba_tool("ou", "create", f"{ou},{realm.base_dn}")
    realm.samba_tool("user", "create", name, f"Ou-{secrets.token_hex(8)}-Pa55", f"--userou={ou}")
    try:
        yield name
    finally:
        realm.samba_tool("user", "delete", name)
        realm.samba_tool("ou", "delete", f"{ou},{realm.base_dn}")


@pytest.fixture(scope="module")
def minted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """This module's device key and request (openssl req), shared by its certificates."""
    where = tmp_path_factory.mktemp("no-account-minted")
    argv = ["openssl", "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    argv += ["-keyout", str(where / "device.key"), "-out", str(where / "device.csr"), "-subj", "/CN=device"]
    subprocess.run(argv, check=True, capture_output=True)
    return where


@pytest.fixture(scope="module")
def computer(realm: ad.AdRealm) -> Iterator[str]:
    """A computer account of this module's own, joined (enabled, with a password: `samba-tool computer create`
    makes it disabled, as before a join); its sAMAccountName, with the `$`; deleted after."""
    name = f"ws{secrets.token_hex(3)}"
    realm.samba_tool("computer", "create", name)
    realm.samba_tool("user", "setpassword", f"{name}$", f"--newpassword=Ws-{secrets.token_hex(8)}-Pa55")
    realm.samba_tool("user", "enable", f"{name}$")
    try:
        yield f"{name}$"
    finally:
        realm.samba_tool("computer", "delete", name)


def _sid_cert(realm: ad.AdRealm, minted: Path, label: str, upn: str, sid: str, url: str = "") -> Path:
    line, section = sid_extension_text(f"OCTETSTRING:{sid}")
    upn = upn.replace("$", "\\$")  # openssl's configuration files expand `$name`; a computer's `$` is escaped
    san = upn_line(upn)
    if url:  # the SID URL beside the UPN: a subjectAltName section (the one-line form splits at the URL's comma)
        san = "subjectAltName = @alt\n"
        section += f"[alt]\notherName.1 = 1.3.6.1.4.1.311.20.2.3;UTF8:{upn}\nURI.1 = {url}\n"
    return mint(realm, minted, label, san + line, section)


def test_a_computers_name_with_another_accounts_sid_is_not_served(
    realm: ad.AdRealm, audit: AdProcess, minted: Path, computer: str
) -> None:
    """bob's SID (AD CS writes the requester's) on a UPN naming a computer account: no user account has the name,
    but the SID is bob's, so the certificate is bob's and not the computer's: 403 at mapping "SID of another
    account" naming bob's account, no KDC request; before, served as the computer account (200)."""
    bob = str(ad_mapping.object_sid(realm, "bob"))
    cert = _sid_cert(realm, minted, "computer-bob", f"{computer}@{ad.DNS_DOMAIN}", bob)
    status, body = curl(realm, audit, cert, minted / "device.key")
    assert status == 403, body
    assert "SID of another account" in body
    event = audit.wait_event("mapping_refused")
    assert bob in event["fix"]
    assert "CN=bob," in event["fix"]
    assert audit.wait_event("request", upn=f"{computer}@{ad.DNS_DOMAIN}")["refused_stage"] == "mapping"
    assert not audit.events("weak_certificate_mapping", audit.since)


def test_a_name_outside_base_dn_with_another_accounts_sid_is_not_served_as_that_name(
    realm: ad.AdRealm, users_only: AdProcess, minted: Path, outsider: str
) -> None:
    """bob's SID (bob is in CN=Users) on the UPN of a user outside base_dn: the certificate is bob's, whatever name
    it carries (ESC1: AD CS writes the requester's SID, the requester writes the UPN): 403 at mapping "SID of
    another account"; before, the audit served it as the other user (200), the KDC asked for them. A Windows DC
    refuses it in compatibility mode too (KB5014754: a SID that is not the mapped account's is denied)."""
    bob = str(ad_mapping.object_sid(realm, "bob"))
    upn = f"{outsider}@{ad.DNS_DOMAIN}"
    cert = _sid_cert(realm, minted, "outsider-bob", upn, bob)
    status, body = curl(realm, users_only, cert, minted / "device.key")
    assert status == 403, body
    assert "SID of another account" in body
    assert "CN=bob," in users_only.wait_event("mapping_refused")["fix"]
    assert users_only.wait_event("request", upn=upn)["refused_stage"] == "mapping"


def test_a_name_outside_base_dn_with_its_own_sid_is_still_served_by_the_audit(
    realm: ad.AdRealm, users_only: AdProcess, minted: Path, outsider: str
) -> None:
    """The same user's own SID: the SID names the account the UPN names (found in the whole domain, not only under
    base_dn), so the audit serves it as before, as weakly mapped (the account is outside base_dn), with the
    warning."""
    own = str(ad_mapping.object_sid(realm, outsider))
    upn = f"{outsider}@{ad.DNS_DOMAIN}"
    cert = _sid_cert(realm, minted, "outsider-own", upn, own)
    status, body = curl(realm, users_only, cert, minted / "device.key")
    assert status == 200, body
    assert served_as(body) == f"{outsider}@{ad.REALM}"
    assert users_only.wait_event("weak_certificate_mapping", upn=upn)


def test_a_name_no_account_has_with_another_accounts_sid_is_refused(
    realm: ad.AdRealm, audit: AdProcess, minted: Path
) -> None:
    """alice's SID on ghost@ad.test (no account): 403 at mapping "SID of another account", not a weakly mapped
    certificate handed to the KDC."""
    alice = str(ad_mapping.object_sid(realm, "alice"))
    cert = _sid_cert(realm, minted, "ghost-alice", "ghost@ad.test", alice)
    status, body = curl(realm, audit, cert, minted / "device.key")
    assert status == 403, body
    assert "SID of another account" in body
    assert "CN=alice," in audit.wait_event("mapping_refused")["fix"]
    assert audit.wait_event("request", upn="ghost@ad.test")["refused_stage"] == "mapping"


def test_two_different_sids_on_a_name_no_account_has_are_refused(
    realm: ad.AdRealm, audit: AdProcess, minted: Path
) -> None:
    """The SID extension (alice's) and the SID URL (bob's) disagreeing, on ghost@ad.test: 403 at mapping "two
    different SIDs", as for a name an account has (docs: in both modes), not a weak mapping."""
    alice, bob = (str(ad_mapping.object_sid(realm, name)) for name in ("alice", "bob"))
    url = f"tag:microsoft.com,2022-09-14:sid:{bob}"
    cert = _sid_cert(realm, minted, "ghost-two", "ghost@ad.test", alice, url)
    status, body = curl(realm, audit, cert, minted / "device.key")
    assert status == 403, body
    assert "two different SIDs" in body
    assert audit.wait_event("request", upn="ghost@ad.test")["refused_stage"] == "mapping"
    assert not audit.events("weak_certificate_mapping", audit.since)


def test_a_sid_no_object_has_on_a_name_no_account_has_is_left_to_the_kdc(
    realm: ad.AdRealm, audit: AdProcess, minted: Path
) -> None:
    """A SID of another domain (no object under base_dn has it) on ghost@ad.test: what an account outside base_dn
    looks like, served as weakly mapped as before; the KDC then refuses the name (403 at kerberos), with the
    warning."""
    other = "S-1-5-21-1111111111-2222222222-3333333333-1105"
    cert = _sid_cert(realm, minted, "ghost-other-domain", "ghost@ad.test", other)
    status, body = curl(realm, audit, cert, minted / "device.key")
    assert status == 403, body
    assert other in audit.wait_event("weak_certificate_mapping", upn="ghost@ad.test")["detail"]
    assert audit.wait_event("request", upn="ghost@ad.test")["refused_stage"] == "kerberos"


@pytest.fixture(scope="module")
def deleted_sid(realm: ad.AdRealm) -> str:
    """The objectSid of a user of this module's own, created and deleted at once (its tombstone keeps the SID)."""
    name = f"gone{secrets.token_hex(3)}"
    realm.samba_tool("user", "create", name, f"Gone-{secrets.token_hex(8)}-Pa55")
    sid = str(ad_mapping.object_sid(realm, name))
    realm.samba_tool("user", "delete", name)
    return sid


def _domain_sid(realm: ad.AdRealm) -> str:
    return str(ad_mapping.object_sid(realm, "alice")).rpartition("-")[0]


def _foreign_sid(realm: ad.AdRealm) -> str:
    """The SID of a foreignSecurityPrincipal the provisioning made (Authenticated Users, S-1-5-11, among them)."""
    out = realm.ldbsearch("(objectClass=foreignSecurityPrincipal)", "cn")
    return sorted(line.split(": ", 1)[1] for line in out.splitlines() if line.startswith("cn: S-1-"))[0]


@pytest.mark.parametrize(
    ("case", "sid", "owner"),
    [
        ("builtin administrators", lambda realm: "S-1-5-32-544", "CN=Administrators,CN=Builtin,"),
        ("domain admins", lambda realm: f"{_domain_sid(realm)}-512", "CN=Domain Admins,CN=Users,"),
    ],
)
def test_a_groups_sid_on_a_name_no_account_has_is_refused_naming_the_group(
    realm: ad.AdRealm, audit: AdProcess, minted: Path, case: str, sid: Callable[[ad.AdRealm], str], owner: str
) -> None:
    """A well-known group's SID (BUILTIN\\Administrators S-1-5-32-544, the domain's Domain Admins -512) on
    ghost@ad.test: the SID is that group's, so the certificate is nobody's to serve: 403 at mapping "SID of another
    account" naming the group (not a 500 reading a group as an account, not a weak mapping)."""
    cert = _sid_cert(realm, minted, f"ghost-{case.replace(' ', '-')}", "ghost@ad.test", sid(realm))
    status, body = curl(realm, audit, cert, minted / "device.key")
    assert status == 403, body
    assert "SID of another account" in body
    assert owner in audit.wait_event("mapping_refused")["fix"]
    assert audit.wait_event("request", upn="ghost@ad.test")["refused_stage"] == "mapping"


@pytest.mark.parametrize("case", ["deleted user", "foreign security principal", "15 sub-authorities"])
def test_a_sid_of_no_live_object_on_a_name_no_account_has_is_left_to_the_kdc(
    realm: ad.AdRealm, audit: AdProcess, minted: Path, deleted_sid: str, case: str
) -> None:
    """A SID no live object of the domain has (a deleted user's, its tombstone aside; a foreignSecurityPrincipal's,
    which stands for another domain's account; one of 15 sub-authorities, the most a SID has) on ghost@ad.test:
    served as weakly mapped as any SID of another domain, then refused by the KDC (403 at kerberos), never a 500."""
    sid = {
        "deleted user": deleted_sid,
        "foreign security principal": _foreign_sid(realm),
        "15 sub-authorities": "S-1-5-21-" + "-".join(str(n) for n in range(1, 15)),
    }[case]
    cert = _sid_cert(realm, minted, f"ghost-{case.replace(' ', '-')}", "ghost@ad.test", sid)
    status, body = curl(realm, audit, cert, minted / "device.key")
    assert status == 403, body
    assert sid in audit.wait_event("weak_certificate_mapping", upn="ghost@ad.test")["detail"]
    assert audit.wait_event("request", upn="ghost@ad.test")["refused_stage"] == "kerberos"


def test_a_sid_of_no_sub_authority_on_a_name_no_account_has_is_refused_as_unreadable(
    realm: ad.AdRealm, audit: AdProcess, minted: Path
) -> None:
    """`S-1-5` (no sub-authority: no SID an object has) in the SID extension of ghost@ad.test: 403 at mapping, the
    extension "cannot be read", not a weak mapping nor a directory search for it."""
    cert = _sid_cert(realm, minted, "ghost-no-sub-authority", "ghost@ad.test", "S-1-5")
    status, body = curl(realm, audit, cert, minted / "device.key")
    assert status == 403, body
    assert "SID extension cannot be read" in body
    assert audit.wait_event("request", upn="ghost@ad.test")["refused_stage"] == "mapping"
    assert not audit.events("weak_certificate_mapping", audit.since)
