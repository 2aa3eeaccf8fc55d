"""A request held at the backend when the directory stops admitting it, against the Samba AD DC.

An ActiveSync `Ping` is held for most of an hour. The mapping stage decided it once, before it was forwarded; these
tests change the account in Samba while the Ping is held (its strong `altSecurityIdentities` entry removed, or the
account disabled) and pin that the held Ping is ended with `403` within `[directory] cache_seconds` and a sweep,
not served on until the backend answers. The device is a small TLS client inside the realm's namespace that sends
the Ping with `Expect: 100-continue`: the gateway answers `100 Continue` only once every stage said yes and it
forwards, so that interim answer is the witness that the Ping is held at the backend. A 503 instead (the gateway's
first directory bind waits for its TGT, which Samba answers after any write transaction on sam.ldb: 10 s and more on
a loaded machine) is the answer a device gets and retries, and so does this one.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.lab import ad, ad_mapping
from tests.integration.ad_fixtures import AD_TIMEOUT, AdProcess
from tests.integration.jsonlog import WAIT
from tests.integration.test_ad_mapping import start_gateway

pytestmark = pytest.mark.timeout(AD_TIMEOUT)

HOLD = 40  # seconds the backend holds the Ping; the gateway must end it long before

_DEVICE = """
import json, socket, ssl, sys, time
port, root, authorization = int(sys.argv[1]), sys.argv[2], sys.argv[4]
hold, _, until = sys.argv[3].partition("/")  # "40", or "600/key": held until a request sends X-Lab-Release: key
context = ssl.create_default_context(cafile=root)
context.check_hostname = False
if len(sys.argv) > 5:
    context.load_cert_chain(sys.argv[5], sys.argv[6])
auth = f"Authorization: {authorization}\\r\\n" if authorization else ""
auth += f"X-Lab-Hold-Until: {until}\\r\\n" if until else ""
head = ("POST /Microsoft-Server-ActiveSync?Cmd=Ping HTTP/1.1\\r\\nHost: 127.0.0.1\\r\\n" + auth +
        f"X-Lab-Hold-Seconds: {hold}\\r\\nExpect: 100-continue\\r\\nContent-Length: 1\\r\\n\\r\\n")
unavailable, deadline = [], time.monotonic() + 120
while True:  # a 503 (the KDC or the directory slow: Retry-After) is retried on a new connection, as devices do
    tls = context.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=120), server_hostname="127.0.0.1")
    tls.sendall(head.encode())
    interim = b""
    while b"\\r\\n\\r\\n" not in interim:
        chunk = tls.recv(1)
        if not chunk:
            break
        interim += chunk
    first = interim.decode("latin-1").split("\\r\\n")[0]
    if not first.startswith("HTTP/1.1 503 ") or time.monotonic() > deadline:
        break
    unavailable.append(interim.decode("latin-1"))
    tls.close()
    time.sleep(1)  # the device's pace between two tries
print(json.dumps({"interim": first, "unavailable": unavailable}), flush=True)
tls.sendall(b"x")
held = time.monotonic()
answer = b""
while True:
    try:
        chunk = tls.recv(65536)
    except OSError:
        break
    if not chunk:
        break
    answer += chunk
    if b"\\r\\n\\r\\n" in answer:
        head_, _, body = answer.partition(b"\\r\\n\\r\\n")
        lines = head_.decode("latin-1").split("\\r\\n")
        length = [int(x.split(":", 1)[1]) for x in lines if x.lower().startswith("content-length:")]
        if length and len(body) >= length[0]:
            break
status = answer.split(b" ", 2)[1].decode() if answer.startswith(b"HTTP/1.1 ") else ""
print(json.dumps({"status": status, "answer": answer.decode(errors="replace")[-2000:],
                  "seconds": time.monotonic() - held}), flush=True)
"""


@pytest.fixture(scope="module")
def realm(ad_mapping_realm: ad.AdRealm) -> ad.AdRealm:
    """The AD realm with the mapping accounts and certificates (`ad_fixtures.ad_mapping_realm`)."""
    return ad_mapping_realm


@pytest.fixture
def account(realm: ad.AdRealm) -> Iterator[str]:
    """An account of this test's own (the realm is shared by the run's workers), deleted after."""
    name = f"hm{secrets.token_hex(4)}"
    realm.samba_tool("user", "create", name, f"Hm-{secrets.token_hex(8)}-Pa55")
    try:
        yield name
    finally:
        realm.samba_tool("user", "delete", name)


def _certificate(realm: ad.AdRealm, where: Path, upn: str) -> tuple[Path, Path]:
    """A certificate for `upn` without a SID, from the lab's issuing CA (openssl CLI), serial 0x4D0A01."""
    key, csr, cert, ext = (where / f"device.{suffix}" for suffix in ("key", "csr", "pem", "ext"))
    argv = ["openssl", "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    subprocess.run([*argv, "-keyout", str(key), "-out", str(csr), "-subj", "/CN=device"], check=True)
    ext.write_text(
        "basicConstraints = CA:FALSE\nkeyUsage = critical, digitalSignature\nextendedKeyUsage = clientAuth\n"
        f"subjectAltName = otherName:1.3.6.1.4.1.311.20.2.3;UTF8:{upn}\n"
    )
    argv = ["openssl", "x509", "-req", "-in", str(csr), "-CA", str(realm.pki.issuing_cert), "-CAkey"]
    argv += [str(realm.pki.issuing_key), "-days", "5", "-set_serial", "0x4D0A01", "-extfile", str(ext)]
    subprocess.run([*argv, "-out", str(cert)], check=True, capture_output=True)
    return cert, key


def _modify(realm: ad.AdRealm, name: str, change: str) -> None:
    dn = f"dn: CN={name},CN=Users,{realm.base_dn}\nchangetype: modify\n"
    realm.ldbmodify(dn + change)


@pytest.mark.parametrize("change", ["entry-removed", "account-disabled"])
def test_a_held_ping_is_ended_when_the_directory_stops_admitting_it(
    realm: ad.AdRealm, ad_backend: AdProcess, account: str, tmp_path: Path, change: str
) -> None:
    """A Ping held at the backend on a strong altSecurityIdentities mapping: the entry removed (or the account
    disabled) in Samba ends it with 403 and the reason within seconds (cache_seconds = 1), and
    `held_request_ended` says why; before, it was served on (200 after the backend's 40 s hold)."""
    upn = f"{account}@{ad.DNS_DOMAIN}"
    cert, key = _certificate(realm, tmp_path, upn)
    _modify(
        realm, account, "replace: altSecurityIdentities\naltSecurityIdentities: X509:<I>CN=Lab Issuing CA<SR>010a4d\n"
    )
    table = ad_mapping.directory_table(realm, cache_seconds=1)
    gw = start_gateway(realm, tmp_path / "gw", ad_backend, "strong", directory_text=table)
    device = None
    try:
        argv = [sys.executable, "-c", _DEVICE, str(gw.port), str(realm.pki.root_cert), str(HOLD)]
        argv += ["", str(cert), str(key)]  # no Authorization header: the certificate alone
        device = subprocess.Popen(realm.netns_argv(argv), stdout=subprocess.PIPE, text=True, env=None)
        assert device.stdout is not None
        interim = json.loads(device.stdout.readline() or "{}")
        assert interim.get("interim", "").startswith("HTTP/1.1 100"), interim  # held at the backend now
        if change == "entry-removed":
            _modify(realm, account, "delete: altSecurityIdentities\n")
        else:
            realm.samba_tool("user", "disable", account)
        changed = time.monotonic()
        answer = json.loads(device.stdout.readline() or "{}")
        ended_after = time.monotonic() - changed
        assert answer.get("status") == "403", answer
        assert ended_after < HOLD / 2, answer  # the sweep, not the backend's answer, ended it
        reason = "not strongly mapped" if change == "entry-removed" else "the account is disabled"
        assert reason in answer["answer"]
        ended = gw.wait_event("held_request_ended", upn=upn)
        assert reason in ended["reason"]
        assert ended["fix"]
        assert device.wait(timeout=WAIT) == 0
    finally:
        if device is not None and device.poll() is None:
            device.kill()
            device.wait()
        gw.stop()


def test_a_held_ping_is_ended_within_cache_seconds_of_the_change_whatever_the_cache_held(
    realm: ad.AdRealm, ad_backend: AdProcess, account: str, tmp_path: Path
) -> None:
    """The sweeps run every `cache_seconds` from the first request the gateway held; a Ping whose account was looked
    up between two sweeps (its device's first request) had its answer in the cache at the next sweep, which judged
    it on that answer, from before the change: its strong entry removed just after the Ping was held, it was ended
    by the sweep after, about 1.5 x cache_seconds after the change (16 s with 10). Each sweep now asks the directory
    afresh: the first sweep after the change ends it, within cache_seconds."""
    every = 10
    upn = f"{account}@{ad.DNS_DOMAIN}"
    cert, key = _certificate(realm, tmp_path, upn)
    _modify(
        realm, account, "replace: altSecurityIdentities\naltSecurityIdentities: X509:<I>CN=Lab Issuing CA<SR>010a4d\n"
    )
    table = ad_mapping.directory_table(realm, cache_seconds=every)
    gw = start_gateway(realm, tmp_path / "gw", ad_backend, "strong", directory_text=table)
    device = None
    try:
        # Another user's request starts the sweeps' clock (the first request held): sweeps at about +10, +20 s.
        cmd = ["curl", "-sS", "--max-time", "30", "--cacert", str(realm.pki.root_cert), "-o", "/dev/null"]
        cmd += ["--cert", str(ad_mapping.cert(realm, "alice-sid")), "--key", str(ad_mapping.key(realm, "alice-sid"))]
        statuses: list[str] = []  # a 503 (the first directory bind given up while the DC was slow): tried again
        deadline = time.monotonic() + WAIT
        while not statuses or (statuses[-1] == "503" and time.monotonic() < deadline):
            statuses.append(realm.run([*cmd, "-w", "%{http_code}", f"{gw.url}/owa/"], timeout=60).stdout)
        assert statuses[-1] == "200", statuses
        first = time.monotonic()
        # Place the Ping early in the sweeps' cycle (a placement in time, not a wait for a condition): its look-up,
        # kept for 10 s, is then still in the cache at the first sweep, which comes after the change.
        time.sleep(max(0.0, first + 2 - time.monotonic()))
        argv = [sys.executable, "-c", _DEVICE, str(gw.port), str(realm.pki.root_cert), str(HOLD)]
        argv += ["", str(cert), str(key)]  # no Authorization header: the certificate alone
        device = subprocess.Popen(realm.netns_argv(argv), stdout=subprocess.PIPE, text=True, env=None)
        assert device.stdout is not None
        interim = json.loads(device.stdout.readline() or "{}")
        assert interim.get("interim", "").startswith("HTTP/1.1 100"), interim  # held at the backend now
        _modify(realm, account, "delete: altSecurityIdentities\n")
        changed = time.monotonic()
        answer = json.loads(device.stdout.readline() or "{}")
        ended_after = time.monotonic() - changed
        assert answer.get("status") == "403", answer
        assert ended_after < every + 2, (ended_after, answer)  # the first sweep after the change, plus its search
        assert "not strongly mapped" in gw.wait_event("held_request_ended", upn=upn)["reason"]
        assert device.wait(timeout=WAIT) == 0
    finally:
        if device is not None and device.poll() is None:
            device.kill()
            device.wait()
        gw.stop()
