"""Basic's password checks against a KDC that accepts TCP and never answers: the rest of the gateway runs on.

The KDC is a second `krb5kdc` of the lab realm (`test_kdc_silent.SecondKdc`), the only one the gateway's krb5.conf
lists, frozen with SIGSTOP: MIT's library then waits about 25 s per request (`proxy.kerberos.kdcs`), long after
the gateway answered 503 at `kerberos.kdc_timeout`, and the thread it waits in is held all that time. Anyone can
send Basic logins, with any name and password, and each one that reaches the KDC holds a thread that long.
"""

from __future__ import annotations

import asyncio
import base64
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import NamedTuple

import aiohttp
import pytest
from cryptography import x509

from proxy.lab.layout import USERS, LabLayout
from proxy.lab.pki import Pki
from tests.integration.conftest import Gateway, client_context, curl, free_port, lab_config, start_gateway
from tests.integration.jsonlog import eventually
from tests.integration.test_kdc_silent import SecondKdc
from tests.integration.test_revocation import GRACE, REFRESH, connect, get, signed_crl

KDC_TIMEOUT = 2  # kerberos.kdc_timeout in these tests: far below MIT's own wait on a silent KDC (about 25 s)


@pytest.fixture
def second_kdc(lab: LabLayout, tmp_path: Path) -> Iterator[SecondKdc]:
    kdc = SecondKdc(lab, tmp_path)
    yield kdc
    kdc.close()


def _gateway(
    lab: LabLayout,
    directory: Path,
    kdc: SecondKdc,
    *,
    crl: Path,
    kerberos: str = "",
    failures_per_user: int = 100,
    kdc_timeout: int = KDC_TIMEOUT,
) -> Gateway:
    """certificate-or-basic, with only `kdc` in krb5.conf, kdc_timeout 2 s unless told, and the CRL file `crl`
    (refreshed every second) for the lab's issuing CA."""
    krb5_conf = directory / "krb5.conf"
    krb5_conf.write_text(lab.krb5_conf.read_text().replace(f"127.0.0.1:{lab.kdc_port}", kdc.address))
    assert kdc.address in krb5_conf.read_text()
    text = lab_config(lab, port=free_port(), krb5_conf=krb5_conf)
    text = text.replace("[kerberos]\n", f"[kerberos]\nkdc_timeout = {kdc_timeout}\n{kerberos}", 1)
    lab_crls = f'crls = ["{lab.pki_dir / "crls.pem"}"]\nrevocation = "require"\n'
    assert lab_crls in text
    root = Pki.at(lab.pki_dir).root_crl
    crls = f'crls = ["{crl}", "{root}"]\ncrl_refresh_seconds = {REFRESH}\nrevocation = "require"\n'
    text = text.replace(lab_crls, crls)
    text += (
        '\n[authentication]\nmode = "certificate-or-basic"\n'
        f"basic_failures_per_user = {failures_per_user}\nbasic_failures_per_address = 1000\n"
    )
    return start_gateway(lab, directory / "gateway", text)


def _publish_crl(lab: LabLayout, directory: Path, at: Path, serials: list[int]) -> None:
    """The lab issuing CA's CRL listing `serials`, written to `at` in one step (a refresh never reads half)."""
    now = datetime.now(UTC)
    pki = Pki.at(lab.pki_dir)
    directory.mkdir(parents=True, exist_ok=True)
    made = signed_crl(
        lab,
        directory,
        key_path=pki.issuing_key,
        this=now - timedelta(seconds=1),
        next_=now + timedelta(days=1),
        serials=serials,
    )
    made.replace(at)


def _basic(login: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(login.encode()).decode()}


class Answer(NamedTuple):
    status: int
    seconds: float
    body: str
    retry_after: str | None


async def _send(lab: LabLayout, gw: Gateway, logins: list[str]) -> list[Answer]:
    """One request per login, all at once, each on a connection of its own."""
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    timeout = aiohttp.ClientTimeout(total=120)
    ssl = client_context(lab, None)

    async def one(session: aiohttp.ClientSession, login: str) -> Answer:
        start = time.monotonic()
        async with session.get(gw.url + "/owa/", headers=_basic(login), ssl=ssl) as r:
            body = await r.text()
            return Answer(r.status, time.monotonic() - start, body, r.headers.get("Retry-After"))

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        return await asyncio.gather(*(one(session, login) for login in logins))


def _in_background(lab: LabLayout, gw: Gateway, logins: list[str]) -> Future[list[Answer]]:
    """`_send` in a thread of its own, so the test can act while the logins wait on the KDC."""
    runner = ThreadPoolExecutor(max_workers=1)
    try:
        return runner.submit(asyncio.run, _send(lab, gw, logins))
    finally:
        runner.shutdown(wait=False)


def test_basic_logins_hung_on_the_kdc_leave_crl_refreshes_and_signed_in_users_alone(
    lab: LabLayout, tmp_path: Path, second_kdc: SecondKdc
) -> None:
    """36 Basic logins of unknown names while the only KDC accepts and never answers (each 503): meanwhile a CRL
    published for alice's certificate still refuses it within crl_refresh_seconds + 5 s (the CRL file is read and
    vetted in a thread), and carol, signed in with her password before, is still served from the cache (one hash
    in a thread, her token built in another). Before, the password checks ran in asyncio's default executor
    (at most 32 threads, 6 on 2 cores), where MIT held each one for about 25 s after its login was answered."""
    crl = tmp_path / "issuing.crl"
    _publish_crl(lab, tmp_path / "first", crl, serials=[])
    gw = _gateway(lab, tmp_path, second_kdc, crl=crl)
    try:
        alice = connect(lab, gw, "alice", timeout=60)
        assert get(alice)[0] == 200  # her service ticket is cached: no KDC asked for her again
        carol = f"carol:{USERS['carol']}"
        assert [a.status for a in asyncio.run(_send(lab, gw, [carol]))] == [200]
        gw.mark()
        second_kdc.stop_answering()
        tag = uuid.uuid4().hex[:8]
        burst = _in_background(lab, gw, [f"hung-{tag}-{n}:guess" for n in range(36)])
        gw.wait_event("kdc_unavailable")  # the first of them answered 503: the KDC holds the rest
        revoked = x509.load_pem_x509_certificate(Pki.at(lab.pki_dir).user_cert("alice").read_bytes())
        _publish_crl(lab, tmp_path / "second", crl, serials=[revoked.serial_number])
        published = time.monotonic()
        while (answer := get(alice))[0] == 200:
            assert time.monotonic() - published < REFRESH + GRACE, "alice still served after the promised interval"
            time.sleep(0.1)
        assert (answer[0], "was revoked on" in answer[1]) == (403, True), answer
        [served] = asyncio.run(_send(lab, gw, [carol]))
        assert served.status == 200, served
        assert served.seconds < REFRESH + GRACE, served  # served from the cache, not after MIT's 25 s
        answers = burst.result(timeout=120)
        assert {a.status for a in answers} == {503}, answers
    finally:
        second_kdc.answer_again()  # MIT's waits end, and the gateway's threads with them
        gw.stop()


def test_a_login_that_finds_every_thread_held_by_the_silent_kdc_is_503_at_once(
    lab: LabLayout, tmp_path: Path, second_kdc: SecondKdc
) -> None:
    """kerberos.max_in_flight = 2 and the only KDC silent: two logins hold both threads for Basic's password checks
    (503 at kdc_timeout); the next login is 503 with Retry-After without waiting for one, the log naming the realm
    whose KDC does not answer; once the KDC answers again and MIT lets the threads go, bob signs in."""
    crl = tmp_path / "issuing.crl"
    _publish_crl(lab, tmp_path / "first", crl, serials=[])
    gw = _gateway(lab, tmp_path, second_kdc, crl=crl, kerberos="max_in_flight = 2\n")
    try:
        second_kdc.stop_answering()
        tag = uuid.uuid4().hex[:8]
        gw.mark()
        held = asyncio.run(_send(lab, gw, [f"held-{tag}-{n}:guess" for n in range(2)]))
        assert [a.status for a in held] == [503, 503], held
        timed_out = gw.wait_events("kdc_unavailable", 2)
        assert {e["fix"].split(" [")[-1] for e in timed_out} == {f"cannot contact any KDC within {KDC_TIMEOUT} s]"}
        gw.mark()
        [answer] = asyncio.run(_send(lab, gw, [f"next-{tag}:guess"]))
        assert (answer.status, answer.body.strip()) == (
            503,
            "the authentication service is unreachable; try again shortly",
        )
        assert answer.retry_after, answer
        refused = gw.wait_event("kdc_unavailable")
        assert refused["fix"].startswith("the KDC of LAB.TEST does not answer: all 2 threads"), refused
        assert "within" not in refused["fix"], refused  # not a wait of its own for the KDC
        second_kdc.answer_again()
        bob = f"bob:{USERS['bob']}"

        def signed_in() -> bool:
            return [a.status for a in asyncio.run(_send(lab, gw, [bob]))] == [200]

        eventually(signed_in, "bob signed in once MIT let the threads go")
    finally:
        second_kdc.answer_again()
        gw.stop()


def test_a_thread_held_by_a_login_whose_device_hung_up_is_not_said_to_be_past_kdc_timeout(
    lab: LabLayout, tmp_path: Path, second_kdc: SecondKdc
) -> None:
    """kerberos.max_in_flight = 1, kdc_timeout 30 s and the only KDC silent: a device hangs up on its Basic login
    after 1 s (499), its password check still inside MIT's wait; the next login's refusal (503 at once) names what
    ended that wait, its request's end, and that kdc_timeout did not. It said "left unanswered past
    kerberos.kdc_timeout (30 s)" of a check 1 s old: an operator would look at a timer that ended nothing."""
    crl = tmp_path / "issuing.crl"
    _publish_crl(lab, tmp_path / "first", crl, serials=[])
    gw = _gateway(lab, tmp_path, second_kdc, crl=crl, kerberos="max_in_flight = 1\n", kdc_timeout=30)
    try:
        second_kdc.stop_answering()
        tag = uuid.uuid4().hex[:8]
        gw.mark()
        curl(lab, gw.url + "/owa/", None, "-u", f"gone-{tag}:guess", "--max-time", "1")
        gw.wait_event("request", status=499)
        gw.mark()
        [answer] = asyncio.run(_send(lab, gw, [f"next-{tag}:guess"]))
        assert (answer.status, answer.seconds < 30) == (503, True), answer
        fix = gw.wait_event("kdc_unavailable")["fix"]
        assert "past kerberos.kdc_timeout" not in fix, fix
        assert fix.startswith("the KDC of LAB.TEST has not answered: all 1 threads for Basic's KDC calls"), fix
        assert "whose requests ended before it answered" in fix, fix
        assert "kerberos.kdc_timeout (30 s) did not end them" in fix, fix
    finally:
        second_kdc.answer_again()
        gw.stop()


def test_wrong_passwords_still_at_the_kdc_after_their_503_count_against_the_user(
    lab: LabLayout, tmp_path: Path, second_kdc: SecondKdc
) -> None:
    """basic_failures_per_user = 2 and the only KDC silent: two wrong passwords for bob are 503 at kdc_timeout, but
    MIT still holds them for the KDC, which checks them once it answers again; so the next two are 429 without
    reaching the KDC, and the KDC answers exactly two of bob's passwords (AD counts each towards bob's lockout).
    Before, an attempt stopped counting when its caller stopped waiting (a timeout, or the device hanging up), so
    anyone could send bob's account any number of wrong passwords past the throttle that exists to prevent it."""
    crl = tmp_path / "issuing.crl"
    _publish_crl(lab, tmp_path / "first", crl, serials=[])
    gw = _gateway(lab, tmp_path, second_kdc, crl=crl, kerberos="max_in_flight = 8\n", failures_per_user=2)
    kdc_log = tmp_path / lab.kdc_log.relative_to(lab.run_dir)
    try:
        second_kdc.stop_answering()
        tag = uuid.uuid4().hex[:8]
        answers = [asyncio.run(_send(lab, gw, [f"bob:wrong-{tag}-{n}"]))[0] for n in range(4)]
        assert [a.status for a in answers] == [503, 503, 429, 429], answers
        second_kdc.answer_again()

        def checked() -> list[str]:
            text = kdc_log.read_text(errors="replace") if kdc_log.exists() else ""
            # one answer per password: ISSUE for the lab's bob (no preauthentication: his client finds the password
            # wrong), PREAUTH_FAILED where the KDC checks it (AD)
            finals = ("ISSUE:", "PREAUTH_FAILED")
            return [
                line
                for line in text.splitlines()
                if "bob@LAB.TEST for krbtgt/" in line and any(final in line for final in finals)
            ]

        eventually(lambda: len(checked()) >= 2, "the KDC checked the two passwords MIT held for it")
        gw.mark()
        [after] = asyncio.run(_send(lab, gw, [f"bob:wrong-{tag}-after"]))
        assert after.status == 429, after  # both counted once MIT let them go: bob is held
        assert len(checked()) == 2, checked()
    finally:
        second_kdc.answer_again()
        gw.stop()
