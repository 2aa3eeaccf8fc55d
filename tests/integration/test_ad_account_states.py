"""Account states a Windows administrator sets, against the real Samba DC, through a certificate (S4U2Self, no
password) and through Basic (the user's own AS exchange): 'must change password at next logon', no logon hours,
locked out. Each is a 403 whose log line names the state and the fix, never the operator's 502; where Samba's KDC
lets S4U2Self through (logon hours), the test pins it and docs/deploying.md says what Windows does."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.lab import ad
from tests.integration.ad_fixtures import AD_TIMEOUT, AdProcess, _locked, ad_curl, start_ad_gateway, status_and_body

pytestmark = pytest.mark.timeout(AD_TIMEOUT)

USERS = ("mustchange", "nohours", "lockedout")
PSO = "kcd-test-lock1"  # locks after one bad password


def _password(name: str) -> str:
    return f"{name.title()}-Pa55-x"


@pytest.fixture(scope="module")
def states(ad_realm: ad.AdRealm, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, tuple[Path, Path]]]:
    """The three accounts made afresh, each with a certificate for its UPN; lockedout locked by one wrong kinit."""
    directory = tmp_path_factory.mktemp("states")
    certs = {}
    with _locked(ad_realm.root):
        listed = ad_realm.samba_tool("user", "list")
        for name in USERS:
            if name in listed:
                ad_realm.samba_tool("user", "delete", name)
            ad_realm.samba_tool("user", "create", name, _password(name))
            certs[name] = ad.issue_user_certificate(ad_realm.pki, directory, name, f"{name}@{ad.DNS_DOMAIN}")
        ad_realm.samba_tool("user", "setpassword", "mustchange", f"--newpassword={_password('mustchange')}")
        ad_realm.ldbmodify(ad._replace(f"CN=mustchange,CN=Users,{ad.BASE_DN}", "pwdLastSet", "0"))
        none = base64.b64encode(bytes(21)).decode()  # 168 hours, no bit set: never
        hours = f"dn: CN=nohours,CN=Users,{ad.BASE_DN}\nchangetype: modify\nreplace: logonHours\nlogonHours:: {none}\n"
        ad_realm.ldbmodify(hours)
        if PSO not in ad_realm.samba_tool("domain", "passwordsettings", "pso", "list"):
            ad_realm.samba_tool(
                "domain", "passwordsettings", "pso", "create", PSO, "12",
                "--account-lockout-threshold=1", "--account-lockout-duration=30", "--reset-account-lockout-after=30",
            )  # fmt: skip
        ad_realm.samba_tool("domain", "passwordsettings", "pso", "apply", PSO, "lockedout")
    ad_realm.run(["kinit", f"lockedout@{ad.REALM}"], stdin="not-the-password\n")
    assert "lockoutTime: 0" not in ad_realm.ldbsearch("(sAMAccountName=lockedout)", "lockoutTime")
    try:
        yield certs
    finally:
        with _locked(ad_realm.root):
            for name in USERS:
                ad_realm.samba_tool("user", "delete", name)


@pytest.fixture(scope="module")
def either(
    ad_realm: ad.AdRealm, ad_backend: AdProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[AdProcess]:
    """A gateway taking a certificate, or else Basic."""
    mode = '\n[authentication]\nmode = "certificate-or-basic"\n'
    gw = start_ad_gateway(ad_realm, tmp_path_factory.mktemp("states-gw"), ad_backend, mode)
    yield gw
    gw.stop()


def _certificate(realm: ad.AdRealm, gw: AdProcess, cert: tuple[Path, Path]) -> tuple[int, str]:
    cmd = ["curl", "-sS", "--max-time", "30", "--cacert", str(realm.pki.root_cert), "--cert", str(cert[0])]
    return status_and_body(realm.run([*cmd, "--key", str(cert[1]), "-w", "\n%{http_code}", f"{gw.url}/owa/"]))


def test_must_change_password_is_the_users_403_not_the_operators_502(
    ad_realm: ad.AdRealm, either: AdProcess, states: dict[str, tuple[Path, Path]]
) -> None:
    """pwdLastSet = 0: Samba refuses S4U2Self ('Password has expired') though S4U uses no password; that was a 502
    'unexpected Kerberos failure' logged as the operator's misconfiguration. Now a 403 naming the password, whose
    fix is the user's; Basic with the right password says the same."""
    either.mark()
    status, body = _certificate(ad_realm, either, states["mustchange"])
    assert status == 403, body
    assert "the password of mustchange@AD.TEST has expired or must be changed" in body
    event = either.wait_event("kerberos_refused", principal="mustchange@AD.TEST")
    assert "must change password at next logon" in event["fix"]
    assert not either.events("kerberos_misconfigured", either.since)
    status, body = status_and_body(
        ad_curl(ad_realm, f"{either.url}/owa/", None, "-u", f"mustchange@ad.test:{_password('mustchange')}")
    )
    assert status == 403, body
    assert "has expired" in body


def test_logon_hours_bind_a_password_not_samba_s4u(
    ad_realm: ad.AdRealm, either: AdProcess, states: dict[str, tuple[Path, Path]]
) -> None:
    """logonHours all zero: Samba refuses nohours's own AS exchange (Basic: 403, the fix names logon hours) but
    issues S4U2Self for him, so his certificate is served (pinned: Samba's KDC, not the gateway, decides)."""
    status, body = _certificate(ad_realm, either, states["nohours"])
    assert status == 200, body
    assert json.loads(body)["principal"] == "nohours@AD.TEST"
    either.mark()
    status, body = status_and_body(
        ad_curl(ad_realm, f"{either.url}/owa/", None, "-u", f"nohours@ad.test:{_password('nohours')}")
    )
    assert status == 403, body
    event = either.wait_event("kerberos_refused")
    assert "logon hours" in event["fix"]


def test_a_locked_out_account_is_refused_both_ways_with_the_unlock_command(
    ad_realm: ad.AdRealm, either: AdProcess, states: dict[str, tuple[Path, Path]]
) -> None:
    """lockedout is locked (one bad password under a threshold-1 PSO): S4U2Self and his own right password are both
    refused, 403 'disabled or locked', and the fix gives Unlock-ADAccount / samba-tool user unlock."""
    either.mark()
    status, body = _certificate(ad_realm, either, states["lockedout"])
    assert status == 403, body
    assert "the account lockedout@AD.TEST is disabled or locked" in body
    assert "Unlock-ADAccount" in either.wait_event("kerberos_refused", principal="lockedout@AD.TEST")["fix"]
    status, body = status_and_body(
        ad_curl(ad_realm, f"{either.url}/owa/", None, "-u", f"lockedout@ad.test:{_password('lockedout')}")
    )
    assert status == 403, body
