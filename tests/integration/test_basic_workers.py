"""The Basic per-user throttle with `[listener] workers = 2`: the kernel spreads a guesser's connections over both
workers, and the wrong passwords that reach the KDC through the one gateway must stay within
`basic_failures_per_user` (the directory's lockout threshold is sized against it: docs/throttles-and-limits.md)."""

from __future__ import annotations

import asyncio
import base64
import math
import os
import signal
import time
from pathlib import Path

import aiohttp

from proxy.lab.kdclog import KdcLog
from proxy.lab.layout import USERS, LabLayout
from tests.integration.conftest import Gateway, client_context, free_port, lab_config, start_gateway
from tests.integration.jsonlog import WAIT, eventually
from tests.integration.test_kdc_hang_elsewhere import KDC_TIMEOUT
from tests.integration.test_kdc_silent import SecondKdc

PER_USER = 4
PER_ADDRESS = 6
GUESSES = 24  # each on a new connection: all of them landing on one worker is a chance of 2**-23


def _two_worker_basic_gateway(
    lab: LabLayout,
    directory: Path,
    *,
    cache_seconds: float = 60,
    per_user: int = PER_USER,
    per_address: int = 1000,
    kdc: SecondKdc | None = None,
) -> Gateway:
    """Two workers signing in with Basic; with `kdc`, that KDC alone in krb5.conf and kdc_timeout KDC_TIMEOUT."""
    port = free_port()
    extra = f"""
[authentication]
mode = "basic"
basic_cache_seconds = {cache_seconds}
basic_failures_per_user = {per_user}
basic_failures_per_address = {per_address}
basic_failure_window_seconds = 600
"""
    krb5_conf = None
    if kdc is not None:
        krb5_conf = directory.parent / "krb5.conf"
        krb5_conf.write_text(lab.krb5_conf.read_text().replace(f"127.0.0.1:{lab.kdc_port}", kdc.address))
        assert kdc.address in krb5_conf.read_text()
    text = lab_config(lab, port=port, extra=extra, krb5_conf=krb5_conf)
    if kdc is not None:
        text = text.replace("[kerberos]\n", f"[kerberos]\nkdc_timeout = {KDC_TIMEOUT}\n", 1)
    bind = f'bind = "127.0.0.1:{port}"\n'
    assert bind in text
    return start_gateway(lab, directory, text.replace(bind, f"{bind}workers = 2\n"))


async def _guess_on_fresh_connections(
    lab: LabLayout, gw: Gateway, user: str, n: int, password: str | None = None, *, spray: bool = False
) -> list[int]:
    """`n` wrong passwords for `user` (or `password` n times), one after the other, each on a connection of its own;
    `spray`: each for another user (`user` and the guess's number: names the directory does not know)."""
    statuses = []
    for i in range(n):
        name = f"{user}{i}" if spray else user
        login = base64.b64encode(f"{name}:{password or f'Wrong-{i}'}".encode()).decode()
        async with (
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session,
            session.get(
                gw.url + "/owa/", headers={"Authorization": f"Basic {login}"}, ssl=client_context(lab, None)
            ) as r,
        ):
            await r.read()
            statuses.append(r.status)
    return statuses


def test_a_guesser_spread_over_two_workers_reaches_the_kdc_at_most_the_per_user_limit(
    lab: LabLayout, tmp_path: Path
) -> None:
    """24 wrong passwords for carol, each on a new connection to a gateway of two workers, both of which answer: at
    most basic_failures_per_user (4) of them are checked by the KDC (401; the KDC logs an AS request for each), the
    rest are 429 without the KDC (before: 4 per worker, 8 reached the KDC, so the directory's lockout threshold
    counted twice the limit the administrator sized it against)."""
    gw = _two_worker_basic_gateway(lab, tmp_path / "gw")
    try:
        kdc = KdcLog(lab.kdc_log)
        gw.mark()
        statuses = asyncio.run(_guess_on_fresh_connections(lab, gw, "carol", GUESSES))
        answered = gw.wait_events("request", GUESSES)
        assert len({e["pid"] for e in answered}) == 2, "one worker answered every guess"
        assert set(statuses) == {401, 429}, statuses
        assert statuses.count(401) <= PER_USER, statuses
        checked = statuses.count(401)  # each a password the KDC checked (the lab does not require pre-auth:
        # the KDC logs one AS_REQ that it answered, and the client library finds the password wrong)

        def kdc_checks() -> list[str]:
            with lab.kdc_log.open(errors="replace") as f:
                f.seek(kdc.offset)
                return [line for line in f.read().splitlines() if "AS_REQ" in line and "carol@LAB.TEST" in line]

        eventually(lambda: len(kdc_checks()) >= checked or None, f"{checked} AS requests for carol in the KDC's log")
        kdc.settled()
        assert len(kdc_checks()) == checked, kdc_checks()
    finally:
        gw.stop()


def test_a_held_user_stays_held_when_a_worker_is_replaced_and_under_a_burst(lab: LabLayout, tmp_path: Path) -> None:
    """bob held after basic_failures_per_user wrong passwords (sent at once, 24 connections: at most 4 reach the KDC);
    one worker killed and replaced by the supervisor: the new worker answers bob's further guesses 429 too, without
    the KDC (a worker's own throttle would have started afresh and let 4 more through)."""
    gw = _two_worker_basic_gateway(lab, tmp_path / "gw")
    try:
        pids = sorted({e["pid"] for e in gw.wait_events("listening", 2)})

        async def burst() -> list[list[int]]:
            return list(await asyncio.gather(*(_guess_on_fresh_connections(lab, gw, "bob", 1) for _ in range(GUESSES))))

        first = [s for answers in asyncio.run(burst()) for s in answers]
        assert first.count(401) <= PER_USER, first
        assert set(first) <= {401, 429}, first
        kdc = KdcLog(lab.kdc_log)

        os.kill(pids[0], signal.SIGKILL)
        replacement = eventually(
            lambda: next((e["pid"] for e in gw.events("listening") if e["pid"] not in pids), None),
            "a replacement worker listening",
        )
        gw.mark()
        later: list[int] = []

        def replacement_answered() -> bool | None:
            later.extend(asyncio.run(_guess_on_fresh_connections(lab, gw, "bob", 4)))
            return any(e.get("pid") == replacement for e in gw.events("request", gw.since)) or None

        eventually(replacement_answered, "the replacement worker answering one of bob's guesses")
        assert set(later) == {429}, later
        kdc.settled()
        with lab.kdc_log.open(errors="replace") as f:
            f.seek(kdc.offset)
            assert not [line for line in f.read().splitlines() if "AS_REQ" in line and "bob@LAB.TEST" in line]
    finally:
        gw.stop()


def test_a_held_users_own_password_gets_in_on_any_worker_after_the_one_that_accepted_it_is_replaced(
    lab: LabLayout, tmp_path: Path
) -> None:
    """alice signs in once (one worker's KDC check accepts her password), a guesser holds her, and that worker is
    killed and replaced: her device's next connections, on the replacement or the other worker, are served (the
    password the KDC last accepted is kept in the workers' table); each worker kept its own and answered 429 until
    the window ended."""
    gw = _two_worker_basic_gateway(lab, tmp_path / "gw", cache_seconds=0)
    try:
        pids = sorted({e["pid"] for e in gw.wait_events("listening", 2)})
        gw.mark()
        assert asyncio.run(_guess_on_fresh_connections(lab, gw, "alice", 1, USERS["alice"])) == [200]
        accepted_by = gw.wait_event("request", status=200)["pid"]
        guesses = asyncio.run(_guess_on_fresh_connections(lab, gw, "alice", PER_USER + 2))
        assert guesses == [401] * PER_USER + [429, 429], guesses

        os.kill(accepted_by, signal.SIGKILL)
        replacement = eventually(
            lambda: next((e["pid"] for e in gw.events("listening") if e["pid"] not in pids), None),
            "a replacement worker listening",
        )
        serving = {replacement, *(pid for pid in pids if pid != accepted_by)}
        gw.mark()
        device: list[int] = []

        def both_answered() -> bool | None:
            device.extend(asyncio.run(_guess_on_fresh_connections(lab, gw, "alice", 2, USERS["alice"])))
            return {e.get("pid") for e in gw.events("request", gw.since)} >= serving or None

        eventually(both_answered, "both serving workers answering alice's device")
        assert set(device) == {200}, device
    finally:
        gw.stop()


def test_a_sprayer_spread_over_two_workers_meets_one_address_limit(lab: LabLayout, tmp_path: Path) -> None:
    """24 guesses from one address, each for another user (a spray, which the per-user limit never meets) and on a new
    connection to a gateway of two workers, both of which answer: the KDC checks basic_failures_per_address (6) of them,
    and past that only the releases of the address's back-off (1, 2, 4 ... s after the last failure: log2(elapsed + 1)
    more at most); the rest are 429 without the KDC. Before, each worker counted the address on its own: 6 per worker,
    12 and their releases reached the KDC."""
    gw = _two_worker_basic_gateway(lab, tmp_path / "gw", per_user=1000, per_address=PER_ADDRESS)
    try:
        gw.mark()
        started = time.monotonic()
        statuses = asyncio.run(_guess_on_fresh_connections(lab, gw, "spray", GUESSES, spray=True))
        elapsed = time.monotonic() - started
        answered = gw.wait_events("request", GUESSES)
        assert len({e["pid"] for e in answered}) == 2, "one worker answered every guess"
        assert set(statuses) == {401, 429}, statuses
        assert statuses[:PER_ADDRESS] == [401] * PER_ADDRESS, statuses
        assert statuses.count(401) <= PER_ADDRESS + math.floor(math.log2(elapsed + 1)), (statuses, elapsed)
    finally:
        gw.stop()


def test_a_sign_in_in_flight_in_a_worker_killed_holds_its_user_until_stale_after_not_for_good(
    lab: LabLayout, tmp_path: Path
) -> None:
    """carol's sign-in in flight (the KDC stopped: MIT holds the check about 25 s, past kdc_timeout) when its worker
    is killed (SIGKILL): with basic_failures_per_user = 1 her attempt in flight is all she may have, so her next
    sign-ins, on the other worker or the replacement, are 429 without the KDC; the dead attempt is never ended, and
    stops counting stale_after (1 x kdc_timeout + 30 s) after it was admitted: then, the KDC answering again, she is
    signed in (200). Not throttled for good. A connection the kernel queued on the killed worker's socket is reset
    (seen under load): it is asked again."""
    kdc = SecondKdc(lab, tmp_path)
    gw = None
    try:
        gw = _two_worker_basic_gateway(lab, tmp_path / "gw", per_user=1, kdc=kdc)
        gw.wait_events("listening", 2)
        kdc.stop_answering()
        admitted = time.monotonic()
        first = asyncio.run(_guess_on_fresh_connections(lab, gw, "carol", 1, USERS["carol"]))
        assert first == [503], first  # kdc_timeout passed; the check goes on inside MIT
        held_by = gw.wait_event("request")["pid"]
        os.kill(held_by, signal.SIGKILL)
        kdc.answer_again()
        stale_after = 1 * KDC_TIMEOUT + 30
        statuses: list[int] = []
        deadline = admitted + stale_after + WAIT
        resets = 0
        while time.monotonic() < deadline and 200 not in statuses:
            try:
                statuses += asyncio.run(_guess_on_fresh_connections(lab, gw, "carol", 1, USERS["carol"]))
            except aiohttp.ClientConnectionError:  # queued on the killed worker's socket: reset, asked again
                resets += 1
            time.sleep(1.0)
        assert resets < 10, (resets, statuses)
        assert statuses[0] == 429, statuses
        assert statuses[-1] == 200, statuses
        assert set(statuses) == {429, 200}, statuses
        assert time.monotonic() - admitted >= stale_after - 1, statuses
    finally:
        if gw is not None:
            gw.stop()
        kdc.close()
