"""The gateway's own account against AD: a keytab left stale by a password reset, and an account whose tickets
are RC4 where krb5.conf permits only AES. The account is one of the test's own (svc-kcdtmp, with protocol
transition and delegation to HTTP/cas.ad.test), under a PSO that locks it after `THRESHOLD` bad passwords."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.lab import ad
from tests.integration.ad_fixtures import (
    AD_TIMEOUT,
    AdProcess,
    _locked,
    ad_curl,
    apply_lockout_policy,
    kdc_log_offset,
    start_ad_gateway,
    status_and_body,
)

pytestmark = pytest.mark.timeout(AD_TIMEOUT)

ACCOUNT = "svc-kcdtmp"
PSO = "kcd-test-svc-lockout"
THRESHOLD = 5


@pytest.fixture
def account(ad_realm: ad.AdRealm) -> Iterator[str]:
    """svc-kcdtmp made afresh (SPN HTTP/proxy3.ad.test, protocol transition, delegation to HTTP/cas.ad.test), under
    a PSO locking it after THRESHOLD bad passwords; deleted afterwards."""
    with _locked(ad_realm.root):
        if ACCOUNT in ad_realm.samba_tool("user", "list"):
            ad_realm.samba_tool("user", "delete", ACCOUNT)
        ad_realm.samba_tool("user", "create", ACCOUNT, "Svc-Tmp-Pa55-1")
        ad_realm.samba_tool("spn", "add", "HTTP/proxy3.ad.test", ACCOUNT)
        ad_realm.samba_tool("delegation", "for-any-protocol", ACCOUNT, "on")
        ad_realm.samba_tool("delegation", "add-service", ACCOUNT, ad.BACKEND_SPN)
        apply_lockout_policy(ad_realm, PSO, 11, THRESHOLD, ACCOUNT)
    try:
        yield ACCOUNT
    finally:
        with _locked(ad_realm.root):
            ad_realm.samba_tool("user", "delete", ACCOUNT)


def _set_enctypes(realm: ad.AdRealm, value: int) -> None:
    realm.ldbmodify(ad._replace(f"CN={ACCOUNT},CN=Users,{ad.BASE_DN}", "msDS-SupportedEncryptionTypes", str(value)))


def _export(realm: ad.AdRealm, keytab: Path) -> None:
    keytab.unlink(missing_ok=True)
    realm.samba_tool("domain", "exportkeytab", str(keytab), f"--principal={ACCOUNT}@{ad.REALM}")


def _bad_passwords(realm: ad.AdRealm) -> tuple[int, int]:
    text = realm.ldbsearch(f"(sAMAccountName={ACCOUNT})", "badPwdCount", "lockoutTime")
    bad = re.search(r"^badPwdCount: (\d+)$", text, re.MULTILINE)
    locked = re.search(r"^lockoutTime: (\d+)$", text, re.MULTILINE)
    return int(bad.group(1)) if bad else 0, int(locked.group(1)) if locked else 0


def _gateway(realm: ad.AdRealm, directory: Path, backend: AdProcess, keytab: Path, krb5: Path) -> AdProcess:
    return start_ad_gateway(
        realm,
        directory,
        backend,
        principal=f'"{ACCOUNT}@{ad.REALM}"',
        keytab=f'"{keytab}"',
        krb5_config=f'"{krb5}"',
    )


def test_a_stale_keytab_is_not_offered_again_until_it_changes_so_the_account_is_not_locked(
    ad_realm: ad.AdRealm, ad_backend: AdProcess, account: str, tmp_path: Path
) -> None:
    """The account's password is reset after its keytab was exported: every request is 502 with the fix 'export the
    keytab again', but the refused keys go to the KDC once, not per request (each try was two bad passwords: ten
    requests locked the account, and the re-exported keytab then met a locked account); once the keytab file
    changes, the next request is served."""
    _set_enctypes(ad_realm, 24)
    keytab = tmp_path / "svc.keytab"
    _export(ad_realm, keytab)
    ad_realm.samba_tool("user", "setpassword", account, "--newpassword=Svc-Tmp-Pa55-2")
    krb5 = tmp_path / "krb5.conf"
    krb5.write_text(ad_realm.krb5_conf.read_text())
    gw = _gateway(ad_realm, tmp_path / "gw", ad_backend, keytab, krb5)
    try:
        offset = kdc_log_offset(ad_realm)
        for _ in range(10):
            status, body = status_and_body(ad_curl(ad_realm, f"{gw.url}/owa/", "alice"))
            assert status == 502, body
        event = gw.wait_event("kerberos_misconfigured", principal="alice@AD.TEST")
        assert "the keytab is stale" in event["fix"]
        assert "export it again" in event["fix"]
        tried = ad_realm.samba_log.read_bytes()[offset:].decode(errors="replace").count("ERR_PREAUTH_FAILED")
        bad, locked = _bad_passwords(ad_realm)
        assert locked == 0, f"AD locked {account} after {bad} bad passwords ({tried} AS exchanges refused)"
        assert bad < THRESHOLD

        _export(ad_realm, keytab)  # the fix the log gave
        status, body = status_and_body(ad_curl(ad_realm, f"{gw.url}/owa/", "alice"))
        assert status == 200, body
    finally:
        gw.stop()


def test_rc4_tickets_where_krb5_conf_permits_only_aes_name_the_accounts_enctypes(
    ad_realm: ad.AdRealm, ad_backend: AdProcess, account: str, tmp_path: Path
) -> None:
    """msDS-SupportedEncryptionTypes = 4 (RC4 only) on the gateway's account and permitted_enctypes AES in the
    gateway's krb5.conf: AD issues RC4 and the library refuses it (KDC has no support for encryption type); 502 and
    a fix naming msDS-SupportedEncryptionTypes on the account, not a 500."""
    _set_enctypes(ad_realm, 4)
    keytab = tmp_path / "svc.keytab"
    _export(ad_realm, keytab)
    krb5 = tmp_path / "krb5.conf"
    aes = "    permitted_enctypes = aes256-cts-hmac-sha1-96 aes128-cts-hmac-sha1-96\n"
    krb5.write_text(ad_realm.krb5_conf.read_text().replace("[libdefaults]\n", "[libdefaults]\n" + aes))
    gw = _gateway(ad_realm, tmp_path / "gw", ad_backend, keytab, krb5)
    try:
        status, body = status_and_body(ad_curl(ad_realm, f"{gw.url}/owa/", "alice"))
        assert status == 502, body
        event = gw.wait_event("kerberos_misconfigured", principal="alice@AD.TEST")
        assert "KDC_ERR_ETYPE_NOSUPP" in event["fix"]
        assert "msDS-SupportedEncryptionTypes" in event["fix"]
        assert f"Set-ADUser {account} -KerberosEncryptionType AES128,AES256" in event["fix"]
    finally:
        gw.stop()
