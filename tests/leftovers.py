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

The mark is in the environment, and so anyone's to pass on: a developer's shell that exported it (a dead run's mark
copied to run a test's gateway by hand, `eval` of a /proc/PID/environ) gives it to every process started from it
afterwards, `make test` included, none of them a run's. So a marked process is never stopped when it is an ancestor of
this run (the `make` or script that started it), nor when its parent lives, is no process of the same run (carries
another mark or none) and shares its session: that parent started it (a shell and its jobs share the terminal's
session). What a dead run left has its creator gone: adopted by init (this namespace's pid 1) or a subreaper, which
is in no session of the run's, or created by another of the run's processes, which carries its mark.

A dead run's dockerd is another matter: a later run (of any checkout) finds the engine answering and uses it
(tests/integration/test_compose.py), but stops only a dockerd it started itself, so a killed run's stayed for good,
with `ip_forward` on (dockerd turns it on; the run that started it would have put it back). It is stopped only while
no run holds the engine (`ENGINE_LOCK`, taken exclusively, as test_compose.py takes it to stop its own), and what it
changed is put back from what its starter wrote in its environment (`IP_FORWARD_BEFORE`, `DOCKER0_BEFORE`). The
same holds for the processes dockerd started (containerd, its shims, docker-proxy): they inherit its environment,
`IP_FORWARD_BEFORE` with it, and a run using the engine needs them as much.

The tests' AD realm is shared too, by the runs of one checkout (tests/integration/ad_fixtures.py): its samba carries the
mark of the run that started it, which may end while a later run still uses the realm. Its environment names the lock
each run using the realm holds shared (`SHARED_LOCK`), and it is stopped only while nobody holds that lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

# The variable a run marks its processes with: "<controller pid>:<its start in clock ticks after boot>:<pid ns>:<time
# ns>:<the checkout>". A run made inside a test (test_killed_run.py's scene) names one of its own in MARK_NAME: its
# processes keep the mark of the run that made it (going) under MARK, and no other run on the machine stops them.
MARK_NAME = "KCD_TEST_MARK_NAME"
MARK = os.environ.get(MARK_NAME) or "KCD_TEST_RUN"
GRACE = 10.0  # seconds between SIGTERM and SIGKILL
ENGINE = "dockerd"  # shared by the runs: stopped only while no run holds ENGINE_LOCK
ENGINE_GRACE = 60.0  # dockerd stops its containers first
# shared: a run using the engine; exclusive: stopping it (test_compose.py); the variable is for a test's own engine
ENGINE_LOCK = Path(os.environ.get("KCD_TEST_ENGINE_LOCK", "/run/lock/kcd-proxy-dockerd.lock"))
IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")
# in the environment of a process several runs use (the tests' AD realm's samba): the lock each holds shared meanwhile
SHARED_LOCK = "KCD_TEST_SHARED_LOCK"
IP_FORWARD_BEFORE = "KCD_IP_FORWARD_BEFORE"  # in a started dockerd's environment: ip_forward before it started
DOCKER0_BEFORE = "KCD_DOCKER0_BEFORE"  # "yes" or "no": whether the docker0 bridge was there before it started


@dataclass(frozen=True)
class Run:
    """A run of the suite: its controller process, told apart from a later process with the same pid by its start,
    and the pid and time namespaces that pid and start time were read in."""

    pid: int
    started: int
    pid_namespace: int
    time_namespace: int
    checkout: str

    def mark(self) -> str:
        return f"{self.pid}:{self.started}:{self.pid_namespace}:{self.time_namespace}:{self.checkout}"

    @classmethod
    def parse(cls, mark: str) -> Run | None:
        """The run a mark names; None for anything else (an older checkout's three-field mark included: left alone)."""
        fields = mark.split(":", 4)
        if len(fields) != 5 or not all(field.isdigit() for field in fields[:4]) or not fields[4]:
            return None
        pid, started, pid_namespace, time_namespace = (int(field) for field in fields[:4])
        return cls(pid, started, pid_namespace, time_namespace, fields[4])

    def judged_here(self) -> bool:
        """Whether this process can tell if the run is going: its controller's pid and start time read here as they
        did there. A run in another pid namespace (a CI job in a container) names a pid that here is another process
        or none; in another time namespace, its start time reads shifted by the namespace's boot-time offset."""
        return (self.pid_namespace, self.time_namespace) == (namespace("pid"), namespace("time"))

    def alive(self) -> bool:
        return start_time(self.pid) == self.started


def of_this_run() -> dict[str, str]:
    """This run's mark, for an environment made from scratch (not `os.environ` and more): a process started without
    it is never stopped by a later run, and a run killed while it runs leaves it running for good."""
    return {MARK: os.environ[MARK]} if MARK in os.environ else {}


def namespace(kind: str) -> int:
    """This process's namespace of that kind (its inode), 0 where the kernel has none (time: before Linux 5.6)."""
    try:
        return Path(f"/proc/self/ns/{kind}").stat().st_ino
    except OSError:
        return 0


def start_time(pid: int) -> int | None:
    """The process's start in clock ticks after boot (/proc/PID/stat, field 22, shifted by the reader's time
    namespace), None once it is gone or a zombie."""
    stat = _stat(pid)
    return None if stat is None else stat[0]


def _stat(pid: int) -> tuple[int, int, int] | None:
    """The process's start (`start_time`), its parent's pid and its session's id (/proc/PID/stat fields 22, 4 and
    6), None once it is gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()  # the fields after the command's name, from the 3rd (the state) on
    return None if fields[0] in ("Z", "X") else (int(fields[19]), int(fields[1]), int(fields[3]))


def _mark_of(pid: int) -> str | None:
    """The mark in the process's environment (as it was exec'd), "" for none, None when it cannot be read."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return None
    prefix = f"{MARK}=".encode()
    return next((v[len(prefix) :].decode(errors="replace") for v in environ.split(b"\0") if v.startswith(prefix)), "")


def this_run(checkout: Path) -> Run:
    """The run of the calling process, which is its controller."""
    started = start_time(os.getpid())
    assert started is not None
    return Run(os.getpid(), started, namespace("pid"), namespace("time"), str(checkout))


@dataclass(frozen=True)
class Leftover:
    """A process whose run has ended (its pid and start time, as scanned), and the variables of its environment this
    module reads."""

    pid: int
    started: int
    command: str
    run: Run
    environ: dict[str, str]
    parent: int = 0  # its parent's pid as scanned
    session: int = 0  # its session's id


def _marked(mark: str = MARK) -> Iterator[Leftover]:
    """Each process carrying a run's mark under the variable `mark`."""
    names = (mark, IP_FORWARD_BEFORE, DOCKER0_BEFORE, SHARED_LOCK)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        stat = _stat(pid)
        with contextlib.suppress(OSError):
            environ = (entry / "environ").read_bytes()
            command = (entry / "comm").read_text().strip()
            if stat is None or start_time(pid) != stat[0]:
                continue  # gone meanwhile, or its pid another process's: what was read may be either's
            pairs = (variable.decode(errors="replace").partition("=") for variable in environ.split(b"\0"))
            found = {name: value for name, _, value in pairs if name in names}
            run = Run.parse(found.get(mark, ""))
            if run is not None:
                yield Leftover(pid, stat[0], command, run, found, parent=stat[1], session=stat[2])


def leftovers() -> list[Leftover]:
    """Every process (but this one and its ancestors) whose run has ended, judged from here (`Run.judged_here`), and
    that a process of no run did not start (`_started_outside_a_run`)."""
    mine = _ancestors()
    return [
        left
        for left in _marked()
        if left.pid not in mine and left.run.judged_here() and not left.run.alive() and not _started_outside_a_run(left)
    ]


def _ancestors() -> set[int]:
    """This process and its ancestors: a run started by a `make` or a script that carries a dead run's mark (exported
    in the shell that started it) never stops what is running it."""
    found: set[int] = set()
    pid = os.getpid()
    while pid > 0 and pid not in found:
        found.add(pid)
        stat = _stat(pid)
        pid = 0 if stat is None else stat[1]
    return found


def _started_outside_a_run(left: Leftover) -> bool:
    """Whether the leftover's parent lives, carries another mark or none, and shares its session: the parent started
    it (a shell that exported the mark, and its job), as no dead run's process was (module docstring). Init (pid 1),
    having adopted it, is never that parent."""
    if left.parent <= 1:
        return False
    parent = _stat(left.parent)
    return parent is not None and parent[2] == left.session and _mark_of(left.parent) not in (None, left.run.mark())


def of_the_engine(left: Leftover) -> bool:
    """dockerd, or a process it started with its environment (containerd, its shims, docker-proxy): the engine a
    later run may be using, all of it. Only the dockerd test_compose.py starts has `IP_FORWARD_BEFORE`, and its
    children inherit it."""
    return left.command == ENGINE or IP_FORWARD_BEFORE in left.environ


def stop_all(found: list[Leftover]) -> list[Leftover]:
    """Stop what killed runs left (`stop`), dockerd only while no run holds the engine, putting back what it changed;
    what was stopped."""
    others = [left for left in found if not of_the_engine(left) and SHARED_LOCK not in left.environ]
    stop(others)
    for path in sorted({left.environ[SHARED_LOCK] for left in found if SHARED_LOCK in left.environ}):
        shared = [left for left in found if left.environ.get(SHARED_LOCK) == path and not of_the_engine(left)]
        with _exclusively(Path(path)) as free:
            if free:
                stop(shared)
                others += shared
    engines = [left for left in found if of_the_engine(left)]
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


@contextlib.contextmanager
def _exclusively(path: Path) -> Iterator[bool]:
    """The lock at `path` held exclusively for the block (True), unless a run holds it (False): a process several runs
    share, such as the AD realm's samba, is stopped only while nobody uses it, and nobody can start using it
    meanwhile. A lock file that is gone is held by nobody."""
    try:
        lock = path.open("rb")
    except FileNotFoundError:
        yield True
        return
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True


def _pidfd(left: Leftover) -> int | None:
    """A pidfd on the leftover, None once its pid is gone or another process's (taken after the scan)."""
    try:
        pidfd = os.pidfd_open(left.pid)
    except ProcessLookupError:
        return None
    if start_time(left.pid) == left.started:
        return pidfd  # checked after opening: the pidfd holds that very process, whatever its pid becomes
    os.close(pidfd)
    return None


def _signal(pidfd: int, signum: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        signal.pidfd_send_signal(pidfd, signum)


def stop(found: list[Leftover], grace: float = GRACE) -> None:
    """SIGCONT and SIGTERM to each, then SIGKILL to those still there after `grace` seconds. Through pidfds opened
    on the processes as scanned: a pid ended and taken meanwhile by a new process (of a run going) gets nothing."""
    pidfds = [pidfd for pidfd in map(_pidfd, found) if pidfd is not None]
    try:
        for pidfd in pidfds:
            _signal(pidfd, signal.SIGCONT)
            _signal(pidfd, signal.SIGTERM)
        waiting = select.poll()
        for pidfd in pidfds:
            waiting.register(pidfd, select.POLLIN)  # readable once the process has ended
        left = set(pidfds)
        deadline = time.monotonic() + grace
        while left and (remaining := deadline - time.monotonic()) > 0:
            for pidfd, _ in waiting.poll(remaining * 1000):
                waiting.unregister(pidfd)
                left.discard(pidfd)
        for pidfd in left:
            _signal(pidfd, signal.SIGKILL)
    finally:
        for pidfd in pidfds:
            os.close(pidfd)
