"""An ActiveSync Ping held past aiohttp's default five-minute total timeout, through the real gateway.

Slow by nature (310 s). It runs in `make test`, whose pytest-xdist workers (`--dist loadfile`) run the
rest of the suite beside it: its `slow` mark puts its file first (tests/conftest.py), so its worker is held
from the start of the run, not at the end with nothing else left to run.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import pytest

from proxy.lab.layout import LabLayout
from tests.integration.conftest import Gateway, client_context

HOLD_SECONDS = 310  # longer than aiohttp's default ClientTimeout(total=300)
PING = "/Microsoft-Server-ActiveSync?Cmd=Ping&User=alice&DeviceId=LAB0001&DeviceType=iPhone"


@pytest.mark.slow(seconds=HOLD_SECONDS)
@pytest.mark.timeout(HOLD_SECONDS + 120)
def test_ping_held_longer_than_300_seconds_is_answered(lab: LabLayout, gateway: Gateway) -> None:
    """A Ping the backend holds for 310 s comes back 200 for the right user, with the default route
    configuration: no total timeout cuts it, and the default read timeout (3600 s) outlasts it."""
    body = b"\x03\x01j\x00\x00\x0dE" * 4  # a stand-in for a WBXML Ping request

    async def ping() -> tuple[int, dict[str, Any], float]:
        started = time.monotonic()
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_read=HOLD_SECONDS + 60)) as session,
            session.post(
                gateway.url + PING,
                data=body,
                headers={"X-Lab-Hold-Seconds": str(HOLD_SECONDS), "Content-Type": "application/vnd.ms-sync.wbxml"},
                ssl=client_context(lab, "alice"),
            ) as r,
        ):
            return r.status, await r.json(), time.monotonic() - started

    mark = gateway.mark()
    status, echo, elapsed = asyncio.run(ping())
    assert status == 200
    assert elapsed >= HOLD_SECONDS
    assert echo["principal"] == "alice@LAB.TEST"
    assert echo["body_length"] == len(body)
    # the summary line is written once the answer has gone out: wait for it
    gateway.wait_for("request", lambda e: e.get("backend_ms", 0) >= HOLD_SECONDS * 1000, what="the held request")
    held = [e for e in gateway.events("request", after=mark) if e.get("backend_ms", 0) >= HOLD_SECONDS * 1000]
    assert [(e["path"], e["status"], e["principal"]) for e in held] == [
        ("/Microsoft-Server-ActiveSync", 200, "alice@LAB.TEST")
    ]
