"""An ActiveSync Ping held past aiohttp's default five-minute total timeout, through the real gateway, on a clock
ten times as fast.

The gateway is `kcd-proxy run` with the default route configuration, in a process of its own with libfaketime
preloaded (Debian `faketime`, as test_ad_clock_skew.py preloads it): its clocks, the monotonic one its event loop
times out by included, run ten times as fast, and the library shortens the event loop's waits (`epoll_wait`) to
match. The backend holds the Ping 31 s of real time, which is 310 s of the gateway's: more than aiohttp's default
`ClientTimeout(total=300)` and far less than the default read timeout (3600 s). What the gateway measured is read
from its own summary line (`backend_ms`), so the test fails if the clock was not sped up. Before, the test held the
session's gateway 310 s of real time, a worker of `make test` doing nothing for five minutes.

The wall clock runs fast too, and the KDC and the backend allow 300 s of skew: a gateway started at ten times its speed
asked for its tickets nine times its start time ahead (a start of 33 s on a loaded machine was a 403/502, not the
Ping). The gateway now starts at the real speed, reading its libfaketime setting from a file (FAKETIME_TIMESTAMP_FILE,
read at every clock call: FAKETIME_NO_CACHE); once it is up, the test writes ten times the speed into it, with an
offset taking back nine times the process's age (read from /proc): its clocks then run ten times as fast from the
switch on, the wall clock ahead only by nine times the moment between the switch and the request, however long the
start took. (FAKETIME_XRESET, which restarts the faster clock from the last clock read, made an idle gateway's clock
jump by nine times its idle time.)
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

import aiohttp
import pytest

from proxy.lab.layout import LabLayout
from tests.integration.conftest import client_context, free_port, lab_config, start_gateway

LIBFAKETIME = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")
SPEED = 10  # the gateway's clocks run this many times as fast as the test's
HOLD_SECONDS = 310  # of the gateway's clock: longer than aiohttp's default ClientTimeout(total=300)
REAL_HOLD = HOLD_SECONDS / SPEED  # what the backend holds the Ping, in real seconds
PING = "/Microsoft-Server-ActiveSync?Cmd=Ping&User=alice&DeviceId=LAB0001&DeviceType=iPhone"


def _age(pid: int) -> float:
    """How long ago (seconds) the process `pid` started: its start time in /proc/PID/stat (field 22, clock ticks since
    boot) against /proc/uptime."""
    started = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")
    return float(Path("/proc/uptime").read_text().split()[0]) - started


@pytest.mark.slow(seconds=40)
@pytest.mark.timeout(300)
def test_ping_held_longer_than_300_seconds_is_answered(lab: LabLayout, tmp_path: Path) -> None:
    """A Ping the backend holds for 310 s of the gateway's clock comes back 200 for the right user, with the default
    route configuration: no total timeout cuts it, and the default read timeout (3600 s) outlasts it."""
    if not LIBFAKETIME.exists():
        pytest.fail(f"{LIBFAKETIME} is missing: make setup installs it (Debian faketime)")
    setting = tmp_path / "faketime.rc"
    setting.write_text("+0 x1\n")
    clock = {
        "LD_PRELOAD": str(LIBFAKETIME),
        "FAKETIME_TIMESTAMP_FILE": str(setting),
        "FAKETIME_NO_CACHE": "1",  # read the file at every clock call: the switch below takes effect at once
    }
    gw = start_gateway(lab, tmp_path, lab_config(lab, port=free_port()), env=clock)
    # the gateway is up (however long that took): from now on its clocks run SPEED times as fast, from where they are
    # (libfaketime counts the speed from the process's start: the offset takes that back). Written whole and renamed,
    # so that the library never reads half a setting
    staged = tmp_path / "faketime.rc.new"
    staged.write_text(f"-{(SPEED - 1) * _age(gw.proc.pid):.2f}s x{SPEED}\n")
    staged.replace(setting)
    switched = time.monotonic()
    body = b"\x03\x01j\x00\x00\x0dE" * 4  # a stand-in for a WBXML Ping request

    async def ping() -> tuple[int, bytes, float]:
        started = time.monotonic()
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_read=REAL_HOLD + 60)) as session,
            session.post(
                gw.url + PING,
                data=body,
                headers={"X-Lab-Hold-Seconds": f"{REAL_HOLD:g}", "Content-Type": "application/vnd.ms-sync.wbxml"},
                ssl=client_context(lab, "alice"),
            ) as r,
        ):
            return r.status, await r.read(), time.monotonic() - started

    try:
        mark = gw.mark()
        status, answer, elapsed = asyncio.run(ping())
        ahead = (SPEED - 1) * (time.monotonic() - switched - elapsed)
        assert status == 200, f"the gateway's clock was about {ahead:.0f} s ahead (300 s allowed): {answer[:500]!r}"
        assert elapsed >= REAL_HOLD
        echo = json.loads(answer)
        assert echo["principal"] == "alice@LAB.TEST"
        assert echo["body_length"] == len(body)
        # the summary line is written once the answer has gone out: wait for it. Its backend_ms is the gateway's
        # clock: 310 s or more only if that clock ran fast, a test that proves nothing otherwise fails here
        gw.wait_for("request", lambda e: e.get("path") == "/Microsoft-Server-ActiveSync", what="the held request")
        held = [e for e in gw.events("request", after=mark) if e.get("backend_ms", 0) >= HOLD_SECONDS * 1000]
        assert [(e["path"], e["status"], e["principal"]) for e in held] == [
            ("/Microsoft-Server-ActiveSync", 200, "alice@LAB.TEST")
        ], gw.events("request", after=mark)
    finally:
        assert gw.stop() == 0, gw.log_path.read_text()[-2000:]
