"""The directory's simple bind refused, against the Samba AD DC: 503 and a log that says why, never the password.

The bind account is one of this module's own (a unique name: the realm is shared by the run's workers), deleted
afterwards; its password is a unique string, so a search of every line the gateway and `doctor` wrote, and of
every answer a device got, finds it if it leaked anywhere.
"""

from __future__ import annotations

import secrets
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.lab import ad
from tests.integration.ad_fixtures import AD_TIMEOUT, AdProcess
from tests.integration.test_ad_mapping import curl, start_gateway

pytestmark = pytest.mark.timeout(AD_TIMEOUT)


@pytest.fixture(scope="module")
def realm(ad_mapping_realm: ad.AdRealm) -> ad.AdRealm:
    """The AD realm with the mapping accounts and certificates (`ad_fixtures.ad_mapping_realm`)."""
    return ad_mapping_realm


@pytest.fixture
def bind_account(realm: ad.AdRealm) -> Iterator[tuple[str, str]]:
    """An account of this test's own to bind as, and its password; deleted after."""
    name = f"sb{secrets.token_hex(4)}"
    password = f"Bind-{secrets.token_hex(12)}-Pa55"
    realm.samba_tool("user", "create", name, password)
    try:
        yield name, password
    finally:
        realm.samba_tool("user", "delete", name)


def _directory(realm: ad.AdRealm, where: Path, account: str, password: str) -> str:
    where.mkdir(parents=True, exist_ok=True)
    (where / "ldap.pw").write_text(password + "\n")
    ca = realm.samba_dir / "private" / "tls" / "ca.pem"
    return f"""
[directory]
urls = ["ldaps://{realm.dc_host}"]
base_dn = "{realm.base_dn}"
bind = "simple"
bind_dn = "CN={account},CN=Users,{realm.base_dn}"
password_file = "{where / "ldap.pw"}"
ca_file = "{ca}"
cache_seconds = 0
"""


def test_a_refused_simple_bind_is_503_and_no_password_is_written_anywhere(
    realm: ad.AdRealm, ad_backend: AdProcess, bind_account: tuple[str, str], tmp_path: Path
) -> None:
    """The right password: served. A wrong one, and the right one of an expired account: 503 with Retry-After,
    `directory_server_failed` says the directory refused the bind; `doctor` fails its directory check. Neither
    password is in any line the gateway or doctor wrote, nor in an answer."""
    account, password = bind_account
    wrong = f"Wrong-{secrets.token_hex(12)}-Pa55"
    seen: list[str] = []
    cases = [("right", password, 200), ("wrong", wrong, 503), ("expired", password, 503)]
    for label, given, expected in cases:
        if label == "expired":
            realm.samba_tool("user", "setexpiry", account, "--days=0")
        text = _directory(realm, tmp_path / label, account, given)
        gw = start_gateway(realm, tmp_path / label, ad_backend, "strong", directory_text=text)
        try:
            status, body, headers = curl(realm, gw, "alice-sid")
            seen.append(body + repr(headers))
            assert status == expected, (label, body)
            if expected == 503:
                assert headers["retry-after"]
                assert "Invalid credentials" in gw.wait_event("directory_server_failed")["error"], label
                gw.wait_event("directory_unavailable")
        finally:
            gw.stop()
        seen.append(gw.log_path.read_text(errors="replace"))
        doctor = [sys.executable, "-m", "proxy", "doctor", "--config", str(tmp_path / label / "gateway.toml")]
        done = realm.run(doctor, timeout=180)
        seen.append(done.stdout + done.stderr)
        line = next(x for x in done.stdout.splitlines() if x.split()[1:2] == ["directory"])
        assert line.startswith("PASS" if expected == 200 else "FAIL"), (label, done.stdout)
    everything = "\n".join(seen)
    assert password not in everything
    assert wrong not in everything
