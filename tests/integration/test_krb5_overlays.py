"""The krb5.conf overlay files of gateways killed outright (SIGKILL, the OOM killer) do not pile up in the temporary
directory: a gateway starting removes those whose process is gone, and never a live one's (proxy.kerberos.profile)."""

from __future__ import annotations

import os
import signal
import tempfile
from pathlib import Path

from proxy.lab.layout import LabLayout
from tests.integration.conftest import free_port, lab_config, start_gateway
from tests.integration.jsonlog import eventually


def _overlays(pid: int) -> list[Path]:
    """The overlay files (and half-written ones, `*.new`) named for process `pid`."""
    return sorted(Path(tempfile.gettempdir()).glob(f"kcd-proxy-krb5-{pid}-*.conf*"))


def test_a_killed_gateways_overlay_is_removed_by_the_next_start_and_a_live_ones_kept(
    lab: LabLayout, tmp_path: Path
) -> None:
    """A gateway killed with SIGKILL leaves its overlay (and a half-written copy); the next gateway to start removes
    both, and leaves the overlay of a gateway still running, and a file named for a live process that is no gateway
    (this test's). They stayed, one more per killed gateway, for ever."""
    killed = start_gateway(lab, tmp_path / "killed", lab_config(lab, port=free_port()))
    running = start_gateway(lab, tmp_path / "running", lab_config(lab, port=free_port()))
    mine = Path(tempfile.gettempdir()) / f"kcd-proxy-krb5-{os.getpid()}-test.conf"
    try:
        [left] = _overlays(killed.proc.pid)
        half_written = Path(f"{left}.x1y2z3.new")  # as `_write` names its staging copy
        half_written.write_text("[libdefaults]\n")
        killed.proc.send_signal(signal.SIGKILL)
        killed.proc.wait()
        assert _overlays(killed.proc.pid) == [left, half_written]
        [live] = _overlays(running.proc.pid)
        mine.write_text("[libdefaults]\n")
        third = start_gateway(lab, tmp_path / "third", lab_config(lab, port=free_port()))
        try:
            eventually(lambda: _overlays(third.proc.pid), "the third gateway's overlay")
            assert _overlays(killed.proc.pid) == []
            assert _overlays(running.proc.pid) == [live]
            assert mine.exists()
        finally:
            third.stop()
    finally:
        mine.unlink(missing_ok=True)
        running.stop()
        killed.stop()
        for path in _overlays(killed.proc.pid):  # on failure: nothing of this test left behind
            path.unlink()
