"""The supervisor's end (`proxy.workers.supervise`): a Ctrl-C again while it ends. Real forks and signals, with a
stand-in `serve_one` for the gateway, in a process of its own."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.integration.conftest import free_port

# The supervisor under test. Its log stand-in sends it a SIGINT as it logs `supervisor_stopped` (its workers reaped,
# its directory removed): where a third Ctrl-C, or a process manager's repeated signal, lands while it ends. Each
# worker writes that it serves, then waits for the end (SIGTERM, default handling).
_DRIVER = """
import os, signal, sys
from pathlib import Path
from proxy import workers
from proxy.config import Listener

out = Path(sys.argv[1])


class SigintAsItEnds:
    def __getattr__(self, level):
        def emit(event, **fields):
            if event == "supervisor_stopped":
                os.kill(os.getpid(), signal.SIGINT)
        return emit


workers.log = SigintAsItEnds()


def serve_one(worker):
    (out / str(worker.number)).write_text(str(os.getpid()))
    while True:
        signal.pause()


listener = Listener(host="127.0.0.1", port=int(sys.argv[2]), certificate=out, private_key=out, workers=2)
sys.exit(workers.supervise(listener, serve_one))
"""


def test_a_signal_again_while_the_supervisor_ends_does_not_kill_it(tmp_path: Path) -> None:
    """SIGTERM to the supervisor, then SIGINT while it ends (its workers reaped): it exits 0, not killed by the
    signal. With its handlers given back before its last steps, a Ctrl-C again there raised KeyboardInterrupt: exit -2
    (seen in test_workers' Ctrl-C test under load), its directory's removal cut short if it came a moment earlier."""
    proc = subprocess.Popen([sys.executable, "-c", _DRIVER, str(tmp_path), str(free_port())], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not all((tmp_path / n).exists() for n in ("1", "2")):
            assert proc.poll() is None, f"the supervisor ended ({proc.returncode})"
            assert time.monotonic() < deadline, "the workers did not start within 60 s"
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err.decode()[-2000:]
