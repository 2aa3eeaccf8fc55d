"""Names an attacker's certificate can carry, against the Samba AD DC: whom does the gateway impersonate?

A CA trusted for any UPN (`identity.mapping = "upn"`), or a certificate `strong-or-audit` serves as weakly mapped,
names an account; the KDC impersonates whatever principal that name is. These tests mint the certificates with
the openssl CLI from the lab's issuing CA, as the independent harness does, and send them with curl through a real
gateway inside the realm's namespace.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.lab import ad
from tests.integration.ad_fixtures import (
    AD_TIMEOUT,
    AdProcess,
    kdc_log_offset,
    start_ad_gateway,
    wait_kdc_reason,
)
from tests.integration.test_ad_mapping import start_gateway
from tests.integration.test_ad_openssl_mapping import curl, mint, upn_line

pytestmark = pytest.mark.timeout(AD_TIMEOUT)


@pytest.fixture(scope="module")
def realm(ad_mapping_realm: ad.AdRealm) -> ad.AdRealm:
    """The AD realm with the mapping accounts and the DC's name (`ad_fixtures.ad_mapping_realm`)."""
    return ad_mapping_realm


@pytest.fixture(scope="module")
def minted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory for this module's key, CSR and certificates."""
    where = tmp_path_factory.mktemp("names-minted")
    argv = ["openssl", "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    argv += ["-keyout", str(where / "device.key"), "-out", str(where / "device.csr"), "-subj", "/CN=device"]
    subprocess.run(argv, check=True, capture_output=True)
    return where


@pytest.fixture(scope="module", params=["upn", "strong-or-audit"])
def gateway(
    request: pytest.FixtureRequest, realm: ad.AdRealm, ad_backend: AdProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[AdProcess]:
    """The gateways that let a name alone decide whom the KDC is asked for: `mapping = "upn"` (the AD lab's
    configuration) and `strong-or-audit` (which serves a weakly mapped certificate, with a warning)."""
    where = tmp_path_factory.mktemp(f"names-{request.param}")
    if request.param == "upn":
        gw = start_ad_gateway(realm, where, ad_backend)
    else:
        gw = start_gateway(realm, where, ad_backend, request.param)
    yield gw
    gw.stop()


def test_a_upn_naming_the_domain_controllers_computer_account_is_refused(
    realm: ad.AdRealm, gateway: AdProcess, minted: Path
) -> None:
    """UPN `dc1$@ad.test`: the implicit UPN of the DC's computer account (sAMAccountName `DC1$`). Samba's KDC
    impersonates a computer account for S4U2Self as readily as a user, and its PAC's implicit UPN is the
    certificate's, so the request was served to the backend as the domain controller (200, `dc1$@AD.TEST`; under
    `strong-or-audit` too: the directory's user search finds no person, and a name no account has is served as
    weak). A machine's account is never a device's user (Exchange grants its servers' accounts every mailbox):
    403 at `kerberos`, `kdc_account_mismatch` naming the computer account, and no S4U2Proxy for it."""
    cert = mint(realm, minted, "dc-computer", upn_line("dc1\\$@ad.test"))  # `\$`: openssl's config expands `$`
    offset = kdc_log_offset(realm)
    status, body = curl(realm, gateway, cert, minted / "device.key")
    assert status == 403, body
    assert "is a computer or trust account" in body
    event = gateway.wait_event("kdc_account_mismatch", upn="dc1$@ad.test")
    assert "DC1$" in event["fix"]
    wait_kdc_reason(realm, offset, "s4u2self", "impersonating dc1$@AD.TEST")  # it was asked, and answered
    after = realm.samba_log.read_bytes()[offset:].decode(errors="replace")
    assert "constrained delegation for dc1$@AD.TEST" not in after  # refused before S4U2Proxy


def test_a_upn_naming_the_gateways_own_account_is_the_users_403_not_the_operators_502(
    realm: ad.AdRealm, gateway: AdProcess, minted: Path
) -> None:
    """UPN `svc-kcdproxy@ad.test`, the gateway's own account: S4U2Self to itself fails at the KDC ("KDC has no
    support for padata type"), which was the operator's 502 and a `kerberos_misconfigured` line ("unexpected
    Kerberos failure"): any holder of such a certificate raised the gateway's misconfiguration alarm at will. It
    is the certificate's problem: 403 at `kerberos` naming the gateway's account, and the KDC is not asked."""
    cert = mint(realm, minted, "gateway-account", upn_line(f"{ad.GATEWAY_ACCOUNT}@{ad.DNS_DOMAIN}"))
    offset = kdc_log_offset(realm)
    status, body = curl(realm, gateway, cert, minted / "device.key")
    assert status == 403, body
    assert "names the gateway's own account" in body
    event = gateway.wait_event("kerberos_refused", upn=f"{ad.GATEWAY_ACCOUNT}@{ad.DNS_DOMAIN}")
    assert "revoke" in event["fix"]
    assert not gateway.events("kerberos_misconfigured", gateway.since)
    after = realm.samba_log.read_bytes()[offset:].decode(errors="replace")
    assert f"impersonating {ad.GATEWAY_ACCOUNT}@{ad.REALM}" not in after  # no S4U2Self for it


def test_a_upn_in_the_domains_netbios_name_is_the_users_403_not_a_kdc_outage(
    realm: ad.AdRealm, gateway: AdProcess, minted: Path
) -> None:
    """UPN `alice@ADTEST` (the down-level domain name as a suffix): S4U2Self for alice@ADTEST, which Samba refers to
    a realm ADTEST that krb5.conf gives no KDC ("Cannot find KDC for requested realm"). That was a `503` with
    `Retry-After` (the device retries for ever) and `kdc_unavailable` ("add it to krb5.conf [realms]": the operator
    told the KDC is away) for one certificate's suffix. It is the certificate's: 403 as for any suffix no realm
    serves, `kerberos_refused` with the fix."""
    cert = mint(realm, minted, "netbios-suffix", upn_line(f"alice@{ad.NETBIOS_DOMAIN}"))
    gateway.mark()
    status, body = curl(realm, gateway, cert, minted / "device.key")
    assert status == 403, body
    assert f"no Kerberos realm serves alice@{ad.NETBIOS_DOMAIN}'s UPN suffix" in body
    assert "enterprise_names" in gateway.wait_event("kerberos_refused", upn=f"alice@{ad.NETBIOS_DOMAIN}")["fix"]
    assert not gateway.events("kdc_unavailable", gateway.since)


@pytest.mark.parametrize("upn", ["Alice@AD.TEST", "ALICE@ad.test"])
def test_alices_name_in_another_case_is_her_account_under_a_ticket_and_pool_of_its_own(
    request: pytest.FixtureRequest, realm: ad.AdRealm, gateway: AdProcess, minted: Path, upn: str
) -> None:
    """AD compares names without regard to case: `Alice@AD.TEST` is alice's one account (MIT would hold another
    principal). Under `mapping = "upn"` the gateway asks for the name as spelled; Samba impersonates alice's account
    and writes the ticket's client as asked, so the backend serves alice's account (PAC: UPN alice@ad.test,
    sAMAccountName alice) under that spelling, which the gateway keeps apart (its own ticket and backend pool, never
    another account's). Under `strong-or-audit` the directory's account is asked for: `alice@AD.TEST`, alice's own
    entry. Either way the summary line says the PAC named alice."""
    cert = mint(realm, minted, f"case-{upn}", upn_line(upn))
    status, body = curl(realm, gateway, cert, minted / "device.key")
    assert status == 200, body
    echo = json.loads(body)
    asked = (
        f"{upn.partition('@')[0]}@{ad.REALM}" if request.node.callspec.params["gateway"] == "upn" else "alice@AD.TEST"
    )
    assert echo["principal"] == asked
    assert (echo["pac"]["upn"], echo["pac"]["sam_name"]) == ("alice@ad.test", "alice")
    line = gateway.wait_event("request", upn=upn)
    assert (line["status"], line["principal"]) == (200, asked), line
    assert line["kdc_account"] in ("upn alice@ad.test", "sam alice"), line


@pytest.mark.parametrize("local", ["*", "ali*", "alice)(sAMAccountName=*"], ids=["wildcard", "prefix", "filter"])
def test_ldap_filter_syntax_in_a_upn_matches_no_account(
    realm: ad.AdRealm, gateway: AdProcess, minted: Path, local: str
) -> None:
    """A UPN whose local part is LDAP filter syntax: the directory's search (strong-or-audit) and Samba's KDC both
    escape it, so it names no account, never alice or the first user found: 403 at `kerberos`, nothing forwarded."""
    upn = f"{local}@ad.test"
    cert = mint(realm, minted, f"filter-{len(local)}", upn_line(upn))
    status, body = curl(realm, gateway, cert, minted / "device.key")
    assert status == 403, body
    line = gateway.wait_event("request", upn=upn)
    assert (line["status"], line["refused_stage"]) == (403, "kerberos"), line
    assert "backend" not in line["ms"]
