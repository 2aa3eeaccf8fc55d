"""Slips an Active Directory administrator makes setting the gateway up, against the Samba AD DC: what each gets.

Each configuration is the AD lab's with one mistake, run as the gateway (curl as the device) and through `doctor`;
the answer must name the key or the setting to change, not send the device to retry or the operator to the KDC.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator

import pytest

from proxy.lab import ad
from tests.integration.ad_fixtures import AD_TIMEOUT, AdProcess, ad_curl, start_ad_gateway, status_and_body

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
