"""Slips an Active Directory administrator makes setting the gateway up, against the Samba AD DC: what each gets.

Each configuration is the AD lab's with one mistake, run as the gateway and through `doctor`; the answer must name the
key or the setting to change, not send the device to retry or the operator to the KDC.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from proxy.lab import ad
from tests.integration.ad_fixtures import AD_TIMEOUT

pytestmark = pytest.mark.timeout(AD_TIMEOUT)

LOWER_REALM_MAP = 'source = "san-upn"\nrealm_map = { "ad.test" = "ad.test" }'
REFUSED = (
    "configuration error: identity.realm_map.ad.test: 'ad.test' is kerberos.principal's realm 'AD.TEST' in another "
    "case: Kerberos realm names are case-sensitive"
)


@pytest.fixture(scope="module")
def lower_realm(ad_realm: ad.AdRealm, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The AD lab's gateway configuration (`mapping = "upn"`) whose realm_map sends ad.test to the realm in lower
    case."""
    text = ad.gateway_config(ad_realm, port=ad_realm.free_port(), backend_port=ad_realm.free_port())
    assert 'source = "san-upn"\n' in text
    config = tmp_path_factory.mktemp("lower-realm") / "gateway.toml"
    config.write_text(text.replace('source = "san-upn"\n', f"{LOWER_REALM_MAP}\n", 1))
    return config


def test_a_realm_map_to_the_realm_in_lower_case_is_refused_when_the_gateway_starts_naming_the_key(
    ad_realm: ad.AdRealm, lower_realm: Path
) -> None:
    """`realm_map = { "ad.test" = "ad.test" }`: alice would be asked for as alice@ad.test, a realm no KDC is configured
    for. It was 503 "unreachable; try again shortly" (a device retries for ever), then a 502 at each request; `run`
    now refuses (exit 2) naming identity.realm_map and the realm in capitals, before any device is refused."""
    done = ad_realm.run([sys.executable, "-m", "proxy", "run", "--config", str(lower_realm)], timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    assert REFUSED in done.stderr, done.stderr
    assert "(Active Directory's: 'AD.TEST')" in done.stderr, done.stderr


def test_doctor_names_the_realm_map_in_lower_case(ad_realm: ad.AdRealm, lower_realm: Path) -> None:
    """doctor with that configuration: the configuration is refused naming the realm's case and the key, before any
    step runs; never a missing KDC ("add it to krb5.conf [realms]")."""
    done = ad_realm.run([sys.executable, "-m", "proxy", "doctor", "--config", str(lower_realm)], timeout=180)
    assert done.returncode == 2, done.stdout + done.stderr
    assert REFUSED in done.stderr, done.stderr
    assert not re.search(r"\s+s4u2self\s", done.stdout), done.stdout
    assert "add it to krb5.conf [realms]" not in done.stdout + done.stderr
