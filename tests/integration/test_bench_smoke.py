"""`make bench` runs its whole course on a tiny scale: every phase ends and writes the figures the README uses.

No figure is judged here (timings never go into `make test`); what is pinned is that each measurement ran and
produced its keys: the fixed-rate run of bench.paced, the asyncio column, two workers against one (nginx's too),
the held long-polls and where their memory goes (bench.traced). The bench's tools (nginx, wrk, gcc, libssl-dev) come
from `make bench-setup`, which `make test` runs first.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _stall_the_kdc_as_two_workers_start(scene: Path, bench: subprocess.Popen[str]) -> None:
    """SIGSTOP the scene's KDC for 3 s (the scenario: a KDC slow to answer) once the scaling phase's two-worker
    gateway says it listens, so that its workers' first requests wait for tickets; nothing if the bench ends first."""
    log = scene / "gateway2.log"
    while '"listening"' not in (log.read_text(errors="replace") if log.exists() else ""):
        if bench.poll() is not None:
            return
        time.sleep(0.01)
    kdc = int((scene / "lab" / "run" / "krb5kdc.pid").read_text())
    os.kill(kdc, signal.SIGSTOP)
    try:
        time.sleep(3)
    finally:
        os.kill(kdc, signal.SIGCONT)


@pytest.mark.slow(seconds=85)
def test_a_tiny_bench_run_writes_every_new_figure(tmp_path: Path) -> None:
    """Each phase runs end to end against real nginx, the real gateway (uvloop, the default, and asyncio) and the
    plain proxy; the JSON has the fixed-rate latencies, the scaling ratio, the asyncio column, the held columns each
    warmed with every user, and the memory breakdown; the report prints the plain aiohttp proxy as a column beside
    kcd-proxy and nginx with the ratio to nginx, each of issue 7's four measurements, and where the JSON went. The
    scene's KDC stalls for 3 s as the two-worker gateway starts: the scaling phase measures its workers warm (their
    first S4U2Self and S4U2Proxy waited for), not 0 requests in a 1 s run, as on a loaded machine before; the workers
    pinned by `listener.worker_cpus` are measured beside them, paired."""
    out = tmp_path / "bench.json"
    argv = [sys.executable, "-u", "-m", "bench.run", "--seconds", "1", "--rounds", "1", "--held", "40"]
    argv += ["--users", "4", "--traced", "20", "--rate", "100", "--settle", "1", "--json", str(out)]
    bench = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert bench.stdout is not None
    first = bench.stdout.readline()  # "bench: scene in <root>; ..."
    scene = Path(first.removeprefix("bench: scene in ").partition(";")[0])
    stall = threading.Thread(target=_stall_the_kdc_as_two_workers_start, args=(scene, bench), daemon=True)
    stall.start()
    try:
        stdout, stderr = bench.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        bench.kill()
        raise
    stall.join(timeout=60)
    run = subprocess.CompletedProcess(argv, bench.returncode, first + stdout, stderr)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    figures = json.loads(out.read_text())
    # issue 18: the plain aiohttp proxy is a column beside kcd-proxy and nginx, in the JSON and the printed report
    for column in ("gateway", "plain", "nginx"):
        assert figures["keepalive"][column][0]["requests"] > 0, column
    heads = next(line.split() for line in run.stdout.splitlines() if "kcd/ngx" in line)
    assert {"kcd-proxy", "aiohttp", "nginx"} <= set(heads), heads
    for section in ("1. keep-alive", "2. a new TLS connection", "3. held long-polls", "4. KDC requests per 1,000"):
        assert section in run.stdout, section
    assert f"bench: figures in {out}" in run.stdout
    for column in ("gateway", "gateway_asyncio", "plain", "nginx"):
        paced = figures["paced"][column]
        assert paced["answered"] == paced["sent"] == 100, paced
        assert paced["errors"] == 0
        assert paced["p50_ms"] <= paced["p99_ms"] <= paced["max_ms"]
    assert figures["keepalive"]["gateway_asyncio"][0]["requests"] > 0
    assert figures["handshakes"]["gateway_asyncio"][0]["requests"] > 0
    assert figures["scaling"]["throughput_ratio"] > 0
    assert figures["scaling"]["two_workers"]["runs"][0]["errors"] == 0
    assert figures["scaling"]["two_workers"]["machine_cores_busy"] > 0
    # the same two shared cores for nginx (the reference's own ratio), and what each run's CPU went to
    assert figures["scaling"]["nginx"]["throughput_ratio"] > 0
    assert figures["scaling"]["nginx"]["two_workers"]["runs"][0]["errors"] == 0
    assert figures["scaling"]["ceiling"] > 0
    two_workers = figures["scaling"]["two_workers"]["runs"][0]
    assert two_workers["wrk_us"] > 0
    assert two_workers["backend_us"] > 0
    assert len(two_workers["requests_per_worker"]) == 2, two_workers  # both workers served (50 connections)
    # the two workers pinned by `listener.worker_cpus = "auto"`, paired run by run with the unpinned ones
    pinned = figures["scaling"]["two_pinned"]
    assert pinned["runs"][0]["errors"] == 0
    assert len(pinned["runs"][0]["requests_per_worker"]) == 2, pinned
    assert pinned["paired_rate_ratio"] > 0
    assert "kcd-proxy pinned / unpinned, paired run by run:" in run.stdout
    assert figures["held"]["gateway_asyncio"]["held"] == 40
    # every held column (and the traced gateway) met all the users before its idle RSS was read
    for column in ("nginx", "gateway", "gateway_aiohttp", "gateway_asyncio", "gateway_nocache"):
        assert figures["held"][column]["warmed"] == 4, figures["held"][column]
    breakdown = figures["held_breakdown"]
    assert breakdown["held"] == 20
    assert breakdown["warmed"] == 4
    assert "outside_python_of_gateway_kib" in breakdown
    # files named as parts (bench.run.module_of): the device connection of each held request is there
    # (asyncio's sslproto.py was, until proxy.tls.record took the connection from it after the handshake)
    assert "proxy/device/server.py" in breakdown["python_by_file_kib"], breakdown
    assert figures["versions"]["uvloop"] != "not installed"


@pytest.mark.slow(seconds=40)
@pytest.mark.parametrize(("mode", "routes"), [([], ("default", "bound")), (["--handshakes"], ("handshakes",))])
def test_a_tiny_paired_run_writes_its_ratios(tmp_path: Path, mode: list[str], routes: tuple[str, ...]) -> None:
    """bench.paired runs this tree's gateway twice and a baseline tree's once, on both routes (with `--handshakes`,
    the default route with a new connection per request), and writes per route each gateway's CPU per request and
    the three paired ratios (this / baseline, again / baseline, the A/A again / this) with their rounds; no figure is
    judged."""
    baseline = tmp_path / "baseline"
    shutil.copytree(REPO / "proxy", baseline / "proxy", ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path / "paired.json"
    argv = [sys.executable, "-m", "bench.paired", "--baseline", str(baseline), "--rounds", "1", "--seconds", "1"]
    argv += ["--users", "1", "--json", str(out), *mode]
    run = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert set(routes) <= figures.keys()
    for route in routes:
        assert set(figures[route]["cpu_us"]) == {"this", "again", "baseline"}, figures[route]
        assert figures[route]["errors"] == {"this": 0, "again": 0, "baseline": 0}, figures[route]
        for pair in ("this/baseline", "again/baseline", "again/this"):
            assert figures[route]["paired"][pair]["rounds"] == 1, (route, pair)
        assert f"{route} route:" in run.stdout
    assert {"load_before", "load_after", "date"} <= figures.keys()
    assert f"bench.paired: figures in {out}" in run.stdout
