"""Several gateway processes on one port: a small pre-fork supervisor.

Theory of operation
-------------------
With `[listener] workers = N` (N > 1), `kcd-proxy run` becomes a supervisor. It first checks that the
port is free, then forks N workers; each runs the whole gateway (`proxy.app.serve`) on a listening socket
of its own, bound with SO_REUSEPORT, and the kernel spreads new connections over them. The supervisor
itself serves nothing and holds no socket.

Why the check: SO_REUSEPORT lets any process of the same user bind the same port, so a second gateway
started by mistake on a port that one already serves would quietly take half of its connections instead
of failing. A plain bind (SO_REUSEADDR only) fails when anything listens there; that is the check, made for the
admin listener's port too (its workers share it the same way).

Workers share nothing but one thing: each has its own Kerberos credentials and ticket cache, per-user backend pools
and CRLs, so a user whose connections land on two workers costs two S4U2Self exchanges. That is also
why several machines behind a load balancer need no coordination (docs/deploying.md; their Basic per-user limit is
sized for their number instead, docs/throttles-and-limits.md).

The one thing shared is the Basic throttles' counts, per user and per address (`proxy.auth.shared`): tables in shared
memory that the command line makes before `supervise` forks, so that a guesser's connections spread over the workers
count against one limit, and a replacement worker finds the users and addresses its predecessor held.

Workers share nothing else, but the admin listener must answer for all of them: each scrape of `/metrics` or read of
`/traces` reaches one worker (SO_REUSEPORT again). So the supervisor makes a private directory (mode 0700) before
it forks, and gives each worker a number (1..N; a replacement takes the number of the worker it replaces) and that
directory (`Worker`): each worker answers its siblings on a Unix socket there, and the one a scrape reaches asks
the others (`proxy.observability.siblings`). The supervisor removes the directory when it stops; killed outright,
it cannot, and its workers, stopping with it, remove it instead (the last one to remove its socket). Killed all at
once (`kill -9` to every process of the gateway, the OOM killer), none can: the next gateway the same user starts
removes it (`_sweep`), the supervisor's pid and start time in it saying it is dead.

A worker leaving (a drain of its own, the gateway's stop) first accepts what the kernel has already queued on its
listening sockets, device and admin, then closes them (`proxy.tls.limits.accept_queued`, `proxy.admin`): closing a
socket of an SO_REUSEPORT group resets its queue, which the kernel gives to a sibling only with
`net.ipv4.tcp_migrate_req` = 1 (docs/deploying.md, "Scaling"), the one remedy for a worker killed outright.

Signals: SIGTERM and SIGINT go to every worker (as `PASSED_ON`'s real-time signals, which a worker tells from the same
signal sent to it directly), which finish and exit; the supervisor exits 0 once they have. Each is followed by SIGCONT,
as systemd does for the processes it signals: a worker stopped (SIGSTOP) would act on it only once continued, and the
supervisor waited for it for ever. SIGHUP goes to every worker too, and each reloads on
its own (`proxy.live`); a worker still starting, before its reload handler is in place, remembers it (rather than
die of it, or miss the reload) and reloads once it serves, and one forked after the supervisor got a SIGHUP (between
two forks) is forked with it remembered. A supervisor killed
outright (SIGKILL, which it cannot pass on) takes its workers with it: each asks the kernel for SIGTERM
when its parent dies (PR_SET_PDEATHSIG), so none runs on as an orphan holding the port. A worker that dies on its own is
replaced after a pause, unless it exited with an error within `MIN_UPTIME` seconds of starting: a
gateway that cannot start (unreadable keytab, ...) would only fail again, so the supervisor stops the
rest and exits with that worker's code. A replacement that so fails while a sibling still serves does not stop the
gateway: its siblings serve on with what they loaded (a trust anchor or the listener's certificate caught half
rewritten fails a start, not a worker that has it loaded), the supervisor says so (`worker_not_replaced`, with the
fix) and tries again every `REPLACE_RETRY` seconds; a sibling serves if it is one of the first workers or a replacement
that has opened its listener (`Worker.listens`; one still starting may fail as well), so with none left serving the
gateway stops as when the first workers fail, unless a replacement still starts (it may serve in a moment: the
failed one is retried). The supervisor reaps a worker as it ends, a replacement's pause
included: its uptime is measured when it ended. (A worker killed by a signal is replaced whenever it dies.)
A replacement reads the configuration file again (`proxy.live.replacement_config`): its siblings may have reloaded
since the supervisor read it.

One rule for what a replacement cannot read while a sibling serves: it serves the configuration it read whole, or
not at all. A CRL file it cannot read (grown past `MAX_CRL_BYTES`, caught half rewritten), or a CRL source (a file, a
URL at its first fetch) whose CRL is older than the one its siblings took (below the shared replay floor:
`CrlStore.behind_floors`), is refused, not served without: under `revocation = "best-effort"` that passed the
certificates the siblings' CRL revokes while they, keeping it, refused them (the same device got 200 or 403 by the
kernel's pick of worker), and under "require" it refused every device of that CA while they served them. Nor does a
configuration that does not build send it back to the one the gateway started with (older routes, trust anchors and
revocation mode than its siblings' reload, if they took it). The supervisor tells each replacement how many siblings
serve (`Worker.serving_beside`: alive, one of the first workers or a replacement that listens, and not one that has
closed its listener to stop, `Worker.stops_listening`); one with
none beside it (every worker died) serves as before, as nothing else would: without the CRL sources it cannot use
(`crl_not_used`; the revocation mode says what that means), on the configuration the gateway started with if the
file does not build. A refusing replacement leaves its problems in `Worker.refusal` for the supervisor's
`worker_not_replaced` to name. That count (`_serving`) is the supervisor's one notion of serving: it also decides
whether a replacement that failed is retried or the gateway stops; one that refused only because siblings served,
none serving by the time it ended, is followed by one forked with none beside it, not by a stop. It is also what an
operator sees, less the workers stopped (SIGSTOP: alive, counted in the decisions, but what the kernel gives their
sockets waits): the supervisor writes the workers configured and the numbers of those serving (and of those stopped
or stopping) to its directory (`serving.json`, whole, by a rename) whenever they change, woken by a worker's mark
(SIGCHLD from `Worker.listens` and `stops_listening`) and by a worker stopped or continued (SIGCHLD from the kernel),
and the admin listener reads it (`Worker.serving`) for `kcd_workers_serving` and `/readyz`'s "N of M workers serve":
a worker not replaced used to show only in the log.

The CRLs a replacement is given older than its siblings' (a plain-HTTP distribution point answering an older genuine
CRL, which anyone on its path can replay) kept it out for as long as that lasted, one worker short; one whose CRL URL
did not answer at its first fetch served without that CA's CRL. So every worker keeps the bytes of each source whose
CRLs it took in this directory (`crls/`, `Worker.kept_crls`), and a replacement starts each source from the newest of
those it vets itself (`proxy.certs.kept`): what its source then gives is taken if no older, refused as a replay if
older, as in its siblings. The refusal above remains for what it cannot so vet (a kept file older than the floor,
forged, or absent), and only beside a sibling that holds CRLs of that source (`KeptCrls.held_beside`: hence the
numbers of the siblings serving, `Worker.serving_beside`): beside siblings holding none either, it protected nothing.

Pinning (`[listener] worker_cpus`, off unless set): worker n runs on the n-th CPU of the list, wrapping ("auto": the
CPUs the gateway was started allowed to use, in order: a container's cpuset, `taskset`, systemd's `CPUAffinity=`). The
supervisor checks the list against that set before it forks (`worker_cpus_problem`, which check-config runs too), and
each worker pins itself after the fork (`sched_setaffinity`), a replacement on the CPU of the worker it replaces (it
takes its number); `worker_started` names the CPU. The supervisor stays unpinned; it serves nothing. Why it is a
setting: on two cores shared with busy neighbours, two workers each pinned to a core served 1.25 times what two the
scheduler placed did, paired with an A/A control (docs/performance.md, "Pinning the workers as a setting").
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import select
import shutil
import signal
import socket
import struct
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

import structlog

from proxy.certs.kept import DIRECTORY as KEPT_CRLS
from proxy.certs.kept import KeptCrls
from proxy.config import Admin, Listener, WorkerCpus
from proxy.kerberos.profile import remove_overlay

log = structlog.get_logger("proxy.workers")

MIN_UPTIME = 5.0  # seconds: a worker that exits with an error sooner failed to start
_RESTART_PAUSE = 1.0
REPLACE_RETRY = 5.0  # seconds between tries to replace a worker whose replacement failed to start
_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
# A stop signal the supervisor passes on reaches a worker as a real-time signal of its own (queued, never merged with
# another pending one), so the worker tells it from the same signal sent to it directly: Ctrl-C signals the whole
# process group, a unit's default KillMode=control-group every process, so each worker gets one of each for one stop,
# and a second of either kind is the stop asked again (`proxy.app.serve`). Its default action ends the process, as
# SIGTERM's does, until the worker handles it.
PASSED_ON: dict[signal.Signals, int] = {signal.SIGTERM: signal.SIGRTMIN + 0, signal.SIGINT: signal.SIGRTMIN + 1}
_PR_SET_PDEATHSIG = 1  # linux/prctl.h
_RELOADED = "reloaded.toml"  # in the supervisor's directory: the text the workers' last reload took (`Worker.reloaded`)
_SERVING = "serving.json"  # in the supervisor's directory: the workers configured and those serving (`Worker.serving`)
_SUPERVISOR = "supervisor"  # in the supervisor's directory: its pid and start time (`_sweep`)
_PREFIX = "kcd-proxy-workers-"  # the supervisor's directory, in the temp directory


@dataclass(frozen=True)
class Worker:
    """Which worker this process is, and where its siblings answer (module docstring)."""

    number: int  # 1..N, kept by a replacement
    siblings: Path  # the supervisor's private directory: one Unix socket per worker, `<number>.sock`
    replacement: bool = False  # started in place of one that died: reads the configuration afresh (proxy.live)
    serving_beside: tuple[int, ...] = ()  # a replacement: the numbers of its siblings serving as it was forked
    # (module docstring, `_serving_numbers`)

    @property
    def socket(self) -> Path:
        return self.siblings / f"{self.number}.sock"

    @property
    def beside(self) -> bool:
        """A replacement with siblings serving: it serves its configuration whole or not at all (module docstring)."""
        return self.replacement and bool(self.serving_beside)

    @property
    def refusal(self) -> Path:
        """Where a replacement that refuses its configuration writes the problems (JSON), for `worker_not_replaced`."""
        return self.siblings / f"{self.number}.refused"

    def refused(self, problems: list[str]) -> None:
        """A replacement's configuration refused (`refusal`): best effort, the worker's stderr has them anyway."""
        with contextlib.suppress(OSError):
            self.refusal.write_text(json.dumps(problems))

    def listens(self) -> None:
        """This worker has opened its listener: the supervisor counts it as serving from now on (`_serving`). Best
        effort: a replacement not so marked is counted as not serving, as one still starting is."""
        with contextlib.suppress(OSError):
            _listening(self.siblings, os.getpid()).touch()
            os.kill(os.getppid(), signal.SIGCHLD)  # the supervisor's wait ends: it publishes the count (`_publish`)

    def stops_listening(self) -> None:
        """This worker has closed its listener to stop (its SIGTERM, or the gateway's): it serves no new connection,
        only its requests in flight, so the supervisor no longer counts it (`_serving`), though it is alive for up to
        `listener.drain_timeout`. Best effort, as `listens`."""
        with contextlib.suppress(OSError):
            _stopping(self.siblings, os.getpid()).touch()
            os.kill(os.getppid(), signal.SIGCHLD)  # the supervisor publishes the count without it (`_publish`)

    @property
    def kept_crls(self) -> KeptCrls:
        """Where this worker keeps the CRLs it takes; a replacement starts from its siblings' (`proxy.certs.kept`)."""
        return KeptCrls(self.siblings / KEPT_CRLS, self.number, adopt=self.replacement, beside=self.serving_beside)

    @property
    def reloaded(self) -> Path:
        """Where a worker's reload that succeeded leaves the file's text it took, for a replacement to serve if the
        file does not load by then (`proxy.live.replacement_refused`)."""
        return self.siblings / _RELOADED

    def serving(self) -> Serving | None:
        """The workers configured and those serving, as the supervisor last wrote them (`_publish`); None if unread."""
        try:
            figures = json.loads((self.siblings / _SERVING).read_text())
            numbers = (tuple(int(n) for n in figures.get(key, ())) for key in ("serving", "stopped", "stopping"))
            return Serving(int(figures["configured"]), *numbers)
        except (OSError, ValueError, KeyError, TypeError):
            return None


@dataclass(frozen=True)
class Serving:
    """How many workers the gateway was started with (`listener.workers`) and the numbers of those serving, by the
    supervisor's one notion of serving (`_serving`): what `/metrics` and `/readyz` say of a worker not replaced."""

    configured: int
    numbers: tuple[int, ...]
    stopped: tuple[int, ...] = ()  # alive but stopped (SIGSTOP): its socket takes connections that wait (`_stopped`)
    stopping: tuple[int, ...] = ()  # its listener closed, finishing its requests in flight (`Worker.stops_listening`)

    @property
    def missing(self) -> list[int]:
        return [n for n in range(1, self.configured + 1) if n not in self.numbers]


class PortInUse(Exception):
    """The gateway's address cannot be bound: something listens there already, or it is not this machine's, or not
    ours to bind; `key` is the configuration key that names it, `error` the bind's."""

    def __init__(self, message: str, key: str, error: OSError) -> None:
        super().__init__(message)
        self.key = key
        self.error = error


def check_port_free(listener: Listener, admin: Admin | None = None) -> None:
    """Bind the address the way a lone gateway would (no SO_REUSEPORT): this fails if anything listens. The admin
    listener's too (`admin`, when it has a TCP address): its workers share it with SO_REUSEPORT as well, so a second
    gateway given the same admin port answered half of the first one's scrapes and readiness probes."""
    _check_free(listener.host, listener.port, "listener.bind", "")
    if admin is not None and admin.bound:
        _check_free(admin.host, admin.port, "admin.bind", "admin.bind ")


def _check_free(host: str, port: int, key: str, prefix: str) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise PortInUse(f"{prefix}{host}:{port}: {exc.strerror}", key, exc) from None


def worker_cpus(setting: WorkerCpus | None, allowed: set[int]) -> tuple[int, ...]:
    """The CPUs `listener.worker_cpus` names in order, worker n pinned to the ((n - 1) modulo their count)-th: "auto"
    is `allowed` (the CPUs this process may use) in order; () when not set (no worker is pinned)."""
    if setting is None:
        return ()
    return tuple(sorted(allowed)) if setting == "auto" else setting


def worker_cpus_problem(setting: WorkerCpus | None, allowed: set[int]) -> str | None:
    """What is wrong with `listener.worker_cpus` on this machine: a CPU this process may not use (not on the machine,
    or outside its cpuset or affinity), checked before the workers fork, and by check-config; None if nothing."""
    outside = sorted(set(worker_cpus(setting, allowed)) - allowed)
    if not outside:
        return None
    return (
        f"listener.worker_cpus: CPU {', '.join(map(str, outside))} not among the CPUs this process may use "
        f"({_cpu_list(allowed)}: the machine's, narrowed by a container's cpuset, taskset or systemd's CPUAffinity=); "
        'list only those, or write "auto" to pin the workers to them in turn'
    )


def _cpu_list(cpus: set[int]) -> str:
    """CPUs as `taskset` and /proc write them: "0-3,6"."""
    spans: list[list[int]] = []
    for cpu in sorted(cpus):
        if spans and spans[-1][1] == cpu - 1:
            spans[-1][1] = cpu
        else:
            spans.append([cpu, cpu])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def pin(cpu: int) -> None:
    """Run every thread of this process on `cpu` alone (threads started later inherit it)."""
    for task in Path("/proc/self/task").iterdir():
        os.sched_setaffinity(int(task.name), {cpu})


def pin_or_say(cpu: int) -> None:
    """`pin` this worker to `cpu`, or say why it serves unpinned: the CPU was checked at the start, but a container's
    cpuset can shrink and a CPU go offline since (a replacement forked later)."""
    try:
        pin(cpu)
    except OSError as e:
        log.warning(
            "worker_not_pinned",
            cpu=cpu,
            error=e.strerror,
            allowed=_cpu_list(os.sched_getaffinity(0)),
            fix='serves on any CPU allowed; set listener.worker_cpus to CPUs the gateway may use (or "auto") and '
            "restart it",
        )


def supervise(listener: Listener, serve_one: Callable[[Worker], int], admin: Admin | None = None) -> int:
    """Run `serve_one` (one whole gateway; returns an exit code) in `listener.workers` processes, each pinned to its
    CPU when `listener.worker_cpus` is set (checked by `worker_cpus_problem` before)."""
    check_port_free(listener, admin)
    cpus = worker_cpus(listener.worker_cpus, os.sched_getaffinity(0))
    workers: dict[int, tuple[float, int, bool]] = {}  # pid -> (when it started, its number, a replacement?)
    due: dict[int, float] = {}  # number -> when the worker replacing the one that had it is forked
    _sweep(Path(tempfile.gettempdir()))
    siblings = Path(tempfile.mkdtemp(prefix=_PREFIX))  # mode 0700
    _mark_supervisor(siblings)
    wake = _Wake()
    stopping = False
    starting = True  # the first workers are being forked
    failure = 0

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        if signum != signal.SIGHUP:
            stopping = True
        elif starting:  # passed on to the workers forked so far; the ones still to fork inherit it remembered
            remember_reload(signum, frame)
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, PASSED_ON.get(signal.Signals(signum), signum))
                if signum != signal.SIGHUP:  # a stopped worker (SIGSTOP) acts on it once continued, as systemd does
                    os.kill(pid, signal.SIGCONT)  # for what it signals (here the supervisor alone: KillMode=mixed)

    def start(number: int, *, replacement: bool = False) -> None:
        beside = _serving_numbers(workers, siblings) if replacement else ()
        cpu = cpus[(number - 1) % len(cpus)] if cpus else None  # a replacement's is its predecessor's: same number
        # Signals wait until the new pid is in `workers` (parent) or default handlers are back (child).
        signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        try:
            if stopping:  # a SIGTERM since the fork was decided: a worker forked now would serve on, never told
                return
            supervisor = os.getpid()
            pid = os.fork()
            if pid == 0:
                wake.close_in_child()
                _worker(lambda: serve_one(Worker(number, siblings, replacement, beside)), supervisor, siblings, cpu)
            workers[pid] = (time.monotonic(), number, replacement)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)
        log.info("worker_started", worker=pid, number=number, **({} if cpu is None else {"cpu": cpu}))

    previous = {sig: signal.signal(sig, on_signal) for sig in _SIGNALS}
    try:
        wake.listen()
        for number in range(1, listener.workers + 1):
            start(number)
        starting = False
        # a SIGHUP before `on_signal` was in place, or between two forks, is the first workers' to act on (each forked
        # after it with the flag set), not every replacement's to come (each reads the file afresh anyway)
        reload_asked_while_starting()
        published: Serving | None = None
        while workers or (due and not stopping):
            published = _publish(siblings, _now_serving(listener.workers, workers, siblings), published)
            # Reaped as they end, also while a replacement waits to be forked: a worker's uptime is measured when it
            # ended, not after a pause (a sleep here made a replacement failing at once look as if it had served).
            ended = _reap()
            if (
                not ended
            ):  # woken too by a worker opening or closing its listener (`Worker.listens`, `stops_listening`), and by
                # one stopped or continued (SIGCHLD: SA_NOCLDSTOP is not set): the count to publish changed
                wake.wait(max(0.0, min(due.values()) - time.monotonic()) if due and not stopping else None)
            for pid, status in ended:
                if pid not in workers:
                    continue
                started, number, replacing = workers.pop(pid)
                # A worker killed outright leaves its mark and its Unix socket: with the socket there, the last worker
                # stopping after the supervisor was killed (a replacement retried, not yet listening) could not remove
                # the directory. Its replacement binds a new one.
                _listening(siblings, pid).unlink(missing_ok=True)
                _stopping(siblings, pid).unlink(missing_ok=True)
                Worker(number, siblings).socket.unlink(missing_ok=True)
                code = os.waitstatus_to_exitcode(status)
                if stopping:
                    log.info("worker_stopped", worker=pid, code=code)
                    continue
                log.warning("worker_exited", worker=pid, code=code)
                pause = _RESTART_PAUSE
                problems = _refusal(Worker(number, siblings))  # a refusal is a failure to start, however long it took
                failed = code > 0 and (time.monotonic() - started < MIN_UPTIME or bool(problems))
                serving = _serving(workers, siblings)  # the one count both the retry and a replacement's `beside` go by
                coming = _starting(workers, siblings)  # replacements not yet listening
                if failed and replacing and (serving or coming):
                    # its siblings serve with what they loaded: a file caught half rewritten is no reason to stop them
                    # (nor, with none serving, while a replacement still starts: it may serve in a moment)
                    log.error(
                        "worker_not_replaced",
                        worker=pid,
                        code=code,
                        serving=serving,
                        starting=coming,
                        retry_seconds=REPLACE_RETRY,
                        problems=problems,
                        fix="`problems` (or the worker's lines above) name the file it refused (a trust anchor, a CRL "
                        "file, the listener's certificate or key being rewritten?): write it whole (a new file renamed "
                        "over the old one), publish a CRL no older than the other workers hold (replayed?), or fix the "
                        "configuration; the other workers serve meanwhile",
                    )
                    pause = REPLACE_RETRY
                elif failed and not (replacing and problems):
                    # one of the first workers, or no sibling left serving: the gateway cannot serve. (A replacement
                    # that refused only because a sibling served beside it, none serving now, is followed by one with
                    # none beside it, which serves as a lone replacement does or fails to start and stops the gateway.)
                    log.error("worker_failed_to_start", worker=pid, code=code, fix="see the worker's lines above")
                    failure = code
                    on_signal(signal.SIGTERM, None)
                    continue
                due[number] = time.monotonic() + pause
            if stopping:
                due.clear()
            for number, when in sorted(due.items()):
                if when <= time.monotonic():
                    del due[number]
                    start(number, replacement=True)
    finally:
        wake.close()
        shutil.rmtree(siblings, ignore_errors=True)
        for sig, handler in previous.items():
            # a stop signal again while it ends (a third Ctrl-C, a process manager repeating SIGTERM) is ignored, not
            # given to its old handler (Python's KeyboardInterrupt: killed by SIGINT, exit -2): it ends anyway
            signal.signal(sig, signal.SIG_IGN if stopping and sig in (signal.SIGINT, signal.SIGTERM) else handler)
    log.info("supervisor_stopped")
    return failure


def _started(pid: int) -> str | None:
    """When process `pid` started (clock ticks since boot, /proc/<pid>/stat), telling it from a later process given
    the same pid; None if there is no such process."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[19]
    except (OSError, IndexError):
        return None


def _mark_supervisor(siblings: Path) -> None:
    """The supervisor's pid, start time and PID namespace in its directory `siblings`, by which `_sweep` tells it is
    dead."""
    with contextlib.suppress(OSError):  # best effort: without it, only this directory's sweep is lost (`_sweep`)
        (siblings / _SUPERVISOR).write_text(f"{os.getpid()} {_started(os.getpid())} {_pid_namespace()}")


def _pid_namespace() -> str:
    """This process's PID namespace ("pid:[4026531836]"): a pid means the same process only within it."""
    try:
        return str(Path("/proc/self/ns/pid").readlink())
    except OSError:
        return _UNKNOWN


_UNKNOWN = "unknown"


def _sweep(temp: Path) -> None:
    """Remove the private directories (`supervise`) in `temp` of this user's gateways that died with every worker
    killed outright (`kill -9` to the supervisor and its workers at once, the OOM killer, a container's cgroup
    killed): none of theirs lived on to remove it (`_leave`), and each stayed for good. Such a directory is known by
    its supervisor (its pid and start time, `_SUPERVISOR`) gone and no worker answering on a socket in it (one still
    stopping removes it itself); one without that file (being made, or an older version's), or whose supervisor ran in
    another PID namespace (another container sharing /tmp: its pid means another process here, or none), is left
    alone."""
    ours = _pid_namespace()
    if ours == _UNKNOWN:  # no /proc to read: neither a pid's start time nor a socket's peer can be told
        return
    for directory in temp.glob(f"{_PREFIX}*"):
        try:
            if directory.is_symlink() or not directory.is_dir() or directory.stat().st_uid != os.getuid():
                continue
            text, started, namespace = (directory / _SUPERVISOR).read_text().split()
            pid = int(text)
        except (OSError, ValueError):
            continue
        if namespace != ours:
            continue
        if _started(pid) == started or any(_answers(path) for path in directory.glob("*.sock")):
            continue
        unremoved = _remove(directory)
        if unremoved is not None:
            log.warning(
                "workers_directory_not_removed",
                directory=str(directory),
                supervisor=pid,
                error=unremoved,
                detail=_SWEPT,
            )
            continue
        log.info("workers_directory_removed", directory=str(directory), supervisor=pid, detail=_SWEPT)


def _remove(directory: Path) -> str | None:
    """Remove `directory` and what it holds: None once it is gone (another gateway starting may have removed it
    meanwhile), else why not (the first failure: a read-only temp directory, say)."""
    errors: list[str] = []
    shutil.rmtree(directory, onerror=lambda _f, _p, e: errors.append(str(e[1])))
    return (errors[0] if errors else "still there") if directory.exists() else None


_SWEPT = "the private directory of a gateway whose supervisor and workers were all killed outright"


def _listening(siblings: Path, pid: int) -> Path:
    """The mark a worker leaves once its listener is open (`Worker.listens`), removed when it ends."""
    return siblings / f"{pid}.listening"


def _stopping(siblings: Path, pid: int) -> Path:
    """The mark a worker leaves once it has closed its listener to stop (`Worker.stops_listening`), removed when it
    ends."""
    return siblings / f"{pid}.stopping"


def _serving(workers: dict[int, tuple[float, int, bool]], siblings: Path) -> int:
    """How many of `workers` serve (`_serving_numbers`)."""
    return len(_serving_numbers(workers, siblings))


def _serving_numbers(workers: dict[int, tuple[float, int, bool]], siblings: Path) -> tuple[int, ...]:
    """The numbers of `workers` that serve, as far as the supervisor can tell: alive (one that died is not yet
    reaped: asked without reaping it, `WNOWAIT`), and one of the first workers (a first one that fails to start stops
    the gateway) or a replacement that has opened its listener (`Worker.listens`). Not its age: one still starting
    may yet fail
    (two workers dying together would otherwise each wait for the other's replacement, and none serve), one past
    `MIN_UPTIME` may still be starting (a slow CRL URL), and one younger serving was counted as none: the gateway
    stopped when its sibling's replacement failed beside it, and a replacement forked beside it served as a lone one
    (what it could not read left out, or the started configuration). Nor one that has closed its listener to stop
    (`Worker.stops_listening`): it only finishes its requests in flight, for up to `listener.drain_timeout`."""
    return tuple(
        sorted(
            number
            for pid, (_, number, replacement) in workers.items()
            if (not replacement or _listening(siblings, pid).exists())
            and not _stopping(siblings, pid).exists()
            and _running(pid)
        )
    )


def _now_serving(configured: int, workers: dict[int, tuple[float, int, bool]], siblings: Path) -> Serving:
    """What the supervisor publishes (`_publish`): the workers serving (`_serving_numbers`) less those stopped
    (SIGSTOP: the connections the kernel gives their sockets wait), and those stopping. A stopped worker still counts
    in the supervisor's own decisions (`_serving`): continued, it serves what it loaded, and a gateway stopped for
    want of it would wait for it to be continued before it could end."""
    numbers = _serving_numbers(workers, siblings)
    stopped = tuple(sorted(n for pid, (_, n, _) in workers.items() if n in numbers and _stopped(pid)))
    stopping = tuple(
        sorted(n for pid, (_, n, _) in workers.items() if _stopping(siblings, pid).exists() and _running(pid))
    )
    return Serving(configured, tuple(n for n in numbers if n not in stopped), stopped, stopping)


def _starting(workers: dict[int, tuple[float, int, bool]], siblings: Path) -> int:
    """How many of `workers` are replacements still starting: alive, their listener not yet open. While one is, a
    lone replacement failing does not stop the gateway (the one starting may serve in a moment, having read its
    files whole before they went bad): it is retried, and the gateway stops once none serves and none starts."""
    return sum(
        1
        for pid, (_, _, replacement) in workers.items()
        if replacement
        and not _listening(siblings, pid).exists()
        and not _stopping(siblings, pid).exists()
        and _running(pid)
    )


def _running(pid: int) -> bool:
    """Whether the worker `pid` has not ended: one that died is not yet reaped, so asked without reaping it."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None
    except ChildProcessError:
        return False


def _stopped(pid: int) -> bool:
    """Whether the worker `pid` is stopped (SIGSTOP, SIGTSTP): asked without taking the report (`WNOWAIT`), so it
    stays until the worker is continued; a worker that has ended is not stopped."""
    try:
        info = os.waitid(os.P_PID, pid, os.WSTOPPED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:  # ended (a zombie is no child for WSTOPPED alone)
        return False
    return info is not None and info.si_code == os.CLD_STOPPED


def _publish(siblings: Path, serving: Serving, published: Serving | None) -> Serving | None:
    """`serving` written for the workers to read (`Worker.serving`) when it is not what was `published` last, whole
    (a file renamed over the old one: a worker never reads half of it); returns what the file now says. Best effort:
    a file that cannot be written leaves the figures out of /metrics and /readyz (the log has `worker_not_replaced`)."""
    if serving == published:
        return published
    new = siblings / f"{_SERVING}.new"
    try:
        figures = {"configured": serving.configured, "serving": list(serving.numbers)}
        figures.update({k: list(v) for k, v in (("stopped", serving.stopped), ("stopping", serving.stopping)) if v})
        new.write_text(json.dumps(figures))
        new.replace(siblings / _SERVING)
    except OSError:
        return published
    return serving


def _refusal(worker: Worker) -> list[str]:
    """The problems a replacement that refused its configuration left (`Worker.refused`), taken: [] if none."""
    try:
        text = worker.refusal.read_text()
    except OSError:
        return []
    worker.refusal.unlink(missing_ok=True)
    try:
        problems = json.loads(text)
    except ValueError:
        return []
    return [str(p) for p in problems] if isinstance(problems, list) else []


def _reap() -> list[tuple[int, int]]:
    """The workers that have ended, without waiting: (pid, wait status) each."""
    ended: list[tuple[int, int]] = []
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:  # none left
            return ended
        if pid == 0:
            return ended
        ended.append((pid, status))


class _Wake:
    """What ends the supervisor's wait: a worker ending (SIGCHLD), a signal to pass on, or a replacement due. Each
    signal caught writes a byte to a pipe (`signal.set_wakeup_fd`), so one that comes between a look for ended
    workers and the wait is not missed, and the wait has a timeout (`os.wait` has none)."""

    def __init__(self) -> None:
        self.read, self.write = os.pipe()
        for fd in (self.read, self.write):
            os.set_blocking(fd, False)
        self.previous_fd = -1
        self.previous_handler: signal.Handlers | Callable[[int, FrameType | None], Any] | int | None = None

    def listen(self) -> None:
        # a handler of Python's own: SIG_DFL would leave the wake-up byte unwritten
        self.previous_handler = signal.signal(signal.SIGCHLD, lambda signum, frame: None)
        self.previous_fd = signal.set_wakeup_fd(self.write, warn_on_full_buffer=False)

    def wait(self, timeout: float | None) -> None:
        select.select([self.read], [], [], timeout)
        with contextlib.suppress(BlockingIOError):
            while os.read(self.read, 512):
                pass

    def close_in_child(self) -> None:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        os.close(self.read)
        os.close(self.write)

    def close(self) -> None:
        if self.previous_handler is not None:
            signal.set_wakeup_fd(self.previous_fd)
            signal.signal(signal.SIGCHLD, self.previous_handler)
        os.close(self.read)
        os.close(self.write)


_reload_asked = False  # a SIGHUP came while this process started (`remember_reload`)


def remember_reload(signum: int, frame: FrameType | None) -> None:
    """SIGHUP's handler until the event loop's is in place (`kcd-proxy run` from its start; a worker from its fork):
    the reload is remembered, not lost, and SIGHUP's default action (the end of the process) never taken."""
    global _reload_asked
    _reload_asked = True


def reload_asked_while_starting() -> bool:
    """Whether a SIGHUP reached this process before its reload handler was in place (then it reloads once it serves:
    a worker would otherwise have missed a reload the supervisor passed on, serving the file as read before; a lone
    gateway would have ended). Asked once: the answer is the process's to act on, then forgotten."""
    global _reload_asked
    asked, _reload_asked = _reload_asked, False
    return asked


def _worker(serve_one: Callable[[], int], supervisor: int, siblings: Path, cpu: int | None = None) -> None:
    """The child side of the fork: default signal handling back, pinned to `cpu` if given, serve, and never return
    into the parent's code. A worker outliving its supervisor (killed outright, so it never removed `siblings`) empties
    that directory of all but its live siblings' sockets and removes it (`_leave`): each such worker has removed its
    own socket by then, so the last one to stop succeeds."""
    code = 1
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGHUP, remember_reload)  # until proxy.app.serve installs its reload handler
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != supervisor:  # it died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)  # delivered when the mask is lifted below
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)
        if cpu is not None:
            pin_or_say(cpu)
        code = serve_one()
    except (Exception, asyncio.CancelledError):  # CancelledError (a BaseException) used to end it with no line
        log.exception("worker_crashed")
    finally:
        for mark in (_listening, _stopping):  # this worker serves no more (`_serving`)
            with contextlib.suppress(OSError):
                mark(siblings, os.getpid()).unlink()
        if os.getppid() != supervisor:
            _leave(siblings)
        end_process(code)


def _leave(siblings: Path) -> None:
    """A worker whose supervisor is gone (killed outright) stops: no replacement will come to read what the siblings'
    last reload took (nor take its lock, `.reloaded.toml.lock`: `proxy.live._kept_lock`), nor a scrape the
    supervisor's count, nor the supervisor a mark or a refusal. Everything but a sibling's socket that answers (a
    sibling still stopping, which removes its own) is removed, then the directory, which the last worker to stop finds
    empty. A socket nothing answers on is a worker's killed outright, which only the supervisor removed, as it reaped
    it: killed together with it, the worker was never reaped, and the directory stayed."""
    with contextlib.suppress(OSError):
        for path in siblings.iterdir():
            if path.suffix == ".sock" and _answers(path):
                continue
            if path.is_dir() and not path.is_symlink():  # none yet: a directory of files for the workers, say
                shutil.rmtree(path, ignore_errors=True)
                continue
            with contextlib.suppress(OSError):
                path.unlink()
        siblings.rmdir()  # not empty: a sibling still stopping removes it


def _answers(path: Path) -> bool:
    """Whether a live process listens on the Unix socket `path` (asked by connecting; any doubt is a yes). A worker
    killed outright at the same moment (`kill -9` to the supervisor and a worker) still answered for a few ms, until
    the kernel had closed its descriptors: the process listening (the socket's peer credentials) is asked whether it
    is ending (`_ending`); one in a PID namespace this process cannot see (peer pid 0) is taken as live."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
            pid = _PEERCRED.unpack(probe.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))[0]
        except (ConnectionRefusedError, FileNotFoundError):
            return False
        except OSError:
            return True
    return pid == 0 or not _ending(pid)


_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
_PF_EXITING = 0x4  # include/linux/sched.h: the task is in do_exit


def _ending(pid: int) -> bool:
    """Whether process `pid` has ended or is ending: gone, its first thread a zombie (the others still closing its
    descriptors), exiting, or with SIGKILL pending. Any doubt is a no."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    except OSError:
        return False
    pending = (line.split()[1] for line in status.splitlines() if line.startswith(("ShdPnd:", "SigPnd:")))
    killed = any(int(mask, 16) >> (signal.SIGKILL - 1) & 1 for mask in pending)
    return stat[0] in ("Z", "X") or bool(int(stat[6]) & _PF_EXITING) or killed


def end_process(code: int) -> NoReturn:
    """End a process whose gateway has stopped (a worker; `kcd-proxy run`'s one process): its krb5.conf overlays
    removed (`os._exit` runs no atexit handler) and its output flushed, then `os._exit(code)`, never the interpreter's
    teardown. That teardown collects and frees every object the gateway held, memory the kernel takes back at once:
    with two CRL sets of 200,000 entries (a reload's and the start's) 0.6 s of CPU after the `stopped` line, which a
    load of 10 stretched to 5-17 s and a load of 16-20 past the 30 s systemd gives a stop (TimeoutStopSec) before
    SIGKILL; it grows with the CRLs (64 MiB are allowed)."""
    try:
        remove_overlay()
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)
