"""The directory going silent under the gateway, against the Samba AD DC: fail closed, fail fast, recover.

A relay of our own (`_RELAY`) stands between the gateway and the DC's LDAP port, on the DC's address, so the
Kerberos bind still gets its ticket for `ldap/dc1.ad.test`. SIGSTOP freezes the relay: its kernel still accepts
connections and holds the ones open, nothing answers. That is a DC that hangs (a full disk, a stuck process, a
half-open connection after a network change), and the shared DC itself is never touched.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.lab import ad, ad_mapping
from tests.integration.ad_fixtures import AD_TIMEOUT, AdProcess
from tests.integration.jsonlog import WAIT, eventually
from tests.integration.test_ad_mapping import curl, start_gateway, summary

pytestmark = pytest.mark.timeout(AD_TIMEOUT)

_RELAY = """
import asyncio, sys

async def pipe(reader, writer):
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        writer.close()

async def serve(reader, writer):
    try:
        up_reader, up_writer = await asyncio.open_connection(sys.argv[2], int(sys.argv[3]))
    except OSError:
        writer.close()
        return
    await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

async def main():
    server = await asyncio.start_server(serve, sys.argv[2], int(sys.argv[1]))
    print("relay listening", flush=True)
    await server.serve_forever()

asyncio.run(main())
"""


@pytest.fixture(scope="module")
def realm(ad_mapping_realm: ad.AdRealm) -> ad.AdRealm:
    """The AD realm with the mapping accounts and certificates (`ad_fixtures.ad_mapping_realm`)."""
    return ad_mapping_realm


@contextlib.contextmanager
def _relay_to(realm: ad.AdRealm, log: Path, upstream: int) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """A TCP relay on the DC's address to the DC's port `upstream`, and the relay's port; let go on exit."""
    port = realm.free_port()
    proc = realm.popen([sys.executable, "-c", _RELAY, str(port), realm.dc_address, str(upstream)], log=log)
    try:
        deadline = time.monotonic() + WAIT
        while "relay listening" not in log.read_text():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "the relay did not start"
            time.sleep(0.1)
        yield proc, port
    finally:
        proc.send_signal(signal.SIGCONT)
        proc.kill()
        proc.wait()


@pytest.fixture
def relay(realm: ad.AdRealm, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """A TCP relay to the DC's LDAP port on the DC's address, and its URL by the DC's name; let go on exit."""
    with _relay_to(realm, tmp_path / "relay.log", 389) as (proc, port):
        yield proc, f"ldap://{realm.dc_host}:{port}"


_BURST_PROBE = """
import asyncio, json, os, signal, sys, time
from pathlib import Path
from proxy import config
from proxy.directory import Directory

NAMES = ["alice@ad.test", "bob@ad.test", "frank@ad.test", "grace@ad.test", "heidi@ad.test", "ivan@ad.test"]

async def timed(d, name):
    start = time.perf_counter()
    account = await d.account(name)
    return account.sam_account_name, time.perf_counter() - start

async def main():
    cfg = config.load(Path(sys.argv[1]))
    relay = int(sys.argv[2])
    d = Directory(cfg.directory, cfg.kerberos)
    warm = await d.account("carol@ad.test")  # a kept connection to the relay, the first URL
    os.kill(relay, signal.SIGSTOP)
    try:
        burst = await asyncio.wait_for(asyncio.gather(*(timed(d, n) for n in NAMES)), 300)
        after = await asyncio.wait_for(timed(d, "carol@ad.test"), 300)
    finally:
        os.kill(relay, signal.SIGCONT)
    print(json.dumps({"warm": warm.sam_account_name, "burst": burst, "after": after, "binds": d.binds}))

asyncio.run(main())
"""


def test_a_hung_first_server_delays_a_burst_of_look_ups_once_not_once_each(
    realm: ad.AdRealm, relay: tuple[subprocess.Popen[bytes], str], tmp_path: Path
) -> None:
    """The first URL hangs with a kept connection open (half-open): six concurrent look-ups of six users are
    all answered by the second URL within one [directory] timeout or two, not one timeout after another
    (they queued for the hung server's turn, 3-9 s each); the next look-up skips the hung server at once."""
    proc, relay_url = relay
    timeout = 3
    urls = (relay_url, f"ldap://{realm.dc_host}")
    directory_text = ad_mapping.directory_table(realm, urls=urls, cache_seconds=0) + f"timeout = {timeout}\n"
    cfg = tmp_path / "gateway.toml"
    cfg.write_text(ad_mapping.gateway_config(realm, "strong", directory_text=directory_text))
    done = realm.run([sys.executable, "-c", textwrap.dedent(_BURST_PROBE), str(cfg), str(proc.pid)], timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["warm"] == "carol"
    assert [name for name, _ in result["burst"]] == ["alice", "bob", "frank", "grace", "heidi", "ivan"]
    slowest = max(seconds for _, seconds in result["burst"])
    assert slowest < 3 * timeout + 1, result  # one wait for the hung server (and slack), not six
    name, seconds = result["after"]
    assert (name, seconds < timeout) == ("carol", True), result  # the hung server is not waited for again at once


def test_a_directory_that_goes_silent_is_503_then_served_again(
    realm: ad.AdRealm, relay: tuple[subprocess.Popen[bytes], str], ad_backend: AdProcess, tmp_path: Path
) -> None:
    """The only directory server hangs while the gateway holds a connection to it: 503 with Retry-After within
    the [directory] timeout, never an admission; once it answers again, the very next request is served."""
    proc, relay_url = relay
    text = ad_mapping.directory_table(realm, urls=(relay_url,), cache_seconds=0) + "timeout = 2\n"
    gw = start_gateway(realm, tmp_path / "gw", ad_backend, "strong", directory_text=text)
    try:
        # the connection the outage then holds: a shared DC slower than 2 s on a loaded machine is a 503 the device is
        # told to retry (its first request failed so in a loaded run), so retried here until the directory answers
        eventually(lambda: curl(realm, gw, "alice-sid")[0] == 200, "a first request served", WAIT)
        proc.send_signal(signal.SIGSTOP)
        for _ in range(2):  # the kept connection hangs; then so does a new one
            status, body, headers = curl(realm, gw, "alice-sid")
            assert (status, headers["x-kcd-refused-stage"]) == (503, "mapping"), body
            assert headers["retry-after"]
            refused = gw.wait_event("directory_unavailable")
            assert summary(gw, "alice@ad.test")["ms"]["mapping"] < 3 * 2 * 1000 + 1000
            # bonsai's own limit on each operation (directory.timeout) ends the wait, not the look-up's bound (2 x)
            assert gw.wait_event("directory_server_failed")["ended_by"] == "directory.timeout (2 s)"
            assert "no answer in time: directory.timeout (2 s) ended the wait for the " in refused["fix"], refused
        proc.send_signal(signal.SIGCONT)
        status, body, _ = curl(realm, gw, "alice-sid")
        assert status == 200, body
    finally:
        gw.stop()


def test_two_devices_refused_by_one_hung_directory_are_told_the_same(
    realm: ad.AdRealm, relay: tuple[subprocess.Popen[bytes], str], ad_backend: AdProcess, tmp_path: Path
) -> None:
    """The only directory server hangs under a kept connection: alice's search there is ended at directory.timeout,
    and bob's look-up, sent while it waited, waits for its turn on that connection and passes the server by once
    alice's has failed there. Both devices are told "did not answer in time; try again in 30 s": bob's said "try
    again later" and its fix named no limit. Bob is sent half a directory.timeout after alice, in the middle of the
    window where his turn comes after alice's search failed: each curl's own start may be 2.5 s late."""
    proc, relay_url = relay
    timeout = 5
    text = ad_mapping.directory_table(realm, urls=(relay_url,), cache_seconds=0) + f"timeout = {timeout}\n"
    gw = start_gateway(realm, tmp_path / "gw", ad_backend, "strong", directory_text=text)
    try:
        status, body, _ = curl(realm, gw, "alice-sid")
        assert status == 200, body
        proc.send_signal(signal.SIGSTOP)
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            alice = pool.submit(curl, realm, gw, "alice-sid")
            bob_due = time.monotonic() + timeout / 2
            while time.monotonic() < bob_due:  # the window above, not a wait for something to happen
                assert not alice.done(), alice.result()
                time.sleep(0.05)
            bob = pool.submit(curl, realm, gw, "bob-sid")
            answers = {"alice": alice.result(), "bob": bob.result()}
        for name, (status, body, headers) in answers.items():
            assert (status, headers["retry-after"]) == (503, "30"), (name, body)
            assert "did not answer in time; try again in 30 s" in body, (name, body)
        fixes = [e["fix"] for e in gw.events("directory_unavailable")]
        assert any("failed for another look-up while this one waited for it: no answer in time" in f for f in fixes)
    finally:
        proc.send_signal(signal.SIGCONT)
        gw.stop()


_KDC_HUNG_PROBE = """
import asyncio, json, os, signal, sys, time
from pathlib import Path
from proxy import config
from proxy.directory import Directory
from proxy.errors import DirectoryUnavailable

async def main():
    cfg = config.load(Path(sys.argv[1]))
    kdc_relay = int(sys.argv[2])
    d = Directory(cfg.directory, cfg.kerberos)
    os.kill(kdc_relay, signal.SIGSTOP)
    try:
        refused = 0
        for n in range(8):  # one after the other: each needs a new connection, so a ticket from the hung KDC
            try:
                await d.account(f"user{n}@ad.test")
            except DirectoryUnavailable:
                refused += 1
        start = time.perf_counter()
        await asyncio.wait_for(asyncio.to_thread(lambda: None), 300)  # what CRL refreshes and Basic hashing use
        waited = time.perf_counter() - start
    finally:
        os.kill(kdc_relay, signal.SIGCONT)
    print(json.dumps({"refused": refused, "waited": waited}))

asyncio.run(main())
"""


def test_a_hung_kdc_under_the_directory_bind_does_not_take_the_shared_threads(
    realm: ad.AdRealm, tmp_path: Path
) -> None:
    """bind = "kerberos" while the KDC accepts and never answers (a relay to port 88, frozen): each look-up is 503
    within its timeout, and the threads the rest of the gateway shares (asyncio's default executor: CRL vetting,
    Basic's hashing) stay free; before, each attempt's ticket request held one of them for MIT's own KDC timeout
    (about 25 s), and eight look-ups left a thread hop waiting for seconds."""
    with _relay_to(realm, tmp_path / "kdc-relay.log", 88) as (kdc, port):
        krb5_conf = tmp_path / "krb5.conf"
        krb5_conf.write_text(
            realm.krb5_conf.read_text().replace(f"kdc = {realm.dc_address}:88", f"kdc = {realm.dc_address}:{port}")
        )
        assert f":{port}" in krb5_conf.read_text()
        table = ad_mapping.directory_table(realm, cache_seconds=0) + "timeout = 1\n"
        text = ad_mapping.gateway_config(realm, "strong", directory_text=table)
        cfg = tmp_path / "gateway.toml"
        cfg.write_text(text.replace(f'krb5_config = "{realm.krb5_conf}"', f'krb5_config = "{krb5_conf}"'))
        assert str(krb5_conf) in cfg.read_text()
        argv = [sys.executable, "-c", textwrap.dedent(_KDC_HUNG_PROBE), str(cfg), str(kdc.pid)]
        done = realm.run(argv, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["refused"] == 8, result
    assert result["waited"] < 1.0, result  # a free thread at once, not one MIT's KDC timeout frees


def test_a_hung_directory_leaves_a_ticket_not_forwardable_a_refusal(
    realm: ad.AdRealm, relay: tuple[subprocess.Popen[bytes], str], ad_backend: AdProcess, tmp_path: Path
) -> None:
    """erin (marked sensitive: her evidence ticket is not forwardable) behind mapping = "upn" with a [directory]
    (cache_seconds = 0, timeout = 2) that names her one cause: while the only directory server hangs, her retries
    are still the 403 at `kerberos` (both causes named, as the KDC left it), never a 500 nor served, each within
    the directory's two timeouts; the next one, once it answers, names NOT_DELEGATED again."""
    proc, relay_url = relay
    timeout = 2
    text = ad_mapping.directory_table(realm, urls=(relay_url,), cache_seconds=0) + f"timeout = {timeout}\n"
    gw = start_gateway(realm, tmp_path / "gw", ad_backend, "upn", directory_text=text)
    try:
        status, body, headers = curl(realm, gw, "erin")
        assert (status, headers["x-kcd-refused-stage"]) == (403, "kerberos"), body
        assert "(NOT_DELEGATED" in gw.wait_event("kerberos_refused", upn="erin@ad.test")["fix"]
        proc.send_signal(signal.SIGSTOP)
        for _ in range(2):  # the kept connection hangs; then so does a new one
            gw.mark()
            status, body, headers = curl(realm, gw, "erin")
            assert (status, headers["x-kcd-refused-stage"]) == (403, "kerberos"), body
            fix = gw.wait_event("kerberos_refused", upn="erin@ad.test")["fix"]
            assert "(NOT_DELEGATED" not in fix, fix
            assert summary(gw, "erin@ad.test")["ms"]["kerberos"] < 2 * 2 * timeout * 1000 + 2000
        proc.send_signal(signal.SIGCONT)
        gw.mark()
        status, body, headers = curl(realm, gw, "erin")
        assert (status, headers["x-kcd-refused-stage"]) == (403, "kerberos"), body
        assert "(NOT_DELEGATED" in gw.wait_event("kerberos_refused", upn="erin@ad.test")["fix"]
    finally:
        proc.send_signal(signal.SIGCONT)
        gw.stop()
