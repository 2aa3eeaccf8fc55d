"""An ActiveSync Ping held past aiohttp's default five-minute total timeout, through the real gateway, on a clock
ten times as fast.

The gateway is `kcd-proxy run` with the default route configuration, in a process of its own with libfaketime
preloaded (Debian `faketime`, as test_ad_clock_skew.py preloads it): its clocks, the monotonic one its event loop
times out by included, run ten times as fast, and the library shortens the event loop's waits (`epoll_wait`) to
match. The backend holds the Ping 31 s of real time, which is 310 s of the gateway's: more than aiohttp's default
`ClientTimeout(total=300)` and far less than the default read timeout (3600 s). What the gateway measured is read
from its own summary line (`backend_ms`), so the test fails if the clock was not sped up. Before, the test held the
session's gateway 310 s of real time, a worker of `make test` doing nothing for five minutes.

The wall clock runs fast too: the gateway's S4U exchanges with the lab's KDC, at the request's start, see it ahead by
nine times what the gateway's start took; the KDC allows 300 s (about 33 s of start, several times a loaded start).
"""

from __future__ import annotations

import asyncio
import json
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


@pytest.mark.slow(seconds=40)
@pytest.mark.timeout(300)
def test_ping_held_longer_than_300_seconds_is_answered(lab: LabLayout, tmp_path: Path) -> None:
    """A Ping the backend holds for 310 s of the gateway's clock comes back 200 for the right user, with the default
    route configuration: no total timeout cuts it, and the default read timeout (3600 s) outlasts it."""
    if not LIBFAKETIME.exists():
        pytest.fail(f"{LIBFAKETIME} is missing: make setup installs it (Debian faketime)")
    fast = {"LD_PRELOAD": str(LIBFAKETIME), "FAKETIME": f"+0 x{SPEED}"}
    gw = start_gateway(lab, tmp_path, lab_config(lab, port=free_port()), env=fast)
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
        assert status == 200, answer[:500]
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
