"""Basic against Active Directory's account lockout (TMG's ActiveSync problem): a hostile device guessing a user's
password through the gateway must not lock the user's AD account, and the user's own device with the right password
keeps working. The victim is an account of its own with a fine-grained password policy (a PSO) that locks it after
`THRESHOLD` bad passwords, so no other test's account or the domain's policy changes."""

from __future__ import annotations

import json
import re
import secrets
import time
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
    wait_kdc_reason,
)
from tests.integration.jsonlog import WAIT

pytestmark = pytest.mark.timeout(AD_TIMEOUT)

VICTIM = "lockme"  # the victims' names begin so
VICTIM_PASSWORD = "Lockme-Ad-Pa55"
PSO = "kcd-test-lockout"
THRESHOLD = 5  # the PSO's msDS-LockoutThreshold
GATEWAY_LIMIT = 3  # the gateway's basic_failures_per_user: below the directory's threshold, as docs/ advise
GUESSES = 2 * THRESHOLD  # a guessing device's wrong passwords: enough to lock the account twice without the gateway


@pytest.fixture
def victim(ad_realm: ad.AdRealm) -> Iterator[str]:
    """A fresh account of this test's own (bad-password count 0) under a PSO that locks it after THRESHOLD bad
    passwords within 30 minutes, for 30 minutes; deleted afterwards. Its name is the test's alone: the realm is shared
    by the run's workers, and under `--dist load` this file's tests run at once on two of them; with one name for
    all (lockme), one test's set-up deleted and made again the account another was guessing at."""
    name = f"{VICTIM}{secrets.token_hex(3)}"
    with _locked(ad_realm.root):
        ad_realm.samba_tool("user", "create", name, VICTIM_PASSWORD)
        apply_lockout_policy(ad_realm, PSO, 10, THRESHOLD, name)
    try:
        yield name
    finally:
        with _locked(ad_realm.root):
            ad_realm.samba_tool("user", "delete", name)


def _directory_says(realm: ad.AdRealm, name: str) -> tuple[int, int]:
    """(badPwdCount, lockoutTime) of `name` as the DC keeps them."""
    text = realm.ldbsearch(f"(sAMAccountName={name})", "badPwdCount", "lockoutTime")
    bad = re.search(r"^badPwdCount: (\d+)$", text, re.MULTILINE)
    locked = re.search(r"^lockoutTime: (\d+)$", text, re.MULTILINE)
    return int(bad.group(1)) if bad else 0, int(locked.group(1)) if locked else 0


def test_one_wrong_password_is_one_bad_password_to_ad(
    ad_realm: ad.AdRealm, ad_backend: AdProcess, victim: str, tmp_path: Path
) -> None:
    """One wrong Basic password through the gateway is one AS exchange, so AD counts one bad password (it was two:
    the password was tried once for krb5 and once more for SPNEGO, which locked a threshold-10 account after five
    guesses, the gateway's own per-user limit), and one right password is one AS exchange."""
    gw = start_ad_gateway(ad_realm, tmp_path, ad_backend, '\n[authentication]\nmode = "basic"\n')
    try:
        offset = kdc_log_offset(ad_realm)
        status, body = status_and_body(ad_curl(ad_realm, f"{gw.url}/owa/", None, "-u", f"{victim}@ad.test:Wrong-1"))
        assert status == 401, body
        wait_kdc_reason(ad_realm, offset, "ERR_PREAUTH_FAILED", f"{victim}@AD.TEST")
        assert _directory_says(ad_realm, victim) == (1, 0)
        status, body = status_and_body(ad_curl(ad_realm, f"{gw.url}/owa/", None, "-u", f"{victim}:{VICTIM_PASSWORD}"))
        assert status == 200, body
        log = ad_realm.samba_log.read_bytes()[offset:].decode(errors="replace")
        checks = [line for line in log.splitlines() if "Auth: [Kerberos KDC" in line and f"[{victim}@AD.TEST]" in line]
        assert [c.split("status [")[1].split("]")[0] for c in checks] == ["NT_STATUS_WRONG_PASSWORD", "NT_STATUS_OK"]
    finally:
        gw.stop()


def test_a_guessing_device_does_not_lock_the_ad_account_and_the_users_own_password_still_works(
    ad_realm: ad.AdRealm, ad_backend: AdProcess, victim: str, tmp_path: Path
) -> None:
    """A device hammering wrong passwords for lockme (GUESSES of them, twice AD's threshold) reaches the KDC at most
    basic_failures_per_user times (then 429): AD's bad-password count stays below its lockout threshold, and lockme's
    own device, whose cached sign-in has expired, still gets in with the right password (it was locked out by AD, then
    by the gateway). The guesses are counted, not timed: ten seconds of them (as before) are three or fewer wherever a
    curl into the namespace takes over three seconds, and three 401s without a 429 failed the test."""
    extra = (
        '\n[authentication]\nmode = "basic"\nbasic_cache_seconds = 1\n'
        f"basic_failures_per_user = {GATEWAY_LIMIT}\nbasic_failures_per_address = 1000\n"
    )
    gw = start_ad_gateway(ad_realm, tmp_path, ad_backend, extra)
    url = f"{gw.url}/Microsoft-Server-ActiveSync"
    try:
        status, body = status_and_body(ad_curl(ad_realm, url, None, "-u", f"{victim}@ad.test:{VICTIM_PASSWORD}"))
        assert status == 200, body
        assert json.loads(body)["principal"].lower() == f"{victim}@ad.test"

        statuses = []
        for guess in range(1, GUESSES + 1):
            done = ad_curl(ad_realm, url, None, "-u", f"{victim}@ad.test:Guess-{guess}")
            statuses.append(status_and_body(done)[0])
            time.sleep(0.2)
        bad, locked_at = _directory_says(ad_realm, victim)
        assert statuses.count(401) == GATEWAY_LIMIT, statuses
        assert set(statuses) == {401, 429}, statuses
        assert (bad, locked_at) == (GATEWAY_LIMIT, 0), f"AD counted {bad} bad passwords; statuses {statuses}"

        status, body = status_and_body(ad_curl(ad_realm, url, None, "-u", f"{victim}@ad.test:{VICTIM_PASSWORD}"))
        assert status == 200, body
        assert _directory_says(ad_realm, victim) == (0, 0)  # a good sign-in resets AD's count, as the gateway's
        assert gw.wait_event("request", status=200, principal=f"{victim}@AD.TEST")
    finally:
        gw.stop()


def test_a_guesser_spread_over_two_workers_does_not_lock_the_ad_account(
    ad_realm: ad.AdRealm, ad_backend: AdProcess, victim: str, tmp_path: Path
) -> None:
    """With listener.workers = 2, twelve wrong passwords for lockme, each a new connection (curl), reach the DC
    basic_failures_per_user (3) times: badPwdCount 3, lockoutTime 0 (each worker counting on its own let 6 through and
    the DC locked the account at its threshold of 5). Then lockme's own device, retrying, gets in through the KDC
    (the password the KDC last accepted passes the hold; nothing is cached, so a cache hit cannot stand in for it),
    never sees a 401, and AD's count is back to 0."""
    extra = (
        '\n[authentication]\nmode = "basic"\nbasic_cache_seconds = 0\n'
        f"basic_failures_per_user = {GATEWAY_LIMIT}\nbasic_failures_per_address = 1000\n"
    )
    gw = start_ad_gateway(ad_realm, tmp_path, ad_backend, extra, workers=2)
    url = f"{gw.url}/Microsoft-Server-ActiveSync"
    own = ("-u", f"{victim}@ad.test:{VICTIM_PASSWORD}")
    try:
        signed_in = [status_and_body(ad_curl(ad_realm, url, None, *own))[0] for _ in range(4)]
        assert set(signed_in) == {200}, signed_in
        statuses = [
            status_and_body(ad_curl(ad_realm, url, None, "-u", f"{victim}@ad.test:Guess-{i}"))[0] for i in range(12)
        ]
        assert len({e["pid"] for e in gw.events("request")}) == 2, "one worker answered every request"
        assert statuses.count(401) == GATEWAY_LIMIT, statuses
        assert set(statuses) == {401, 429}, statuses
        assert _directory_says(ad_realm, victim) == (GATEWAY_LIMIT, 0), statuses

        gw.mark()
        retries: list[int] = []
        deadline = time.monotonic() + WAIT  # each try is a curl into the namespace: seconds apiece under load
        while 200 not in retries and time.monotonic() < deadline:
            retries.append(status_and_body(ad_curl(ad_realm, url, None, *own))[0])
        assert retries[-1] == 200, retries
        assert set(retries) <= {200, 429}, retries
        assert gw.wait_event("request", status=200, principal=f"{victim}@AD.TEST").get("basic_cached") is False
        assert _directory_says(ad_realm, victim) == (0, 0)
    finally:
        gw.stop()
