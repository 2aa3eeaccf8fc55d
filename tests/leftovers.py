"""What a killed run left running: found by the mark its processes inherit, stopped by the next run.

Why: a run killed midway (SIGTERM to pytest, a CI job cancelled) stops nothing it started. xdist's workers are told
(execnet sends each a SIGINT once its controller is gone, 5 s later) and tear their fixtures down, but execnet ends a
worker with `os._exit` 10 s after that: a lab's slapd, krb5kdc, CRL server and backends, the gateways of the test
that was running, a dockerd, samba in the AD realm's namespace all daemonise or run in sessions of their own, and
kept running, each on its ports, with nobody left to stop them (seen: a loaded `make test` killed at 4.5 minutes
left one worker's lab, its gateway and the dockerd it had started).

So the controller (or the only process) marks its run in the environment, which every worker, daemon and child
inherits (`MARK`: the controller's pid, its start time and the checkout), and at the start of a run stops every
process whose mark names a run that has ended: SIGCONT (a test may have frozen it), SIGTERM, then SIGKILL what is
left after `GRACE` seconds. A process of a run still going (another checkout's, this machine's other engineers') is
never touched: its controller lives, with the start time in its mark. dockerd is left alone: another run may be
using the engine since (tests/integration/test_compose.py uses an engine that answers).
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

MARK = "KCD_TEST_RUN"  # "<controller pid>:<its start time in clock ticks since boot>:<the checkout>"
GRACE = 10.0  # seconds between SIGTERM and SIGKILL
SPARED = frozenset({"dockerd"})  # shared with other runs: test_compose.py uses an engine that answers


@dataclass(frozen=True)
class Run:
    """A run of the suite: its controller process, told apart from a later process with the same pid by its start."""

    pid: int
    started: int
    checkout: str

    def mark(self) -> str:
        return f"{self.pid}:{self.started}:{self.checkout}"

    @classmethod
    def parse(cls, mark: str) -> Run | None:
        pid, _, rest = mark.partition(":")
        started, _, checkout = rest.partition(":")
        if not (pid.isdigit() and started.isdigit() and checkout):
            return None
        return cls(int(pid), int(started), checkout)

    def alive(self) -> bool:
        return start_time(self.pid) == self.started


def start_time(pid: int) -> int | None:
    """The process's start in clock ticks after boot (/proc/PID/stat, field 22), None once it is gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()  # the fields after the command's name, from the 3rd (the state) on
    return None if fields[0] in ("Z", "X") else int(fields[19])


def this_run(checkout: Path) -> Run:
    """The run of the calling process, which is its controller."""
    started = start_time(os.getpid())
    assert started is not None
    return Run(os.getpid(), started, str(checkout))


@dataclass(frozen=True)
class Leftover:
    """A process whose run has ended."""

    pid: int
    command: str
    run: Run


def _marked() -> Iterator[tuple[int, str, Run]]:
    """Each process carrying a run's mark: its pid, its command's name and the run."""
    prefix = f"{MARK}=".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            environ = (entry / "environ").read_bytes()
            command = (entry / "comm").read_text().strip()
            for variable in environ.split(b"\0"):
                if variable.startswith(prefix):
                    run = Run.parse(variable[len(prefix) :].decode(errors="replace"))
                    if run is not None:
                        yield int(entry.name), command, run
                    break


def leftovers() -> list[Leftover]:
    """Every process (but this one and dockerd) whose run has ended."""
    return [
        Leftover(pid, command, run)
        for pid, command, run in _marked()
        if pid != os.getpid() and command not in SPARED and not run.alive()
    ]


def _signal(pid: int, signum: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


def stop(found: list[Leftover], grace: float = GRACE) -> None:
    """SIGCONT and SIGTERM to each, then SIGKILL to those still there after `grace` seconds."""
    for left in found:
        _signal(left.pid, signal.SIGCONT)
        _signal(left.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    alive = {left.pid: start_time(left.pid) for left in found}
    while True:
        alive = {pid: started for pid, started in alive.items() if started is not None and start_time(pid) == started}
        if not alive or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    for pid in alive:
        _signal(pid, signal.SIGKILL)
