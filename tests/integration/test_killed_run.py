"""A run killed midway leaves its daemons running; the next run stops them as it starts (tests/leftovers.py).

The scene is a checkout of its own in `tmp_path` whose conftest is the suite's (tests/conftest.py's hooks), and a
test there that starts a daemon in a session of its own (as slapd, krb5kdc, samba and the gateways run) and stops it
at its fixture's teardown, which takes longer than execnet waits for a worker whose controller is gone (a lab's
teardown on a loaded machine). That run, under xdist as `make test` runs it, is killed with SIGTERM to pytest.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import leftovers
from tests.integration.conftest import REPO
from tests.integration.jsonlog import WAIT, eventually

pytestmark = pytest.mark.slow(seconds=40)  # two pytest runs, and a worker's 15 s at execnet's hands

_CONFTEST = "from tests.conftest import pytest_sessionstart, pytest_terminal_summary  # noqa: F401\n"

_TEST = '''
import os, subprocess, sys, time
from pathlib import Path

import pytest

DAEMON = "import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); open(sys.argv[1], 'w').close(); \\
time.sleep(600)"
DOCKERD = "from pathlib import Path; import sys, time; Path('/proc/self/comm').write_text('dockerd'); \\
open(sys.argv[1], 'w').close(); time.sleep(600)"


@pytest.fixture
def daemons():
    """A daemon that ignores SIGTERM, and one named dockerd, in sessions of their own; stopped slowly."""
    here = Path(__file__).parent
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(here / ready)], start_new_session=True)
        for code, ready in ((DAEMON, "daemon.ready"), (DOCKERD, "dockerd.ready"))
    ]
    (here / "pids").write_text(" ".join(str(p.pid) for p in procs))
    yield
    time.sleep(60)  # a teardown longer than execnet's 15 s: the worker is ended before it stops them
    for proc in procs:
        proc.kill()


def test_holds(daemons):
    time.sleep(600)


def test_quick():
    pass
'''


def _pytest(scene: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args, str(scene)]


def test_a_killed_runs_daemon_is_stopped_by_the_next_run_and_nothing_else(tmp_path: Path) -> None:
    """A run killed with SIGTERM leaves a daemon of its test running (its worker ended by execnet before the
    fixture's teardown stopped it); the next run in that checkout stops it as it starts, even though it ignores
    SIGTERM, and names it; a process of a run still going (this one) and a dockerd of the killed run are left."""
    scene = tmp_path / "checkout"
    scene.mkdir()
    (scene / "conftest.py").write_text(_CONFTEST)
    (scene / "test_scene.py").write_text(_TEST)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop(leftovers.MARK, None)  # the killed run marks its own
    ours = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
    killed = subprocess.Popen(
        _pytest(scene, "-n", "1", "-k", "holds"), cwd=scene, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    pids: list[int] = []
    try:
        eventually(lambda: (scene / "daemon.ready").exists() and (scene / "dockerd.ready").exists(), "the daemons")
        pids = [int(pid) for pid in (scene / "pids").read_text().split()]
        killed.send_signal(signal.SIGTERM)
        killed.wait(timeout=WAIT)
        workers = [pid for pid, _, run in leftovers._marked() if run.pid == killed.pid and pid not in pids]
        eventually(lambda: not any(leftovers.start_time(pid) for pid in workers), "the killed run's worker to end")
        assert all(leftovers.start_time(pid) for pid in pids), "the scene's daemons did not outlive their run"

        done = subprocess.run(
            _pytest(scene, "-n", "0", "-k", "quick"), cwd=scene, env=env, capture_output=True, text=True, timeout=WAIT
        )
        assert done.returncode == 0, done.stdout + done.stderr
        daemon, dockerd = pids
        deadline = time.monotonic() + WAIT
        while leftovers.start_time(daemon) is not None:
            assert time.monotonic() < deadline, "the killed run's daemon still runs"
            time.sleep(0.1)
        assert f"{daemon} " in done.stdout, done.stdout
        assert f"the run of pid {killed.pid} in {scene}" in done.stdout, done.stdout
        assert leftovers.start_time(dockerd) is not None, "a dockerd was stopped: another run may use the engine"
        assert leftovers.start_time(ours.pid) is not None, "a process of a run still going was stopped"
    finally:
        for proc in (killed, ours):
            proc.kill()
            proc.wait()
        for pid in pids:
            if leftovers.start_time(pid) is not None:
                os.kill(pid, signal.SIGKILL)
