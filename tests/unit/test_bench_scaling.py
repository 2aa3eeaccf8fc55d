"""bench.run's and bench.scaling's view of two workers: connections per process (ss), placement, CPU per worker."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from bench.run import ScalingRun, WrkResult, connections_per_process, place, workers_of
from bench.scaling import paired_rates, python_view


def test_connections_per_process_counts_the_accepted_sockets_of_this_process() -> None:
    """Three connections accepted on a port are three for this process, as `ss -p` sees them."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
        accepted = [server.accept()[0] for _ in clients]
        try:
            assert connections_per_process(port) == {os.getpid(): 3}
        finally:
            for s in clients + accepted:
                s.close()


def test_place_pins_a_process_tree_and_releases_it() -> None:
    """`place` puts a process and its child on the cores named, and on every core for ""."""
    parent = subprocess.Popen(["sh", "-c", "sleep 30 & echo $!; wait"], stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    try:
        deadline = time.monotonic() + 10
        while workers_of(parent.pid) != [child]:  # the shell's child, as /proc lists it once forked
            assert time.monotonic() < deadline, "the child sleep never showed in /proc"
            time.sleep(0.01)
        place(parent.pid, "0")
        assert os.sched_getaffinity(parent.pid) == os.sched_getaffinity(child) == {0}
        place(parent.pid, "")
        assert os.sched_getaffinity(child) == set(range(os.cpu_count() or 1))
    finally:
        os.kill(child, signal.SIGKILL)
        parent.kill()
        parent.wait()


def test_each_workers_cpu_per_request_comes_from_its_own_cpu_and_lines() -> None:
    """Each worker's µs a request is its own CPU over the summary lines it wrote; cores are its CPU over the run."""
    result = WrkResult(requests=3000, seconds=2.0, p50_ms=1, p99_ms=2, errors=0, cpu_s=0.75)
    run = ScalingRun(result, 2.0, 0.06, 0.09, {11: 1000, 12: 2000}, {11: 0.25, 12: 0.5}, {11: 20, 12: 30})
    figures = run.figures()
    assert figures["worker_us"] == [250.0, 250.0]
    assert figures["worker_cores"] == [0.125, 0.25]
    assert figures["connections_per_worker"] == [20, 30]
    assert figures["wrk_us"] == pytest.approx(20.0)
    assert figures["backend_us"] == pytest.approx(30.0)


def test_python_view_finds_the_shared_table_in_a_workers_stacks(tmp_path: Path) -> None:
    """py-spy's raw lines: the share of stacks through proxy/auth/shared.py, and the function most often on top."""
    raw = tmp_path / "raw.txt"
    raw.write_text(
        "run (proxy/workers.py:90);serve (proxy/app.py:600);generation (proxy/auth/shared.py:231) 1\n"
        "run (proxy/workers.py:90);serve (proxy/app.py:600);_flush (proxy/tls/record.py:240) 3\n"
    )
    view = python_view(raw)
    assert "4 samples" in view
    assert "proxy/auth/shared.py 25.0%" in view
    assert "on top: _flush (proxy/tls/record.py:240) 75.0%" in view


def test_paired_rates_compare_the_pinned_workers_with_the_unpinned_and_the_a_a_control() -> None:
    """Each round: pinned over two, over two_again (the A/A control) and over both; two_again over two (the noise)."""

    def part(*rates: float) -> dict[str, Any]:
        return {"runs": [{"rate": r, "cpu_us": 1e6 / r, "cpu_s": 1.0, "backend_us": 50.0} for r in rates]}

    paired = paired_rates({"two": part(100, 200), "two_again": part(110, 180), "two_pinned": part(120, 270)})
    assert paired["two_again / two, requests/s, each round"] == [1.1, 0.9]
    assert paired["two_pinned / two, requests/s, each round"] == [1.2, 1.35]
    assert paired["two_pinned / two_again, requests/s, each round"] == [1.091, 1.5]
    assert paired["two_pinned / two_again, rounds above 1"] == "2 of 2"
    assert paired["two_pinned / two, requests/s, geometric mean"] == pytest.approx((1.2 * 1.35) ** 0.5)
    assert paired["two_pinned / both unpinned (geometric mean of two and two_again), requests/s"] == pytest.approx(
        (120 / (100 * 110) ** 0.5 + 270 / (200 * 180) ** 0.5) / 2
    )
