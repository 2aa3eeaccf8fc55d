"""A user in many groups: AD puts every group in the ticket's PAC, so the Negotiate header outgrows IIS's default
header limits (http.sys MaxFieldLength and MaxRequestBytes, 16 KiB). groupie is in GROUPS groups; the Exchange
stand-in runs once with the lab's limit (96 KiB) and once with IIS's default (`--max-field-bytes 16384`)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.lab import ad
from tests.integration.ad_fixtures import AD_TIMEOUT, AdProcess, _locked, _start, start_ad_gateway, status_and_body

pytestmark = pytest.mark.timeout(AD_TIMEOUT)

USER = "groupie"
GROUPS = 1600
IIS_MAX_FIELD = 16384


def _group_ldif(realm: ad.AdRealm) -> str:
    member = f"CN={USER},CN=Users,{realm.base_dn}"
    return "".join(
        f"dn: CN=kcd-big-{i:04d},CN=Users,{realm.base_dn}\nobjectClass: group\nsAMAccountName: kcd-big-{i:04d}\n"
        f"member: {member}\n\n"
        for i in range(1, GROUPS + 1)
    )


@pytest.fixture(scope="module")
def groupie(ad_realm: ad.AdRealm, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """groupie@ad.test in GROUPS groups (kept in the realm: made once, about 6 s), and a certificate for the UPN."""
    with _locked(ad_realm.root):
        if USER not in ad_realm.samba_tool("user", "list"):
            ad_realm.samba_tool("user", "create", USER, "Groupie-Ad-Pa55")
        if f"kcd-big-{GROUPS:04d}" not in ad_realm.ldbsearch(f"(sAMAccountName=kcd-big-{GROUPS:04d})", "cn"):
            ldif = tmp_path_factory.mktemp("groups") / "groups.ldif"
            ldif.write_text(_group_ldif(ad_realm))
            ad._run(["ldbadd", "-H", str(ad_realm.sam_ldb), f"--configfile={ad_realm.smb_conf}", str(ldif)])
        return ad.issue_user_certificate(
            ad_realm.pki, tmp_path_factory.mktemp("groupie"), USER, f"{USER}@{ad.DNS_DOMAIN}"
        )


@pytest.fixture(scope="module")
def iis_backend(ad_realm: ad.AdRealm, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AdProcess]:
    """The Exchange stand-in with IIS's default header field limit."""
    port = ad_realm.free_port()
    log = tmp_path_factory.mktemp("iis-backend") / "backend.log"
    argv = [*ad.backend_argv(ad_realm, port), "--max-field-bytes", str(IIS_MAX_FIELD)]
    backend = _start(ad_realm, argv, port, log, scheme="http")
    yield backend
    backend.stop()


def _get(realm: ad.AdRealm, url: str, cert: tuple[Path, Path]) -> tuple[int, str]:
    cmd = ["curl", "-sS", "--max-time", "30", "--cacert", str(realm.pki.root_cert), "--cert", str(cert[0])]
    return status_and_body(realm.run([*cmd, "--key", str(cert[1]), "-w", "\n%{http_code}", url], timeout=60))


def test_a_large_pac_is_delegated_whole_to_a_backend_that_takes_it(
    ad_realm: ad.AdRealm, ad_backend: AdProcess, groupie: tuple[Path, Path], tmp_path: Path
) -> None:
    """groupie's evidence and service tickets carry every group: the gateway sends a Negotiate header above IIS's
    16 KiB default, whole, and a backend whose limit allows it serves groupie."""
    gw = start_ad_gateway(ad_realm, tmp_path, ad_backend)
    try:
        status, body = _get(ad_realm, f"{gw.url}/owa/", groupie)
        assert status == 200, body
        echo = json.loads(body)
        assert echo["principal"] == f"{USER}@AD.TEST"
        assert echo["pac"]["size"] > 8 * GROUPS  # a GROUP_MEMBERSHIP is 8 bytes
    finally:
        gw.stop()


def test_a_backend_refusing_the_large_header_is_relayed_and_logged_with_the_iis_settings(
    ad_realm: ad.AdRealm, iis_backend: AdProcess, groupie: tuple[Path, Path], tmp_path: Path
) -> None:
    """Behind IIS's default limit the backend answers 400: the device gets that 400 (as IIS would answer it), never a
    500, and the gateway logs backend_refused_large_token with the header's size and the fix: MaxFieldLength and
    MaxRequestBytes under HKLM\\...\\HTTP\\Parameters, or fewer groups. alice's small ticket is served there."""
    gw = start_ad_gateway(ad_realm, tmp_path, iis_backend)
    try:
        status, body = _get(ad_realm, f"{gw.url}/owa/", groupie)
        assert status == 400, body
        event = gw.wait_event("backend_refused_large_token", principal=f"{USER}@AD.TEST")
        assert event["negotiate_header_bytes"] > IIS_MAX_FIELD
        for words in ("MaxFieldLength", "MaxRequestBytes", "HTTP\\Parameters", "MaxTokenSize", "groups"):
            assert words in event["fix"], event["fix"]
        status, body = _get(ad_realm, f"{gw.url}/owa/", (ad_realm.user_cert("alice"), ad_realm.user_key("alice")))
        assert status == 200, body
    finally:
        gw.stop()
