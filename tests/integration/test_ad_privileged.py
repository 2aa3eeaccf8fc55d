"""A privileged account's certificate, against the real Samba DC: delegated like any user's, unless AD says not.

The gateway has no list of accounts it will not impersonate (only its own: `Delegator._not_the_gateway`): a
certificate naming the domain's Administrator makes it S4U2Self and S4U2Proxy as Administrator, and the backend
serves Administrator. What stops it is the account's flag "sensitive and cannot be delegated" (UF_NOT_DELEGATED,
`samba-tool user sensitive`): the KDC then issues a non-forwardable evidence ticket and refuses S4U2Proxy, and the
device gets 403 (docs/deploying.md, "Privileged accounts").
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from proxy.lab import ad
from tests.integration.ad_fixtures import (
    AD_TIMEOUT,
    AdProcess,
    _locked,
    kdc_log_offset,
    start_ad_gateway,
    status_and_body,
    wait_kdc_reason,
)

pytestmark = pytest.mark.timeout(AD_TIMEOUT)

ADMIN = "Administrator"


def _get(realm: ad.AdRealm, gw: AdProcess, cert: tuple[Path, Path]) -> tuple[int, str]:
    cmd = ["curl", "-sS", "--max-time", "30", "--cacert", str(realm.pki.root_cert), "--cert", str(cert[0])]
    cmd += ["--key", str(cert[1]), "-w", "\n%{http_code}", f"{gw.url}/owa/"]
    return status_and_body(realm.run(cmd, timeout=60))


def test_administrators_certificate_is_delegated_unless_the_account_is_sensitive(
    ad_realm: ad.AdRealm, ad_backend: AdProcess, tmp_path: Path
) -> None:
    """A certificate for Administrator@ad.test: served as Administrator@AD.TEST (no account is refused for its
    privileges). Marked 'sensitive and cannot be delegated', the same certificate at a fresh gateway: Samba's
    evidence ticket is not forwardable, S4U2Proxy refused ("Missing forwardable flag"), 403, the fix names the flag."""
    cert = ad.issue_user_certificate(ad_realm.pki, tmp_path / "certs", "administrator", f"{ADMIN}@ad.test")
    gw = start_ad_gateway(ad_realm, tmp_path / "plain", ad_backend)
    try:
        status, body = _get(ad_realm, gw, cert)
        assert status == 200, body
        assert json.loads(body)["principal"] == f"{ADMIN}@AD.TEST"
    finally:
        gw.stop()
    with _locked(ad_realm.root):
        ad_realm.samba_tool("user", "sensitive", ADMIN, "on")
    try:
        gw = start_ad_gateway(ad_realm, tmp_path / "sensitive", ad_backend)
        try:
            offset = kdc_log_offset(ad_realm)
            status, body = _get(ad_realm, gw, cert)
            assert status == 403, body
            assert f"the gateway may not act for {ADMIN}@AD.TEST: its evidence ticket is not forwardable" in body
            assert "marked sensitive" in gw.wait_event("kerberos_refused", principal=f"{ADMIN}@AD.TEST")["fix"]
            assert wait_kdc_reason(ad_realm, offset, "forwardable")
        finally:
            gw.stop()
    finally:
        with _locked(ad_realm.root):
            ad_realm.samba_tool("user", "sensitive", ADMIN, "off")
