"""The gateway account's delegation settings as administrators get them wrong, against the real Samba DC: the SPN
a route names spelt another way than the one registered on the backend's account. Each is served or refused with a
log line whose fix names the attribute and the command; none is a 500."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from proxy.lab import ad
from tests.integration.ad_fixtures import AD_TIMEOUT, AdProcess, ad_curl, start_ad_gateway, status_and_body

pytestmark = pytest.mark.timeout(AD_TIMEOUT)

# route SPN -> served (AD compares SPNs without regard to case), or the words the fix must hold
SPELLINGS = {
    "http/cas.ad.test": None,
    "HTTP/CAS.AD.TEST": None,
    "HTTP/cas": "a short host name",
    "HTTP/cas.ad.test:443": "a port (:443)",
    "host/cas.ad.test": "another service class",
}


def test_misspelt_spns_are_served_or_refused_with_the_command_that_fixes_them(
    ad_realm: ad.AdRealm, ad_backend: AdProcess, tmp_path: Path
) -> None:
    """Case is no misspelling to AD (served as alice); a short name, a port or another service class is another SPN
    nobody registered: 502 and kerberos_misconfigured whose fix gives setspn and samba-tool for that SPN."""
    routes = "".join(
        f'\n[[routes]]\nprefix = "/r{i}/"\nupstream = "http://127.0.0.1:{ad_backend.port}"\nspn = "{spn}"\n'
        for i, spn in enumerate(SPELLINGS)
    )
    gw = start_ad_gateway(ad_realm, tmp_path, ad_backend, routes)
    try:
        for i, (spn, words) in enumerate(SPELLINGS.items()):
            gw.mark()
            status, body = status_and_body(ad_curl(ad_realm, f"{gw.url}/r{i}/x", "alice"))
            if words is None:
                assert status == 200, (spn, body)
                assert json.loads(body)["principal"] == "alice@AD.TEST"
                continue
            assert status == 502, (spn, body)
            assert f"the gateway's Kerberos set-up for {spn} is incomplete" in body
            event = gw.wait_event("kerberos_misconfigured", spn=spn)
            assert f"setspn -S {spn} " in event["fix"], event["fix"]
            assert f"samba-tool spn add {spn} " in event["fix"]
            assert words in event["fix"]
    finally:
        gw.stop()
