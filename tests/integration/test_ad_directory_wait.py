"""A directory look-up the KDC keeps waiting, against the Samba AD DC: the refusal names the timer that ended it.

With `bind = "kerberos"` the directory's first bind asks the KDC for the gateway's own TGT, and Samba answers that
AS-REQ only once no other process holds a write transaction on sam.ldb (docs/ad-lab.md). These tests hold one (a
`SamDB` transaction, opened by Samba's own Python, held until the test closes its stdin) while a certificate's
look-up waits, and pin what the refusals say: which limit ended the wait (twice `directory.timeout`, or
`kerberos.kdc_timeout` when that is shorter), for the first look-up and for those refused at once after it while the
abandoned ticket request still holds the directory's one KDC thread; and that the device is told to come back.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from proxy.lab import ad, ad_mapping
from tests.integration.ad_fixtures import AD_TIMEOUT, AdProcess
from tests.integration.jsonlog import WAIT
from tests.integration.test_ad_mapping import curl, start_gateway

pytestmark = pytest.mark.timeout(AD_TIMEOUT)

_HOLD = """
import sys
from samba.auth import system_session
from samba.param import LoadParm
from samba.samdb import SamDB
lp = LoadParm()
lp.load(sys.argv[2])
db = SamDB(url=sys.argv[1], lp=lp, session_info=system_session())
db.transaction_start()
print("held", flush=True)
sys.stdin.read()  # until the test closes stdin
db.transaction_cancel()
"""


@pytest.fixture(scope="module")
def realm(ad_mapping_realm: ad.AdRealm) -> ad.AdRealm:
    """The AD realm with the mapping accounts and certificates (`ad_fixtures.ad_mapping_realm`)."""
    return ad_mapping_realm


@contextmanager
def write_transaction(realm: ad.AdRealm) -> Iterator[None]:
    """A write transaction held on the DC's sam.ldb (Samba's Python: `python3-samba` imports only there) until the
    block ends; entered once the holder says it holds it."""
    argv = ["/usr/bin/python3", "-c", _HOLD, str(realm.sam_ldb), str(realm.smb_conf)]
    holder = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "held", holder.poll()
        yield
    finally:
        if holder.stdin is not None:
            holder.stdin.close()  # the holder cancels its transaction and exits
        try:
            holder.wait(timeout=WAIT)
        except subprocess.TimeoutExpired:
            holder.kill()
            holder.wait()


def _served_again(realm: ad.AdRealm, gw: AdProcess) -> int:
    """alice's status once the DC answers again: a 503 (Retry-After) is retried, as a device does, within WAIT."""
    deadline = time.monotonic() + WAIT
    status, _, _ = curl(realm, gw, "alice-sid")
    while status == 503 and time.monotonic() < deadline:
        time.sleep(1)  # the device's pace between two tries
        status, _, _ = curl(realm, gw, "alice-sid")
    return status


def test_a_look_up_ended_by_its_own_bound_names_directory_timeout(
    realm: ad.AdRealm, ad_backend: AdProcess, tmp_path: Path
) -> None:
    """The first bind's TGT request unanswered (a write transaction on sam.ldb): 503 at 2 x directory.timeout, and
    the log says that bound ended it, not kdc_timeout (60 s here); the look-ups refused at once after it, while the
    abandoned request holds the directory's one KDC thread, say the same (before: "held by calls it left unanswered
    past kerberos.kdc_timeout (60 s)" and "(kerberos.max_in_flight)", which neither ended nor sizes that wait)."""
    table = ad_mapping.directory_table(realm) + "timeout = 2\n"
    gw = start_gateway(realm, tmp_path / "gw", ad_backend, "strong", directory_text=table)
    try:
        with write_transaction(realm):
            status, body, headers = curl(realm, gw, "alice-sid")
            assert (status, headers.get("retry-after")) == (503, "30"), body
            assert "did not answer in time; try again in 30 s" in body
            failed = gw.wait_event("directory_server_failed")
            assert failed["error"] == "no answer in time"  # as before: the field keeps its value
            assert failed["ended_by"] == "2 x directory.timeout (4 s)", failed
            fix = gw.wait_event("directory_unavailable")["fix"]
            assert "4 s (2 x directory.timeout: connect and bind, then search)" in fix, fix
            assert "Retry-After" in fix, fix
            assert "kerberos.kdc_timeout (60 s) did not end it" in fix, fix

            status, body, headers = curl(realm, gw, "alice-sid")
            assert (status, headers.get("retry-after")) == (503, "30"), body
            assert "did not answer in time; try again in 30 s" in body
            fix = gw.wait_event("directory_unavailable")["fix"]
            assert "past kerberos.kdc_timeout" not in fix, fix
            assert "max_in_flight" not in fix, fix
            assert "given up at 2 x directory.timeout (4 s)" in fix, fix
            assert "holds the directory's one KDC thread" in fix, fix
            assert "Retry-After" in fix, fix
            assert gw.wait_event("directory_server_failed")["ended_by"] == "2 x directory.timeout (4 s)"
        assert _served_again(realm, gw) == 200
    finally:
        gw.stop()


def test_a_bind_ended_by_kdc_timeout_is_reported_under_kdc_timeout(
    realm: ad.AdRealm, ad_backend: AdProcess, tmp_path: Path
) -> None:
    """kerberos.kdc_timeout (2 s) shorter than the look-up's bound (10 s): the bind's ticket request ends at
    kdc_timeout, and the log names that key, for the first look-up and those refused after it (before: "no answer in
    time", the look-up's own words, and then "(kerberos.max_in_flight)")."""
    table = ad_mapping.directory_table(realm) + "timeout = 5\n"
    gw = start_gateway(realm, tmp_path / "gw", ad_backend, "strong", directory_text=table, kerberos="kdc_timeout = 2\n")
    try:
        with write_transaction(realm):
            status, body, headers = curl(realm, gw, "alice-sid")
            assert (status, headers.get("retry-after")) == (503, "30"), body
            assert "did not answer in time; try again in 30 s" in body
            failed = gw.wait_event("directory_server_failed")
            assert "within kerberos.kdc_timeout (2 s)" in failed["error"], failed
            assert failed["ended_by"] == "kerberos.kdc_timeout (2 s)", failed

            status, body, _ = curl(realm, gw, "alice-sid")
            assert status == 503, body
            fix = gw.wait_event("directory_unavailable")["fix"]
            assert "given up at kerberos.kdc_timeout (2 s)" in fix, fix
            assert "max_in_flight" not in fix, fix
        assert _served_again(realm, gw) == 200
    finally:
        gw.stop()
