"""accountExpires past the year 9999 (a FILETIME Python's datetime cannot hold), against the real Samba AD DC.

`accountExpires` is a 64-bit integer; `0` and `0x7FFFFFFFFFFFFFFF` mean never, anything else is a time. A value past
9999-12-31 (what an administrator types in ADSI Edit or a script writes as "far away", 0x7FFFFFFFFFFFFFFE, say) is
a time that has not come: Samba's KDC, which compares the integers, signs the account in. These tests give an
account such a value in Samba and send its certificate (its own SID, minted with the openssl CLI) through a real
`strong` gateway, curl as the device.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.lab import ad, ad_mapping
from tests.integration.ad_fixtures import AD_TIMEOUT, AdProcess
from tests.integration.test_ad_held_accounts import HOLD, _ended_within_a_sweep, _gateway, _Ping, _User, _user
from tests.integration.test_ad_held_mapping import _certificate
from tests.integration.test_ad_mapping import served_as, start_gateway
from tests.integration.test_ad_openssl_mapping import curl, mint, sid_extension_text, upn_line

pytestmark = pytest.mark.timeout(AD_TIMEOUT)

FAR = 3_000_000_000_000_000_000  # a FILETIME in the year 11107


@pytest.fixture(scope="module")
def realm(ad_mapping_realm: ad.AdRealm) -> ad.AdRealm:
    return ad_mapping_realm


@pytest.fixture(scope="module")
def strong(realm: ad.AdRealm, ad_backend: AdProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AdProcess]:
    """`strong`, asking the directory on every request."""
    table = ad_mapping.directory_table(realm, cache_seconds=0)
    gw = start_gateway(realm, tmp_path_factory.mktemp("expiry-range"), ad_backend, "strong", table)
    yield gw
    gw.stop()


@pytest.fixture
def far_user(realm: ad.AdRealm) -> Iterator[_User]:
    """An account of this test's own whose accountExpires is FAR; deleted after."""
    for user in _user(realm, "xr"):
        dn = f"dn: CN={user.name},CN=Users,{realm.base_dn}\nchangetype: modify\n"
        realm.ldbmodify(dn + f"replace: accountExpires\naccountExpires: {FAR}\n")
        yield user


@pytest.fixture
def far_off(far_user: _User) -> str:
    return far_user.name


@pytest.fixture
def other(realm: ad.AdRealm) -> Iterator[_User]:
    """Another account of this test's own."""
    yield from _user(realm, "xo")


@pytest.fixture
def minted(tmp_path: Path) -> Path:
    argv = ["openssl", "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    argv += ["-keyout", str(tmp_path / "device.key"), "-out", str(tmp_path / "device.csr"), "-subj", "/CN=device"]
    subprocess.run(argv, check=True, capture_output=True)
    return tmp_path


def test_an_expiry_past_the_year_9999_is_not_a_500(
    realm: ad.AdRealm, strong: AdProcess, minted: Path, far_off: str
) -> None:
    """The account's accountExpires is 0x7FFFFFFFFFFFFFFE, its certificate carries its SID: served as the account,
    as Samba's KDC signs it in (200); before, the mapping stage's date arithmetic overflowed (500)."""
    assert str(FAR) in realm.ldbsearch(f"(sAMAccountName={far_off})", "accountExpires")
    line, section = sid_extension_text(f"OCTETSTRING:{ad_mapping.object_sid(realm, far_off)}")
    upn = f"{far_off}@{ad.DNS_DOMAIN}"
    cert = mint(realm, minted, "far", upn_line(upn) + line, section)
    status, body = curl(realm, strong, cert, minted / "device.key")
    assert status == 200, body
    assert served_as(body) == f"{far_off}@{ad.REALM}"
    assert strong.wait_event("request", upn=upn)["mapping"] == "sid-extension"


def test_an_expiry_past_the_year_9999_does_not_stop_the_sweep_for_everyone_else(
    realm: ad.AdRealm, ad_backend: AdProcess, far_user: _User, other: _User, tmp_path: Path
) -> None:
    """Two Pings held under `mapping = "upn"` (the far-off account's by its certificate, S4U2Self: Samba's KDC will
    not answer its AS exchange, whose reply cannot carry a year past 9999; then another user's by Basic), the other
    user disabled in Samba: their Ping is ended with 403 within a sweep, and the far-off account's runs its whole
    hold (200: not expired).
    Before, every sweep failed at the far-off account (`held_mapping_sweep_failed`, OverflowError) before it came to
    the other user, whose Ping was served to its end (200) though the account was disabled."""
    gw = _gateway(realm, tmp_path / "gw", ad_backend)
    pings: list[_Ping] = []
    try:
        (tmp_path / "cert").mkdir()
        upn = f"{far_user.name}@{ad.DNS_DOMAIN}"
        far = _Ping(realm, gw, HOLD // 2, cert=_certificate(realm, tmp_path / "cert", upn))
        pings.append(far)
        held = _Ping(realm, gw, HOLD, basic=other.basic)
        pings.append(held)
        gw.mark()
        realm.samba_tool("user", "disable", other.name)
        answer = _ended_within_a_sweep(held)
        assert "the account is disabled" in str(answer["answer"])
        kept = far.answer()
        assert kept.get("status") == "200", kept
        assert not gw.events("held_mapping_sweep_failed", gw.since)
    finally:
        for ping in pings:
            ping.stop()
        gw.stop()
