"""A SIGHUP reload that changes `[authentication]` on a gateway of one worker: a held user stays held."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

from proxy.lab.layout import USERS, LabLayout
from tests.integration.conftest import free_port, lab_config, start_gateway
from tests.integration.test_basic_workers import _guess_on_fresh_connections

PER_USER = 3
BASIC = """
[authentication]
mode = "basic"
basic_cache_seconds = 0
basic_failures_per_user = {limit}
basic_failures_per_address = 1000
basic_failure_window_seconds = 600
basic_realm = "{realm}"
"""


def test_a_reload_that_changes_authentication_keeps_a_held_user_held(lab: LabLayout, tmp_path: Path) -> None:
    """alice signs in, a guesser holds her (3 wrong passwords, 401 each, then 429), and a SIGHUP reload changes the
    challenge's realm and raises the limit to 4: the guesser's next passwords are still 429 (they never reach the
    KDC), and alice's own password still gets in. Before, the reload started the counts afresh: 401, the KDC asked
    again, a new allowance towards the directory's lockout."""
    port = free_port()
    text = lab_config(lab, port=port, extra=BASIC.format(limit=PER_USER, realm="Exchange"))
    gw = start_gateway(lab, tmp_path / "gw", text)
    try:
        assert asyncio.run(_guess_on_fresh_connections(lab, gw, "alice", 1, USERS["alice"])) == [200]
        guesses = asyncio.run(_guess_on_fresh_connections(lab, gw, "alice", PER_USER + 1))
        assert guesses == [401] * PER_USER + [429], guesses
        gw.mark()
        gw.config_path.write_text(lab_config(lab, port=port, extra=BASIC.format(limit=PER_USER + 1, realm="Mail")))
        gw.proc.send_signal(signal.SIGHUP)
        assert "authentication" in str(gw.wait_event("reloaded")["changed"])
        assert asyncio.run(_guess_on_fresh_connections(lab, gw, "alice", 2)) == [429, 429]
        assert asyncio.run(_guess_on_fresh_connections(lab, gw, "alice", 1, USERS["alice"])) == [200]
    finally:
        gw.stop()
