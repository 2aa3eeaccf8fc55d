"""Two gateway workers on two cores against one worker on one core: `make bench`'s phase 2c alone, with more
arrangements side by side.

Not part of `make bench` (docs/performance.md, "Two workers on two cores", has its figures). It builds the bench's
scene (bench.scene) with `--users` users, starts the one-worker gateway pinned to CPU 0 and a two-worker gateway
(`listener.workers = 2`, unpinned), with `--nginx` nginx's one- and two-worker processes too, and runs
bench.run.scaling: `--rounds` rounds of wrk runs of `--seconds` each, 50 keep-alive connections, the arrangements in
rotating order. Besides the four of `make bench` (`one`, `two`, `nginx_one`, `nginx_two`), it measures
`two_pinned`, a two-worker gateway started with `listener.worker_cpus = "auto"` (each worker pinned by the gateway to a
core of its own), and `two_again`, the A/A control: a third two-worker gateway started exactly as `two`'s; each against
`two` run by run in the same rounds (`paired`), so `two_again` / `two` is the noise `two_pinned` / `two` must clear,
and `two_pinned` / `two_again` compares two processes started alike but for the setting; and `two_each`, `two`'s own
workers pinned from outside for the run (`sched_setaffinity`, as the setting does): the same A/B within one process.
With `--more`, perf12's arrangements too: `two_free`, the two workers with the static backend released from the load
core for the run (`make bench` leaves it there), and `one_free`, the one-worker gateway with nothing pinned (it, wrk
and the backend anywhere): two workers' CPU per request against one worker's placed alike, as `dedicated_free`.

Per arrangement: requests/s, the cores the proxy used and the whole machine kept busy, the CPU per request of the
proxy, of each worker (from its own CPU and the summary lines it wrote), of wrk and of the backend, the requests and
wrk connections each worker had, and the ratio to one worker measured and with the machine to itself (`ceiling`).

    .venv/bin/python -m bench.scaling [--seconds 8] [--rounds 4] [--users 2] [--nginx] [--more] [--perf] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import geometric_mean, median
from typing import Any

from bench.run import (
    Arrangement,
    build_shim,
    cores,
    scaling,
    scaling_arrangements,
    start_pinned,
    tree,
    warm_workers,
    workers_of,
    wrk,
)
from bench.scene import Scene

PATH = "/EWS/Exchange.asmx"
MULTI_WORKER = ("proxy/auth/shared.py", "proxy/observability/siblings.py")  # code only several workers run
QUIET: dict[str, Any] = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
KNOWN = ("one_worker", "two_workers", "nginx")  # bench.run.scaling's keys for the four arrangements of `make bench`


def show(name: str, part: dict[str, Any]) -> None:
    """One arrangement's figures (medians over its runs), and each run's split over the workers."""
    runs = part["runs"]
    worker_us = [[round(us) for us in run["worker_us"]] for run in runs if run["worker_us"]]
    print(
        f"  {name:<12} {part['rate']:8,.0f} req/s  proxy {part['gateway_cores']:.2f} cores, machine "
        f"{part['machine_cores_busy']:.2f}  µs a request: proxy {part['cpu_us']:.0f}, wrk {part['wrk_us']:.0f}, "
        f"backend {part['backend_us']:.0f}"
    )
    print(f"  {'':<12} {part['placement']}")
    if worker_us:
        print(f"  {'':<12} µs a request per worker: {worker_us}")
        print(f"  {'':<12} requests per worker: {[run['requests_per_worker'] for run in runs]}")
    print(f"  {'':<12} wrk connections per worker: {[run['connections_per_worker'] for run in runs]}")
    print(f"  {'':<12} cores per worker: {[[round(c, 2) for c in run['worker_cores']] for run in runs]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=8, help="length of each wrk run (default 8)")
    parser.add_argument("--rounds", type=int, default=4, help="rounds of every arrangement (default 4)")
    parser.add_argument("--users", type=int, default=2, help="bench users made (default 2; wrk presents the first)")
    parser.add_argument("--nginx", action="store_true", help="nginx's one- and two-worker arrangements too")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument(
        "--more",
        action="store_true",
        help="perf12's arrangements too: two_free (the backend anywhere), one_free (one worker, nothing pinned)",
    )
    parser.add_argument(
        "--perf",
        action="store_true",
        help="then one more two-worker run under `perf record -a`: the machine by part",
    )
    args = parser.parse_args()
    if (os.cpu_count() or 1) < 2:
        print("bench.scaling: needs two cores", file=sys.stderr)
        return 2
    root = Path(tempfile.mkdtemp(prefix="kcd-scaling-"))
    scene = Scene(root, cores())
    started = time.monotonic()
    try:
        print(f"bench.scaling: scene in {root}; load average {os.getloadavg()}")
        scene.build(args.users)
        build_shim(scene)
        scene.start_backends()
        scene.start_gateway()
        scene.start_variant("gateway2", core="", workers=2)
        start_pinned(scene)
        scene.start_variant("gateway2b", core="", workers=2)
        if args.nginx:
            scene.start_nginx()
            scene.start_nginx_workers("nginx2", 2, core="")
        urls = scaling_arrangements(scene, PATH, nginx=args.nginx)
        two = urls["two"]
        # the A/A control: a second unpinned two-worker gateway started as `two`'s, in the same rounds: the noise of
        # a paired ratio between two processes, which `two_pinned` / `two` is
        urls["two_again"] = Arrangement(
            "gateway2b", f"https://127.0.0.1:{scene.ports['gateway2b']}{PATH}", False, two.backend_cores
        )
        # `two`'s own workers pinned from outside for the run, as the setting pins them: the same A/B within one process
        urls["two_each"] = Arrangement(two.proxy, two.url, two.pinned, two.backend_cores, ("0", "1"))
        if args.more:
            urls["two_free"] = Arrangement(two.proxy, two.url, two.pinned, "")
            urls["one_free"] = Arrangement("gateway", urls["one"].url, False, "", ("",))
        certs = scene.cert_list(1)
        for where in urls.values():  # warm up: handshakes, tickets, pools (both workers of gateway2 answered)
            if where.proxy.startswith("gateway2"):
                warm_workers(scene, where.proxy, where.url, workers=2, certs=certs)
            else:
                wrk(scene, where.proxy, where.url, seconds=2, connections=50, certs=certs, args=[], pinned=where.pinned)
        load_before = os.getloadavg()
        figures = scaling(scene, urls, seconds=args.seconds, rounds=args.rounds, certs=certs)
        load_after = os.getloadavg()
        machine = whole_machine(scene, urls["two"], args.seconds, certs) if args.perf else ""
    finally:
        scene.teardown()
        shutil.rmtree(root, ignore_errors=True)
    print(f"\n{args.rounds} rounds of {args.seconds:g} s; load average before / after: {load_before} / {load_after}")
    parts: dict[str, dict[str, Any]] = {"one": figures["one_worker"], "two": figures["two_workers"]}  # type: ignore[dict-item]
    parts.update({k: v for k, v in figures.items() if isinstance(v, dict) and "runs" in v and k not in KNOWN})
    nginx = figures.get("nginx")
    if isinstance(nginx, dict):
        parts["nginx_one"], parts["nginx_two"] = nginx["one_worker"], nginx["two_workers"]
    for name, part in parts.items():
        show(name, part)
    print("ratios to one worker (measured; with the machine to itself, `ceiling`; `dedicated`):")
    ratios = {"two": figures, **{k: v for k, v in parts.items() if "throughput_ratio" in v}}
    if isinstance(nginx, dict):
        ratios["nginx_two"] = nginx
    for name, part in ratios.items():
        print(
            f"  {name:<12} {part['throughput_ratio']:.2f}; ceiling {part['ceiling']:.2f}; with a core for each worker "
            f"and the load elsewhere {part['dedicated']:.2f} (CPU per request, two / one: "
            f"{part['cpu_per_request_ratio']:.2f})"
        )
    paired = paired_rates(parts)
    for name, value in paired.items():
        print(f"  paired per round, {name}: {round(value, 3) if isinstance(value, float) else value}")
    if machine:
        print(f"the whole machine during one more `two` run (perf record -a, both cores):\n{machine}")
    print(f"bench.scaling: {time.monotonic() - started:.0f} s")
    if args.json:
        figures["whole_machine"] = machine.splitlines()
        figures["paired"] = paired
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, **figures}, indent=2) + "\n")
    return 0


def whole_machine(scene: Scene, where: Arrangement, seconds: float, certs: Path) -> str:
    """`perf record -a` (both cores, 499 Hz) for `seconds` while wrk runs against `where`: the busy samples of each
    part of the scene (each worker, its supervisor, wrk, the backend) and of everything else on the machine (the
    neighbours), each split into the kernel's share and user space's."""
    data = scene.root / "perf.data"
    argv = ["perf", "record", "-a", "-F", "499", "-o", str(data), "--", "sleep", f"{seconds:g}"]
    recorder = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    proxy = scene.procs[where.proxy].pid
    roles = {proxy: "supervisor", **{pid: f"worker {n}" for n, pid in enumerate(workers_of(proxy), 1)}}
    roles.update(dict.fromkeys(tree(scene.procs["backend"].pid), "backend"))
    spies = {}
    spy = Path(sys.executable).parent / "py-spy"
    if spy.exists():  # not a dependency of the project: `pip install py-spy` into the venv to have it
        for pid, role in roles.items():
            if role.startswith("worker"):
                raw = scene.root / f"py-spy-{pid}.txt"
                argv = [str(spy), "record", "--nonblocking", "-r", "200", "-d", f"{seconds:g}", "-f", "raw"]
                spies[role] = (raw, subprocess.Popen([*argv, "-o", str(raw), "-p", str(pid)], **QUIET))
    try:
        wrk(scene, where.proxy, where.url, seconds=seconds, connections=50, certs=certs, args=[], pinned=where.pinned)
    finally:
        recorder.wait(timeout=seconds + 60)
        for _, spying in spies.values():
            spying.wait(timeout=seconds + 60)
    report = ["perf", "report", "-i", str(data), "--sort", "pid,dso", "--stdio", "--percent-limit", "0"]
    out = subprocess.run(report, capture_output=True, text=True, check=False).stdout
    shares: dict[str, dict[str, float]] = {}
    for found in re.finditer(r"^\s*([\d.]+)%\s+(\d+):(\S+)\s+(\S+)", out, re.MULTILINE):  # "6.42%  5647:python  dso"
        percent, pid, comm, dso = float(found[1]), int(found[2]), found[3], found[4]
        role = "idle" if pid == 0 else roles.get(pid, "wrk" if comm == "wrk" else "everything else")
        side = "kernel" if dso.startswith("[kernel") else "user"
        shares.setdefault(role, {"kernel": 0.0, "user": 0.0})[side] += percent
    order = sorted(shares.items(), key=lambda kv: -sum(kv[1].values()))
    lines = [
        f"  {role:<16} {sum(s.values()):5.1f}% of the busy samples (kernel {s['kernel']:.1f}%, user {s['user']:.1f}%)"
        for role, s in order
    ]
    for role, (raw, _) in spies.items():
        lines.append(f"  {role}, py-spy: {python_view(raw)}")
    return "\n".join(lines)


def python_view(raw: Path) -> str:
    """A worker's py-spy samples (`-f raw`: a stack and its count a line): the share of samples whose stack passes
    through code only several workers run (the shared table, the siblings' sockets; every worker's stack starts in
    proxy/workers.py, which forked it), and the functions most often on top."""
    total, shared, top = 0, dict.fromkeys(MULTI_WORKER, 0), dict[str, int]()
    for line in raw.read_text(errors="replace").splitlines() if raw.exists() else []:
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        total += int(count)
        for name in MULTI_WORKER:
            shared[name] += int(count) if name in stack else 0
        leaf = stack.rpartition(";")[2]
        top[leaf] = top.get(leaf, 0) + int(count)
    if not total:
        return "no samples"
    multi = ", ".join(f"{name} {n / total:.1%}" for name, n in shared.items())
    best = ", ".join(f"{leaf} {n / total:.1%}" for leaf, n in sorted(top.items(), key=lambda kv: -kv[1])[:4])
    return f"{total} samples; stacks through {multi}; on top: {best}"


def paired_rates(parts: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Within each round, every two-worker arrangement over `two`, and `two_pinned` over `two_again` (the A/A control,
    a process started as `two`'s: its ratio to `two` is the noise, and the bias between two processes, that a paired
    ratio has in this run) and over both unpinned processes (the geometric mean of the two's requests/s): medians,
    geometric means, the rounds above 1 and each round's ratio of requests/s."""
    out: dict[str, Any] = {}
    if "one_free" in parts:  # like `dedicated`, from a one-worker gateway placed as the two workers are
        out["dedicated_free: 2 x one_free / two, CPU per request"] = median(
            2 * a["cpu_us"] / b["cpu_us"] for a, b in zip(parts["one_free"]["runs"], parts["two"]["runs"], strict=True)
        )
    against = [(name, "two") for name in sorted(n for n in parts if n.startswith("two_"))]
    if {"two_pinned", "two_again"} <= set(parts):  # both processes started after `two`'s, side by side
        against.append(("two_pinned", "two_again"))
    for name, base in against:
        pairs = list(zip(parts[name]["runs"], parts[base]["runs"], strict=True))
        rounds = [a["rate"] / b["rate"] for a, b in pairs]
        out[f"{name} / {base}, requests/s"] = median(rounds)
        out[f"{name} / {base}, requests/s, geometric mean"] = geometric_mean(rounds)
        out[f"{name} / {base}, rounds above 1"] = f"{sum(r > 1 for r in rounds)} of {len(rounds)}"
        out[f"{name} / {base}, requests/s, each round"] = [round(r, 3) for r in rounds]
        out[f"{name} / {base}, proxy µs a request"] = median(a["cpu_us"] / b["cpu_us"] for a, b in pairs)
        out[f"{name} / {base}, proxy cores"] = median(a["cpu_s"] / b["cpu_s"] for a, b in pairs)
        out[f"{name} / {base}, backend µs a request"] = median(a["backend_us"] / b["backend_us"] for a, b in pairs)
    if {"two_pinned", "two_again"} <= set(parts):  # against both unpinned processes at once: their drift cancels out
        both = zip(parts["two_pinned"]["runs"], parts["two"]["runs"], parts["two_again"]["runs"], strict=True)
        rounds = [p["rate"] / (a["rate"] * b["rate"]) ** 0.5 for p, a, b in both]
        out["two_pinned / both unpinned (geometric mean of two and two_again), requests/s"] = median(rounds)
        out["two_pinned / both unpinned, rounds above 1"] = f"{sum(r > 1 for r in rounds)} of {len(rounds)}"
    return out


if __name__ == "__main__":
    sys.exit(main())
