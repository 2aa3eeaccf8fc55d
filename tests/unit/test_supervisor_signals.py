"""The supervisor's signals (`proxy.workers.supervise`): a SIGHUP while it forks its workers, a stop signal again while
it ends. Real forks and signals, with a stand-in `serve_one` for the gateway, in a process of its own."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.integration.conftest import free_port

# The supervisor under test. Its log stand-in sends it a SIGHUP right after it forked its first worker (between two
# forks, where a `systemctl reload` just after a start can land); each worker writes whether it was asked to reload
# before it served (waiting up to 10 s for a SIGHUP passed on to it), then waits for the end.
_DRIVER = """
import os, signal, sys, time
from pathlib import Path
from proxy import workers
from proxy.config import Listener

out = Path(sys.argv[1])


class SighupAfterTheFirstFork:
    def __getattr__(self, level):
        def emit(event, **fields):
            if event == "worker_started" and fields.get("number") == 1:
                os.kill(os.getpid(), signal.SIGHUP)
        return emit


workers.log = SighupAfterTheFirstFork()


def serve_one(worker):
    deadline = time.monotonic() + 10
    while not (asked := workers.reload_asked_while_starting()) and time.monotonic() < deadline:
        time.sleep(0.02)
    (out / f"{worker.number}.tmp").write_text(str(asked))
    (out / f"{worker.number}.tmp").rename(out / str(worker.number))
    while True:
        signal.pause()


listener = Listener(host="127.0.0.1", port=int(sys.argv[2]), certificate=out, private_key=out, workers=2)
sys.exit(workers.supervise(listener, serve_one))
"""


def _await_workers(proc: subprocess.Popen[bytes], out: Path) -> None:
    """Until both workers of the driver `proc` runs have written their file in `out` (60 s at most)."""
    deadline = time.monotonic() + 60
    while not all((out / n).exists() for n in ("1", "2")):
        assert proc.poll() is None, f"the supervisor ended ({proc.returncode})"
        assert time.monotonic() < deadline, "the workers did not report"
        time.sleep(0.05)


def test_a_sighup_between_two_forks_reaches_the_workers_forked_after_it(tmp_path: Path) -> None:
    """A SIGHUP the supervisor gets after forking its first worker and before its second is a reload for both: the
    first gets it passed on, the second (forked once it was handled) used to get nothing and served the file as
    read before the edit beside a sibling that had reloaded it."""
    proc = subprocess.Popen([sys.executable, "-c", _DRIVER, str(tmp_path), str(free_port())])
    try:
        _await_workers(proc, tmp_path)
        asked = {n: (tmp_path / n).read_text() for n in ("1", "2")}
        assert asked == {"1": "True", "2": "True"}
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


# The supervisor under test. Its log stand-in sends it a SIGINT as it logs `supervisor_stopped` (its workers reaped,
# its directory removed): where a third Ctrl-C, or a process manager's repeated signal, lands while it ends. Each
# worker writes that it serves, then waits for the end (SIGTERM, default handling).
_STOP_DRIVER = """
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
    proc = subprocess.Popen(
        [sys.executable, "-c", _STOP_DRIVER, str(tmp_path), str(free_port())], stderr=subprocess.PIPE
    )
    try:
        _await_workers(proc, tmp_path)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err.decode()[-2000:]
