"""A user's AD account changing while the gateway holds their service ticket: disabled, or deleted and made again
under the same UPN. AD's tickets live 10 hours; the gateway asks the KDC again `kerberos.ticket_recheck_seconds`
after an exchange (300 by default; 2 here), so a change reaches the device within that, not at the ticket's end."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
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
from tests.integration.jsonlog import WAIT

pytestmark = pytest.mark.timeout(AD_TIMEOUT)

USER = "fickle"  # the accounts' names begin so
RECHECK = 2


@dataclass(frozen=True)
class Fickle:
    """An account of one test's own and a certificate for its UPN."""

    name: str
    cert: tuple[Path, Path]


@pytest.fixture
def fickle(ad_realm: ad.AdRealm, tmp_path: Path) -> Iterator[Fickle]:
    """A fresh, enabled account fickle<hex>@ad.test and a certificate for its UPN; deleted afterwards. Its name is
    the test's alone: the realm is shared by the run's workers, and under `--dist load` this file's tests run at once
    on several of them; with one name for all (fickle), one test's set-up deleted and made again the account another
    had just disabled, renamed or marked."""
    name = f"{USER}{secrets.token_hex(3)}"
    with _locked(ad_realm.root):
        ad_realm.samba_tool("user", "create", name, "Fickle-Ad-Pa55")
        cert = ad.issue_user_certificate(ad_realm.pki, tmp_path / "certs", name, f"{name}@ad.test")
    try:
        yield Fickle(name, cert)
    finally:
        with _locked(ad_realm.root):
            if name in ad_realm.samba_tool("user", "list"):
                ad_realm.samba_tool("user", "delete", name)


def _get(realm: ad.AdRealm, gw: AdProcess, cert: tuple[Path, Path]) -> tuple[int, str]:
    cmd = ["curl", "-sS", "--max-time", "30", "--cacert", str(realm.pki.root_cert), "--cert", str(cert[0])]
    cmd += ["--key", str(cert[1]), "-w", "\n%{http_code}", f"{gw.url}/owa/"]
    return status_and_body(realm.run(cmd, timeout=60))


def _until(probe: object, want: int, what: str) -> tuple[int, str]:
    deadline = time.monotonic() + WAIT
    while True:
        status, body = probe()  # type: ignore[operator]
        if status == want:
            return status, body
        assert time.monotonic() < deadline, f"{what}: still {status} {body[:300]}"
        time.sleep(0.3)


def test_a_user_disabled_while_cached_is_refused_after_the_recheck(
    ad_realm: ad.AdRealm, ad_backend: AdProcess, fickle: Fickle, tmp_path: Path
) -> None:
    """fickle is served, then disabled in AD: the cached ticket (10 h in AD) served him on for its whole life;
    now the first request after ticket_recheck_seconds starts S4U2Self again, the KDC refuses it
    ('Principal may not act as client'), and the next requests are 403 naming the disabled account."""
    gw = start_ad_gateway(
        ad_realm, tmp_path / "gw", ad_backend, kdc_account=f'"require"\nticket_recheck_seconds = {RECHECK}'
    )
    try:
        status, body = _get(ad_realm, gw, fickle.cert)
        assert status == 200, body
        assert json.loads(body)["principal"] == f"{fickle.name}@AD.TEST"
        offset = kdc_log_offset(ad_realm)
        ad_realm.samba_tool("user", "disable", fickle.name)
        time.sleep(RECHECK)  # the recheck's own period: what is pinned is what happens after it
        status, body = _until(lambda: _get(ad_realm, gw, fickle.cert), 403, "disabled fickle")
        assert f"the account {fickle.name}@AD.TEST is disabled" in body
        wait_kdc_reason(ad_realm, offset, "ERR_POLICY", "reason=Principal may not act as client")
        event = gw.wait_event("kerberos_refused", principal=f"{fickle.name}@AD.TEST")
        assert "enable" in event["fix"]
    finally:
        gw.stop()


def test_an_account_made_again_under_the_same_upn_is_served_as_the_new_account_after_the_recheck(
    ad_realm: ad.AdRealm, ad_backend: AdProcess, fickle: Fickle, tmp_path: Path
) -> None:
    """fickle is deleted and made again (same name, same UPN, a new SID): the backend got the old account's SID in
    the cached ticket's PAC; after the recheck it gets the new account's, never the old one's for the ticket's life."""
    gw = start_ad_gateway(
        ad_realm, tmp_path / "gw", ad_backend, kdc_account=f'"require"\nticket_recheck_seconds = {RECHECK}'
    )
    try:
        status, body = _get(ad_realm, gw, fickle.cert)
        assert status == 200, body
        old_sid = json.loads(body)["pac"]["sid"]
        with _locked(ad_realm.root):
            ad_realm.samba_tool("user", "delete", fickle.name)
            ad_realm.samba_tool("user", "create", fickle.name, "Fickle-Ad-Pa55-2")
        new_sid = ad_realm.ldbsearch(f"(sAMAccountName={fickle.name})", "objectSid").split("objectSid: ")[1].split()[0]
        assert new_sid != old_sid
        time.sleep(RECHECK)

        def sid() -> tuple[int, str]:
            status, body = _get(ad_realm, gw, fickle.cert)
            return (1 if status == 200 and json.loads(body)["pac"]["sid"] == new_sid else status), body

        _until(sid, 1, "fickle made again")
    finally:
        gw.stop()


def test_a_upn_changed_while_cached_no_longer_serves_the_old_upns_certificate_after_the_recheck(
    ad_realm: ad.AdRealm, ad_backend: AdProcess, fickle: Fickle, tmp_path: Path
) -> None:
    """fickle's UPN becomes fickle.renamed@ad.test while his ticket is cached; his certificate still says
    fickle@ad.test. After the recheck the new evidence ticket's PAC names the new UPN, which is not the
    certificate's: 403 kdc_account_mismatch (the cached ticket served the old UPN's certificate for its life)."""
    gw = start_ad_gateway(
        ad_realm, tmp_path / "gw", ad_backend, kdc_account=f'"require"\nticket_recheck_seconds = {RECHECK}'
    )
    try:
        status, body = _get(ad_realm, gw, fickle.cert)
        assert status == 200, body
        ad_realm.ldbmodify(
            ad._replace(
                f"CN={fickle.name},CN=Users,{ad.BASE_DN}", "userPrincipalName", f"{fickle.name}.renamed@ad.test"
            )
        )
        time.sleep(RECHECK)
        status, body = _until(lambda: _get(ad_realm, gw, fickle.cert), 403, "renamed fickle")
        assert f"the KDC's account for {fickle.name}@AD.TEST is not the certificate's" in body
        gw.wait_event("kdc_account_mismatch", principal=f"{fickle.name}@AD.TEST")
    finally:
        gw.stop()


def test_a_user_marked_sensitive_while_cached_is_refused_after_the_recheck(
    ad_realm: ad.AdRealm, ad_backend: AdProcess, fickle: Fickle, tmp_path: Path
) -> None:
    """fickle is marked 'sensitive and cannot be delegated' while his ticket is cached: after the recheck Samba
    issues a non-forwardable evidence ticket, S4U2Proxy is refused, and the device gets 403 naming the evidence
    ticket (the cached ticket had served him for its life)."""
    gw = start_ad_gateway(
        ad_realm, tmp_path / "gw", ad_backend, kdc_account=f'"require"\nticket_recheck_seconds = {RECHECK}'
    )
    try:
        status, body = _get(ad_realm, gw, fickle.cert)
        assert status == 200, body
        ad_realm.samba_tool("user", "sensitive", fickle.name, "on")
        time.sleep(RECHECK)
        status, body = _until(lambda: _get(ad_realm, gw, fickle.cert), 403, "sensitive fickle")
        assert "its evidence ticket is not forwardable" in body
    finally:
        gw.stop()
