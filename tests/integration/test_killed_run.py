"""A run killed midway leaves its daemons running; the next run stops them as it starts (tests/leftovers.py).

The scene is a checkout of its own in `tmp_path` whose conftest is the suite's (tests/conftest.py's hooks), and a
test there that starts a daemon in a session of its own (as slapd, krb5kdc, samba and the gateways run) and one named
dockerd, and stops them at its fixture's teardown, which takes longer than execnet waits for a worker whose controller
is gone (a lab's teardown on a loaded machine). That run, under xdist as `make test` runs it, is killed with SIGTERM to
pytest. The scene's engine lock is its own (`KCD_TEST_ENGINE_LOCK`): this machine's runs of test_compose.py hold the
real one now and then. So is the variable its runs mark with (`leftovers.MARK_NAME`): another run starting on the
machine meanwhile (another engineer's, another checkout's) stopped the killed run's daemon before the scene's next run
could, and that run named nothing; now the scene's processes carry this run's mark, and only the scene's runs read the
scene's.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests import leftovers
from tests.integration.conftest import REPO
from tests.integration.jsonlog import WAIT, eventually

pytestmark = pytest.mark.slow(seconds=60)  # three pytest runs, and a worker's 15 s at execnet's hands

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


def _stopped(pid: int) -> bool:
    return leftovers.start_time(pid) is None


def test_a_killed_runs_daemon_is_stopped_by_the_next_run_and_nothing_else(tmp_path: Path) -> None:
    """A run killed with SIGTERM leaves a daemon of its test running (its worker ended by execnet before the
    fixture's teardown stopped it); another run on the machine starting meanwhile leaves it (a run of the scene's own,
    made inside this one); the next run in that checkout stops it as it starts, even though it ignores SIGTERM, and
    names it; a process of a run still going (this one) is left, and so is the killed run's dockerd while
    a run holds the engine; the run after, with the engine free, stops that one too."""
    scene = tmp_path / "checkout"
    scene.mkdir()
    (scene / "conftest.py").write_text(_CONFTEST)
    (scene / "test_scene.py").write_text(_TEST)
    engine_lock = tmp_path / "engine.lock"
    # The scene's runs mark under a variable of their own (and read only that one); what they start keeps this run's
    # mark under KCD_TEST_RUN, so the machine's other runs, starting meanwhile, leave it alone while this run goes.
    mark = f"KCD_TEST_RUN_SCENE_{secrets.token_hex(4)}"
    env = {**os.environ, "PYTHONPATH": str(REPO), "KCD_TEST_ENGINE_LOCK": str(engine_lock), leftovers.MARK_NAME: mark}
    ours = subprocess.Popen(  # a process of a run going (this one), marked as the scene's runs read marks
        [sys.executable, "-c", "import time; time.sleep(600)"],
        start_new_session=True,
        env={**os.environ, mark: os.environ[leftovers.MARK]},
    )
    killed = subprocess.Popen(
        _pytest(scene, "-n", "1", "-k", "holds"), cwd=scene, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    pids: list[int] = []
    try:
        eventually(lambda: (scene / "daemon.ready").exists() and (scene / "dockerd.ready").exists(), "the daemons")
        pids = [int(pid) for pid in (scene / "pids").read_text().split()]
        killed.send_signal(signal.SIGTERM)
        killed.wait(timeout=WAIT)
        workers = [left.pid for left in leftovers._marked(mark) if left.run.pid == killed.pid and left.pid not in pids]
        eventually(lambda: all(_stopped(pid) for pid in workers), "the killed run's worker to end")
        assert not any(_stopped(pid) for pid in pids), "the scene's daemons did not outlive their run"
        daemon, dockerd = pids

        # another run on this machine starting now (another checkout's, another engineer's) stops what dead runs left
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        (elsewhere / "conftest.py").write_text(_CONFTEST)
        (elsewhere / "test_scene.py").write_text(_TEST)
        other = {**os.environ, "PYTHONPATH": str(REPO)}
        done = subprocess.run(
            _pytest(elsewhere, "-n", "0", "-k", "quick"),
            cwd=elsewhere,
            env=other,
            capture_output=True,
            text=True,
            timeout=WAIT,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert not any(_stopped(pid) for pid in pids), "another run on the machine stopped the scene's daemons"

        with engine_lock.open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_SH)  # a run using the engine
            done = subprocess.run(
                _pytest(scene, "-n", "0", "-k", "quick"),
                cwd=scene,
                env=env,
                capture_output=True,
                text=True,
                timeout=WAIT,
            )
        assert done.returncode == 0, done.stdout + done.stderr
        eventually(lambda: _stopped(daemon), "the killed run's daemon to be gone (SIGKILLed)")
        assert f"{daemon} " in done.stdout, done.stdout
        assert f"the run of pid {killed.pid} in {scene}" in done.stdout, done.stdout
        assert not _stopped(dockerd), "a dockerd was stopped while a run held the engine"
        assert not _stopped(ours.pid), "a process of a run still going was stopped"

        done = subprocess.run(
            _pytest(scene, "-n", "0", "-k", "quick"), cwd=scene, env=env, capture_output=True, text=True, timeout=WAIT
        )
        assert done.returncode == 0, done.stdout + done.stderr
        eventually(lambda: _stopped(dockerd), "the killed run's dockerd to be gone with the engine free")
        assert f"{dockerd} dockerd" in done.stdout, done.stdout
        assert not _stopped(ours.pid), "a process of a run still going was stopped"
    finally:
        for proc in (killed, ours):
            proc.kill()
            proc.wait()
        for pid in pids:
            if not _stopped(pid):
                os.kill(pid, signal.SIGKILL)
