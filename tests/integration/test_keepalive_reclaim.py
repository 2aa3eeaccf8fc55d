"""At `listener.max_connections`, an idle keep-alive gives way to a new device (nginx's `ngx_drain_connections`).

Real gateways on both device-side servers (`listener.http_server`), the lab's KDC and backend, devices presenting
the lab PKI's certificates over real TLS. The cap is 4 connections per worker; the keep-alive timeout is long (120 s),
so a fifth device served within seconds was served because an idle connection was closed for it, not because one
timed out.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from proxy.lab.layout import LabLayout
from tests.integration.conftest import Gateway, client_context, free_port, lab_config, metric, start_gateway

SERVERS = ("own", "aiohttp")
CAP = 4
USERS = ("alice", "bob", "carol", "alice")  # CAP devices (alice has two)
SERVED_WITHIN = 20.0  # seconds a new device may take to be served at the cap (the keep-alive timeout is 120 s)
Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@pytest.fixture(params=SERVERS)
def server(request: pytest.FixtureRequest) -> str:
    """Each device-side server (`listener.http_server`)."""
    return str(request.param)


@contextmanager
def capped(lab: LabLayout, directory: Path, server: str, listener: str = "") -> Iterator[tuple[Gateway, str]]:
    """A gateway on `server` with `listener.max_connections = CAP` (and `listener`'s lines), a keep-alive timeout of
    120 s and an admin listener; yields it and its admin URL, and stops it."""
    admin = f"127.0.0.1:{free_port()}"
    text = lab_config(lab, port=free_port(), extra=f'\n[admin]\nbind = "{admin}"\n')
    lines = f'http_server = "{server}"\nmax_connections = {CAP}\nkeepalive_timeout = 120\n{listener}'
    gw = start_gateway(lab, directory, text.replace("[listener]\n", f"[listener]\n{lines}", 1))
    try:
        gw.wait_for("listening", lambda e: e.get("http_server") == server, what=server)
        yield gw, f"http://{admin}"
    finally:
        gw.stop()


def head(path: str, extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra}\r\n".encode()


async def connect(lab: LabLayout, port: int, user: str, source: str = "127.0.0.1") -> Stream:
    """A device's TLS connection, its certificate `user`'s."""
    return await asyncio.open_connection("127.0.0.1", port, ssl=client_context(lab, user), local_addr=(source, 0))


async def answer(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One HTTP/1.1 answer: its status and body (Content-Length or chunked)."""
    lines = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    fields = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:] if line)}
    if "content-length" in fields:
        return status, await reader.readexactly(int(fields["content-length"]))
    body = b""
    if fields.get("transfer-encoding", "").lower() == "chunked":
        while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
            body += await reader.readexactly(size)
            await reader.readexactly(2)
        await reader.readuntil(b"\r\n")
    return status, body


async def exchange(stream: Stream, path: str, extra: str = "") -> tuple[int, bytes]:
    reader, writer = stream
    writer.write(head(path, extra))
    await writer.drain()
    return await asyncio.wait_for(answer(reader), 60)


async def served(lab: LabLayout, port: int, user: str, path: str, source: str = "127.0.0.1") -> Stream:
    """A device that connected, asked `path` and got its 200, and now holds the connection idle (kept alive)."""
    stream = await connect(lab, port, user, source)
    status, body = await exchange(stream, path)
    assert status == 200, (status, body[:200])
    return stream


async def closed_by_gateway(reader: asyncio.StreamReader) -> bool:
    """Whether the gateway closed the connection (its close_notify, a FIN or a reset) with nothing else sent."""
    try:
        return await asyncio.wait_for(reader.read(), 30) == b""
    except (ConnectionError, ssl.SSLError):
        return True


def readyz(admin: str) -> tuple[int, dict[str, object]]:
    try:
        with urllib.request.urlopen(admin + "/readyz", timeout=30) as r:  # noqa: S310  loopback
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_an_idle_keepalive_gives_way_to_a_new_device_at_the_cap(lab: LabLayout, tmp_path: Path, server: str) -> None:
    """Four devices that made one request each hold the cap of 4 on keep-alive: /readyz counts them as room (200), a
    fifth device is served within seconds, the oldest idle one is closed cleanly (its close_notify, no answer), logged
    (`device_idle_reclaimed`) and counted; the other three are still served on their own connections."""
    with capped(lab, tmp_path, server) as (gw, admin):

        async def run() -> None:
            devices = [await served(lab, gw.port, user, f"/EWS/{n}") for n, user in enumerate(USERS)]
            assert metric(admin, "kcd_listener_connections") == CAP
            oldest = devices[0][1].get_extra_info("sockname")[1]
            status, body = await asyncio.to_thread(readyz, admin)
            assert status == 200, body  # the idle keep-alives are room
            assert "listener" not in body, body
            before = metric(admin, "kcd_listener_connections_reclaimed_total")
            gw.mark()
            started = time.monotonic()
            fifth = await asyncio.wait_for(served(lab, gw.port, "bob", "/EWS/fifth"), SERVED_WITHIN)
            assert time.monotonic() - started < SERVED_WITHIN
            assert await closed_by_gateway(devices[0][0]), "the oldest idle connection was not the one closed"
            for stream in devices[1:]:
                assert (await exchange(stream, "/EWS/again"))[0] == 200  # untouched, kept alive
            event = gw.wait_event("device_idle_reclaimed")
            assert event["peer"] == f"127.0.0.1:{oldest}"
            assert event["idle_s"] >= 0
            assert metric(admin, "kcd_listener_connections_reclaimed_total") == before + 1
            for _, writer in (*devices, fifth):
                writer.close()

        asyncio.run(run())
