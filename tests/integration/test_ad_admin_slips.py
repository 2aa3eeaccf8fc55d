"""Slips an Active Directory administrator makes setting the gateway up, against the Samba AD DC: what each gets.

Each configuration is the AD lab's with one mistake, run as the gateway (curl as the device) and through `doctor`;
the answer must name the key or the setting to change, not send the device to retry or the operator to the KDC.
"""

from __future__ import annotations

import base64
import re
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.identity.sid import Sid
from proxy.lab import ad, ad_mapping
from tests.integration.ad_fixtures import AD_TIMEOUT, AdProcess, ad_curl, start_ad_gateway, status_and_body
from tests.integration.test_ad_mapping import start_gateway
from tests.integration.test_ad_openssl_mapping import curl, mint, sid_extension_text, upn_line

pytestmark = pytest.mark.timeout(AD_TIMEOUT)

LOWER_REALM_MAP = '"san-upn"\nrealm_map = { "ad.test" = "ad.test" }'


@pytest.fixture(scope="module")
def lower_realm(
    ad_realm: ad.AdRealm, ad_backend: AdProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[AdProcess]:
    """The AD lab's gateway (`mapping = "upn"`) whose realm_map sends ad.test to the realm in lower case."""
    gw = start_ad_gateway(ad_realm, tmp_path_factory.mktemp("lower-realm"), ad_backend, source=LOWER_REALM_MAP)
    yield gw
    gw.stop()


def test_a_realm_map_to_the_realm_in_lower_case_is_the_gateways_set_up_naming_the_key(
    ad_realm: ad.AdRealm, lower_realm: AdProcess
) -> None:
    """`realm_map = { "ad.test" = "ad.test" }`: alice is asked for as alice@ad.test, a realm no KDC is configured for.
    It was 503 "unreachable; try again shortly" (a device retries for ever) with a fix to add a KDC to krb5.conf; now
    502 `kerberos_misconfigured`, the fix naming identity.realm_map and the realm in capitals."""
    lower_realm.mark()
    status, body = status_and_body(ad_curl(ad_realm, f"{lower_realm.url}/Microsoft-Server-ActiveSync", "alice"))
    assert status == 502, body
    assert "the gateway's Kerberos set-up is incomplete" in body
    event = lower_realm.wait_event("kerberos_misconfigured")
    assert "alice@ad.test" in event["fix"]
    assert "is the gateway's realm AD.TEST in another case" in event["fix"]
    assert 'identity.realm_map, identity.default_realm) as "AD.TEST"' in event["fix"]


def test_doctor_names_the_realm_map_in_lower_case(ad_realm: ad.AdRealm, lower_realm: AdProcess) -> None:
    """doctor with that configuration: s4u2self fails naming the realm's case and the key, not a missing KDC."""
    config = lower_realm.log_path.parent / "gateway.toml"
    done = ad_realm.run([sys.executable, "-m", "proxy", "doctor", "--config", str(config)], timeout=180)
    assert done.returncode == 1, done.stdout + done.stderr
    assert re.search(r"FAIL\s+s4u2self\s", done.stdout), done.stdout
    assert "is the gateway's realm AD.TEST in another case" in done.stdout, done.stdout
    assert "add it to krb5.conf [realms]" not in done.stdout, done.stdout


# -- the SID an administrator writes into a certificate (openssl CLI, as an MDM's or offline CA's template would) --


@pytest.fixture(scope="module")
def strong(
    ad_mapping_realm: ad.AdRealm, ad_backend: AdProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[AdProcess]:
    gw = start_gateway(ad_mapping_realm, tmp_path_factory.mktemp("slips-strong"), ad_backend, "strong")
    yield gw
    gw.stop()


@pytest.fixture(scope="module")
def minted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """This module's key and CSR (openssl req)."""
    where = tmp_path_factory.mktemp("slips-minted")
    argv = ["openssl", "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    argv += ["-keyout", str(where / "device.key"), "-out", str(where / "device.csr"), "-subj", "/CN=device"]
    subprocess.run(argv, check=True, capture_output=True)
    return where


@pytest.fixture(scope="module")
def hire(ad_mapping_realm: ad.AdRealm) -> Iterator[str]:
    """An account of this module's own (the workers share the realm), deleted after."""
    name = f"sl{secrets.token_hex(4)}"
    ad_mapping_realm.samba_tool("user", "create", name, f"Sl-{secrets.token_hex(8)}-Pa55")
    try:
        yield name
    finally:
        ad_mapping_realm.samba_tool("user", "delete", name)


def _written(sid: Sid, how: str) -> str:
    """The account's SID as an administrator slipped: the base64 of its binary form (ldapsearch's `objectSid::`),
    or its domain's SID (the RID left out)."""
    if how == "base64":
        return base64.b64encode(sid.to_bytes()).decode()
    return str(Sid(sid.authority, sid.sub_authorities[:-1]))


@pytest.mark.parametrize(
    ("how", "reason", "said"),
    [
        ("base64", "the certificate's SID extension cannot be read", "is the base64 of the binary SID {sid}"),
        ("domain", "SID of another account", "is the SID of the account's domain, not of an account (no RID)"),
    ],
)
def test_a_sid_written_in_a_wrong_form_names_the_accounts_sid(
    ad_mapping_realm: ad.AdRealm, strong: AdProcess, minted: Path, hire: str, how: str, reason: str, said: str
) -> None:
    """The SID extension holding the account's SID as ldapsearch prints objectSid (base64 of the binary form), or
    its domain's SID without the RID: 403 as before, and the fix says what was written and the account's SID, the
    string the CA must write. It said "not a SID string: '...'; ask the CA to reissue", or named ESC1 for the domain's
    SID, without the SID to write."""
    sid = ad_mapping.object_sid(ad_mapping_realm, hire)
    line, section = sid_extension_text(f"OCTETSTRING:{_written(sid, how)}")
    cert = mint(ad_mapping_realm, minted, f"sid-{how}", upn_line(f"{hire}@{ad.DNS_DOMAIN}") + line, section)
    status, body = curl(ad_mapping_realm, strong, cert, minted / "device.key")
    assert status == 403, body
    assert reason in body
    fix = strong.wait_event("mapping_refused")["fix"]
    assert said.format(sid=sid) in fix, fix
    assert f"its objectSid is {sid}: that string" in fix, fix
