"""The KDC calls besides Basic's during a KDC that accepts TCP and never answers: readiness probes, the Delegator's
exchanges, and a gateway stopped meanwhile.

The KDC is a second `krb5kdc` of the lab realm (`test_kdc_silent.SecondKdc`), the only one krb5.conf lists, frozen
with SIGSTOP: MIT's library then holds the calling thread about 25 s per call (`proxy.kerberos.kdcs`), long after
the gateway gave up at `kerberos.kdc_timeout`.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from proxy.lab.layout import USERS, LabLayout
from tests.integration.conftest import REPO, Gateway, curl, free_port, lab_config, metric, start_gateway
from tests.integration.jsonlog import eventually
from tests.integration.test_basic_kdc_threads import _basic
from tests.integration.test_kdc_silent import SecondKdc

KDC_TIMEOUT = 3  # kerberos.kdc_timeout here: far below MIT's own wait on a silent KDC (about 25 s)


@pytest.fixture
def second_kdc(lab: LabLayout, tmp_path: Path) -> Iterator[SecondKdc]:
    kdc = SecondKdc(lab, tmp_path)
    yield kdc
    kdc.close()


def _config_text(lab: LabLayout, directory: Path, kdc: SecondKdc, extra: str = "", kerberos: str = "") -> str:
    """The lab gateway's configuration with only `kdc` in krb5.conf and kdc_timeout KDC_TIMEOUT."""
    directory.mkdir(parents=True, exist_ok=True)
    krb5_conf = directory / "krb5.conf"
    krb5_conf.write_text(lab.krb5_conf.read_text().replace(f"127.0.0.1:{lab.kdc_port}", kdc.address))
    assert kdc.address in krb5_conf.read_text()
    text = lab_config(lab, port=free_port(), krb5_conf=krb5_conf, extra=extra)
    return text.replace("[kerberos]\n", f"[kerberos]\nkdc_timeout = {KDC_TIMEOUT}\n{kerberos}", 1)


def _status(lab: LabLayout, gw: Gateway, user: str) -> tuple[int, float]:
    """A request with `user`'s certificate: its status and how long its answer took."""
    start = time.monotonic()
    done = curl(lab, f"{gw.url}/EWS/Exchange.asmx", user)
    return int(done.stdout.rsplit("\n", 1)[-1]), time.monotonic() - start


# The probes run in a process of their own: MIT keeps a parsed krb5.conf per path for the process and looks at the
# file again at most once a second, so in this test process a profile an earlier test wrote to the same overlay
# path could still be MIT's (the lab's KDC, which answers) when the first probe runs.
READINESS_UNDER_A_HANG = """
import asyncio, contextlib, json, os, signal, sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from proxy.admin import READY_CACHE_SECONDS, Readiness
from proxy.config import load
from proxy.kerberos.delegate import Delegator

config, kdc_pid, timeout = Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
now = [0.0]

async def scenario() -> None:
    loop = asyncio.get_running_loop()
    loop.set_default_executor(ThreadPoolExecutor(max_workers=2))  # as few as a busy gateway may have free
    settings = load(config)
    gateway = SimpleNamespace(delegator=Delegator(settings.kerberos))  # whose AS exchanges the probes make
    readiness = Readiness(SimpleNamespace(config=settings, gateway=gateway), clock=lambda: now[0])
    seen = {"answering": await readiness.kdc_problem()}
    os.kill(kdc_pid, signal.SIGSTOP)
    now[0] += READY_CACHE_SECONDS + 1
    seen["first"] = await readiness.kdc_problem()
    later = []
    for _ in range(3):
        now[0] += READY_CACHE_SECONDS + 1
        start = loop.time()
        later.append((await readiness.kdc_problem(), loop.time() - start))
    seen["later"] = later
    started = loop.time()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.to_thread(lambda: "vetted"), timeout * 3)
    seen["shared_executor_wait"] = loop.time() - started
    print(json.dumps(seen), flush=True)

asyncio.run(scenario())
"""


def test_readiness_probes_during_a_kdc_hang_hold_one_thread_of_their_own(
    lab: LabLayout, tmp_path: Path, second_kdc: SecondKdc
) -> None:
    """/readyz's KDC probe (an AS exchange, `Readiness`) asked again each time its answer is older than
    READY_CACHE_SECONDS, while the KDC is frozen: the first probe is "no answer" at kdc_timeout; the next ones,
    finding it still inside MIT's wait, say the KDC does not answer at once instead of starting another; and
    asyncio's shared executor (2 threads here, as few as a busy gateway may have free), which CRL reads and
    vetting use, still runs work at once. Before, each probe held a thread of the shared executor for MIT's
    wait (about 25 s): the third probe found both held, and so did the CRL work after it."""
    config_path = tmp_path / "gateway.toml"
    config_path.write_text(_config_text(lab, tmp_path, second_kdc))
    argv = [sys.executable, "-c", READINESS_UNDER_A_HANG, str(config_path), str(second_kdc.proc.pid), str(KDC_TIMEOUT)]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, timeout=120, check=False)
    finally:
        second_kdc.answer_again()  # MIT's wait ends, and the probe's thread with it
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["answering"] is None, seen  # the KDC answers
    assert seen["first"] == f"no answer from the KDC within {KDC_TIMEOUT:g} s", seen
    assert seen["shared_executor_wait"] < KDC_TIMEOUT, f"the shared executor waited for MIT: {seen}"
    for problem, seconds in seen["later"]:
        assert problem is not None, seen
        assert "does not answer" in problem, seen
        assert seconds < KDC_TIMEOUT / 2, f"a probe waited for the KDC again: {seen}"


def test_new_users_while_every_kdc_thread_is_held_by_an_unanswered_exchange_are_503_at_once(
    lab: LabLayout, tmp_path: Path, second_kdc: SecondKdc
) -> None:
    """kerberos.max_in_flight = 1 and the only KDC frozen: alice's exchange takes the one thread and is 503 at
    kdc_timeout, its thread still inside MIT's wait; bob and carol (none cached) are then refused at once (503, the
    log naming the thread held by a call the KDC left unanswered), not each left waiting kdc_timeout for a thread
    MIT holds: before, the Delegator's executor queued every exchange past its threads."""
    text = _config_text(lab, tmp_path, second_kdc, kerberos="max_in_flight = 1\n")
    gw = start_gateway(lab, tmp_path / "gateway", text)
    try:
        second_kdc.stop_answering()
        gw.mark()
        assert _status(lab, gw, "alice")[0] == 503
        assert "within" in gw.wait_event("kdc_unavailable")["fix"]  # her own wait: kdc_timeout
        gw.mark()
        with ThreadPoolExecutor(max_workers=2) as senders:
            answers = list(senders.map(lambda user: _status(lab, gw, user), ["bob", "carol"]))
        assert [status for status, _ in answers] == [503, 503], answers
        for refused in gw.wait_events("kdc_unavailable", 2):
            assert "within" not in refused["fix"], refused  # no wait of their own
            assert "does not answer: all 1 threads for the gateway's KDC exchanges" in refused["fix"], refused
        assert max(seconds for _, seconds in answers) < KDC_TIMEOUT, answers
    finally:
        second_kdc.answer_again()
        gw.stop()


def test_exchanges_refused_for_want_of_a_thread_are_refusals_not_kdc_requests(
    lab: LabLayout, tmp_path: Path, second_kdc: SecondKdc
) -> None:
    """kerberos.max_in_flight = 1 and the only KDC frozen: alice's exchange went to the KDC (503 at kdc_timeout), bob's
    was refused before any KDC was asked (no thread). The metrics count two kerberos refusals but one KDC request:
    `kcd_kdc_requests` ("Kerberos stages that went to the KDC") counted bob's refusal as one, so a gateway refusing
    at once looked like one asking a silent KDC for every new user."""
    admin = free_port()
    extra = f'\n[admin]\nbind = "127.0.0.1:{admin}"\n'
    text = _config_text(lab, tmp_path, second_kdc, extra=extra, kerberos="max_in_flight = 1\n")
    gw = start_gateway(lab, tmp_path / "gateway", text)
    url = f"http://127.0.0.1:{admin}"
    asked = 'kcd_kdc_requests_total{outcome="kdc_unavailable"}'
    refused = 'kcd_refusals_total{reason="kdc_unavailable",stage="kerberos"}'
    try:
        second_kdc.stop_answering()
        gw.mark()
        assert _status(lab, gw, "alice")[0] == 503
        assert "within" in gw.wait_event("kdc_unavailable")["fix"]  # her own wait: the KDC was asked
        gw.mark()
        assert _status(lab, gw, "bob")[0] == 503
        assert "threads" in gw.wait_event("kdc_unavailable")["fix"]  # refused before the KDC
        gw.wait_events("request", 1)  # counted in the metrics as its summary line is written
        eventually(lambda: metric(url, refused) == 2, "two kerberos refusals in the metrics")
        assert metric(url, asked) == 1
    finally:
        second_kdc.answer_again()
        gw.stop()


def test_a_gateway_stopped_during_a_kdc_hang_exits_at_once(
    lab: LabLayout, tmp_path: Path, second_kdc: SecondKdc
) -> None:
    """The only KDC frozen, and a thread inside MIT's wait for each kind of KDC call: a certificate user's exchange,
    a Basic login's password check, a /readyz probe (each answered 503 at kdc_timeout). SIGTERM: the gateway exits
    0 well before MIT gives up (the calls' callers are gone; nothing waits for their answers). Before, Python's
    exit joined the executors' threads, and the stop took until MIT's wait ended (about 25 s after the calls)."""
    admin = free_port()
    extra = f'\n[admin]\nbind = "127.0.0.1:{admin}"\n\n[authentication]\nmode = "certificate-or-basic"\n'
    gw = start_gateway(lab, tmp_path / "gateway", _config_text(lab, tmp_path, second_kdc, extra=extra))
    try:
        second_kdc.stop_answering()
        gw.mark()
        assert _status(lab, gw, "alice")[0] == 503
        basic = ["curl", "-sS", "-k", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "30"]
        header = _basic(f"carol:{USERS['carol']}-not")["Authorization"]
        done = curl_raw([*basic, "-H", f"Authorization: {header}", f"{gw.url}/EWS/Exchange.asmx"])
        assert done == "503", done
        with pytest.raises(urllib.error.HTTPError) as not_ready:
            urllib.request.urlopen(f"http://127.0.0.1:{admin}/readyz", timeout=30)
        assert not_ready.value.code == 503
        assert len(gw.wait_events("kdc_unavailable", 2)) == 2  # alice's exchange, carol's password check
        start = time.monotonic()
        assert gw.stop() == 0
        assert time.monotonic() - start < 10, "the stop waited for MIT"
    finally:
        second_kdc.answer_again()
        gw.stop()


def curl_raw(command: list[str]) -> str:
    """curl's output (here the status it was given)."""
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False).stdout
