"""`[listener] worker_cpus`: a real `kcd-proxy run` with two workers pins each to its CPU (read back from
/proc/<pid>/status), a replacement takes the CPU of the worker it replaces, "auto" keeps to the CPUs the gateway was
started on (`taskset`), a CPU it may not use is refused, by `run` and by check-config, naming the key, and a
replacement whose CPU its cpuset no longer holds serves unpinned, saying so."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.lab.layout import LabLayout
from tests.integration.conftest import Gateway, curl, free_port, lab_config, start_gateway
from tests.integration.jsonlog import WAIT, eventually

pytestmark = [
    pytest.mark.skipif(
        len(os.sched_getaffinity(0)) < 2, reason="pinning two workers to two CPUs needs two CPUs this process may use"
    ),
    pytest.mark.slow(seconds=6),  # two workers started (a replacement after a 1 s pause), like test_workers.py
]


def _config(lab: LabLayout, worker_cpus: str, port: int = 0) -> str:
    port = port or free_port()
    text = lab_config(lab, port=port)
    bind = f'bind = "127.0.0.1:{port}"\n'
    return text.replace(bind, f"{bind}workers = 2\nworker_cpus = {worker_cpus}\n", 1)


def _cpus_allowed(pid: int) -> str:
    """The CPUs the kernel lets `pid` run on, as /proc writes them ("0", "0-1")."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Cpus_allowed_list:"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"no Cpus_allowed_list for {pid}")


def _started(gw: Gateway, count: int) -> list[dict[str, object]]:
    """The first `count` `worker_started` lines, each once its worker listens (pinned before it serves)."""
    started = gw.wait_events("worker_started", count)
    for pid in [line["worker"] for line in started]:
        gw.wait_event("listening", pid=pid)
    return started


@pytest.fixture
def cpus() -> tuple[int, int]:
    """Two CPUs this process may use, in order."""
    first, second = sorted(os.sched_getaffinity(0))[:2]
    return first, second


@pytest.fixture
def listed(lab: LabLayout, tmp_path: Path, cpus: tuple[int, int]) -> Iterator[Gateway]:
    gw = start_gateway(lab, tmp_path / "gw", _config(lab, f"[{cpus[1]}, {cpus[0]}]"))
    yield gw
    gw.stop()


def test_each_worker_runs_on_its_listed_cpu_and_a_replacement_on_its_predecessors(
    listed: Gateway, cpus: tuple[int, int]
) -> None:
    """worker_cpus = [b, a]: worker 1 on b alone, worker 2 on a alone (worker_started says so, /proc agrees), the
    supervisor unpinned; a worker killed is replaced on the same CPU."""
    gw = listed
    started = {line["number"]: line for line in _started(gw, 2)}
    assert {n: (line["cpu"], _cpus_allowed(int(str(line["worker"])))) for n, line in started.items()} == {
        1: (cpus[1], str(cpus[1])),
        2: (cpus[0], str(cpus[0])),
    }
    assert _cpus_allowed(gw.proc.pid) == _cpus_allowed(os.getpid())  # the supervisor as it was started

    killed = int(str(started[1]["worker"]))
    os.kill(killed, signal.SIGKILL)
    replacement = gw.wait_for("worker_started", lambda e: e.get("number") == 1 and e.get("worker") != killed)
    gw.wait_for("listening", lambda e: e.get("pid") == replacement["worker"], what="the replacement")
    assert replacement["cpu"] == cpus[1]
    assert _cpus_allowed(int(replacement["worker"])) == str(cpus[1])


@pytest.mark.parametrize("restricted", [False, True], ids=["every-cpu", "taskset"])
def test_auto_pins_the_workers_in_turn_to_the_cpus_the_gateway_may_use(
    lab: LabLayout, tmp_path: Path, cpus: tuple[int, int], restricted: bool
) -> None:
    """ "auto": worker 1 on the first CPU allowed, worker 2 on the second; started as `taskset -c b kcd-proxy run`,
    both on b (only the CPUs the gateway may use, as in a container's cpuset, wrapping around them)."""
    launcher = ("taskset", "-c", str(cpus[1]), sys.executable) if restricted else (sys.executable,)
    expected = [cpus[1], cpus[1]] if restricted else [cpus[0], cpus[1]]
    gw = start_gateway(lab, tmp_path / "gw", _config(lab, '"auto"'), launcher=launcher)
    try:
        started = sorted(_started(gw, 2), key=lambda line: int(str(line["number"])))
        assert [line["cpu"] for line in started] == expected
        assert [_cpus_allowed(int(str(line["worker"]))) for line in started] == [str(cpu) for cpu in expected]
    finally:
        gw.stop()


def test_a_cpu_the_gateway_may_not_use_is_refused_naming_the_key(
    lab: LabLayout, tmp_path: Path, cpus: tuple[int, int]
) -> None:
    """A listed CPU outside the allowed set (under `taskset -c a`, CPU b) is refused by check-config and by `run`
    (exit 1 and 2, as for any configuration they refuse; nothing forked), naming the key, the CPU and those allowed."""
    path = tmp_path / "gateway.toml"
    path.write_text(_config(lab, f"[{cpus[0]}, {cpus[1]}]"))
    expected = f"listener.worker_cpus: CPU {cpus[1]} not among the CPUs this process may use ({cpus[0]}:"
    for command, code in (("check-config", 1), ("run", 2)):
        argv = ["taskset", "-c", str(cpus[0]), sys.executable, "-m", "proxy", command]
        argv += [str(path)] if command == "check-config" else ["--config", str(path)]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60, env={**os.environ, **lab.env()})
        assert done.returncode == code, (command, done.stdout, done.stderr)
        assert expected in done.stdout + done.stderr, (command, done.stdout, done.stderr)
        assert "worker_started" not in done.stdout + done.stderr


def test_a_lone_gateway_is_worker_1(lab: LabLayout, tmp_path: Path, cpus: tuple[int, int]) -> None:
    """workers = 1 with worker_cpus = [b, a]: the one process (no supervisor) serves pinned to b, every thread."""
    gw = start_gateway(
        lab, tmp_path / "gw", _config(lab, f"[{cpus[1]}, {cpus[0]}]").replace("workers = 2", "workers = 1")
    )
    try:
        gw.wait_event("listening", pid=gw.proc.pid)
        threads = list(Path(f"/proc/{gw.proc.pid}/task").iterdir())
        assert {_cpus_allowed(int(task.name)) for task in threads} == {str(cpus[1])}
    finally:
        gw.stop()


CGROUP_V1_CPUSET = Path("/sys/fs/cgroup/cpuset")  # cgroup v1's cpuset hierarchy (this lab's kernel: hybrid cgroups)
CGROUP_V2 = Path("/sys/fs/cgroup")


def _cpuset_parent() -> Path | None:
    """A cpuset cgroup directory this process may make a child in (v2's root with `cpuset` among its controllers, or
    v1's cpuset hierarchy), or None."""
    controllers = CGROUP_V2 / "cgroup.controllers"
    if controllers.exists() and "cpuset" in controllers.read_text().split():
        return CGROUP_V2 if os.access(CGROUP_V2 / "cgroup.subtree_control", os.W_OK) else None
    if (CGROUP_V1_CPUSET / "cpuset.cpus").exists() and os.access(CGROUP_V1_CPUSET, os.W_OK):
        return CGROUP_V1_CPUSET
    return None


@pytest.fixture
def cpuset(cpus: tuple[int, int]) -> Iterator[Path]:
    """A cpuset cgroup of its own holding the two CPUs (the parent's `+cpuset` enabled first under v2, and disabled
    again after if it was not), removed once every process in it has ended."""
    parent = _cpuset_parent()
    if parent is None:
        pytest.skip("no cpuset cgroup this process may make a child in (cgroup v2 with cpuset, or v1's, as root)")
    subtree = parent / "cgroup.subtree_control"
    enabled = parent == CGROUP_V2 and "cpuset" not in subtree.read_text().split()
    if enabled:
        subtree.write_text("+cpuset")
    group = parent / f"kcd-test-{uuid.uuid4().hex[:8]}"
    group.mkdir()
    try:
        (group / "cpuset.cpus").write_text(f"{cpus[0]},{cpus[1]}")
        if parent == CGROUP_V1_CPUSET:  # v1 takes no process before its memory nodes are set
            (group / "cpuset.mems").write_text((parent / "cpuset.mems").read_text())
        yield group
    finally:
        deadline = time.monotonic() + WAIT
        while (group / "cgroup.procs").read_text().strip() and time.monotonic() < deadline:
            time.sleep(0.05)  # polled: the gateway's processes leave it as they are reaped
        group.rmdir()
        if enabled:
            with contextlib.suppress(OSError):  # busy if another child took cpuset meanwhile: left as it is then
                subtree.write_text("-cpuset")


def test_a_replacement_whose_cpu_the_cpuset_no_longer_holds_serves_unpinned_naming_it(
    lab: LabLayout, tmp_path: Path, cpus: tuple[int, int], cpuset: Path
) -> None:
    """ "auto" in a cpuset cgroup of two CPUs a and b: worker 2 pinned to b. The operator narrows the cpuset to a, and
    worker 2 is killed: its replacement cannot pin itself to b, says so (`worker_not_pinned`, naming b and what it may
    use, a) and serves, on a."""
    script = f'echo $$ > "{cpuset / "cgroup.procs"}" && exec "$@"'
    launcher = ("sh", "-c", script, "sh", sys.executable)
    gw = start_gateway(lab, tmp_path / "gw", _config(lab, '"auto"'), launcher=launcher)
    try:
        started = {line["number"]: line for line in _started(gw, 2)}
        assert started[2]["cpu"] == cpus[1], started
        assert str(gw.proc.pid) in (cpuset / "cgroup.procs").read_text().split()
        (cpuset / "cpuset.cpus").write_text(str(cpus[0]))
        killed = int(str(started[2]["worker"]))
        gw.mark()
        os.kill(killed, signal.SIGKILL)
        replacement = gw.wait_for("worker_started", lambda e: e.get("number") == 2 and e.get("worker") != killed)
        pid = int(str(replacement["worker"]))
        unpinned = gw.wait_event("worker_not_pinned", pid=pid)
        assert (unpinned["cpu"], unpinned["allowed"]) == (cpus[1], str(cpus[0])), unpinned
        gw.wait_event("listening", pid=pid)
        assert _cpus_allowed(pid) == str(cpus[0])

        def served_by_the_replacement() -> bool:
            done = curl(lab, gw.url + "/owa/", "alice")
            assert done.stdout.endswith("\n200"), (done.stdout[-300:], done.stderr)
            return any(e["pid"] == pid for e in gw.events("request", gw.since))

        eventually(served_by_the_replacement, "a request served by the replacement")
    finally:
        gw.stop()
