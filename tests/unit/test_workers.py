"""`[listener] workers`: parsed and checked like every key; the supervisor refuses a port already served."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from proxy import config, workers
from proxy.errors import ConfigError
from proxy.workers import PortInUse, Serving, Worker, check_port_free
from tests.integration.jsonlog import eventually
from tests.unit.test_config import GOOD, _write


def _with_workers(value: str) -> str:
    return GOOD.replace('bind = "127.0.0.1:8443"\n', f'bind = "127.0.0.1:8443"\nworkers = {value}\n')


def test_workers_defaults_to_one(tmp_path: Path) -> None:
    """Without the key the gateway is one process, as before."""
    assert config.load(_write(tmp_path, GOOD)).listener.workers == 1


def test_workers_is_read_as_a_count(tmp_path: Path) -> None:
    """workers = 4 becomes the integer 4."""
    assert config.load(_write(tmp_path, _with_workers("4"))).listener.workers == 4


@pytest.mark.parametrize("value", ["0", "-2", '"2"', "1.5", "true"])
def test_workers_must_be_a_positive_integer(tmp_path: Path, value: str) -> None:
    """Zero, negative, quoted, fractional or boolean counts are refused, naming the key."""
    with pytest.raises(ConfigError) as e:
        config.load(_write(tmp_path, _with_workers(value)))
    assert any(p.startswith("listener.workers:") for p in e.value.problems), e.value.problems


@pytest.mark.parametrize("value", ["1025", "99999999999999999999"])
def test_workers_beyond_any_machine_are_refused_before_a_fork(tmp_path: Path, value: str) -> None:
    """`workers = 99999999999999999999` (a typo, or a hostile file) was taken, and the supervisor forked until the
    machine ran out of processes: a count over MAX_WORKERS is refused, naming the key."""
    with pytest.raises(ConfigError) as e:
        config.load(_write(tmp_path, _with_workers(value)))
    assert any(p.startswith(f"listener.workers: at most {config.MAX_WORKERS}") for p in e.value.problems), (
        e.value.problems
    )
    assert config.load(_write(tmp_path, _with_workers(str(config.MAX_WORKERS)))).listener.workers == config.MAX_WORKERS


def test_port_check_refuses_an_address_something_listens_on() -> None:
    """SO_REUSEPORT would let a second gateway share a served port silently; the supervisor's check refuses."""
    with socket.socket() as busy:
        busy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # as a running worker binds it
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        listener = config.Listener(host="127.0.0.1", port=port, certificate=Path(), private_key=Path(), workers=2)
        with pytest.raises(PortInUse, match=f"127.0.0.1:{port}"):
            check_port_free(listener)
    check_port_free(listener)  # and once nothing listens, the same address passes


def test_serving_and_starting_count_live_workers_by_their_listener_not_their_age(tmp_path: Path) -> None:
    """What a replacement is told of its siblings (`Worker.serving_beside`): a first worker alive serves, one that died
    but is not yet reaped does not (and stays to be reaped), nor a replacement that has not opened its listener
    (`Worker.listens`), however old: it may yet fail to start (two replacements counting each other, neither serving,
    would each wait for the other), and is counted as starting instead. One that listens serves however young."""
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        deadline = time.monotonic() + 60
        while os.waitid(os.P_PID, dead.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        now = time.monotonic()
        assert workers._serving({alive.pid: (now, 1, False), dead.pid: (now - 60, 2, False)}, tmp_path) == 1
        assert workers._serving({alive.pid: (now - workers.MIN_UPTIME - 1, 1, True)}, tmp_path) == 0  # still starting
        assert workers._starting({alive.pid: (now, 1, True)}, tmp_path) == 1  # a replacement, not yet listening
        assert workers._starting({alive.pid: (now, 1, False)}, tmp_path) == 0  # a first worker: serving, not starting
        workers._listening(tmp_path, alive.pid).touch()  # what `Worker.listens` leaves, in the worker's process
        assert workers._serving({alive.pid: (now, 1, True)}, tmp_path) == 1  # listening since a moment
        assert workers._starting({alive.pid: (now, 1, True)}, tmp_path) == 0
        workers._listening(tmp_path, dead.pid).touch()
        assert workers._serving({dead.pid: (now, 2, True)}, tmp_path) == 0  # its mark left, the worker dead
        assert workers._starting({dead.pid: (now, 2, True)}, tmp_path) == 0
        assert dead.poll() == 0  # still there to be reaped by the supervisor's wait
    finally:
        alive.kill()
        alive.wait()


def test_a_stopped_or_stopping_worker_is_published_as_not_serving(tmp_path: Path) -> None:
    """What the supervisor publishes (`_now_serving`): a worker stopped (SIGSTOP) is not serving but `stopped`, and
    serving again once continued; one that closed its listener to stop (`<pid>.stopping`) is `stopping`, and no
    longer serving for the supervisor's own decisions either (`_serving`), nor starting."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        now = time.monotonic()
        running = {child.pid: (now, 1, False)}
        assert workers._now_serving(2, running, tmp_path) == Serving(2, (1,))
        os.kill(child.pid, signal.SIGSTOP)
        eventually = time.monotonic() + 60
        while not workers._stopped(child.pid):
            assert time.monotonic() < eventually
            time.sleep(0.01)
        assert workers._now_serving(2, running, tmp_path) == Serving(2, (), stopped=(1,))
        assert workers._serving(running, tmp_path) == 1  # continued, it serves what it loaded: still counted
        os.kill(child.pid, signal.SIGCONT)
        while workers._stopped(child.pid):
            assert time.monotonic() < eventually
            time.sleep(0.01)
        assert workers._now_serving(2, running, tmp_path) == Serving(2, (1,))
        workers._stopping(tmp_path, child.pid).touch()  # what `Worker.stops_listening` leaves
        assert workers._now_serving(2, running, tmp_path) == Serving(2, (), stopping=(1,))
        assert workers._serving(running, tmp_path) == 0
        assert workers._starting({child.pid: (now, 1, True)}, tmp_path) == 0
    finally:
        child.kill()
        child.wait()
    assert not workers._stopped(child.pid)  # reaped: no child of ours


def test_the_published_stopped_and_stopping_workers_round_trip(tmp_path: Path) -> None:
    """`serving.json` carries the stopped and stopping workers (only when there are some: the plain figures read as
    before) and `Worker.serving` reads them back."""
    worker = Worker(1, tmp_path)
    workers._publish(tmp_path, Serving(3, (1,), stopped=(2,), stopping=(3,)), None)
    assert worker.serving() == Serving(3, (1,), stopped=(2,), stopping=(3,))
    workers._publish(tmp_path, Serving(3, (1, 2, 3)), None)
    assert json.loads((tmp_path / "serving.json").read_text()) == {"configured": 3, "serving": [1, 2, 3]}


def test_the_supervisors_count_is_written_whole_for_the_workers_and_only_when_it_changes(tmp_path: Path) -> None:
    """What `/metrics` and `/readyz` read (`Worker.serving`) is what the supervisor published last; a count unchanged
    is not written again; a file that is not the figures reads as none (no gauges, no `workers` key)."""
    worker = Worker(1, tmp_path)
    assert worker.serving() is None
    published = workers._publish(tmp_path, Serving(2, (1,)), None)
    assert published == worker.serving() == Serving(2, (1,))
    assert published is not None
    assert published.missing == [2]
    (tmp_path / "serving.json").write_text("garbage")
    assert workers._publish(tmp_path, Serving(2, (1,)), published) == published  # unchanged: not written
    assert worker.serving() is None
    assert workers._publish(tmp_path, Serving(2, (1, 2)), published) == worker.serving() == Serving(2, (1, 2))
    assert [p.name for p in tmp_path.iterdir()] == ["serving.json"]  # no `.new` left behind


def test_a_replacements_refusal_is_handed_to_the_supervisor_once(tmp_path: Path) -> None:
    """The problems a refusing replacement writes (`Worker.refused`) are what `worker_not_replaced` names, taken
    once; a worker that wrote none, or wrote what is no list, gives none."""
    worker = workers.Worker(2, tmp_path, replacement=True, serving_beside=(1,))
    worker.refused(["client_certificates.crls[0]: /etc/crl/issuing.crl: more than 67108864 bytes"])
    assert workers._refusal(workers.Worker(2, tmp_path)) == [
        "client_certificates.crls[0]: /etc/crl/issuing.crl: more than 67108864 bytes"
    ]
    assert workers._refusal(workers.Worker(2, tmp_path)) == []
    worker.refusal.write_text('{"not": "a list"}')
    assert workers._refusal(worker) == []


def test_a_worker_left_by_its_supervisor_removes_all_but_a_live_siblings_socket(tmp_path: Path) -> None:
    """What an orphaned worker leaves (`_leave`): a socket a live sibling listens on stays (it removes its own), a
    socket nothing answers on (a worker killed and never reaped), marks, refusals, the kept reload text and its lock
    go; the directory goes once nothing is left."""
    directory = tmp_path / "kcd-proxy-workers-x"
    directory.mkdir()
    live, dead = socket.socket(socket.AF_UNIX), socket.socket(socket.AF_UNIX)
    with live, dead:
        live.bind(str(directory / "2.sock"))
        live.listen()
        dead.bind(str(directory / "1.sock"))  # bound, never listening: refused, as a dead worker's
        for name in (
            "123.listening",
            "124.stopping",
            "1.refused",
            "serving.json",
            "reloaded.toml",
            ".reloaded.toml.lock",
        ):
            (directory / name).write_text("x")
        (directory / "shared").mkdir()  # a directory of the workers' files, should one come
        (directory / "shared" / "a").write_text("x")
        workers._leave(directory)
        assert sorted(p.name for p in directory.iterdir()) == ["2.sock"]
    (directory / "2.sock").unlink()  # the sibling's own, as it stops
    workers._leave(directory)
    assert not directory.exists()


_SYS_EXIT = {"x86_64": 60, "aarch64": 93}  # the exit system call: one thread ends, not the process (exit_group)
_FIRST_THREAD_ENDS = """
import ctypes, socket, sys, threading, time
s = socket.socket(socket.AF_UNIX)
s.bind(sys.argv[1])
s.listen()
threading.Thread(target=time.sleep, args=(120,)).start()  # holds the process, and its socket, after the first thread
print("ready", flush=True)
ctypes.CDLL(None).syscall(int(sys.argv[2]), 0)
"""


def _state(pid: int) -> str:
    """Process `pid`'s state as /proc/<pid>/stat gives it (its first thread's): "Z" for a zombie."""
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]


def test_a_worker_left_by_its_supervisor_removes_the_socket_of_a_sibling_killed_with_it(tmp_path: Path) -> None:
    """`kill -9` to the supervisor and a worker at once: the killed worker's socket still answered while the kernel
    ended its threads (its first thread a zombie, the others still holding its descriptors), so the surviving worker
    left it, and the directory stayed. The process answering is now asked whether it is ending (its peer credentials,
    then /proc): here one whose first thread has ended while another holds the socket, as under SIGKILL."""
    directory = tmp_path / "kcd-proxy-workers-x"
    directory.mkdir()
    path = directory / "1.sock"
    number = _SYS_EXIT[os.uname().machine]
    child = subprocess.Popen(
        [sys.executable, "-c", _FIRST_THREAD_ENDS, str(path), str(number)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline() == "ready\n"
        eventually(lambda: _state(child.pid) == "Z", "the first thread ended")
        with socket.socket(socket.AF_UNIX) as probe:
            probe.connect(str(path))  # it still answers
        workers._leave(directory)
        assert not directory.exists(), sorted(p.name for p in directory.iterdir())
    finally:
        child.kill()
        child.wait()


def test_a_start_removes_the_directories_of_gateways_killed_whole_and_no_other(tmp_path: Path) -> None:
    """`_sweep`: a private directory whose supervisor has gone (its pid and start time) and in which no socket answers
    is removed; one whose supervisor runs, one a worker still answers in, and one without the supervisor's file (being
    made, or an older gateway's) stay."""
    ended = subprocess.Popen(["true"])
    ended.wait()
    dead, alive, answering, unmarked = (tmp_path / f"kcd-proxy-workers-{n}" for n in ("a", "b", "c", "d"))
    for directory in (dead, alive, answering, unmarked):
        directory.mkdir()
        (directory / "serving.json").write_text("{}")
    for directory in (dead, answering):
        (directory / "supervisor").write_text(f"{ended.pid} 12345 {workers._pid_namespace()}")
    workers._mark_supervisor(alive)
    with socket.socket(socket.AF_UNIX) as worker:
        worker.bind(str(answering / "2.sock"))
        worker.listen()
        workers._sweep(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [p.name for p in (alive, answering, unmarked)]


def test_a_start_in_another_pid_namespace_leaves_a_live_gateways_directory(tmp_path: Path) -> None:
    """`_sweep` run in a container (its own PID namespace, /tmp shared with the host or another container): a live
    gateway's directory outside it stays. Its supervisor's pid means another process there (or none), and a worker's
    socket answers with peer pid 0 (SO_PEERCRED for a process the namespace cannot see): both were taken as dead and
    the live gateway's directory removed (its workers' sockets, the marks its supervisor counts them by)."""
    live, no_socket = (tmp_path / f"kcd-proxy-workers-{n}" for n in ("a", "b"))
    for directory in (live, no_socket):
        directory.mkdir()
        workers._mark_supervisor(directory)
    sweep = f"from pathlib import Path; from proxy import workers; workers._sweep(Path({str(tmp_path)!r}))"
    with socket.socket(socket.AF_UNIX) as worker:
        worker.bind(str(live / "1.sock"))
        worker.listen()
        subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c", sweep], check=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name, no_socket.name]


def test_a_directory_the_sweep_cannot_remove_is_not_logged_as_removed(tmp_path: Path) -> None:
    """`_sweep` on a read-only temp directory (a bind mount made read-only in a mount namespace of its own): a dead
    gateway's directory stays, and the log says so with the reason. It said `workers_directory_removed`."""
    ended = subprocess.Popen(["true"])
    ended.wait()
    dead = tmp_path / "kcd-proxy-workers-a"
    dead.mkdir()
    (dead / "supervisor").write_text(f"{ended.pid} 12345 {workers._pid_namespace()}")
    sweep = f"from pathlib import Path; from proxy import workers; workers._sweep(Path({str(tmp_path)!r}))"
    script = 'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" && exec "$2" -c "$3"'
    done = subprocess.run(
        ["unshare", "--mount", "sh", "-c", script, "sh", str(tmp_path), sys.executable, sweep],
        capture_output=True,
        text=True,
        check=True,
    )
    assert dead.exists()
    assert "workers_directory_removed" not in done.stdout, done.stdout
    assert "workers_directory_not_removed" in done.stdout, done.stdout
    assert "Read-only file system" in done.stdout, done.stdout


def test_a_start_that_cannot_read_proc_sweeps_nothing(tmp_path: Path) -> None:
    """`_sweep` where /proc cannot be read (here an empty tmpfs over it, in a mount namespace of its own): no pid's
    start time, no socket's peer and no PID namespace can be told, so a live gateway's directory, marked as one
    without /proc marks it, stays. It was removed: every supervisor looked gone and every worker ending."""
    live = tmp_path / "kcd-proxy-workers-a"
    live.mkdir()
    (live / "supervisor").write_text(f"{os.getpid()} {workers._started(os.getpid())} unknown")
    sweep = f"from pathlib import Path; from proxy import workers; workers._sweep(Path({str(tmp_path)!r}))"
    with socket.socket(socket.AF_UNIX) as worker:
        worker.bind(str(live / "1.sock"))
        worker.listen()
        subprocess.run(
            ["unshare", "--mount", "sh", "-c", 'mount -t tmpfs none /proc && exec "$0" -c "$1"', sys.executable, sweep],
            check=True,
        )
    assert live.exists()
