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
never touched: its controller lives, with the start time in its mark.

A dead run's dockerd is another matter: a later run (of any checkout) finds the engine answering and uses it
(tests/integration/test_compose.py), but stops only a dockerd it started itself, so a killed run's stayed for good,
with `ip_forward` on (dockerd turns it on; the run that started it would have put it back). It is stopped only while
no run holds the engine (`ENGINE_LOCK`, taken exclusively, as test_compose.py takes it to stop its own), and what it
changed is put back from what its starter wrote in its environment (`IP_FORWARD_BEFORE`, `DOCKER0_BEFORE`).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

MARK = "KCD_TEST_RUN"  # "<controller pid>:<its start time in clock ticks since boot>:<the checkout>"
GRACE = 10.0  # seconds between SIGTERM and SIGKILL
ENGINE = "dockerd"  # shared by the runs: stopped only while no run holds ENGINE_LOCK
ENGINE_GRACE = 60.0  # dockerd stops its containers first
# shared: a run using the engine; exclusive: stopping it (test_compose.py); the variable is for a test's own engine
ENGINE_LOCK = Path(os.environ.get("KCD_TEST_ENGINE_LOCK", "/run/lock/kcd-proxy-dockerd.lock"))
IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")
IP_FORWARD_BEFORE = "KCD_IP_FORWARD_BEFORE"  # in a started dockerd's environment: ip_forward before it started
DOCKER0_BEFORE = "KCD_DOCKER0_BEFORE"  # "yes" or "no": whether the docker0 bridge was there before it started


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
    """A process whose run has ended, and the variables of its environment this module reads."""

    pid: int
    command: str
    run: Run
    environ: dict[str, str]


def _marked() -> Iterator[Leftover]:
    """Each process carrying a run's mark."""
    names = (MARK, IP_FORWARD_BEFORE, DOCKER0_BEFORE)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            environ = (entry / "environ").read_bytes()
            command = (entry / "comm").read_text().strip()
            pairs = (variable.decode(errors="replace").partition("=") for variable in environ.split(b"\0"))
            found = {name: value for name, _, value in pairs if name in names}
            run = Run.parse(found.get(MARK, ""))
            if run is not None:
                yield Leftover(int(entry.name), command, run, found)


def leftovers() -> list[Leftover]:
    """Every process (but this one) whose run has ended."""
    return [left for left in _marked() if left.pid != os.getpid() and not left.run.alive()]


def stop_all(found: list[Leftover]) -> list[Leftover]:
    """Stop what killed runs left (`stop`), dockerd only while no run holds the engine, putting back what it changed;
    what was stopped."""
    others = [left for left in found if left.command != ENGINE]
    stop(others)
    engines = [left for left in found if left.command == ENGINE]
    if not engines:
        return others
    ENGINE_LOCK.parent.mkdir(parents=True, exist_ok=True)
    with ENGINE_LOCK.open("a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return others  # a run uses the engine: its dockerd stays
        stop(engines, ENGINE_GRACE)
        for engine in engines:
            if IP_FORWARD_BEFORE in engine.environ:
                IP_FORWARD.write_text(engine.environ[IP_FORWARD_BEFORE] + "\n")
            if engine.environ.get(DOCKER0_BEFORE) == "no":
                subprocess.run(["ip", "link", "delete", "docker0"], capture_output=True, check=False)
    return others + engines


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
