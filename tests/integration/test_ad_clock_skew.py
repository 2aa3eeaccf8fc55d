"""The gateway's clock ten minutes off the DC's (AD allows five). The network namespace cannot have a clock of its
own (Linux time namespaces shift only the monotonic clocks), so the gateway runs with libfaketime preloaded (Debian
`faketime`), which shifts the wall clock of that one process; the DC, the backend and curl keep the real time. The
library is preloaded by hand rather than through the `faketime` command, which forks: stopping it left the gateway
running."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from proxy.lab import ad
from tests.integration.ad_fixtures import AD_TIMEOUT, AdProcess, _start, ad_curl, status_and_body

pytestmark = pytest.mark.timeout(AD_TIMEOUT)

LIBFAKETIME = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")


@pytest.mark.parametrize(("shift", "ahead"), [("+10m", True), ("-10m", False)])
def test_a_gateway_clock_ten_minutes_off_is_the_operators_502_naming_the_offset(
    ad_realm: ad.AdRealm, ad_backend: AdProcess, tmp_path: Path, shift: str, ahead: bool
) -> None:
    """MIT corrects the S4U exchanges by the KDC's time, so they succeed; the gateway then cannot accept its own
    evidence ticket ('Clock skew too great' / 'Ticket not yet valid'), which was every user's 403 'the KDC's account
    cannot be verified' with the fix 'is kerberos.keytab current?'. Now it is a 502, kerberos_misconfigured, whose
    fix says how far the clock is off and to synchronise it."""
    if not LIBFAKETIME.exists():
        pytest.fail(f"{LIBFAKETIME} is missing: make setup installs it (Debian faketime)")
    port = ad_realm.free_port()
    config = tmp_path / "gateway.toml"
    config.write_text(ad.gateway_config(ad_realm, port=port, backend_port=ad_backend.port))
    faked = ["env", f"LD_PRELOAD={LIBFAKETIME}", f"FAKETIME={shift}", "FAKETIME_DONT_FAKE_MONOTONIC=1"]
    gw = _start(
        ad_realm,
        [*faked, sys.executable, "-m", "proxy", "run", "--config", str(config)],
        port,
        tmp_path / "gateway.log",
        scheme="https",
    )
    try:
        status, body = status_and_body(ad_curl(ad_realm, f"{gw.url}/owa/", "alice"))
        assert status == 502, body
        assert "the gateway's clock disagrees with the authentication service" in body
        event = gw.wait_event("kerberos_misconfigured", principal="alice@AD.TEST")
        assert f"{'ahead of' if ahead else 'behind'} the KDC's" in event["fix"], event["fix"]
        offset = int(event["fix"].split("about ")[1].split(" s ")[0])
        assert 540 <= offset <= 660, event["fix"]  # ten minutes, give or take the machine's load
        assert "synchronise the gateway's clock" in event["fix"]
        assert not gw.events("kdc_account_mismatch")
    finally:
        gw.stop()


def test_doctor_with_a_skewed_clock_says_what_the_gateway_says(
    ad_realm: ad.AdRealm, ad_backend: AdProcess, tmp_path: Path
) -> None:
    """`kcd-proxy doctor` ten minutes ahead: its clock and s4u2self checks fail with the gateway's own words and
    offset (they read "A required input parameter could not be read -- No context has been established")."""
    config = tmp_path / "gateway.toml"
    config.write_text(ad.gateway_config(ad_realm, port=ad_realm.free_port(), backend_port=ad_backend.port))
    faked = ["env", f"LD_PRELOAD={LIBFAKETIME}", "FAKETIME=+10m", "FAKETIME_DONT_FAKE_MONOTONIC=1"]
    done = ad_realm.run([*faked, sys.executable, "-m", "proxy", "doctor", "--config", str(config)], timeout=180)
    assert done.returncode == 1, done.stdout + done.stderr
    clock = r"FAIL\s+clock\s+cannot read the KDC's time: the gateway's clock disagrees"
    assert re.search(clock, done.stdout), done.stdout
    assert re.search(r"FAIL\s+s4u2self\s+the gateway's clock disagrees", done.stdout), done.stdout
    assert "ahead of the KDC's" in done.stdout
    assert "No context has been established" not in done.stdout
