"""Instructions per keep-alive request, counted by valgrind's callgrind: a figure the machine's load does not move.

Not part of `make bench` (docs/performance.md, "Instructions per request, counted"). On this VM wall-clock CPU per
request spreads 4-8% between two processes of one build (bench.paired's A/A); callgrind counts the instructions a
process runs in software, the same for the same build and the same requests whatever else the machine does.

It builds the bench's scene (bench.scene, as bench.paired does) and starts the gateway under `valgrind
--tool=callgrind --instr-atstart=no` pinned to CPU 0, with PYTHONHASHSEED fixed: this tree's twice (`this`, and
`again`, the A/A control) and, with `--baseline DIR`, that tree's once. Nothing is counted while a gateway starts and
warms up (`--connections` keep-alive connections from a Python client on the other CPU, each taking requests on both
routes, so the handshake, the ticket, the backend pools and the per-connection memos are made). Then for each of
`--windows` windows, each gateway and each route (the default route, a token on every request; the bound route,
`backend_binding = "connection"`): the client's connections opened again and given two requests each (not counted:
the gateway closes a connection idle past its keep-alive timeout, and under callgrind the others' windows take
minutes), callgrind's counters zeroed, instrumentation switched on (`callgrind_control -i
on`), `--requests` GET requests one after the other over the open connections in turn, the gateway's summary lines
polled until it has written one for each of them, instrumentation off and the counters dumped (every thread's). The
summary lines written in the window must be exactly `--requests` of that route, or the run fails.

A window counts everything the process ran meanwhile, also what runs by the clock rather than by the request, and
under callgrind a window of 300 requests lasts 10 s to minutes (with the machine's load) instead of a tenth of one:
such work lands in some windows and not others, and 50-1,000 times more often per request than without callgrind.
The largest, the CRL files read again and their signatures checked every `crl_refresh_seconds` (60 s by default:
about 4 million instructions, 1-2% of a window), is put off for a day in the gateways' configuration
(`put_off_crl_refresh`). What else runs besides the requests only adds, so a route's figure is its least window's
instructions over its requests; every window is printed with its distance from that least one. A window of 5 s
without requests (`idle`) shows what the loop's own timers add.

It prints instructions per request per gateway and route, `this / baseline` and the A/A (`again / this`), and writes
bench/results/instructions-<time>.json (or `--json`; `--keep DIR` keeps callgrind's dumps for callgrind_annotate).
The defaults (300 requests a window, 3 windows) take 4-6 minutes with a baseline.

With `--new-connections` the windows are of new connections instead, on the default route only (route
`new_connection`): each of the `--requests` requests on a TLS connection of its own (a full handshake with the
certificate, no session resumed: Python's client resumes none unless told), sent with `Connection: close`, as
bench.run's handshake phase does with wrk: instructions per handshake + request, the accept path included.

    .venv/bin/python -m bench.instructions [--baseline DIR] [--requests 300] [--windows 3] [--new-connections]
        [--json FILE] [--keep DIR]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from bench.paired import PATH, ROUTES
from bench.run import cores, write_figures
from bench.scene import Scene

PROCESS = {"this": "gateway", "again": "again", "baseline": "baseline"}  # bench.scene's process names
REFRESH = 86_400  # the gateways' crl_refresh_seconds (put_off_crl_refresh)
WAIT = 120  # seconds a gateway under callgrind may take to write a window's last summary line or dump its counters


def callgrind(pid: int, *command: str) -> None:
    """A command to a gateway's callgrind (through vgdb); it fails loudly rather than leave a window uncounted."""
    done = subprocess.run(["callgrind_control", *command, str(pid)], capture_output=True, text=True, timeout=WAIT)
    if done.returncode or "OK" not in done.stdout:
        raise RuntimeError(f"callgrind_control {' '.join(command)} {pid}: {done.stdout}{done.stderr}")


def dumped(root: Path, pid: int, label: str) -> int:
    """Dump the counters of a gateway's callgrind under `label`, and read back their total (instructions run)."""
    before = set(root.glob(f"callgrind.{pid}.*"))
    callgrind(pid, "--dump=" + label)
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        for path in set(root.glob(f"callgrind.{pid}.*")) - before:
            for line in path.read_text(errors="replace").splitlines():  # "totals:" is the dump's last line
                if line.startswith("totals:"):
                    return int(line.split()[1])
        time.sleep(0.1)
    raise RuntimeError(f"callgrind of {pid}: no dump {label!r} after {WAIT} s")


def summary_lines(log: Path, path: str) -> int:
    """The gateway's own count of the requests on `path` it has answered: its summary lines (event `request`)."""
    count = 0
    for line in log.read_bytes().splitlines():
        if line.startswith(b"{") and b'"event":"request"' in line and json.loads(line).get("path") == path:
            count += 1
    return count


def put_off_crl_refresh(scene: Scene) -> None:
    """`crl_refresh_seconds` a day in the gateways' configuration: the CRL files read again and their signatures
    checked every minute is work by the clock, not by the request, and a window lasts minutes on a loaded machine."""
    path = scene.root / "gateway.toml"
    text = path.read_text()
    table = "[client_certificates]\n"
    assert table in text, "the scene's [client_certificates] table moved"
    assert "crl_refresh_seconds" not in text, "the scene sets crl_refresh_seconds itself now"
    path.write_text(text.replace(table, f"{table}crl_refresh_seconds = {REFRESH}\n", 1))


class Client:
    """Keep-alive connections to one gateway with the first bench user's certificate; requests one at a time."""

    def __init__(self, scene: Scene, port: int, connections: int) -> None:
        self.context = ssl.create_default_context(cafile=scene.layout.pki_dir / "root.pem")
        self.context.check_hostname = False
        _, cert, key = scene.users[0]
        self.context.load_cert_chain(cert, key)
        self.port, self.count = port, connections
        self.connections: list[http.client.HTTPSConnection] = []

    def reopen(self) -> None:
        """New connections (a gateway under callgrind waits long between its windows: longer than its keep-alive
        timeout, which closes a connection left idle)."""
        self.close()
        self.connections = [
            http.client.HTTPSConnection("127.0.0.1", self.port, context=self.context, timeout=WAIT)
            for _ in range(self.count)
        ]

    def requests(self, path: str, n: int) -> None:
        for i in range(n):
            connection = self.connections[i % len(self.connections)]
            connection.request("GET", path)
            answer = connection.getresponse()
            body = answer.read()
            if answer.status != 200 or answer.will_close:
                raise RuntimeError(f"GET {path}: {answer.status}, close {answer.will_close}, {body[:200]!r}")

    def new_connections(self, path: str, n: int) -> None:
        """`n` requests, each on a new connection closed after its answer (a full handshake each)."""
        for _ in range(n):
            connection = http.client.HTTPSConnection("127.0.0.1", self.port, context=self.context, timeout=WAIT)
            try:
                connection.request("GET", path, headers={"Connection": "close"})
                answer = connection.getresponse()
                body = answer.read()
            finally:
                connection.close()
            if answer.status != 200:
                raise RuntimeError(f"GET {path} on a new connection: {answer.status}, {body[:200]!r}")

    def close(self) -> None:
        for connection in self.connections:
            connection.close()


def written(log: Path, path: str, count: int) -> None:
    """Wait until the gateway has written `count` summary lines for `path` (it writes one after the answer is sent)."""
    deadline = time.monotonic() + WAIT
    while summary_lines(log, path) < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{log.name}: {summary_lines(log, path)} summary lines for {path}, not {count}")
        time.sleep(0.05)


def window(
    scene: Scene,
    gateway: str,
    client: Client,
    path: str | None,
    n: int,
    seconds: float,
    label: str,
    *,
    new: bool = False,
) -> int:
    """Instructions the gateway ran for `n` requests on `path` (or, `path` None, in `seconds` without any), each on a
    new connection with `new`."""
    pid = scene.procs[PROCESS[gateway]].pid
    log = scene.root / f"{PROCESS[gateway]}.log"
    warm = path or ROUTES["default"]  # not counted: each connection's first request, the route's backend connection
    before = summary_lines(log, warm) + 2 * client.count
    client.reopen()
    client.requests(warm, 2 * client.count)
    written(log, warm, before)
    callgrind(pid, "--zero")
    callgrind(pid, "--instr=on")
    if path is None:
        time.sleep(seconds)
    elif new:
        client.new_connections(path, n)
    else:
        client.requests(path, n)
        written(log, path, before + n)
    callgrind(pid, "--instr=off")
    total = dumped(scene.root, pid, label)
    if path is not None and summary_lines(log, path) != before + n:
        raise RuntimeError(f"{gateway} {path}: {summary_lines(log, path) - before} summary lines in a window of {n}")
    return total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", type=Path, help="a copy of an older tree (its proxy/ package)")
    parser.add_argument("--requests", type=int, default=300, help="requests a window (default 300)")
    parser.add_argument("--windows", type=int, default=3, help="windows per gateway and route (default 3)")
    parser.add_argument("--connections", type=int, default=5, help="keep-alive connections per gateway (default 5)")
    parser.add_argument("--warm", type=int, default=60, help="requests per route before counting (default 60)")
    parser.add_argument(
        "--new-connections", action="store_true", help="each request on a new connection, default route only"
    )
    parser.add_argument("--json", type=Path, help="the figures' file (default: bench/results/instructions-<time>.json)")
    parser.add_argument("--keep", type=Path, help="copy callgrind's dumps here (for callgrind_annotate)")
    args = parser.parse_args()
    if args.baseline and not (args.baseline / "proxy" / "__main__.py").is_file():
        print(f"bench.instructions: {args.baseline} has no proxy/ package of a gateway", file=sys.stderr)
        return 2
    if not shutil.which("valgrind") or not shutil.which("callgrind_control"):
        print("bench.instructions: needs valgrind and callgrind_control", file=sys.stderr)
        return 2
    routes = {"new_connection": PATH} if args.new_connections else ROUTES
    os.environ["PYTHONHASHSEED"] = "0"  # the same dictionaries' layouts in every gateway
    root = Path(tempfile.mkdtemp(prefix="kcd-instructions-"))
    scene = Scene(root, cores())
    scene.wrap = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={root}/callgrind.%p"]
    scene.listen_timeout = 600
    if scene.cores[1]:  # the client beside the backend, away from the gateways' CPU
        os.sched_setaffinity(0, {int(c) for c in scene.cores[1].split(",")})
    gateways = ["this", "again", *(["baseline"] if args.baseline else [])]
    pids: dict[str, int] = {}
    counts: dict[str, dict[str, list[int]]] = {g: {route: [] for route in [*routes, "idle"]} for g in gateways}
    started = time.monotonic()
    try:
        print(f"bench.instructions: scene in {root}; load average {os.getloadavg()}", flush=True)
        scene.build(2)
        put_off_crl_refresh(scene)
        scene.start_backends()
        scene.start_gateway()
        scene.start_variant("again", core=scene.cores[0])
        if args.baseline:
            scene.start_baseline(args.baseline.resolve(), bound=True)
        pids.update((g, scene.procs[PROCESS[g]].pid) for g in gateways)
        print(f"bench.instructions: gateways listen after {time.monotonic() - started:.0f} s", flush=True)
        clients = {g: Client(scene, scene.ports[PROCESS[g]], args.connections) for g in gateways}
        for client in clients.values():
            client.reopen()
            for path in ROUTES.values():
                client.requests(path, max(args.warm, args.connections))
        for w in range(args.windows):
            for gateway, client in clients.items():
                for route, path in routes.items():
                    label = f"{route}-{w}"
                    total = window(scene, gateway, client, path, args.requests, 0, label, new=args.new_connections)
                    counts[gateway][route].append(total)
                    print(f"  {gateway} {route} window {w}: {total / args.requests:,.0f}", flush=True)
        for gateway in gateways:
            counts[gateway]["idle"].append(window(scene, gateway, clients[gateway], None, 0, 5, "idle"))
        for client in clients.values():
            client.close()
    finally:
        scene.teardown()
        if args.keep:
            args.keep.mkdir(parents=True, exist_ok=True)
            for gateway, pid in pids.items():  # "this.1": the first dump of `this`, its label inside ("Trigger")
                for dump in root.glob(f"callgrind.{pid}.*"):
                    shutil.copy(dump, args.keep / f"{gateway}.{dump.name.rpartition('.')[2]}")
        shutil.rmtree(root, ignore_errors=True)

    kind = "a new connection each" if args.new_connections else f"{args.connections} keep-alive connections"
    print(f"\n{args.windows} windows of {args.requests} requests ({kind})")
    figures: dict[str, object] = {}
    for route in routes:
        per = {g: [c / args.requests for c in counts[g][route]] for g in gateways}
        least = {g: min(v) for g, v in per.items()}  # what runs besides the requests only adds (docstring)
        print(
            f"{route} route, instructions a request (the least window): "
            + ", ".join(f"{g} {least[g]:,.0f}" for g in gateways)
        )
        for g, v in per.items():
            print(f"  {g:<8} windows " + ", ".join(f"{x:,.0f} ({x / least[g] - 1:+.2%})" for x in v))
        print(f"  again / this (A/A)  {least['again'] / least['this']:.4f}")
        if args.baseline:
            print(f"  this / baseline     {least['this'] / least['baseline']:.4f}")
            print(f"  again / baseline    {least['again'] / least['baseline']:.4f}")
        figures[route] = {"per_request": least, "windows": per}
    idle = {g: counts[g]["idle"][0] / 5 for g in gateways}
    print("idle, instructions a second: " + ", ".join(f"{g} {v:,.0f}" for g, v in idle.items()))
    figures.update(
        idle_per_second=idle,
        date=datetime.now(UTC).isoformat(timespec="seconds"),
        valgrind=subprocess.run(["valgrind", "--version"], capture_output=True, text=True).stdout.strip(),
        args={k: str(v) for k, v in vars(args).items()},
    )
    out = write_figures(figures, args.json, "instructions")
    print(f"bench.instructions: figures in {out}; {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
