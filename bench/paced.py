"""An open-loop load generator: requests at a fixed rate over a fixed number of keep-alive TLS connections.

wrk (what the bench uses at saturation) is closed-loop: each connection sends its next request when the
previous answer is in, so a proxy that stalls for 100 ms is simply sent fewer requests meanwhile, and the
requests it delayed are never counted as late ("coordinated omission"). wrk2 fixes that and is not in
Debian; `h2load --rate` paces new connections, not requests. So the bench paces requests itself:

- request i is due at `t0 + i / rate`, whatever happened to the ones before it; a scheduler puts it in a
  queue at that moment, and whichever of the `connections` keep-alive connections is free takes it;
- its latency is measured from when it was **due**, not from when a connection got round to sending it:
  time spent queued behind a slow answer counts, as it would for a device (wrk2's correction);
- the generator's own lateness (its event loop woken after the due time, on a busy machine) is in those
  figures too, against every proxy alike, and is reported (`lag_p99_ms`, `lag_max_ms`) so a run where the
  generator itself could not keep up is visible.

Each connection presents a client certificate (a `cert key` pair from `--certs`, taken in turn). Answers
are read by Content-Length or chunked framing; a non-2xx answer or a broken connection counts as an error.
Prints one JSON object: requests sent and answered, errors, p50/p90/p99/p99.9/max latency in ms.

    python -m bench.paced --url https://127.0.0.1:9443/x --rate 500 --connections 50 --seconds 10 \\
        --cacert root.pem --certs certs.txt
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import ssl
import time
from pathlib import Path
from urllib.parse import urlsplit


def percentile(sorted_values: list[float], p: float) -> float:
    """The p-th percentile (0-100) of already sorted values, nearest rank; NaN when there are none."""
    if not sorted_values:
        return float("nan")
    rank = max(1, min(len(sorted_values), math.ceil(p / 100 * len(sorted_values))))
    return sorted_values[rank - 1]


async def read_answer(reader: asyncio.StreamReader) -> int:
    """Read one HTTP/1.1 answer off `reader`; its status code."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    fields = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
    if "chunked" in fields.get("transfer-encoding", "").lower():
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    else:
        await reader.readexactly(int(fields.get("content-length", "0")))
    return status


async def run(
    url: str, rate: float, connections: int, seconds: float, contexts: list[ssl.SSLContext]
) -> dict[str, float]:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 443
    request = f"GET {parts.path or '/'} HTTP/1.1\r\nHost: {parts.netloc}\r\nUser-Agent: bench.paced\r\n\r\n".encode()
    due: asyncio.Queue[float | None] = asyncio.Queue()
    latencies: list[float] = []
    lags: list[float] = []
    errors = 0

    async def connection(n: int) -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection(host, port, ssl=contexts[n % len(contexts)])
        try:
            while (when := await due.get()) is not None:
                try:
                    writer.write(request)
                    status = await read_answer(reader)
                except (OSError, asyncio.IncompleteReadError, ValueError):
                    errors += 1
                    writer.close()
                    reader, writer = await asyncio.open_connection(host, port, ssl=contexts[n % len(contexts)])
                    continue
                latencies.append(time.monotonic() - when)
                errors += not 200 <= status < 300
        finally:
            writer.close()

    workers = [asyncio.create_task(connection(n)) for n in range(connections)]
    await asyncio.sleep(0.5)  # connections (and their handshakes) first: this measures requests, not handshakes
    total = int(rate * seconds)
    start = time.monotonic()
    for i in range(total):
        when = start + i / rate
        delay = when - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        lags.append(time.monotonic() - when)
        due.put_nowait(when)
    for _ in workers:
        due.put_nowait(None)
    await asyncio.gather(*workers)
    elapsed = time.monotonic() - start
    ms = sorted(x * 1000 for x in latencies)
    lag = sorted(x * 1000 for x in lags)
    return {
        "rate": rate,
        "connections": connections,
        "sent": total,
        "answered": len(latencies),
        "errors": errors,
        "seconds": elapsed,
        "p50_ms": percentile(ms, 50),
        "p90_ms": percentile(ms, 90),
        "p99_ms": percentile(ms, 99),
        "p999_ms": percentile(ms, 99.9),
        "max_ms": ms[-1] if ms else float("nan"),
        "lag_p99_ms": percentile(lag, 99),
        "lag_max_ms": lag[-1] if lag else float("nan"),
    }


def contexts_from(cacert: str, certs: Path | None, limit: int) -> list[ssl.SSLContext]:
    pairs = [line.split() for line in certs.read_text().splitlines() if line.strip()] if certs else [[]]
    out = []
    for pair in pairs[:limit]:
        ctx = ssl.create_default_context(cafile=cacert)
        ctx.check_hostname = False  # the bench's proxies listen on 127.0.0.1 with the lab's server name
        if pair:
            ctx.load_cert_chain(pair[0], pair[1])
        out.append(ctx)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True)
    parser.add_argument("--rate", type=float, default=500, help="requests per second (default 500)")
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--cacert", required=True, help="PEM: the CA the proxy's server certificate chains to")
    parser.add_argument("--certs", type=Path, help='client certificates: lines "cert.pem key.pem", one per connection')
    args = parser.parse_args()
    contexts = contexts_from(args.cacert, args.certs, args.connections)
    print(json.dumps(asyncio.run(run(args.url, args.rate, args.connections, args.seconds, contexts))))


if __name__ == "__main__":
    main()
