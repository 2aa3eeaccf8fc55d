"""review41's `tests/leftovers.py` attacked (review42): a developer's shell with `KCD_TEST_RUN` exported (a dead run's
mark copied to reproduce a test gateway's environment by hand, `eval` of a /proc/PID/environ) passes the mark to
every process started from it afterwards: an editor, a gateway run by hand, and `make test` itself. None of them was
started by a run of the suite; the cleanup at a run's start must stop none of them, and still stop what a dead run
left (a process whose creator is gone).

Each scene runs in a pid namespace of its own (`unshare --pid`), where the dead run's mark names the namespace's pid
1 with a start it does not have: a dead run to the scene, and to every other run on the machine a run in another
namespace, which they leave alone (so no other run stops the scene's processes meanwhile).
"""

from __future__ import annotations

import os
import subprocess
import sys

from tests import leftovers
from tests.integration.conftest import REPO
from tests.integration.test_leftovers_live_runs import _unshare

_DEAD_MARK = r"""
import dataclasses, sys
from pathlib import Path
from tests import leftovers
started = leftovers.start_time(1)
print(dataclasses.replace(leftovers.this_run(Path(sys.argv[1])), pid=1, started=started + 1).mark())
"""

_CONTROLLER = r"""
import sys
from tests import leftovers
print("found", *[left.pid for left in leftovers.leftovers() if left.run.checkout == sys.argv[1]])
"""

# The developer's shell: started without the mark (so its own /proc environ has none, as a login shell's), it exports
# a dead run's, then starts an editor-like sleeper and a `make test`-like wrapper whose child, the new run's
# controller, prints what it would stop.
_SHELL = r"""
export KCD_TEST_RUN="$("$PYTHON" -c "$DEAD_MARK" "$1")"
sleep 600 &
sibling=$!
echo "sibling $sibling"
bash -c 'echo "wrapper $$"; "$0" -c "$1" "$2"; true' "$PYTHON" "$CONTROLLER" "$1"
kill "$sibling"
"""

# A dead run's process in the session the run had (not a daemon's own), whose creator has ended: adopted by the
# namespace's init, as by the machine's or a subreaper elsewhere. The scene's controller must find it.
# (Whatever a scene leaves, the kernel ends with its namespace's pid 1.)
_ORPHAN = r"""
mark="$("$PYTHON" -c "$DEAD_MARK" "$1")"
orphan="$(KCD_TEST_RUN="$mark" bash -c 'sleep 600 >/dev/null 2>&1 & echo $!')"
echo "orphan $orphan"
"$PYTHON" -c "$CONTROLLER" "$1"
kill "$orphan"
"""


def _scene(script: str, checkout: str) -> dict[str, list[str]]:
    """`script` run by bash, a child of the pid 1 of a new pid namespace (its init, as the machine's is), without the
    mark; what it printed, by first word."""
    init = 'bash -c "$SCENE" scene "$0"; true'  # `; true`: bash does not exec the last command, it stays init
    done = subprocess.run(
        [_unshare(), "--pid", "--fork", "--mount-proc", "bash", "-c", init, checkout],
        env={
            "SCENE": script,
            **{k: v for k, v in os.environ.items() if k != leftovers.MARK},
            "PYTHON": sys.executable,
            "DEAD_MARK": _DEAD_MARK,
            "CONTROLLER": _CONTROLLER,
            "PYTHONPATH": str(REPO),
        },
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    said = {line.split(" ")[0]: line.split()[1:] for line in done.stdout.splitlines()}
    assert "found" in said, done.stdout + done.stderr
    return said


def test_processes_started_from_a_shell_that_exported_a_dead_runs_mark_are_not_stopped(tmp_path: str) -> None:
    """A shell exports a dead run's mark, starts a sleeper (an editor) and a wrapper (`make test`) whose child, the
    new run's controller, looks for leftovers: neither the wrapper (its own ancestor) nor the sleeper (the shell's
    child, in the shell's session) is one. Before, both were: the run's start sent SIGTERM to its own `make` and to
    the developer's editor, and SIGKILL 10 s later to what ignored it."""
    said = _scene(_SHELL, str(tmp_path))
    assert said.keys() == {"sibling", "wrapper", "found"}, said
    assert said["found"] == [], said


def test_a_dead_runs_orphan_in_its_runs_session_is_still_a_leftover(tmp_path: str) -> None:
    """What a dead run left is still found: a process with the dead run's mark whose creator has ended (adopted by the
    namespace's init), in the session the run had."""
    said = _scene(_ORPHAN, str(tmp_path))
    assert said["found"] == said["orphan"], said
