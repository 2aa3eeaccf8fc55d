"""A real gateway reloading a large CRL: /healthz's worst latency, a steady keep-alive load's p99, the collector's
pauses inside the gateway, and its memory reload after reload (issue #18, perf11).

The bench's scene (`bench.scene`: the lab, one bench user, nginx as the 1 KiB backend), the gateway configured with
one CRL file of the lab's issuing CA listing `--entries` serials (a large CA's; the root's CRL left out: a CA whose
status is unknown is passed), an admin listener for /healthz, `listener.event_loop` as `--loops` says. For each loop:

- a control: `bench.paced` (`--rate` requests/s over 20 keep-alive connections, each latency from its due time) and
  a /healthz poller (one keep-alive connection, a GET every 10 ms, each latency from its send) for `--seconds`, no
  reload;
- the same while the gateway is sent SIGHUP `--reloads` times, each once the one before has logged `reloaded` (a
  reload reads and vets the CRL file in a thread, then swaps it in: the new configuration's CRL set replaces the old);
- inside the gateway, every collection by generation (`gc.callbacks`, dumped on SIGUSR1), and its RSS after each
  reload (the old CRL set must be freed).

`--trees DIR...` runs the gateway from other trees too (`git archive <commit> | tar -x -C DIR`): the before of a
change, in the same run.

    python -m bench.gcreload --entries 200000 --loops uvloop asyncio --reloads 4

Prints one JSON object a line; no figure is judged.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from bench.gcpause import CrlMaker, pct
from bench.scene import REPO, Scene, free_port, wait_port

# Run as the gateway's process (`python -c`, so that the working directory's tree is the one imported): the gateway's
# own command line, with every collection's generation and duration noted and written out on SIGUSR1.
HOOK = """
import gc, json, os, signal, sys, time
seen = []
began = [0.0]
def note(phase, info):
    if phase == "start":
        began[0] = time.perf_counter()
    else:
        seen.append((info["generation"], time.perf_counter() - began[0]))
gc.callbacks.append(note)
def dump(_signum, _frame):
    crls = sum(type(o).__name__ == "Crl" for o in gc.get_objects())  # not the frozen ones (read at start)
    with open(os.environ["KCD_BENCH_GC"], "w") as out:
        json.dump({"collections": seen, "crls_alive": crls}, out)
signal.signal(signal.SIGUSR1, dump)
sys.argv = ["kcd-proxy", *sys.argv[1:]]
from proxy.cli import main
sys.exit(main())
"""


class Poller(threading.Thread):
    """GET /healthz every 10 ms on one keep-alive connection; each answer's latency."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.latencies: list[float] = []
        self.failures = 0
        self.stop = threading.Event()

    def run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        while not self.stop.is_set():
            began = time.perf_counter()
            try:
                conn.request("GET", "/healthz")
                response = conn.getresponse()
                response.read()
                ok = response.status == 200
            except (OSError, http.client.HTTPException):
                ok = False
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
            if ok:
                self.latencies.append(time.perf_counter() - began)
            else:
                self.failures += 1
            self.stop.wait(0.01)
        conn.close()


def rss_mib(pid: int) -> float:
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def events(log: Path, name: str) -> int:
    count = 0
    for line in log.read_bytes().splitlines():
        if line.startswith(b"{"):
            try:
                count += json.loads(line).get("event") == name
            except ValueError:
                continue
    return count


def until(check: Any, what: str, proc: subprocess.Popen[bytes], timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if proc.poll() is not None:
            raise RuntimeError(f"the gateway ended ({proc.returncode}) waiting for {what}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"no {what} in {timeout} s")
        time.sleep(0.05)


def phase(
    scene: Scene,
    proc: subprocess.Popen[bytes],
    ports: tuple[int, int],
    log: Path,
    args: argparse.Namespace,
    *,
    reloads: int,
) -> dict[str, Any]:
    """bench.paced and the poller for `args.seconds`, with `reloads` SIGHUPs spread over it."""
    port, admin = ports
    certs = scene.cert_list(1)
    argv = ["taskset", "-c", scene.cores[1], sys.executable, "-m", "bench.paced", "--url", f"https://127.0.0.1:{port}/"]
    argv += ["--rate", str(args.rate), "--connections", "20", "--seconds", str(args.seconds)]
    argv += ["--cacert", str(scene.layout.pki_dir / "root.pem"), "--certs", str(certs)]
    poller = Poller(admin)
    poller.start()
    load = subprocess.Popen(argv, stdout=subprocess.PIPE, cwd=REPO)
    rss: list[float] = []
    began = time.monotonic()
    done = events(log, "reloaded")
    for _ in range(reloads):
        proc.send_signal(signal.SIGHUP)
        done += 1
        until(lambda n=done: events(log, "reloaded") >= n, "reloaded", proc)
        time.sleep(0.3)
        rss.append(round(rss_mib(proc.pid), 1))
    out, _ = load.communicate(timeout=args.seconds + 600)
    poller.stop.set()
    poller.join()
    paced = json.loads(out)
    healthz = poller.latencies
    return {
        "reloads": reloads,
        "reload_phase_s": round(time.monotonic() - began, 1),
        "paced": {k: paced[k] for k in ("answered", "errors", "p50_ms", "p99_ms", "p999_ms", "max_ms") if k in paced},
        "healthz_max_ms": round(1000 * max(healthz, default=0), 1),
        "healthz_p99_ms": round(1000 * pct(healthz, 99), 1),
        "healthz_polls": len(healthz),
        "healthz_failures": poller.failures,
        "rss_mib_after_each_reload": rss,
    }


def collections(proc: subprocess.Popen[bytes], path: Path) -> tuple[list[tuple[int, float]], int]:
    """The gateway's collections so far, and how many `Crl`s read since start-up it holds."""
    path.unlink(missing_ok=True)
    proc.send_signal(signal.SIGUSR1)
    until(path.exists, "the collections' dump", proc, timeout=30)
    time.sleep(0.2)
    dumped = json.loads(path.read_text())
    return [(g, s) for g, s in dumped["collections"]], dumped["crls_alive"]


def by_generation(seen: list[tuple[int, float]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for gen in (0, 1, 2):
        times = [s for g, s in seen if g == gen]
        out[f"gen{gen}"] = {"count": len(times), "max_ms": round(1000 * max(times, default=0), 1)}
        out[f"gen{gen}"]["total_ms"] = round(1000 * sum(times), 1)
    return out


def one_loop(scene: Scene, args: argparse.Namespace, crl: Path, loop: str) -> dict[str, Any]:
    port, admin = free_port(), free_port()
    text = (scene.root / "gateway.toml").read_text()
    lab_crls = f'crls = ["{scene.layout.pki_dir / "crls.pem"}"]'
    assert lab_crls in text, "the lab configuration's crls line moved"
    text = text.replace(lab_crls, f'crls = ["{crl}"]')
    bind = f'bind = "{scene.layout.bind_host}:{scene.ports["gateway"]}"\n'
    assert bind in text, "the gateway's [listener] bind line moved"
    text = text.replace(bind, f'bind = "{scene.layout.bind_host}:{port}"\nevent_loop = "{loop}"\n')
    text += f'\n[admin]\nbind = "127.0.0.1:{admin}"\n'
    config = scene.root / f"gc-{loop}.toml"
    config.write_text(text)
    log = scene.root / f"gc-{loop}.log"
    dump = scene.root / f"gc-{loop}.json"
    tree = args.tree.resolve() if args.tree else REPO
    env = {**os.environ, **scene.layout.env(), "KCD_BENCH_GC": str(dump), "PYTHONDONTWRITEBYTECODE": "1"}
    argv = ["taskset", "-c", scene.cores[0], sys.executable, "-c", HOOK, "run", "--config", str(config)]
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=tree, env=env, start_new_session=True)
    try:
        wait_port(port, proc, "gateway", timeout=300)
        wait_port(admin, proc, "admin", timeout=60)
        warm = [sys.executable, "-m", "bench.paced", "--url", f"https://127.0.0.1:{port}/", "--rate", "20"]
        warm += ["--connections", "2", "--seconds", "2", "--cacert", str(scene.layout.pki_dir / "root.pem")]
        warm += ["--certs", str(scene.cert_list(1))]
        # warm: the user's tickets (S4U2Self, S4U2Proxy) before anything is timed
        subprocess.run(warm, check=True, capture_output=True, cwd=REPO, timeout=120)
        rss_start = round(rss_mib(proc.pid), 1)
        start_gc, _ = collections(proc, dump)
        control = phase(scene, proc, (port, admin), log, args, reloads=0)
        control_gc = collections(proc, dump)[0][len(start_gc) :]
        reloading = phase(scene, proc, (port, admin), log, args, reloads=args.reloads)
        reload_gc, crls_alive = collections(proc, dump)
        reload_gc = reload_gc[len(start_gc) + len(control_gc) :]
        return {
            "loop": loop,
            "tree": str(tree),
            "rss_mib_warm": rss_start,
            "control": {**control, "gc": by_generation(control_gc)},
            "reloading": {**reloading, "gc": by_generation(reload_gc)},
            "after": {"rss_mib": round(rss_mib(proc.pid), 1), "crls_alive_read_since_start": crls_alive},
            "load": os.getloadavg()[0],
        }
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=200_000)
    parser.add_argument("--loops", nargs="+", default=["uvloop", "asyncio"], choices=["uvloop", "asyncio"])
    parser.add_argument("--reloads", type=int, default=4)
    parser.add_argument("--rate", type=int, default=200, help="keep-alive requests per second (20 connections)")
    parser.add_argument("--seconds", type=float, default=20, help="each phase's length (the reloads may need more)")
    parser.add_argument("--trees", type=Path, nargs="*", default=[], help="other trees to run the gateway from too")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="gcreload-"))
    scene = Scene(root, cores=("0", "1"))
    try:
        scene.build(1)
        scene.start_backends()
        pki = scene.layout.pki_dir
        issuing = x509.load_pem_x509_certificate((pki / "issuing.pem").read_bytes())
        key = serialization.load_pem_private_key((pki / "issuing.key").read_bytes(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        crl = root / "large.crl"
        crl.write_bytes(CrlMaker((issuing, key), args.entries).der(1))
        for loop in args.loops:
            for tree in [None, *args.trees]:
                args.tree = tree
                figures = one_loop(scene, args, crl, loop)
                print(json.dumps({"entries": args.entries, **figures}), flush=True)
    finally:
        scene.teardown()
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
