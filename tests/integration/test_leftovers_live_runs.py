"""What the start of a run must never stop: a process of a run still going (tests/leftovers.py).

Three ways a live run's process looked like a dead run's: the engine's own children (containerd, docker-proxy, the
shims: dockerd starts them with its environment, so with its mark) were stopped as any leftover, without the engine
lock that spares dockerd; a leftover's pid taken, between the scan and the signal, by a new process (pid_max is
32768 here, and a loaded machine runs through pids fast); and a run in another pid or time namespace (a CI job in a
container beside a developer's run), whose controller's pid or start time read differently from here. The pid reuse
is made on purpose in a pid namespace of the test's own, where `ns_last_pid` names the next pid.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import leftovers
from tests.integration.conftest import REPO
from tests.integration.jsonlog import WAIT

# In a pid namespace of its own: a killed run's dockerd and the children it started with its environment, marked with
# the ending of a run that, read from the machine's namespace, is its pid 1 (alive): other runs on the machine leave
# them alone (they would stop them, and put back the ip_forward their environment names).
_ENGINE = r"""
import dataclasses, fcntl, json, os, subprocess, sys, time
from pathlib import Path
from typing import Any
from tests import leftovers

here = Path(sys.argv[1])
leftovers.ENGINE_LOCK = here / "engine.lock"
leftovers.IP_FORWARD = here / "ip_forward"  # not the machine's
run = dataclasses.replace(leftovers.this_run(here), pid=1, started=int(sys.argv[2]))
env = {**os.environ, leftovers.MARK: run.mark(), leftovers.IP_FORWARD_BEFORE: "0", leftovers.DOCKER0_BEFORE: "yes"}
names = ("dockerd", "containerd", "docker-proxy")
sleeper = "import sys, time; open('/proc/self/comm', 'w').write(sys.argv[1]); time.sleep(600)"
procs = [subprocess.Popen([sys.executable, "-c", sleeper, name], env=env) for name in names]
deadline = time.monotonic() + 60
while sorted(Path(f"/proc/{proc.pid}/comm").read_text().strip() for proc in procs) != sorted(names):
    assert time.monotonic() < deadline, "the engine's processes were not named"
    time.sleep(0.01)
found = leftovers.leftovers()
assert sorted(left.command for left in found) == sorted(names), found
with leftovers.ENGINE_LOCK.open("a") as lock:
    fcntl.flock(lock, fcntl.LOCK_SH)  # a run using the engine
    held = [left.command for left in leftovers.stop_all(found)]
    alive = [proc.poll() is None for proc in procs]
free = [left.command for left in leftovers.stop_all(leftovers.leftovers())]
for proc in procs:
    proc.wait(timeout=60)
print(json.dumps({"held": held, "alive": alive, "free": sorted(free), "ip_forward": leftovers.IP_FORWARD.read_text()}))
"""


def _unshare() -> str:
    found = shutil.which("unshare")
    assert found, "unshare is missing (util-linux)"
    return found


def _in_a_pid_namespace(script: str, tmp_path: Path) -> dict[str, Any]:
    """`script` run in a pid namespace of its own (so no other run on the machine sees its dead-marked processes),
    given `tmp_path` and this namespace's init start time: what it printed, as JSON."""
    done = subprocess.run(
        [_unshare(), "--pid", "--fork", "--mount-proc", sys.executable, "-c", script, str(tmp_path), _init_start()],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=WAIT * 2,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    seen: dict[str, Any] = json.loads(done.stdout)
    return seen


def test_a_dead_runs_engine_children_stay_while_a_run_holds_the_engine(tmp_path: Path) -> None:
    """A killed run's dockerd and the children it started with its environment (containerd, docker-proxy) are left
    while a run holds the engine lock, and all stopped once none does: another run's containers need all three."""
    seen = _in_a_pid_namespace(_ENGINE, tmp_path)
    assert seen["held"] == [], f"stopped while a run held the engine: {seen}"
    assert seen["alive"] == [True, True, True], f"stopped while a run held the engine: {seen}"
    assert seen["free"] == ["containerd", "docker-proxy", "dockerd"], seen
    assert seen["ip_forward"] == "0\n", seen


# The same for a process that runs of one checkout share (the AD realm's smbd, started by whichever run came first
# and used by every run that comes while it runs; samba ends with it): marked with a run that has ended here and
# naming the lock a run using it holds shared.
_SHARED = r"""
import dataclasses, fcntl, json, os, subprocess, sys, time
from pathlib import Path
from typing import Any
from tests import leftovers

here = Path(sys.argv[1])
users = here / "users.lock"
run = dataclasses.replace(leftovers.this_run(here), pid=1, started=int(sys.argv[2]))
env = {**os.environ, leftovers.MARK: run.mark(), leftovers.SHARED_LOCK: str(users)}
sleeper = "import sys, time; open('/proc/self/comm', 'w').write(sys.argv[1]); time.sleep(600)"
proc = subprocess.Popen([sys.executable, "-c", sleeper, "smbd"], env=env)
deadline = time.monotonic() + 60
while Path(f"/proc/{proc.pid}/comm").read_text().strip() != "smbd":
    assert time.monotonic() < deadline, "the shared process was not named"
    time.sleep(0.01)
found = leftovers.leftovers()
assert [left.command for left in found] == ["smbd"], found
with users.open("a") as lock:
    fcntl.flock(lock, fcntl.LOCK_SH)  # a run using the realm
    held = [left.command for left in leftovers.stop_all(found)]
    alive = proc.poll() is None
free = [left.command for left in leftovers.stop_all(leftovers.leftovers())]
proc.wait(timeout=60)
print(json.dumps({"held": held, "alive": alive, "free": free}))
"""


def test_a_dead_runs_shared_realm_stays_while_a_run_holds_its_lock(tmp_path: Path) -> None:
    """The AD realm's samba, started by a run that has ended since and used by a run still going (runs of one checkout
    share the realm), is left while a run holds the realm's lock, and stopped once none does."""
    seen = _in_a_pid_namespace(_SHARED, tmp_path)
    assert seen["held"] == [], f"stopped while a run held the realm: {seen}"
    assert seen["alive"] is True, f"stopped while a run held the realm: {seen}"
    assert seen["free"] == ["smbd"], seen


def _init_start() -> str:
    """The start time of this namespace's pid 1: a mark naming it names a run going, to every other run here."""
    started = leftovers.start_time(1)
    assert started is not None
    return str(started)


_REUSE = r"""
import dataclasses, os, signal, subprocess, sys, time
from pathlib import Path
from typing import Any
from tests import leftovers

# ended here (this namespace's pid 1 is this script), going to every other run on the machine (its pid 1)
dead = dataclasses.replace(leftovers.this_run(Path(sys.argv[1])), pid=1, started=int(sys.argv[2]))
sleeper = [sys.executable, "-c", "import time; time.sleep(600)"]
gone = subprocess.Popen(sleeper, env={**os.environ, leftovers.MARK: dead.mark()})
found = [left for left in leftovers.leftovers() if left.pid == gone.pid]
assert found, "the dead run's process was not found"
started = leftovers.start_time(gone.pid)
gone.kill()
gone.wait()
# a later clock tick than its start (the resolution of a start time); a real reuse comes after 32768 pids or more
while time.clock_gettime(time.CLOCK_BOOTTIME) * os.sysconf("SC_CLK_TCK") < started + 2:
    pass
Path("/proc/sys/kernel/ns_last_pid").write_text(str(gone.pid - 1))
# a process of nobody's run: SIGTERM and SIGCONT blocked, so that one sent shows as pending
newcomer = subprocess.Popen(
    [sys.executable, "-c", "import signal, sys, time; signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, "
     "signal.SIGCONT}); print('ready', flush=True); time.sleep(600)"],
    stdout=subprocess.PIPE,
)
assert newcomer.pid == gone.pid, (newcomer.pid, gone.pid)
assert newcomer.stdout.readline() == b"ready\n"
leftovers.stop(found, grace=0.5)
status = dict(line.split(":", 1) for line in Path(f"/proc/{newcomer.pid}/status").read_text().splitlines())
pending = int(status["ShdPnd"], 16) | int(status["SigPnd"], 16)
sent = [signum.name for signum in (signal.SIGTERM, signal.SIGCONT) if pending & (1 << (signum - 1))]
print("signalled:", sent, "ended:", newcomer.poll())
"""


def test_a_pid_taken_after_the_scan_is_not_signalled(tmp_path: Path) -> None:
    """A dead run's process that ends between the scan and the signal, its pid taken by a new process (made so in a
    pid namespace of the test's own), leaves the new process unsignalled."""
    done = subprocess.run(
        [_unshare(), "--pid", "--fork", "--mount-proc", sys.executable, "-c", _REUSE, str(tmp_path), _init_start()],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=WAIT,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip() == "signalled: [] ended: None", done.stdout + done.stderr


def _ours(checkout: Path) -> list[leftovers.Leftover]:
    """This test's leftovers: those of the machine's other (dead) runs are not for it to stop."""
    return [left for left in leftovers.leftovers() if left.run.checkout == str(checkout)]


@pytest.fixture
def spawned() -> Iterator[list[subprocess.Popen[bytes]]]:
    """The processes a test starts, each in a session of its own: the session killed at the test's end."""
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


_CONTROLLER = r"""
import os, subprocess, sys, time
from pathlib import Path
from typing import Any
from tests import leftovers

os.environ[leftovers.MARK] = leftovers.this_run(Path(sys.argv[1])).mark()
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
print(child.pid, flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize(
    "namespace", [["--pid", "--mount-proc"], ["--time", "--boottime", "100000"]], ids=["pid", "time"]
)
def test_a_live_run_in_another_namespace_is_not_a_leftover(
    tmp_path: Path, namespace: list[str], spawned: list[subprocess.Popen[bytes]]
) -> None:
    """A run going on in another pid or time namespace (a CI job in a container), whose controller's pid or start
    time reads differently from here, is not taken for a dead run."""
    controller = subprocess.Popen(
        [_unshare(), *namespace, "--fork", sys.executable, "-c", _CONTROLLER, str(tmp_path)],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    spawned.append(controller)
    assert controller.stdout is not None
    assert controller.stdout.readline().strip().isdigit(), "the controller in its namespace did not start its child"
    marked = [left for left in leftovers._marked() if left.run.checkout == str(tmp_path)]
    assert marked, "the live run's processes carry no mark"
    assert _ours(tmp_path) == [], "a live run in another namespace was taken for a dead one"
