"""The gateway against Active Directory: a Samba AD DC (`proxy.lab.ad`), the gateway, the Exchange
stand-in and curl all inside the realm's network namespace."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.lab import ad
from tests.integration.ad_fixtures import AD_TIMEOUT, AdProcess, ad_curl, start_ad_gateway, status_and_body

pytestmark = pytest.mark.timeout(AD_TIMEOUT)


@pytest.fixture(scope="module")
def ad_gateway(
    ad_realm: ad.AdRealm, ad_backend: AdProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[AdProcess]:
    gw = start_ad_gateway(ad_realm, tmp_path_factory.mktemp("ad-gateway"), ad_backend)
    yield gw
    gw.stop()


def test_delegated_request_reaches_backend_as_the_ad_user(ad_realm: ad.AdRealm, ad_gateway: AdProcess) -> None:
    """alice's certificate in, S4U2Self + S4U2Proxy against Samba's KDC, and the backend serves alice@AD.TEST."""
    status, body = status_and_body(ad_curl(ad_realm, f"{ad_gateway.url}/Microsoft-Server-ActiveSync", "alice"))
    assert status == 200, body
    assert json.loads(body)["principal"] == "alice@AD.TEST"


def test_the_realm_runs_only_inside_its_namespace(ad_realm: ad.AdRealm) -> None:
    """Every samba process lives in the realm's network namespace, not the host's; the KDC answers in there."""
    assert ad_realm.port_answers(88)
    inside = Path("/run/netns", ad_realm.netns).stat().st_ino
    host = Path("/proc/self/ns/net").stat().st_ino
    samba = [pid for pid in ad.namespace_pids(ad_realm) if Path(f"/proc/{pid}/comm").read_text().strip() == "samba"]
    assert samba
    for pid in samba:
        assert Path(f"/proc/{pid}/ns/net").stat().st_ino == inside != host
