"""`make bench`: kcd-proxy against nginx, side by side, in one run on this machine.

Builds its scene (bench.scene: the lab, 500 bench users, a static 1 KiB backend, a long-poll backend,
nginx as an mTLS reverse proxy, the gateway) in a temporary directory and measures:

1. keep-alive: wrk, 50 connections, 1 KiB responses: requests/s, p50/p99 latency at saturation (wrk is
   closed-loop: these p99s carry coordinated omission), CPU per request;
2. handshakes: a new TLS connection with a client certificate per request, no session resumption:
   handshakes/s and CPU per handshake;
   2b. a fixed rate (--rate, 500/s) over 50 keep-alive connections, open loop (bench.paced): p50/p99 from
       each request's due time, for kcd-proxy, kcd (asyncio), plain aiohttp and nginx (medians of the rounds);
   2c. two workers (`listener.workers = 2`, unpinned, wrk too; the backend stays on the load core) against one
       worker pinned to a core (wrk and the backend on the other), with each worker's CPU per request;
3. held long-polls: N requests held open at once (X-Lab-Hold-Seconds): memory per held request, and
   the latency of a new request while they are held; then on a gateway run under tracemalloc
   (bench.traced), where its Python memory goes, by file and line. Each of these processes is first warmed
   with one request from every user and left `--settle` seconds (its idle backend connections closed)
   before its idle RSS is read, so every column starts from the same state;
4. KDC requests per 1,000 gateway requests, for 1 user and for 500 distinct users (lab KDC log).

"kcd (asyncio)" is the same gateway with `listener.event_loop = "asyncio"` (uvloop is the default);
"kcd (aiohttp)" is the same gateway with `listener.http_server = "aiohttp"` (aiohttp's web server parsing the
devices' requests instead of the gateway's own, runs 1 and 2).

The proxy under test and nginx run pinned to one core (one worker each); wrk and the backends to the
other, so "per core" means what it says. wrk presents client certificates through an LD_PRELOAD shim
(bench/certshim.c, compiled here). CPU is read from /proc for the proxy's processes, so CPU per
request does not depend on whether the load generator kept up. Each figure is printed with its ratio
to nginx's, and the issue's target.

    python -m bench.run [--seconds 10] [--held 4000] [--users 500] [--rate 500] [--traced 1000] [--keep]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import resource
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from statistics import median
from typing import Any

import aiohttp

from bench.scene import REPO, Scene
from proxy.backend.client import KEEPALIVE_SECONDS
from proxy.lab.kdclog import S4U2PROXY, S4U2SELF, KdcLog

TICK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


# -- /proc: CPU and memory of a process tree ---------------------------------------------------------


def tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        for task in Path(f"/proc/{p}/task").glob("*/children"):
            todo.extend(int(c) for c in task.read_text().split())
    return pids


def cpu_seconds(pid: int) -> float:
    total = 0
    for p in tree(pid):
        fields = Path(f"/proc/{p}/stat").read_text().rpartition(")")[2].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / TICK


def rss_bytes(pid: int) -> int:
    return sum(int(Path(f"/proc/{p}/statm").read_text().split()[1]) * PAGE for p in tree(pid))


# -- wrk -------------------------------------------------------------------------------------------


@dataclass
class WrkResult:
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    errors: int  # socket errors and non-2xx answers
    cpu_s: float  # CPU of the proxy under test during the run

    @property
    def rate(self) -> float:
        return self.requests / self.seconds

    @property
    def cpu_us(self) -> float:
        return self.cpu_s / max(self.requests, 1) * 1e6


_UNITS_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}  # the units of wrk's format_time_us


def _ms(value: str) -> float:
    """A time as wrk prints it ("850.00us", "9.51ms", "1.24s", "2.50m"), in milliseconds."""
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", value).groups()  # type: ignore[union-attr]
    return float(number) * _UNITS_MS[unit]


def wrk_command(
    scene: Scene, url: str, *, seconds: float, connections: int, certs: Path, args: list[str], pinned: bool
) -> tuple[list[str], dict[str, str]]:
    """wrk's argv and environment (the certificate shim preloaded) for a run against `url`."""
    env = {**os.environ, "LD_PRELOAD": str(scene.root / "certshim.so"), "KCD_SHIM_CERTS": str(certs)}
    if "Connection: close" in args:
        env["KCD_SHIM_NO_RESUME"] = "1"
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--latency", "--timeout", "30s", *args, url]
    if scene.cores[1] and pinned:
        argv = ["taskset", "-c", scene.cores[1], *argv]
    return argv, env


def wrk(
    scene: Scene,
    proxy: str,
    url: str,
    *,
    seconds: float,
    connections: int,
    certs: Path,
    args: list[str],
    pinned: bool = True,
) -> WrkResult:
    argv, env = wrk_command(scene, url, seconds=seconds, connections=connections, certs=certs, args=args, pinned=pinned)
    pid = scene.procs[proxy].pid
    before = cpu_seconds(pid)
    out = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=seconds + 120, check=True).stdout
    return replace(parse_wrk(out), cpu_s=cpu_seconds(pid) - before)


def parse_wrk(out: str) -> WrkResult:
    """What wrk's text output (`--latency`) says: requests, seconds, p50 and p99, errors (`cpu_s` 0).

    wrk prints a time in the unit that suits it (us, ms, s, m, h), and pads a one-letter unit with a space to line
    up with the two-letter ones: on a loaded machine a p99 of "1.24s " ends its line in a space."""
    done = re.search(r"(\d+) requests in ([\d.]+(?:us|ms|s|m|h)),", out)
    latency = dict(re.findall(r"^\s+(50|99)%\s+(\S+)\s*$", out, re.MULTILINE))
    if done is None or latency.keys() != {"50", "99"}:
        raise RuntimeError(f"wrk said:\n{out}")
    elapsed = _ms(done.group(2)) / 1e3
    errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors += int(non2xx.group(1)) if non2xx else 0
    return WrkResult(int(done.group(1)), elapsed, _ms(latency["50"]), _ms(latency["99"]), errors, 0.0)


# -- Python clients: exact request counts, many identities -------------------------------------------


def client_context(scene: Scene, cert: Path, key: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(scene.layout.pki_dir / "root.pem"))
    ctx.load_cert_chain(cert, key)
    return ctx


async def requests_as(scene: Scene, url: str, users: list[tuple[str, Path, Path]], per_user: int) -> int:
    """`per_user` requests for each user, on one keep-alive connection per user; returns how many got 200."""
    ok = 0

    async def one_user(cert: Path, key: Path) -> None:
        nonlocal ok
        ctx = client_context(scene, cert, key)
        async with aiohttp.ClientSession() as session:
            for _ in range(per_user):
                async with session.get(url, ssl=ctx) as r:
                    await r.read()
                    ok += r.status == 200

    sem = asyncio.Semaphore(50)

    async def bounded(cert: Path, key: Path) -> None:
        async with sem:
            await one_user(cert, key)

    await asyncio.gather(*(bounded(cert, key) for _, cert, key in users))
    return ok


def kdc_per_1000(scene: Scene, users: list[tuple[str, Path, Path]]) -> tuple[float, float, int]:
    """(TGS exchanges, AS exchanges) per 1,000 gateway requests spread over `users`; and the 200s."""
    per_user = 1000 // len(users)
    kdc = KdcLog(scene.layout.kdc_log)
    url = f"https://127.0.0.1:{scene.ports['gateway']}/EWS/Exchange.asmx"
    ok = asyncio.run(requests_as(scene, url, users, per_user))
    counts = kdc.count()
    for request in kdc.settled():
        assert request.extension in (S4U2SELF, S4U2PROXY, None)
    scale = 1000 / (per_user * len(users))
    return counts["TGS_REQ"] * scale, counts["AS_REQ"] * scale, ok


# -- held long-polls ---------------------------------------------------------------------------------


@dataclass
class Held:
    held: int
    rss_idle: int
    rss_held: int
    new_request_ms: float  # a new request on a new connection while the others are held
    cpu_s: float
    warmed: int = 0  # users whose warm-up request (`warm`) was answered before `rss_idle` was read
    rss_warmed: int = 0  # RSS right after the warm-up, before the idle backend pools were left to close

    @property
    def per_held_kib(self) -> float:
        return (self.rss_held - self.rss_idle) / max(self.held, 1) / 1024


def held_count(scene: Scene) -> int:
    out = subprocess.run(
        ["curl", "-s", f"http://127.0.0.1:{scene.ports['holdback']}/_held"], capture_output=True, text=True, check=False
    )
    return int(out.stdout or 0)


def timed_request(scene: Scene, port: int) -> float:
    """Milliseconds for one request on a new connection (NaN if it failed), e.g. while others are held."""
    _, cert, key = scene.users[0]
    url = f"https://127.0.0.1:{port}/EWS/Exchange.asmx"
    cmd = ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code} %{time_total}", "--max-time", "30"]
    cmd += ["--cacert", str(scene.layout.pki_dir / "root.pem"), "--cert", str(cert), "--key", str(key), url]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False).stdout
    code, _, total = out.partition(" ")
    if code != "200":
        print(f"bench: a request on a new connection to 127.0.0.1:{port} failed: {out or 'no answer'}")
        return float("nan")
    return float(total) * 1000


@dataclass(frozen=True)
class Warmed:
    answered: int  # users whose warm-up request got a 200
    rss: int  # the proxy's RSS right after the warm-up


def warm(scene: Scene, proxy: str, users: list[tuple[str, Path, Path]]) -> Warmed:
    """One request from each user through `proxy`'s long-poll route, answered at once (no hold header): every
    held column then starts from the state a gateway whose devices synced before they held a Ping is in (each
    user's ticket, evidence, chain and directory memos, its pool's entry), not from a first sight that would count
    as held memory. Each user's request runs on a connection of its own, closed afterwards."""
    url = f"https://127.0.0.1:{scene.ports[proxy]}/hold/ping"
    answered = asyncio.run(requests_as(scene, url, users, 1))
    return Warmed(answered, rss_bytes(scene.procs[proxy].pid))


def hold(
    scene: Scene,
    proxy: str,
    count: int,
    certs: Path,
    *,
    step: int = 500,
    while_held: Callable[[], None] | None = None,
    warmed: Warmed | None = None,
) -> Held:
    """Hold `count` long-polls on `proxy`, opened `step` at a time (a wrk each) as fast as it takes them.

    Opening all at once would measure a reconnect storm instead: a single gateway process spends about
    3 ms of CPU on each TLS handshake with a client certificate, so 10,000 at once keep its event loop
    busy for half a minute, and the backend connections of the first requests time out meanwhile.
    """
    port = scene.ports[proxy]
    pid = scene.procs[proxy].pid
    rss_idle = rss_bytes(pid)
    cpu_before = cpu_seconds(pid)
    hold_seconds = 600
    env = {**os.environ, "LD_PRELOAD": str(scene.root / "certshim.so"), "KCD_SHIM_CERTS": str(certs)}
    loads: list[subprocess.Popen[bytes]] = []
    try:
        for opened in range(0, count, step):
            argv = ["wrk", "-t1", f"-c{min(step, count - opened)}", f"-d{hold_seconds}s", "--timeout", "900s"]
            argv += ["-H", f"X-Lab-Hold-Seconds: {hold_seconds}", f"https://127.0.0.1:{port}/hold/ping"]
            if scene.cores[1]:
                argv = ["taskset", "-c", scene.cores[1], *argv]
            quiet = subprocess.DEVNULL
            loads.append(subprocess.Popen(argv, stdout=quiet, stderr=quiet, env=env, start_new_session=True))
            target = min(opened + step, count)
            deadline = time.monotonic() + 60
            while held_count(scene) < target and time.monotonic() < deadline:
                time.sleep(0.2)
        time.sleep(2)
        rss_held = rss_bytes(pid)
        if while_held is not None:
            while_held()
        new_ms = timed_request(scene, port)
        held = held_count(scene)
        cpu = cpu_seconds(pid) - cpu_before
    finally:
        for load in loads:
            os.killpg(load.pid, 9)
            load.wait()
    deadline = time.monotonic() + 60
    while held_count(scene) > 0 and time.monotonic() < deadline:
        time.sleep(0.5)
    before = warmed or Warmed(0, 0)
    return Held(held, rss_idle, rss_held, new_ms, cpu, before.answered, before.rss)


# -- at a fixed rate (open loop) --------------------------------------------------------------------


def paced(scene: Scene, proxy: str, url: str, *, rate: float, seconds: float, certs: Path) -> dict[str, float]:
    """bench.paced on the load core: `rate` requests/s over 50 keep-alive connections, latency from each
    request's due time (no coordinated omission); with the proxy's CPU per request meanwhile."""
    argv = [sys.executable, "-m", "bench.paced", "--url", url, "--rate", f"{rate:g}", "--connections", "50"]
    argv += ["--seconds", f"{seconds:g}", "--cacert", str(scene.layout.pki_dir / "root.pem"), "--certs", str(certs)]
    if os.geteuid() == 0:  # punctual first: a late generator adds its lateness to every proxy's figures
        argv = ["nice", "-n", "-10", *argv]
    if scene.cores[1]:
        argv = ["taskset", "-c", scene.cores[1], *argv]
    pid = scene.procs[proxy].pid
    before = cpu_seconds(pid)
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 120, check=True, cwd=REPO).stdout
    figures: dict[str, float] = json.loads(out)
    figures["cpu_us"] = (cpu_seconds(pid) - before) / max(figures["answered"], 1) * 1e6
    return figures


def paced_summary(runs: list[dict[str, float]]) -> dict[str, object]:
    """The median of each figure over the rounds; requests sent, answered and failed summed; the runs kept."""
    out: dict[str, object] = {key: median(run[key] for run in runs) for key in runs[0]}
    out.update({key: sum(run[key] for run in runs) for key in ("sent", "answered", "errors")})
    out["runs"] = runs
    return out


# -- two workers on two cores against one on one ------------------------------------------------------


def machine_busy() -> tuple[float, float]:
    """(busy CPU seconds of the whole machine, all cores, since boot; the time): to see what the neighbours took."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    ticks = [int(x) for x in fields]
    idle = ticks[3] + ticks[4]  # idle, iowait
    return (sum(ticks[:8]) - idle) / TICK, time.monotonic()


def answering_pids(log: Path) -> set[int]:
    """The processes (`pid`) of a gateway's log that wrote a `request` line with status 200."""
    pids = set()
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("{") and '"event":"request"' in line:
            event = json.loads(line)
            if event.get("status") == 200:
                pids.add(int(event["pid"]))
    return pids


def warm_workers(scene: Scene, proxy: str, url: str, *, workers: int, certs: Path, timeout: float = 120) -> None:
    """wrk on `proxy` (2 s, as the other columns' warm-up) until each of its `workers` processes has answered 200.
    A worker's first requests wait for its first handshakes and its own S4U2Self and S4U2Proxy (each worker has its
    ticket cache): measured cold, a short run on a loaded machine ended before the first answer (0 requests in the
    tiny bench of tests/integration/test_bench_smoke.py at load 15), and a long one counted that wait as throughput
    lost to the second worker."""
    log = scene.root / f"{proxy}.log"
    deadline = time.monotonic() + timeout
    while True:
        argv, env = wrk_command(scene, url, seconds=2, connections=50, certs=certs, args=[], pinned=False)
        subprocess.run(argv, capture_output=True, env=env, timeout=120, check=True)  # its figures are not read
        answered = answering_pids(log)
        if len(answered) >= workers:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{proxy}: {len(answered)} of its {workers} workers answered after {timeout:g} s")


def requests_per_worker(log: Path, since: int) -> dict[int, int]:
    """Summary lines (`"event":"request"`) per worker pid in a gateway's log written after byte `since`: how evenly
    the kernel spread wrk's connections (SO_REUSEPORT) over the workers."""
    counts: dict[int, int] = {}
    with log.open("rb") as f:
        f.seek(since)
        for line in f:
            found = re.search(rb'"pid":(\d+)', line) if b'"event":"request"' in line else None
            if found:
                counts[int(found.group(1))] = counts.get(int(found.group(1)), 0) + 1
    return counts


def workers_of(pid: int) -> list[int]:
    """The processes that serve for `pid`: its children (a gateway's supervisor, nginx's master), or itself."""
    children = [int(c) for task in Path(f"/proc/{pid}/task").glob("*/children") for c in task.read_text().split()]
    return children or [pid]


def place(pid: int, cores: str) -> None:
    """Let every thread of `pid` and its children run on `cores` ("1", "0,1"; "" for every core of the machine)."""
    cpus = {int(c) for c in cores.split(",")} if cores else set(range(os.cpu_count() or 1))
    for p in tree(pid):
        for task in Path(f"/proc/{p}/task").iterdir():
            os.sched_setaffinity(int(task.name), cpus)


def connections_per_process(port: int) -> dict[int, int]:
    """Established TCP connections on local port `port`, counted per process holding them (`ss -p`): how the
    kernel's SO_REUSEPORT hash spread wrk's connections over a proxy's workers."""
    out = subprocess.run(
        ["ss", "-Htnp", "state", "established", f"( sport = :{port} )"], capture_output=True, text=True, check=False
    ).stdout
    counts: dict[int, int] = {}
    for pid in re.findall(r"pid=(\d+)", out):
        counts[int(pid)] = counts.get(int(pid), 0) + 1
    return counts


@dataclass(frozen=True)
class Arrangement:
    """Where a scaling run places what: the proxy process (`proxy`, its own placement fixed when it started), wrk
    (`pinned`: on the load core, else anywhere) and the static backend during the run (`backend_cores`: a taskset
    list, "" for every core; the scene starts it on the load core); `worker_cores`, if any, the cores of each worker
    during the run (worker i on the i-th: one core each, as nginx's `worker_cpu_affinity auto` would; "" to release
    a worker started pinned), each put back as it was after the run; `setting`, the proxy's own `listener.worker_cpus`
    if it pins its workers itself (its TOML value, for the report)."""

    proxy: str
    url: str
    pinned: bool
    backend_cores: str
    worker_cores: tuple[str, ...] = ()
    setting: str = ""

    def placement(self, scene: Scene) -> str:
        """Where each process ran, in words, for the report."""
        proxy_cores = scene.cores[0] if self.pinned else "any"
        if self.worker_cores:
            proxy_cores = " and ".join(c or "any" for c in self.worker_cores) + " (worker by worker)"
        if self.setting:
            proxy_cores = f"0 and 1 (worker by worker: listener.worker_cpus = {self.setting})"
        wrk_cores = scene.cores[1] if self.pinned else "any"
        return f"proxy on CPU {proxy_cores}, wrk on CPU {wrk_cores}, backend on CPU {self.backend_cores or 'any'}"


@dataclass
class ScalingRun:
    """One wrk run of the scaling phase, with what every process of the scene took meanwhile."""

    result: WrkResult
    machine_cores_busy: float  # the whole machine's busy cores (/proc/stat)
    wrk_cpu_s: float  # the load generator's own CPU
    backend_cpu_s: float  # the static backend's (nginx) CPU
    per_worker: dict[int, int]  # requests per gateway worker (pid), from the summary lines; empty for nginx
    worker_cpu_s: dict[int, float]  # CPU of each worker (pid; the one process of a one-worker gateway)
    connections: dict[int, int]  # wrk's connections held by each worker (pid), read half-way through the run

    def figures(self) -> dict[str, Any]:
        r = self.result
        per_request = 1e6 / max(r.requests, 1)
        # CPU per request of each worker, from its own CPU and the summary lines it wrote (gateway only)
        worker_us = [
            self.worker_cpu_s[p] / n * 1e6 for p, n in sorted(self.per_worker.items()) if p in self.worker_cpu_s
        ]
        return {
            **vars(r),
            "cpu_us": r.cpu_us,
            "rate": r.rate,
            "machine_cores_busy": self.machine_cores_busy,
            "wrk_us": self.wrk_cpu_s * per_request,
            "backend_us": self.backend_cpu_s * per_request,
            "requests_per_worker": sorted(self.per_worker.values()),
            "worker_us": worker_us,
            "worker_cores": sorted(cpu / r.seconds for cpu in self.worker_cpu_s.values()),
            "connections_per_worker": sorted(self.connections.values()),
        }


def _scaling_run(scene: Scene, where: Arrangement, backend: int, *, seconds: float, certs: Path) -> ScalingRun:
    """One wrk run of the scaling phase arranged as `where`, with what the machine, wrk and the backend (pid
    `backend`) spent meanwhile, each worker's CPU and requests, and how many of wrk's connections each one held."""
    proxy = where.proxy
    log = scene.root / f"{proxy}.log"
    since = log.stat().st_size if proxy.startswith("gateway") else 0
    workers = workers_of(scene.procs[proxy].pid)
    place(backend, where.backend_cores)
    started = {pid: ",".join(map(str, sorted(os.sched_getaffinity(pid)))) for pid in workers}
    for pid, core in zip(workers, where.worker_cores, strict=False):
        place(pid, core)
    try:
        port = scene.ports[proxy]
        connections: dict[int, int] = {}
        ss_cpu: list[float] = []  # the `ss` run's own CPU, which RUSAGE_CHILDREN counts with wrk's

        def count_connections() -> None:
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            connections.update(connections_per_process(port))
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            ss_cpu.append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)

        sample = threading.Timer(seconds / 2, count_connections)
        worker_before = {p: cpu_seconds(p) for p in workers}
        busy_before, t_before = machine_busy()
        backend_before = cpu_seconds(backend)
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        sample.start()
        try:
            result = wrk(
                scene, proxy, where.url, seconds=seconds, connections=50, certs=certs, args=[], pinned=where.pinned
            )
        finally:
            sample.cancel()
            sample.join()
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        backend_cpu = cpu_seconds(backend) - backend_before
        busy_after, t_after = machine_busy()
        worker_cpu = {p: cpu_seconds(p) - worker_before[p] for p in workers}
    finally:
        place(backend, scene.cores[1])
        for pid in workers if where.worker_cores else []:
            place(pid, started[pid])  # as the process started (the one-worker gateway on CPU 0, the others anywhere)
    wrk_cpu = after.ru_utime + after.ru_stime - children.ru_utime - children.ru_stime - sum(ss_cpu)
    per_worker = requests_per_worker(log, since) if proxy.startswith("gateway") else {}
    busy = (busy_after - busy_before) / (t_after - t_before)
    held = {p: connections.get(p, 0) for p in workers}
    return ScalingRun(result, busy, wrk_cpu, backend_cpu, per_worker, worker_cpu, held)


PINNED = '"auto"'  # listener.worker_cpus of the scaling phase's pinned two-worker gateway


def start_pinned(scene: Scene) -> None:
    """The two-worker gateway with `listener.worker_cpus = "auto"` (`gateway2p`): worker 1 on CPU 0, worker 2 on CPU 1,
    pinned by the gateway itself; measured beside the unpinned `gateway2` in the same rounds."""
    scene.start_variant("gateway2p", core="", workers=2, worker_cpus=PINNED)


def scaling_arrangements(scene: Scene, path: str, *, nginx: bool = True) -> dict[str, Arrangement]:
    """The scaling phase's four runs: the one-worker gateway and nginx pinned to the proxies' core (wrk and the backend
    on the other), and their two-worker processes (`gateway2`, `nginx2`, started unpinned) with wrk free to run
    anywhere too. The static backend stays on the load core in all four, where the scene started it (releasing it for
    the two-worker runs was measured in bench.scaling's `two_free` and did not pay: docs/performance.md)."""
    names = ("gateway", "gateway2", "nginx", "nginx2") if nginx else ("gateway", "gateway2")
    url = {
        name: f"https://127.0.0.1:{scene.ports[name]}{path}" for name in (*names, "gateway2p") if name in scene.ports
    }
    load = scene.cores[1]
    out = {
        "one": Arrangement("gateway", url["gateway"], True, load),
        "two": Arrangement("gateway2", url["gateway2"], False, load),
    }
    if "gateway2p" in url:  # the two workers pinned by the gateway itself, a core each (`start_pinned`)
        out["two_pinned"] = Arrangement("gateway2p", url["gateway2p"], False, load, setting=PINNED)
    if nginx:
        out["nginx_one"] = Arrangement("nginx", url["nginx"], True, load)
        out["nginx_two"] = Arrangement("nginx2", url["nginx2"], False, load)
    return out


def scaling(
    scene: Scene, urls: dict[str, Arrangement], *, seconds: float, rounds: int, certs: Path
) -> dict[str, object]:
    """Keep-alive throughput with two workers (nothing pinned: two cores shared with wrk and the backend) against one
    worker pinned to a core (wrk and the backend on the other), alternating, for the gateway and for nginx (the honest
    reference: what the same two shared cores let a proxy that needs 17 µs a request do). `urls`: key -> (process,
    URL, pinned) for "one", "two", "nginx_one", "nginx_two".

    Each run also records the CPU of wrk and of the static backend per request, and how many cores the whole machine
    kept busy: with two workers on two cores, whatever the gateway does not get went to wrk, the backend and the
    machine's other tenants. `ceiling` is the ratio the two arrangements would show with the machine to themselves,
    from the CPU per request measured: two workers, both cores over what one request costs the proxy, wrk and the
    backend together; one worker, one core over the larger of the proxy's cost and wrk's and the backend's (which
    share the other core). `dedicated` is the ratio on a machine with a core for each worker and more for the load:
    the cores over the two-worker proxy's CPU per request, against one core over the one worker's; what the target
    asks of the workers themselves. Read both beside the measured ratio (docs/performance.md, "Two workers on two
    cores").
    Keys other than these four are measured too (rotated with them, summed up alike), for a script comparing
    arrangements (bench.scaling)."""
    runs: dict[str, list[ScalingRun]] = {key: [] for key in urls}
    backend = scene.procs["backend"].pid
    for n in range(rounds):
        keys = list(urls)
        for key in keys[n % len(keys) :] + keys[: n % len(keys)]:  # each leads a round in turn
            for _ in range(5):  # a run that served nothing (a short one on a loaded machine) measured nothing: again
                run = _scaling_run(scene, urls[key], backend, seconds=seconds, certs=certs)
                if run.result.requests:
                    break
            runs[key].append(run)

    def summary(key: str) -> dict[str, Any]:
        done = [run.figures() for run in runs[key]]
        return {
            "runs": done,
            "rate": median(r["rate"] for r in done),
            "gateway_cores": median(r["cpu_s"] / r["seconds"] for r in done),  # the proxy's cores, nginx's too
            "machine_cores_busy": median(r["machine_cores_busy"] for r in done),
            "cpu_us": median(r["cpu_us"] for r in done),
            "wrk_us": median(r["wrk_us"] for r in done),
            "backend_us": median(r["backend_us"] for r in done),
            "placement": urls[key].placement(scene),
        }

    def ratios(one: dict[str, Any], two: dict[str, Any]) -> dict[str, float]:
        # Each arrangement with the machine to itself: one worker is held by the busier of its two cores (the proxy's
        # own, or wrk's and the backend's), two workers by what one request costs all three on both cores.
        one_alone = 1e6 / max(one["cpu_us"], one["wrk_us"] + one["backend_us"])
        two_alone = (os.cpu_count() or 1) * 1e6 / (two["cpu_us"] + two["wrk_us"] + two["backend_us"])
        # With a core for each worker and the load elsewhere: the proxy's own CPU per request is all that counts.
        dedicated = (os.cpu_count() or 1) * one["cpu_us"] / two["cpu_us"]
        return {
            "throughput_ratio": two["rate"] / one["rate"],
            "cpu_per_request_ratio": two["cpu_us"] / one["cpu_us"],
            "ceiling": two_alone / one_alone,
            "dedicated": dedicated,
        }

    one, two = summary("one"), summary("two")
    out: dict[str, object] = {"one_worker": one, "two_workers": two, **ratios(one, two)}
    for key in set(urls) - {"one", "two", "nginx_one", "nginx_two"}:
        part: dict[str, Any] = {**summary(key), **ratios(one, summary(key))}
        if key.startswith("two_"):  # against `two` run by run, in the same rounds: what the arrangement changed
            pairs = list(zip(runs[key], runs["two"], strict=True))
            part["paired_rate_ratio"] = median(a.result.rate / b.result.rate for a, b in pairs)
            part["paired_cpu_ratio"] = median(a.result.cpu_us / b.result.cpu_us for a, b in pairs)
        out[key] = part
    if "nginx_one" in urls:
        nginx_one, nginx_two = summary("nginx_one"), summary("nginx_two")
        out["nginx"] = {"one_worker": nginx_one, "two_workers": nginx_two, **ratios(nginx_one, nginx_two)}
    return out


# -- where a held long-poll's memory goes ---------------------------------------------------------------


def traced_snapshot(scene: Scene) -> dict[str, int]:
    """The traced gateway's live Python allocations by file (bench.traced), taken now."""
    path = scene.root / "traced-snapshot.json"
    path.unlink(missing_ok=True)
    os.kill(scene.procs["traced"].pid, signal.SIGUSR1)
    deadline = time.monotonic() + 120
    while not path.exists():
        if time.monotonic() > deadline:
            raise RuntimeError("the traced gateway wrote no snapshot within 120 s")
        time.sleep(0.2)
    sizes: dict[str, int] = json.loads(path.read_text())
    return sizes


def module_of(filename: str) -> str:
    """A source file as the part it belongs to: `asyncio/sslproto.py`, `aiohttp/web_protocol.py`, `proxy/...`."""
    parts = Path(filename).parts
    for anchor in ("proxy", "aiohttp", "asyncio", "multidict", "yarl", "structlog", "ssl.py"):
        if anchor in parts:
            i = len(parts) - 1 - parts[::-1].index(anchor)
            return "/".join(parts[i:])
    return "/".join(parts[-2:])


def breakdown(scene: Scene, count: int, certs: Path, warmed: Warmed, gateway_kib: float) -> dict[str, object]:
    """Held long-polls on the traced gateway (warmed as the held columns are): Python's share of each held request
    by file, and the rest. The traced process's RSS is tracemalloc's as much as the gateway's (its records of the
    warm-up's objects are freed and their memory reused while held), so what is outside Python is also read as
    the untraced gateway's RSS per held request (`gateway_kib`) less Python's share."""
    idle = traced_snapshot(scene)
    shares: dict[str, float] = {}
    lines: dict[str, float] = {}

    def during() -> None:
        held_now = traced_snapshot(scene)
        held_n = max(held_count(scene), 1)
        for name in set(idle) | set(held_now):
            grew = (held_now.get(name, 0) - idle.get(name, 0)) / held_n / 1024
            file, _, line = name.rpartition(":")
            if line.isdigit():
                lines[f"{module_of(file)}:{line}"] = grew
            else:
                shares[module_of(name)] = shares.get(module_of(name), 0.0) + grew

    held = hold(scene, "traced", count, certs, while_held=during, warmed=warmed)
    python = sum(shares.values())
    top = dict(sorted(((k, v) for k, v in shares.items() if abs(v) >= 0.05), key=lambda kv: -kv[1])[:15])
    return {
        "held": held.held,
        "warmed": held.warmed,
        "rss_per_held_kib": held.per_held_kib,
        "python_per_held_kib": python,
        "outside_python_per_held_kib": held.per_held_kib - python,
        "outside_python_of_gateway_kib": gateway_kib - python,
        "python_by_file_kib": top,
        "python_by_line_kib": dict(sorted(lines.items(), key=lambda kv: -kv[1])[:25]),
    }


# -- the run ---------------------------------------------------------------------------------------


def build_shim(scene: Scene) -> None:
    src = REPO / "bench" / "certshim.c"
    out = scene.root / "certshim.so"
    subprocess.run(
        ["gcc", "-shared", "-fPIC", "-O2", "-o", str(out), str(src), "-ldl", "-lssl", "-lcrypto"], check=True
    )


def preflight(scene: Scene) -> str:
    """One request through the gateway to the lab's real acceptor: the principal it authenticated."""
    cert, key = scene.layout.pki_dir / "users" / "carol.pem", scene.layout.pki_dir / "users" / "carol.key"
    url = f"https://127.0.0.1:{scene.ports['gateway']}/lab/EWS/Exchange.asmx"
    cmd = [
        "curl",
        "-s",
        "-D",
        "-",
        "-o",
        "/dev/null",
        "--max-time",
        "20",
        "--cacert",
        str(scene.layout.pki_dir / "root.pem"),
    ]
    out = subprocess.run(
        [*cmd, "--cert", str(cert), "--key", str(key), url], capture_output=True, text=True, check=False
    )
    found = re.search(r"^x-lab-principal: (\S+)", out.stdout, re.IGNORECASE | re.MULTILINE)
    if found is None:
        raise RuntimeError(f"preflight through the gateway failed:\n{out.stdout}{out.stderr}")
    return found.group(1)


def cores() -> tuple[str, str]:
    n = os.cpu_count() or 1
    if n < 2:
        return "", ""
    return "0", ",".join(str(c) for c in range(1, n))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10, help="length of each wrk run (default 10)")
    parser.add_argument("--rounds", type=int, default=2, help="paired rounds of runs 1 and 2; medians are shown")
    parser.add_argument("--held", type=int, default=4000, help="long-polls held at once (default 4000)")
    parser.add_argument("--users", type=int, default=500, help="distinct bench users (default 500)")
    parser.add_argument("--workers", type=int, default=1, help="processes of each proxy (default 1: per core)")
    parser.add_argument(
        "--rate", type=float, default=500, help="requests/s of the fixed-rate latency run (default 500)"
    )
    parser.add_argument("--traced", type=int, default=1000, help="long-polls held on the traced gateway (default 1000)")
    parser.add_argument(
        "--settle",
        type=float,
        default=KEEPALIVE_SECONDS + 5,
        help="seconds between the held phase's warm-up and its idle RSS: the warm-up's idle backend connections "
        f"are closed by then (default {KEEPALIVE_SECONDS + 5:g}, the gateway's keep-alive + 5)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the scene's directory (logs, configs)")
    parser.add_argument(
        "--baseline",
        type=Path,
        help="a copy of an older tree (e.g. `git archive main | tar -x -C DIR`): its gateway is a column too",
    )
    parser.add_argument("--json", type=Path, help="write the figures here (default: bench/results/bench-<time>.json)")
    args = parser.parse_args()
    for tool in ("nginx", "wrk", "gcc", "curl", "taskset"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            print(f"bench: {tool} is missing; `make bench-setup` installs it", file=sys.stderr)
            return 2
    # Each held request takes two sockets in the proxy (client and backend): raise the limit as far as allowed.
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    most = (hard - 1000) // 2  # headroom for listeners, logs, the KDC and the request made meanwhile
    if args.held > most:
        print(
            f"bench: {args.held:,} held requests need {2 * args.held:,} sockets per proxy process; the limit here is "
            f"{hard:,}, so {most:,} are held"
        )
        args.held = most

    root = Path(tempfile.mkdtemp(prefix="kcd-bench-"))
    scene = Scene(root, cores() if args.workers == 1 else ("", ""), workers=args.workers)
    started = time.monotonic()
    figures: dict[str, object] = {}
    try:
        proxies, others = scene.cores[0] or "any", scene.cores[1] or "any"
        print(f"bench: scene in {root}; proxies on CPU {proxies}, load and backends on CPU {others}")
        scene.build(args.users)
        build_shim(scene)
        scene.start_backends()
        scene.start_gateway()
        scene.start_nginx()
        scene.start_plain()
        if args.baseline:
            scene.start_baseline(args.baseline)
        scene.start_variant("gateway_asyncio", core=scene.cores[0], event_loop="asyncio")
        scene.start_variant("gateway_aiohttp", core=scene.cores[0], http_server="aiohttp")
        print(f"bench: preflight through the gateway to the lab acceptor: served as {preflight(scene)}")

        # 4 first, while the gateway's ticket cache is cold.
        users = scene.layout.pki_dir / "users"  # a lab user for the first: the bench users stay new for the second
        alice = [("alice@LAB.TEST", users / "alice.pem", users / "alice.key")]
        one = kdc_per_1000(scene, alice)
        many = kdc_per_1000(scene, scene.users[: args.users])
        figures["kdc"] = {"one_user": one, "distinct_users": many, "users": args.users}

        one_cert, all_certs = scene.cert_list(1), scene.cert_list()
        path = "/EWS/Exchange.asmx"
        columns = {  # column: (process, URL); the bound column is the same gateway on its connection-bound route
            "gateway": ("gateway", f"https://127.0.0.1:{scene.ports['gateway']}{path}"),
            "gateway_bound": ("gateway", f"https://127.0.0.1:{scene.ports['gateway']}/bound{path}"),
            "plain": ("plain", f"https://127.0.0.1:{scene.ports['plain']}{path}"),
            "nginx": ("nginx", f"https://127.0.0.1:{scene.ports['nginx']}{path}"),
        }
        if args.baseline:
            columns["baseline"] = ("baseline", f"https://127.0.0.1:{scene.ports['baseline']}{path}")
        columns["gateway_asyncio"] = ("gateway_asyncio", f"https://127.0.0.1:{scene.ports['gateway_asyncio']}{path}")
        aiohttp_server = f"https://127.0.0.1:{scene.ports['gateway_aiohttp']}{path}"
        columns["gateway_aiohttp"] = ("gateway_aiohttp", aiohttp_server)  # the same build, aiohttp's server
        keep: dict[str, list[WrkResult]] = {c: [] for c in columns}
        shake: dict[str, list[WrkResult]] = {c: [] for c in columns if c != "gateway_bound"}
        for proxy, url in columns.values():  # warm up: pools, caches, JIT-less but page-faulted
            wrk(scene, proxy, url, seconds=2, connections=50, certs=one_cert, args=[])
        figures["load_before"] = os.getloadavg()
        for n in range(args.rounds):
            order = list(columns)
            order = order[n % len(order) :] + order[: n % len(order)]  # each column leads a round in turn
            for column in order:
                proxy, url = columns[column]
                keep[column].append(
                    wrk(scene, proxy, url, seconds=args.seconds, connections=50, certs=one_cert, args=[])
                )
            for column in order:
                if column in shake:
                    proxy, url = columns[column]
                    close = ["-H", "Connection: close"]
                    shake[column].append(
                        wrk(scene, proxy, url, seconds=args.seconds, connections=16, certs=one_cert, args=close)
                    )
        figures["load_after"] = os.getloadavg()
        # p99 at the same offered load: open loop, 50 connections, the rate fixed (bench.paced)
        at_rate = {"gateway", "gateway_asyncio", "plain", "nginx"} & set(columns)
        paced_runs: dict[str, list[dict[str, float]]] = {column: [] for column in sorted(at_rate)}
        for n in range(args.rounds):  # rounds in rotating order, as above: a neighbour's burst hits one run, not all
            order = sorted(at_rate)
            for column in order[n % len(order) :] + order[: n % len(order)]:
                proxy, url = columns[column]
                paced_runs[column].append(
                    paced(scene, proxy, url, rate=args.rate, seconds=args.seconds, certs=one_cert)
                )
        figures["paced"] = {column: paced_summary(runs) for column, runs in paced_runs.items()}
        if args.workers == 1 and scene.cores[0]:
            scene.start_variant("gateway2", core="", workers=2)
            start_pinned(scene)
            scene.start_nginx_workers("nginx2", 2, core="")
            scaled = scaling_arrangements(scene, path)
            for where in scaled.values():  # warm up (the one-worker processes are warm already)
                if where.proxy.startswith(
                    "gateway2"
                ):  # until both workers answered: each has its own handshakes, tickets
                    warm_workers(scene, where.proxy, where.url, workers=2, certs=one_cert)
                elif where.proxy.endswith("2"):
                    wrk(scene, where.proxy, where.url, seconds=2, connections=50, certs=one_cert, args=[], pinned=False)
            figures["scaling"] = scaling(scene, scaled, seconds=args.seconds, rounds=args.rounds, certs=one_cert)
            scene.stop("gateway2")
            scene.stop("gateway2p")
            scene.stop("nginx2")
        # Every held column starts from the same state: warmed with all the users, then left until the idle
        # backend connections the warm-up pooled are closed (docs/performance.md, "A fair held phase").
        # The same gateway without the TLS session cache: a full cache frees an old session for each held one, so
        # kcd-proxy's figure is the marginal cost with the cache's bounded memory (idle RSS) already paid.
        scene.start_variant("gateway_nocache", core=scene.cores[0], session_cache=0)
        held_columns = ("nginx", "gateway", "gateway_aiohttp", "gateway_asyncio", "gateway_nocache")
        bench_users = scene.users[: args.users]
        warmed = {proxy: warm(scene, proxy, bench_users) for proxy in held_columns}
        if args.traced:
            scene.start_variant("traced", core=scene.cores[0])
            warmed["traced"] = warm(scene, "traced", bench_users)
        time.sleep(args.settle)
        held = {proxy: hold(scene, proxy, args.held, all_certs, warmed=warmed[proxy]) for proxy in held_columns}
        if args.traced:
            count = min(args.traced, args.held)
            gateway_kib = held["gateway"].per_held_kib
            figures["held_breakdown"] = breakdown(scene, count, all_certs, warmed["traced"], gateway_kib)
            scene.stop("traced")
    finally:
        scene.teardown()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)

    report(args, keep, shake, held, figures)
    print(f"\nbench: {time.monotonic() - started:.0f} s")
    figures.update(
        date=datetime.now(UTC).isoformat(timespec="seconds"),
        machine=f"{os.cpu_count()} cores ({cpu_model()})",
        versions=versions(),
        args={k: str(v) for k, v in vars(args).items()},
        keepalive={p: [{**vars(r), "cpu_us": r.cpu_us, "rate": r.rate} for r in keep[p]] for p in keep},
        handshakes={p: [{**vars(r), "cpu_us": r.cpu_us, "rate": r.rate} for r in shake[p]] for p in shake},
        paired_ratios=paired_ratios(keep),
        held={p: {**vars(held[p]), "per_held_kib": held[p].per_held_kib} for p in held},
    )
    print(f"bench: figures in {write_figures(figures, args.json, 'bench')}")
    return 0


def write_figures(figures: dict[str, Any], path: Path | None, tool: str) -> Path:
    """A bench tool's run written as JSON to `path`, or to bench/results/<tool>-<time>.json; where it went."""
    out = path or REPO / "bench" / "results" / f"{tool}-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(figures, indent=2) + "\n")
    return out


def paired_ratios(keep: dict[str, list[WrkResult]]) -> dict[str, dict[str, float]]:
    """CPU per request of each column over nginx's and over the plain aiohttp proxy's, per round (runs of one
    round are minutes apart at most: the machine's load moves less within a round than across them)."""
    out: dict[str, dict[str, float]] = {}
    for column in keep:
        for ref in ("nginx", "plain", "baseline", "gateway", "gateway_aiohttp"):
            if ref not in keep:
                continue
            pairs = [a.cpu_us / b.cpu_us for a, b in zip(keep[column], keep[ref], strict=True) if b.cpu_us]
            if pairs and column != ref:
                out[f"{column}/{ref}"] = {"median": median(pairs), "rounds": len(pairs)}
    return out


def versions() -> dict[str, str]:
    found = {"python": sys.version.split()[0], "nginx": nginx_version(), "aiohttp": aiohttp.__version__}
    return {**found, "uvloop": uvloop_version(), "openssl": ssl.OPENSSL_VERSION}


def uvloop_version() -> str:
    try:
        import uvloop
    except ImportError:
        return "not installed"
    return str(getattr(uvloop, "__version__", "?"))


def row(name: str, ours: float, ref: float | None, fmt: str, target: str = "") -> None:
    """One line of the report: our figure, nginx's, their ratio, the issue's target."""
    shown_ref = "-" if ref is None else format(ref, fmt)
    ratio = "" if ref is None or ref == 0 else f"{ours / ref:6.2f}"
    print(f"  {name:<36} {format(ours, fmt):>12} {shown_ref:>12} {ratio:>7}   {target}")


COLUMNS = ("baseline", "gateway_aiohttp", "gateway", "gateway_asyncio", "gateway_bound", "plain", "nginx")
HEADS = {
    "baseline": "baseline",
    "gateway": "kcd-proxy",
    "gateway_aiohttp": "kcd (aiohttp)",
    "gateway_asyncio": "kcd (asyncio)",
    "gateway_bound": "kcd (bound)",
    "gateway_nocache": "kcd (no session cache)",
    "plain": "aiohttp",
    "nginx": "nginx",
}


def row4(name: str, figures: dict[str, float], fmt: str, target: str = "") -> None:
    """One line with a figure for each column present, and kcd-proxy's ratio to nginx."""
    cells = [format(figures[c], fmt) if c in figures else "-" for c in COLUMNS]
    g, n = figures.get("gateway"), figures.get("nginx")
    ratio = f"{g / n:6.2f}" if g is not None and n else ""
    print(f"  {name:<34}" + "".join(f" {cell:>12}" for cell in cells) + f" {ratio:>7}   {target}")


def report(
    args: argparse.Namespace,
    keep: dict[str, list[WrkResult]],
    shake: dict[str, list[WrkResult]],
    held: dict[str, Held],
    figures: dict[str, object],
) -> None:
    def med(runs: dict[str, list[WrkResult]], attr: str) -> dict[str, float]:
        return {c: median(float(getattr(r, attr)) for r in results) for c, results in runs.items()}

    machine = f"{os.cpu_count()} cores ({cpu_model()})"
    print(
        f"\nkcd-proxy vs a plain aiohttp proxy vs nginx {nginx_version()} on {machine}, {args.workers} worker(s) each"
    )
    print(f"  load average before / after the paired runs: {figures['load_before']} / {figures['load_after']}")
    print(f"  {'':<34}" + "".join(f" {HEADS[c]:>12}" for c in COLUMNS) + f" {'kcd/ngx':>7}   target")
    print(f"1. keep-alive, 50 connections, 1 KiB responses (median of {args.rounds} runs of {args.seconds:g} s)")
    row4("requests/s", med(keep, "rate"), ",.0f", ">= 0.15 of nginx (0.5 long-term)")
    cpu = med(keep, "cpu_us")
    row4("requests/s per core (1 / CPU)", {c: 1e6 / v for c, v in cpu.items()}, ",.0f", ">= 0.15 of nginx")
    row4("CPU per request (µs)", cpu, ",.0f", f"<= 160 µs and < aiohttp's ({cpu['plain']:.0f})")
    row4("p50 latency (ms)", med(keep, "p50_ms"), ".2f")
    p99 = med(keep, "p99_ms")
    row4("p99 latency (ms)", p99, ".2f", f"<= nginx + 2 ms (is {p99['gateway'] - p99['nginx']:+.1f} ms)")
    row4("errors", {c: float(sum(r.errors for r in rs)) for c, rs in keep.items()}, ",.0f", "0")
    ratios = paired_ratios(keep)
    print("   paired per round, CPU per request (median of the rounds' ratios):")
    keys = ["gateway/nginx", "gateway/plain", "gateway_bound/plain", "gateway_bound/nginx", "plain/nginx"]
    keys += ["gateway_asyncio/nginx", "gateway_asyncio/plain"]
    keys += ["gateway/gateway_asyncio", "gateway/gateway_aiohttp", "gateway_aiohttp/plain"]
    for key in (*keys, "gateway/baseline", "gateway_bound/baseline", "gateway_aiohttp/baseline", "baseline/nginx"):
        if key in ratios:
            print(f"     {key:<24} {ratios[key]['median']:6.2f}")
    print("2. a new TLS connection with a client certificate per request, no resumption")
    row4("handshakes/s", med(shake, "rate"), ",.0f", ">= 0.8 of nginx")
    cpu = med(shake, "cpu_us")
    row4("handshakes/s per core (1 / CPU)", {c: 1e6 / v for c, v in cpu.items()}, ",.0f", ">= 0.8 of nginx")
    row4("CPU per handshake + request (µs)", cpu, ",.0f")
    row4("errors", {c: float(sum(r.errors for r in rs)) for c, rs in shake.items()}, ",.0f", "0")
    pace = figures.get("paced")
    if isinstance(pace, dict) and pace:
        print(
            f"2b. a fixed rate: {args.rate:g} requests/s over 50 keep-alive connections, open loop (bench.paced), "
            f"median of {args.rounds} runs of {args.seconds:g} s"
        )
        for key, name in (("p50_ms", "p50 latency (ms)"), ("p99_ms", "p99 latency (ms)"), ("p999_ms", "p99.9 (ms)")):
            target = ""
            if key == "p99_ms" and "gateway" in pace and "nginx" in pace:
                target = f"<= nginx + 2 ms (is {pace['gateway']['p99_ms'] - pace['nginx']['p99_ms']:+.1f} ms)"
            row4(name, {c: float(v[key]) for c, v in pace.items()}, ".2f", target)
        row4("CPU per request (µs)", {c: float(v["cpu_us"]) for c, v in pace.items()}, ",.0f")
        row4("errors", {c: float(v["errors"]) for c, v in pace.items()}, ",.0f", "0")
        row4("generator lag p99 (ms)", {c: float(v["lag_p99_ms"]) for c, v in pace.items()}, ".2f", "small")
    scale = figures.get("scaling")
    if isinstance(scale, dict):
        print("2c. two workers (unpinned; wrk too; the backend on the load core) against one pinned worker")
        for proxy, part in (("kcd-proxy", scale), ("nginx", scale.get("nginx"))):
            if not isinstance(part, dict):
                continue
            for key, name in (("one_worker", "one worker, pinned"), ("two_workers", "two workers")):
                run = part[key]
                print(
                    f"  {proxy + ', ' + name:<31} {run['rate']:8,.0f} requests/s; it used {run['gateway_cores']:.2f} "
                    f"cores, the machine {run['machine_cores_busy']:.2f} of {os.cpu_count()}; µs a request: "
                    f"{run['cpu_us']:,.0f}, wrk {run['wrk_us']:,.0f}, the backend {run['backend_us']:,.0f}"
                )
                print(f"  {'':<31} ({run['placement']})")
            print(
                f"  {proxy}: throughput ratio {part['throughput_ratio']:.2f}"
                + (" (target >= 1.8)" if part is scale else "")
                + f"; CPU per request, two workers / one: {part['cpu_per_request_ratio']:.2f}; the ratio with the "
                f"machine to itself (from the CPU per request of proxy, wrk, backend): {part['ceiling']:.2f}; "
                f"with a core for each worker and the load elsewhere: {part['dedicated']:.2f}"
            )
        pinned = scale.get("two_pinned")
        if isinstance(pinned, dict):
            print(
                f"  kcd-proxy, two workers pinned    {pinned['rate']:8,.0f} requests/s; it used "
                f"{pinned['gateway_cores']:.2f} cores; µs a request {pinned['cpu_us']:,.0f} ({pinned['placement']})"
            )
            print(
                f"  kcd-proxy pinned / unpinned, paired run by run: {pinned['paired_rate_ratio']:.2f} of the "
                f"requests/s, {pinned['paired_cpu_ratio']:.2f} of the CPU per request; pinned throughput ratio "
                f"{pinned['throughput_ratio']:.2f} (target >= 1.8)"
            )
        runs = scale["two_workers"]["runs"]
        print(f"  requests per kcd-proxy worker in each run: {[run['requests_per_worker'] for run in runs]}")
        print(f"  µs a request of each worker: {[[round(us) for us in run['worker_us']] for run in runs]}")
        print(f"  wrk's connections on each worker (SO_REUSEPORT): {[run['connections_per_worker'] for run in runs]}")
    print(f"  {'':<36} {'kcd-proxy':>12} {'nginx':>12} {'ratio':>7}   target")
    hg, hn = held["gateway"], held["nginx"]
    print(f"3. held long-polls ({args.held:,} asked for, {args.users} users)")
    warm_ups = ", ".join(f"{HEADS.get(c, c)} {h.warmed}" for c, h in held.items())
    print(f"   each column warmed first, users answered: {warm_ups}; idle RSS read {args.settle:g} s later")
    row("held at once", hg.held, hn.held, ",.0f", f"{args.held:,}")
    row("memory per held request (KiB)", hg.per_held_kib, hn.per_held_kib, ",.1f", "<= nginx's")
    if "gateway_asyncio" in held:
        hu = held["gateway_asyncio"]
        row("  kcd (asyncio): per held (KiB)", hu.per_held_kib, hn.per_held_kib, ",.1f", f"{hu.held:,} held")
    if "gateway_aiohttp" in held:
        ha = held["gateway_aiohttp"]
        row("  kcd (aiohttp): per held (KiB)", ha.per_held_kib, hn.per_held_kib, ",.1f", f"{ha.held:,} held")
    if "gateway_nocache" in held:
        hc = held["gateway_nocache"]
        row("  kcd (no session cache): per held", hc.per_held_kib, hn.per_held_kib, ",.1f", f"{hc.held:,} held")
    at_10k = (hg.rss_idle + hg.per_held_kib * 1024 * 10_000) / 2**30
    row(
        "memory while held (MiB)", hg.rss_held / 2**20, hn.rss_held / 2**20, ",.0f", f"< 1 GiB at 10k: {at_10k:.2f} GiB"
    )
    row("a new request meanwhile (ms)", hg.new_request_ms, hn.new_request_ms, ",.0f", "answered")
    parts = figures.get("held_breakdown")
    if isinstance(parts, dict):
        print(
            f"   where it goes (tracemalloc, {parts['held']:,} held): Python {parts['python_per_held_kib']:.1f} KiB, "
            f"outside Python {parts['outside_python_of_gateway_kib']:.1f} (kcd-proxy's RSS less Python's; the "
            f"traced process's own RSS per held request {parts['rss_per_held_kib']:.1f} KiB)"
        )
        for name, kib in parts["python_by_file_kib"].items():
            print(f"     {name:<48} {kib:6.2f} KiB")
    kdc = figures["kdc"]
    assert isinstance(kdc, dict)
    (one_tgs, one_as, _), (many_tgs, many_as, _) = kdc["one_user"], kdc["distinct_users"]
    print("4. KDC requests per 1,000 gateway requests (nginx does no Kerberos)")
    row("1 user: TGS requests", one_tgs, None, ",.0f", f"2 (and {one_as:.0f} AS)")
    row(
        f"{args.users} users: TGS requests",
        many_tgs,
        None,
        ",.0f",
        f"~2 per user: {2 * args.users} (and {many_as:.0f} AS)",
    )


def nginx_version() -> str:
    out = subprocess.run(["nginx", "-v"], capture_output=True, text=True, check=False).stderr
    return out.strip().rpartition("/")[2]


def cpu_model() -> str:
    for text in Path("/proc/cpuinfo").read_text().splitlines():
        if text.startswith("model name"):
            return text.partition(":")[2].strip()
    return "unknown CPU"


if __name__ == "__main__":
    sys.exit(main())
