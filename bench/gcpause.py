"""The event loop's pauses across CRL refreshes: the garbage collector's and the rest (issue #18, perf11).

A gateway holding a large CRL (a large CA's: 200,000 entries, or a million) refreshes it when its issuer publishes a
new one. The CRL is read, vetted and indexed in a thread (`CrlStore._fetch`, `_swap_in_thread`), but that thread
shares the GIL with the event loop, and a collection of the garbage collector holds it throughout, whichever thread
started it. This script measures, in one process as the gateway has it (a `CrlStore` with a file source, read at
start, then `gc.freeze()` as `proxy.app` does), on the loop chosen:

- `loop lag`: how late a 1 ms timer on the event loop ran while the refresh went on (the worst, and the p99): what a
  /healthz poll or a request would have waited on top of its own time;
- `gc`: every collection (`gc.callbacks`), by generation: how many, the longest, the total, and the longest that
  ran while the timer waited (a full collection, generation 2, walks every tracked object not frozen);
- the resident memory after each refresh, and how many of the `Crl` objects made are still alive (weak
  references): the old CRLs must be freed, refresh after refresh.

Each refresh reads a CRL of the same entries with the next CRL number (a CA's next publication), signed afresh; the
entries' DER is made once per size (`CertificateRevocationListBuilder`), then only the CRL number and the signature
change. `--variant` adds what a change to the gateway would do, without changing it: `freeze` (gc.freeze() after
each swap, on the loop), `collect` (gc.collect() in the CRL's thread just before the new set is installed),
`threshold` (gc.set_threshold(50_000, 20, 100)). Run it from another tree (`--tree DIR`: `git worktree add DIR
<commit>`) to measure that tree's code.

    python -m bench.gcpause --entries 200000 1000000 --loops asyncio uvloop --refreshes 5

Prints one JSON object a line (one per entries x loop x variant); no figure is judged.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
import weakref
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

VARIANTS = ("none", "freeze", "collect", "threshold")


def ca() -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A self-signed CA (the trust anchor that signs the CRLs)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Bench Large CA")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _der_length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


class CrlMaker:
    """CRLs of one CA listing the same `entries` serials, each with its own CRL number (1-127), signed afresh."""

    NUMBER = bytes.fromhex("0603551d14040302017f")  # extnID cRLNumber, OCTET STRING { INTEGER 127 }

    def __init__(self, issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey], entries: int) -> None:
        cert, self.key = issuer
        now = datetime.now(UTC)
        revoked = [
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now - timedelta(minutes=10)).build()
            for serial in range(10**30, 10**30 + entries)
        ]
        template = x509.CertificateRevocationListBuilder(
            issuer_name=cert.subject,
            last_update=now - timedelta(minutes=5),
            next_update=now + timedelta(days=1),
            extensions=[x509.Extension(x509.CRLNumber.oid, False, x509.CRLNumber(127))],
            revoked_certificates=revoked,
        ).sign(self.key, hashes.SHA256())
        self.tbs = template.tbs_certlist_bytes
        outer = template.public_bytes(serialization.Encoding.DER)
        start = outer.index(self.tbs) + len(self.tbs)  # the signatureAlgorithm follows the tbsCertList
        algorithm_length = outer[start + 1]
        self.algorithm = outer[start : start + 2 + algorithm_length]
        assert self.tbs.count(self.NUMBER) == 1

    def der(self, number: int) -> bytes:
        assert 1 <= number <= 127
        tbs = self.tbs.replace(self.NUMBER, self.NUMBER[:-1] + bytes([number]))
        signature = b"\x00" + self.key.sign(tbs, ec.ECDSA(hashes.SHA256()))
        bit_string = b"\x03" + _der_length(len(signature)) + signature
        body = tbs + self.algorithm + bit_string
        return b"\x30" + _der_length(len(body)) + body


def rss_mib() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class Collections:
    """Every collection's generation, duration and thread, from `gc.callbacks`."""

    def __init__(self) -> None:
        self.started: dict[int, float] = {}
        self.seen: list[tuple[int, float, bool, float]] = []  # (generation, seconds, on the loop's thread, end)
        self.loop_thread = threading.get_ident()

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        now = time.perf_counter()
        me = threading.get_ident()
        if phase == "start":
            self.started[me] = now
        elif me in self.started:
            self.seen.append((info["generation"], now - self.started.pop(me), me == self.loop_thread, now))


def pct(values: list[float], p: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


async def measure(args: argparse.Namespace, maker: CrlMaker, anchor: x509.Certificate, variant: str) -> dict[str, Any]:
    from proxy.certs.chain import TrustList
    from proxy.certs.revocation import Crl, CrlSet
    from proxy.certs.sources import CrlSource, CrlStore

    workdir = Path(tempfile.mkdtemp(prefix="gcpause-"))
    path = workdir / "large.crl"
    path.write_bytes(maker.der(1))
    store = CrlStore(TrustList((anchor,)), [CrlSource(str(path))], refresh_seconds=3600)
    made: list[weakref.ref[Crl]] = []
    problems = store.load_files(now=datetime.now(UTC))
    assert not problems, problems
    made.extend(weakref.ref(crl) for crl in store.current.crls)
    if variant == "freeze":
        store.on_change(lambda _old, _new: gc.freeze())
    if variant == "collect":
        of = CrlSet.of

        def collected(*a: Any, **kw: Any) -> tuple[CrlSet, list[str]]:
            result = of(*a, **kw)
            gc.collect()
            return result

        CrlSet.of = collected  # type: ignore[method-assign]
    if variant == "threshold":
        gc.set_threshold(50_000, 20, 100)
    gc.freeze()  # as proxy.app does once the gateway listens
    collections = Collections()
    gc.callbacks.append(collections)
    lags: list[float] = []
    rss: list[float] = []
    refresh_s: list[float] = []
    stop = asyncio.Event()

    async def ticker() -> None:
        while not stop.is_set():
            before = time.perf_counter()
            await asyncio.sleep(0.001)
            lags.append(time.perf_counter() - before - 0.001)

    ticking = asyncio.ensure_future(ticker())
    await asyncio.sleep(0.05)
    try:
        for number in range(2, 2 + args.refreshes):
            path.write_bytes(maker.der(number))
            began = time.perf_counter()
            new = await store.refresh()
            refresh_s.append(time.perf_counter() - began)
            assert new.crls, store.status()
            assert new.crls[0].number == number, (store.status(), number)
            made.extend(weakref.ref(crl) for crl in new.crls)
            await asyncio.sleep(0.02)
            rss.append(rss_mib())
    finally:
        stop.set()
        await ticking
        gc.callbacks.remove(collections)
        if variant == "collect":
            CrlSet.of = of  # type: ignore[method-assign]
        gc.set_threshold(700, 10, 10)
        gc.unfreeze()
        shutil.rmtree(workdir, ignore_errors=True)
    alive = sum(ref() is not None for ref in made)
    by_gen: dict[str, Any] = {}
    for gen in (0, 1, 2):
        times = [s for g, s, _, _ in collections.seen if g == gen]
        by_gen[f"gen{gen}"] = {
            "count": len(times),
            "max_ms": round(1000 * max(times, default=0), 2),
            "total_ms": round(1000 * sum(times), 1),
            "on_loop_thread": sum(1 for g, _, on_loop, _ in collections.seen if g == gen and on_loop),
        }
    return {
        "variant": variant,
        "refreshes": args.refreshes,
        "refresh_s_median": round(sorted(refresh_s)[len(refresh_s) // 2], 2),
        "lag_max_ms": round(1000 * max(lags), 1),
        "lag_p99_ms": round(1000 * pct(lags, 99), 1),
        "lag_p999_ms": round(1000 * pct(lags, 99.9), 1),
        "gc": by_gen,
        "rss_mib": [round(r, 1) for r in rss],
        "crls_alive": alive,
        "crls_held": len(store.current.crls),
    }


def run_one(
    args: argparse.Namespace, maker: CrlMaker, anchor: x509.Certificate, loop: str, variant: str
) -> dict[str, Any]:
    if loop == "uvloop":
        import uvloop

        return uvloop.run(measure(args, maker, anchor, variant))
    return asyncio.run(measure(args, maker, anchor, variant))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, nargs="+", default=[200_000])
    parser.add_argument("--loops", nargs="+", default=["asyncio", "uvloop"], choices=["asyncio", "uvloop"])
    parser.add_argument("--variants", nargs="+", default=["none"], choices=VARIANTS)
    parser.add_argument("--refreshes", type=int, default=5)
    parser.add_argument("--tree", type=Path, help="import `proxy` from this tree (another commit's worktree)")
    args = parser.parse_args()
    if args.tree:
        sys.path.insert(0, str(args.tree.resolve()))
    import structlog

    import proxy

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))  # no crl_loaded lines
    print(json.dumps({"proxy_from": str(Path(proxy.__file__).parent), "load": os.getloadavg()}), flush=True)
    issuer = ca()
    for entries in args.entries:
        began = time.perf_counter()
        maker = CrlMaker(issuer, entries)
        made_s = time.perf_counter() - began
        for loop in args.loops:
            for variant in args.variants:
                figures = run_one(args, maker, issuer[0], loop, variant)
                figures = {"entries": entries, "loop": loop, **figures, "load": os.getloadavg()[0]}
                print(json.dumps(figures), flush=True)
        del maker
        print(json.dumps({"entries": entries, "crl_made_s": round(made_s, 1)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
