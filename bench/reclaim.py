"""New devices served per second at the connection cap, with `--idle` idle keep-alives holding it.

Not part of `make bench` (docs/performance.md, "Idle keep-alives at the cap", has its figures). It brings up the
lab in a temporary directory, and for each `--source` directory (a checkout of the gateway; the current one by
default) starts `kcd-proxy run` in `basic` mode (no client certificate, no KDC on the path: the listener is
what is measured) with `listener.max_connections = --idle`, and a keep-alive timeout of `--keepalive` seconds:

1. `--idle` devices connect over TLS, ask once (a 401) and keep their connections, idle;
2. `--clients` loops then act as new devices for `--seconds`: each connects, asks once, and keeps its connection
   (so that every new device needs a slot of the cap); served per second is what is printed;
3. the same with `max_connections` 4,000 higher (the cap not reached: no connection closed for anyone), the
   control of what a new device costs the client and the gateway here.

Per case: new devices served per second, their latency (connect to answer), and the gateway's CPU per new device
(/proc: on a loaded machine the rate is mostly the machine's, the CPU per device the gateway's).

    .venv/bin/python -m bench.reclaim --idle 200 --seconds 15 --source /tmp/before --source .

With `--attack`, one address (127.0.0.1) opens `--idle` bare TCP connections at once instead (no TLS byte, each held
until the gateway ends it), with `listener.max_connections_per_address` 0 (off, the default) and then `--per-address`;
the idle devices come from addresses of their own (127.0.1.x). Printed: how many idle devices' connections the
attacker's burst closed, and in how many seconds (docs/throttles-and-limits.md, "What the reclaim leaves to the
kernel, and what a stranger can make it close").

    .venv/bin/python -m bench.reclaim --attack --idle 200 --per-address 4
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.scene import free_port, wait_port
from proxy.lab import runner
from proxy.lab.layout import LabLayout

REPO = Path(__file__).resolve().parents[1]
REQUEST = b"GET /owa/ HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


async def device(port: int, ctx: ssl.SSLContext, within: float) -> asyncio.StreamWriter | None:
    """A device that connects, asks once and keeps its connection; None if it was not served `within` seconds."""
    try:
        async with asyncio.timeout(within):
            reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
            writer.write(REQUEST)
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length:", 1)[1].split(b"\r\n", 1)[0])
            await reader.readexactly(length)
            return writer
    except (TimeoutError, OSError, asyncio.IncompleteReadError):
        return None


async def idle_device(port: int, ctx: ssl.SSLContext, source: str) -> asyncio.StreamReader:
    """A device from `source` that connects, asks once and keeps its connection idle; its reader (which keeps its
    writer, whose collection would close the connection)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, local_addr=(source, 0))
    writer.write(REQUEST)
    head = await reader.readuntil(b"\r\n\r\n")
    await reader.readexactly(int(head.lower().split(b"content-length:", 1)[1].split(b"\r\n", 1)[0]))
    reader.writer = writer  # type: ignore[attr-defined]
    return reader


async def attack(port: int, ctx: ssl.SSLContext, idle: int) -> dict[str, float]:
    """`idle` devices of their own addresses hold the cap; then one address opens `idle` TCP connections at once and
    holds them: the idle devices' connections closed for it, and the seconds from its first connect to the last close.
    """
    readers = [await idle_device(port, ctx, f"127.0.{1 + n // 250}.{1 + n % 250}") for n in range(idle)]
    closed_at: list[float] = []

    async def closed(reader: asyncio.StreamReader) -> None:
        with contextlib.suppress(OSError, ssl.SSLError):
            await reader.read()
        closed_at.append(time.monotonic())

    watching = [asyncio.ensure_future(closed(r)) for r in readers]
    await asyncio.sleep(1)
    before = len(closed_at)  # closed before the attack: none expected
    started = time.monotonic()
    held = []
    for _ in range(idle):
        with contextlib.suppress(OSError):
            held.append(await asyncio.open_connection("127.0.0.1", port))
    await asyncio.wait(watching, timeout=5)  # the closes the burst made (handshake_timeout is 10 s)
    for _, writer in held:
        writer.close()
    for task in watching:
        task.cancel()
    return {
        "idle_held": len(readers),
        "attacker_connections": idle,
        "idle_closed_before": before,
        "idle_closed": len(closed_at) - before,
        "seconds_to_last_close": round(max(closed_at) - started, 3) if closed_at else 0.0,
    }


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of process `pid` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def measure(
    port: int, pid: int, ctx: ssl.SSLContext, idle: int, clients: int, seconds: float
) -> dict[str, float]:
    held = [w for w in await asyncio.gather(*(device(port, ctx, 60) for _ in range(idle))) if w is not None]
    served = waited = 0
    latencies: list[float] = []
    kept: list[asyncio.StreamWriter] = []
    end = time.monotonic() + seconds

    async def loop() -> None:
        nonlocal served, waited
        while time.monotonic() < end:
            started = time.monotonic()
            writer = await device(port, ctx, max(end - started, 0.1))
            if writer is None:
                waited += 1
                continue
            served += 1
            latencies.append(time.monotonic() - started)
            kept.append(writer)

    started, cpu = time.monotonic(), cpu_seconds(pid)
    await asyncio.gather(*(loop() for _ in range(clients)))
    elapsed, cpu = time.monotonic() - started, cpu_seconds(pid) - cpu
    for writer in (*held, *kept):
        writer.close()
    latencies.sort()
    p50 = latencies[len(latencies) // 2] * 1000 if latencies else float("nan")
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000 if latencies else float("nan")
    return {
        "idle_held": len(held),
        "served": served,
        "per_second": round(served / elapsed, 1),
        "unserved_at_end": waited,
        "gateway_cpu_ms_per_device": round(cpu * 1000 / served, 2) if served else float("nan"),
        "p50_ms": round(p50, 1),
        "p99_ms": round(p99, 1),
    }


def gateway(
    lab: LabLayout, source: Path, directory: Path, cap: int, keepalive: float, server: str, per_address: int = 0
) -> subprocess.Popen[bytes]:
    port = free_port()
    text = runner.gateway_config(lab, gateway_port=port) + '\n[authentication]\nmode = "basic"\n'
    lines = f'http_server = "{server}"\nmax_connections = {cap}\nkeepalive_timeout = {keepalive}\n'
    lines += f"max_connections_per_address = {per_address}\n"
    text = text.replace("[listener]\n", f"[listener]\n{lines}", 1)
    config = directory / f"gateway-{port}.toml"
    config.write_text(text)
    log = (directory / f"gateway-{port}.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy", "run", "--config", str(config)],
        cwd=source,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, **lab.env(), "PYTHONPATH": str(source)},
    )
    proc.port = port  # type: ignore[attr-defined]
    wait_port(port, proc, f"the gateway from {source}", timeout=120)
    return proc


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--idle", type=int, default=200)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--keepalive", type=float, default=75)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--source", action="append", type=Path)
    parser.add_argument("--server", choices=("own", "aiohttp"), default="own", help="listener.http_server")
    parser.add_argument("--attack", action="store_true", help="one address's burst of bare TCP connections")
    parser.add_argument("--per-address", type=int, default=4, help="max_connections_per_address for --attack")
    args = parser.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    sources = [s.resolve() for s in (args.source or [REPO])]
    with tempfile.TemporaryDirectory(prefix="kcd-reclaim-") as tmp:
        root = Path(tmp)
        lab = LabLayout(
            root=root / "lab",
            ldap_port=free_port(),
            kdc_port=free_port(),
            backend_port=free_port(),
            crl_port=free_port(),
            ocsp_port=free_port(),
            gateway_port=free_port(),
        )
        runner.up(lab)
        try:
            ctx = ssl.create_default_context(cafile=str(lab.pki_dir / "root.pem"))
            if args.attack:
                for per_address in (0, args.per_address):
                    proc = gateway(lab, sources[-1], root, args.idle, args.keepalive, args.server, per_address)
                    try:
                        figures = asyncio.run(attack(proc.port, ctx, args.idle))  # type: ignore[attr-defined]
                    finally:
                        proc.terminate()
                        proc.wait(timeout=60)
                    print(json.dumps({"server": args.server, "per_address": per_address, **figures}), flush=True)
                return 0
            for round_ in range(args.rounds):
                for source in sources:
                    for label, cap in (("at the cap", args.idle), ("below the cap", args.idle + 4000)):
                        if label == "below the cap" and source != sources[-1]:
                            continue  # the control once a round, on the last source
                        proc = gateway(lab, source, root, cap, args.keepalive, args.server)
                        try:
                            figures = asyncio.run(
                                measure(proc.port, proc.pid, ctx, args.idle, args.clients, args.seconds)  # type: ignore[attr-defined]
                            )
                        finally:
                            proc.terminate()
                            proc.wait(timeout=60)
                        line = {"round": round_, "source": str(source), "server": args.server, "case": label, **figures}
                        print(json.dumps(line), flush=True)
        finally:
            runner.down(lab)
    return 0


if __name__ == "__main__":
    sys.exit(main())
