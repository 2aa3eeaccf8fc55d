"""This tree's gateway against an older tree's, paired round by round, with an A/A control: is a change worth keeping?

Not part of `make bench` (docs/performance.md, "What `make bench` compares", lists it). It builds the bench's scene
(bench.scene) once with `--users` users, and starts three gateways with the same configuration, each pinned to CPU 0
(wrk and the backend on CPU 1): this tree's twice (`this` and `again`, the A/A control: two processes of one build)
and the `--baseline` tree's (a copy of an older tree, e.g. `git archive main | tar -x -C DIR`, as `make bench
--baseline` takes). Each round runs wrk (50 keep-alive connections, one certificate, `--seconds` each) on the default
route (a token on every request) and on the bound route (`backend_binding = "connection"`) against each gateway, the
six runs in an order rotated from round to round. CPU per request is read from /proc for each gateway's process, so it
does not depend on whether wrk kept up. With `--handshakes` each run is instead bench.run's phase 2 on the default
route: wrk with a new TLS connection per request (`Connection: close`, 16 connections, no session resumption), so the
figure is CPU per handshake + request, the new-connection path (accept, TLS, the first request) measured.

Per route it prints the median over rounds of each round's ratio: `this / baseline` (the change), `again / baseline`
(the same change seen from the control's process) and `again / this` (the A/A: what two processes of one build differ
by at this load), with how many rounds were below 1, and the load average before and after. A change pays if its
ratio lies further from 1 than the A/A does. The figures go to bench/results/paired-<time>.json (or `--json`).

    .venv/bin/python -m bench.paired --baseline DIR [--rounds 12] [--seconds 4] [--users 2] [--handshakes] [--json FILE]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from statistics import median

from bench.run import WrkResult, build_shim, cores, write_figures, wrk
from bench.scene import Scene

PATH = "/EWS/Exchange.asmx"
ROUTES = {"default": PATH, "bound": f"/bound{PATH}"}
HANDSHAKES = {"handshakes": PATH}  # `--handshakes`: the default route, a new connection per request
GATEWAYS = ("this", "again", "baseline")  # bench.scene's process names: "gateway", "again", "baseline"
PAIRS = (("this", "baseline"), ("again", "baseline"), ("again", "this"))  # the last one is the A/A control


def ratios(runs: dict[str, list[WrkResult]], a: str, b: str) -> dict[str, object]:
    """CPU per request of `a` over `b`, per round (the two runs minutes apart at most), their median and the
    rounds below 1."""
    each = [x.cpu_us / y.cpu_us for x, y in zip(runs[a], runs[b], strict=True) if y.cpu_us]
    return {
        "median": median(each) if each else None,
        "below_1": sum(r < 1 for r in each),
        "rounds": len(each),
        "each": [round(r, 4) for r in each],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", type=Path, required=True, help="a copy of an older tree (its proxy/ package)")
    parser.add_argument("--rounds", type=int, default=12, help="rounds of the six runs (default 12)")
    parser.add_argument("--seconds", type=float, default=4, help="length of each wrk run (default 4)")
    parser.add_argument("--users", type=int, default=2, help="bench users made (default 2; wrk presents the first)")
    parser.add_argument(
        "--handshakes", action="store_true", help="a new TLS connection per request (bench.run's phase 2) instead"
    )
    parser.add_argument("--json", type=Path, help="write the figures here (default: bench/results/paired-<time>.json)")
    args = parser.parse_args()
    if not (args.baseline / "proxy" / "__main__.py").is_file():
        print(f"bench.paired: {args.baseline} has no proxy/ package of a gateway", file=sys.stderr)
        return 2
    routes = HANDSHAKES if args.handshakes else ROUTES
    # bench.run's phase 2 for handshakes: 16 connections, each closed after its request (wrk_command: no resumption)
    connections, close = (16, ["-H", "Connection: close"]) if args.handshakes else (50, [])
    root = Path(tempfile.mkdtemp(prefix="kcd-paired-"))
    scene = Scene(root, cores())
    started = time.monotonic()
    try:
        print(f"bench.paired: scene in {root}; load average {os.getloadavg()}", flush=True)
        scene.build(args.users)
        build_shim(scene)
        scene.start_backends()
        scene.start_gateway()
        scene.start_variant("again", core=scene.cores[0])
        scene.start_baseline(args.baseline.resolve(), bound=True)
        process = {"this": "gateway", "again": "again", "baseline": "baseline"}
        columns = {
            (gateway, route): (process[gateway], f"https://127.0.0.1:{scene.ports[process[gateway]]}{path}")
            for gateway in GATEWAYS
            for route, path in routes.items()
        }
        certs = scene.cert_list(1)
        for proxy, url in columns.values():  # warm up: the handshake, the tickets, the backend pools
            warmed = wrk(scene, proxy, url, seconds=2, connections=50, certs=certs, args=[])
            if warmed.requests == 0 or warmed.errors:
                raise RuntimeError(f"{proxy} {url}: {warmed.requests} requests, {warmed.errors} errors in the warm-up")
        runs: dict[tuple[str, str], list[WrkResult]] = {column: [] for column in columns}
        load_before = os.getloadavg()
        for n in range(args.rounds):
            order = list(columns)
            for column in order[n % len(order) :] + order[: n % len(order)]:  # each column leads a round in turn
                proxy, url = columns[column]
                runs[column].append(
                    wrk(scene, proxy, url, seconds=args.seconds, connections=connections, certs=certs, args=close)
                )
        load_after = os.getloadavg()
    finally:
        scene.teardown()
        shutil.rmtree(root, ignore_errors=True)

    print(f"\n{args.rounds} rounds of {args.seconds:g} s; load average before / after: {load_before} / {load_after}")
    figures: dict[str, object] = {}
    for route in routes:
        by_gateway = {gateway: runs[gateway, route] for gateway in GATEWAYS}
        us = {gateway: median(r.cpu_us for r in rs) for gateway, rs in by_gateway.items()}
        errors = {gateway: sum(r.errors for r in rs) for gateway, rs in by_gateway.items()}
        paired = {f"{a}/{b}": ratios(by_gateway, a, b) for a, b in PAIRS}
        print(f"{route} route: µs a request (medians) " + ", ".join(f"{g} {us[g]:.0f}" for g in GATEWAYS))
        for name, part in paired.items():
            print(f"  {name:<16} {part['median']:.3f}  ({part['below_1']} of {part['rounds']} rounds below 1)")
        if any(errors.values()):
            print(f"  errors: {errors}")
        figures[route] = {
            "cpu_us": us,
            "errors": errors,
            "paired": paired,
            "runs": {g: [{**vars(r), "cpu_us": r.cpu_us} for r in rs] for g, rs in by_gateway.items()},
        }
    figures.update(
        date=datetime.now(UTC).isoformat(timespec="seconds"),
        load_before=load_before,
        load_after=load_after,
        args={k: str(v) for k, v in vars(args).items()},
    )
    out = write_figures(figures, args.json, "paired")
    print(f"bench.paired: figures in {out}; {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
