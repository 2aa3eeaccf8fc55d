"""A SIGHUP storm (review42): a config-management run that sends SIGHUP once per file it changed, `systemctl reload`
repeated by a script, logrotate and an operator together. Each SIGHUP asks that the configuration as it is now be
served; a reload that has not begun yet reads the file when it begins, so it answers every SIGHUP that came before
it. Against the lab's real gateway configuration (keytab, KDC, CRLs), in this process: `Live.reload_soon` is what
the gateway's SIGHUP handler calls, once per signal the loop sees.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from structlog.testing import capture_logs

from proxy import config as config_module
from proxy.lab.layout import LabLayout
from proxy.live import Live
from tests.integration.conftest import free_port, lab_config


async def _settled(live: Live) -> None:
    """Until no reload is under way or waiting to begin."""
    while live._reloads:
        await asyncio.gather(*live._reloads, return_exceptions=True)


def test_sighups_that_come_before_a_reload_begins_are_answered_by_that_reload(lab: LabLayout, tmp_path: Path) -> None:
    """Five SIGHUPs in a row, then, once that reload is under way, three more: two reloads, the second begun after
    the last SIGHUP (it reads the file as it is then), the other six logged `reload_coalesced`. Before, each SIGHUP was
    a reload of its own, one after the other: 20 SIGHUPs in one second to a gateway holding a 200,000-entry CRL took
    206 s and 42.6 s of CPU to work through (each reload reads and vets every CRL again), for what one reload gave."""
    path = tmp_path / "gateway.toml"
    path.write_text(lab_config(lab, port=free_port()))

    async def scene() -> tuple[int, int]:
        live = Live.start(config_module.load(path))
        try:
            await live.gateway.revocation.start()
            for _ in range(5):
                live.reload_soon()
            await asyncio.sleep(0)  # the first reload's task takes its first step: the lock, the file read, the build
            assert live._lock.locked()  # held until that reload ends
            for _ in range(3):
                live.reload_soon()
            await _settled(live)
            return live.generation, len(live._reloads)
        finally:
            await live.close()

    with capture_logs() as logs:
        generation, waiting = asyncio.run(scene())
    assert (generation, waiting) == (1 + 2, 0)
    events = [e["event"] for e in logs if e["event"].startswith("reload")]
    assert events == [*["reload_coalesced"] * 6, "reloaded", "reloaded"], events
