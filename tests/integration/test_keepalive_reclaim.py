"""At `listener.max_connections`, an idle keep-alive gives way to a new device (nginx's `ngx_drain_connections`).

Real gateways on both device-side servers (`listener.http_server`), the lab's KDC and backend, devices presenting
the lab PKI's certificates over real TLS. The cap is 4 connections per worker; the keep-alive timeout is long (120 s),
so a fifth device served within seconds was served because an idle connection was closed for it, not because one
timed out.
"""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import struct
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest

from proxy.lab.layout import LabLayout
from proxy.tls.limits import HEADER_WAITS, HEALTH_CHECKS
from proxy.tls.proxy_protocol import V2_SIGNATURE
from tests.integration.conftest import (
    Gateway,
    accept_queue,
    client_context,
    free_port,
    lab_config,
    metric,
    start_gateway,
)
from tests.integration.jsonlog import eventually
from tests.integration.test_balancer import _check_status, _haproxy, _haproxy_config

SERVERS = ("own", "aiohttp")
CAP = 4
USERS = ("alice", "bob", "carol", "alice")  # CAP devices (alice has two)
STUCK = 64  # connections that cannot be closed, older than an idle one (a scan kept the 64 oldest and gave up)
SERVED_WITHIN = 20.0  # seconds a new device may take to be served at the cap (the keep-alive timeout is 120 s)
Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@pytest.fixture(params=SERVERS)
def server(request: pytest.FixtureRequest) -> str:
    """Each device-side server (`listener.http_server`)."""
    return str(request.param)


@pytest.fixture(params=("uvloop", "asyncio"))
def event_loop_name(request: pytest.FixtureRequest) -> str:
    """Each event loop the listener runs on (`listener.event_loop`)."""
    return str(request.param)


@contextmanager
def capped(
    lab: LabLayout, directory: Path, server: str, listener: str = "", cap: int = CAP
) -> Iterator[tuple[Gateway, str]]:
    """A gateway on `server` with `listener.max_connections = cap` (and `listener`'s lines), a keep-alive timeout of
    120 s and an admin listener; yields it and its admin URL, and stops it."""
    admin = f"127.0.0.1:{free_port()}"
    text = lab_config(lab, port=free_port(), extra=f'\n[admin]\nbind = "{admin}"\n')
    lines = f'http_server = "{server}"\nmax_connections = {cap}\nkeepalive_timeout = 120\n{listener}'
    gw = start_gateway(lab, directory, text.replace("[listener]\n", f"[listener]\n{lines}", 1))
    try:
        gw.wait_for("listening", lambda e: e.get("http_server") == server, what=server)
        yield gw, f"http://{gw.admin}"  # moved if its port was taken meanwhile (`start_gateway`)
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


def strict_device(lab: LabLayout, port: int, user: str, path: str) -> ssl.SSLSocket:
    """A device on a blocking TLS socket that tells a close without close_notify from a clean one (no ragged EOFs
    suppressed), served once (`path`: 200) and kept idle."""
    tls = client_context(lab, user).wrap_socket(
        socket.create_connection(("127.0.0.1", port), timeout=60),
        server_hostname="127.0.0.1",
        suppress_ragged_eofs=False,
    )
    tls.sendall(head(path))
    received = b""
    while b"\r\n\r\n" not in received:
        received += tls.recv(65536)
    head_text, _, body = received.partition(b"\r\n\r\n")
    assert head_text.startswith(b"HTTP/1.1 200 "), head_text
    length = int(head_text.lower().split(b"content-length:", 1)[1].split(b"\r\n", 1)[0])
    while len(body) < length:
        body += tls.recv(65536)
    return tls


def half_record(tls: ssl.SSLSocket) -> None:
    """The device sends the first bytes of a TLS record under its connection (its type and version, never its length
    nor its body): the gateway holds them in its TLS buffers, a record half received."""
    socket.socket.sendall(tls, b"\x17\x03\x03")  # the raw socket's send, beneath the TLS layer


def readyz(admin: str) -> tuple[int, dict[str, object]]:
    try:
        with urllib.request.urlopen(admin + "/readyz", timeout=30) as r:  # noqa: S310  loopback
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


async def fifth_waits(lab: LabLayout, gw: Gateway, admin: str, why: str) -> asyncio.Future[Stream]:
    """With every connection busy: /readyz is 503 naming the listener's cap, and a fifth device (bob, `/EWS/fifth`)
    is not served within 3 s, no connection closed for it (`why` says what serving it would mean). Returns it
    waiting."""
    gw.mark()
    ready, readiness = await asyncio.to_thread(readyz, admin)
    assert ready == 503, readiness
    assert "listener.max_connections" in str(readiness.get("listener")), readiness
    fifth = asyncio.ensure_future(served(lab, gw.port, "bob", "/EWS/fifth"))
    done, _ = await asyncio.wait({fifth}, timeout=3)
    assert not done, why
    assert not gw.events("device_idle_reclaimed", gw.since)
    return fifth


def test_an_idle_keepalive_gives_way_to_a_new_device_at_the_cap(
    lab: LabLayout, tmp_path: Path, server: str, event_loop_name: str
) -> None:
    """Four devices that made one request each hold the cap of 4 on keep-alive: /readyz counts them as room (200), a
    fifth device is served within seconds, the oldest idle one is closed cleanly (its close_notify, no answer), logged
    (`device_idle_reclaimed`) and counted; the other three are still served on their own connections. On uvloop and on
    asyncio's loop (the unread-bytes check reads the socket each gives)."""
    with capped(lab, tmp_path, server, f'event_loop = "{event_loop_name}"\n') as (gw, admin):

        async def run() -> None:
            first = await asyncio.to_thread(strict_device, lab, gw.port, USERS[0], "/EWS/0")  # the oldest
            devices = [await served(lab, gw.port, user, f"/EWS/{n}") for n, user in enumerate(USERS[1:], 1)]
            assert metric(admin, "kcd_listener_connections") == CAP
            oldest = first.getsockname()[1]
            status, body = await asyncio.to_thread(readyz, admin)
            assert status == 200, body  # the idle keep-alives are room
            assert "listener" not in body, body
            before = metric(admin, "kcd_listener_connections_reclaimed_total")
            gw.mark()
            started = time.monotonic()
            fifth = await asyncio.wait_for(served(lab, gw.port, "bob", "/EWS/fifth"), SERVED_WITHIN)
            assert time.monotonic() - started < SERVED_WITHIN
            # cleanly: the gateway's close_notify (a TCP end without it raises SSLEOFError here, a reset OSError)
            assert await asyncio.to_thread(first.recv, 1) == b"", "the oldest idle connection was not the one closed"
            first.close()
            for stream in devices:
                assert (await exchange(stream, "/EWS/again"))[0] == 200  # untouched, kept alive
            event = gw.wait_event("device_idle_reclaimed")
            assert event["peer"] == f"127.0.0.1:{oldest}"
            assert event["idle_s"] >= 0
            assert metric(admin, "kcd_listener_connections_reclaimed_total") == before + 1
            for _, writer in (*devices, fifth):
                writer.close()

        asyncio.run(run())


@pytest.mark.slow(seconds=40)
def test_busy_connections_are_never_closed_for_a_new_device(lab: LabLayout, tmp_path: Path, server: str) -> None:
    """Four busy connections hold the cap: a held long-poll, an upload half sent, a head half read, and one yet to send
    its first request. /readyz is 503 (the listener named), a fifth device waits and none of the four is closed for it;
    once the half-read head ends and is answered, that connection is idle and the fifth is served in its place; the
    upload, the long-poll (held by the lab backend until the test releases it) and the late first request are all
    answered 200 on their own connections."""
    key = f"busy-{server}-{time.time_ns()}"  # the lab backend is shared: a key of this test's own
    with capped(lab, tmp_path, server) as (gw, admin):

        async def run() -> None:
            held = await connect(lab, gw.port, "alice")
            hold = f"X-Lab-Hold-Seconds: 120\r\nX-Lab-Hold-Until: {key}\r\n"
            held[1].write(head("/Microsoft-Server-ActiveSync?Cmd=Ping", hold))
            upload = await connect(lab, gw.port, "bob")
            upload[1].write(b"POST /EWS/upload HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)
            half = await served(lab, gw.port, "carol", "/EWS/first")
            half[1].write(b"GET /EWS/second HTTP/1.1\r\nHost: 127")
            unused = await connect(lab, gw.port, "alice")
            for _, writer in (held, upload, half):
                await writer.drain()
            await asyncio.to_thread(
                eventually, lambda: metric(admin, "kcd_requests_in_flight") >= 2, "the long-poll and the upload"
            )
            fifth = await fifth_waits(lab, gw, admin, "a fifth device was served while every connection was busy")
            half[1].write(b".0.0.1\r\n\r\n")  # the head ends: answered, then idle
            assert (await asyncio.wait_for(answer(half[0]), 60))[0] == 200
            fifth_stream = await asyncio.wait_for(fifth, SERVED_WITHIN + 60)
            assert await closed_by_gateway(half[0])
            upload[1].write(b"x" * 90)
            status, body = await asyncio.wait_for(answer(upload[0]), 60)
            assert status == 200, body[:200]
            assert json.loads(body)["body_length"] == 100
            assert (await exchange(unused, "/EWS/late"))[0] == 200
            assert not held[0].at_eof()  # still held: it was busy throughout
            assert (await exchange(unused, "/EWS/release", f"X-Lab-Release: {key}\r\n"))[0] == 200
            status, body = await asyncio.wait_for(answer(held[0]), 90)
            assert status == 200, body[:200]
            events = gw.events("device_idle_reclaimed", gw.since)
            assert len(events) == 1, events  # the half-read head's connection, once idle; no busy one
            for _, writer in (held, upload, unused, fifth_stream):
                writer.close()

        asyncio.run(run())


def test_a_request_racing_the_close_is_served_or_never_read(lab: LabLayout, tmp_path: Path, server: str) -> None:
    """Four idle devices at the cap; in each round the oldest sends a request as a new connection comes (the request
    first, or the new TCP connection first). Each time a fifth device is then served, and the racing request is either
    answered (200) or its connection closed with no byte of an answer and no trace of the request in the log."""
    with capped(lab, tmp_path, server) as (gw, _admin):

        async def device(user: str, path: str) -> tuple[Stream, str]:
            stream = await served(lab, gw.port, user, path)
            return stream, f"127.0.0.1:{stream[1].get_extra_info('sockname')[1]}"

        async def run() -> None:
            idle = [await device(user, f"/EWS/{n}") for n, user in enumerate(USERS)]
            for round_ in range(4):
                gw.mark()
                racing, fifth_path = f"/EWS/race-{round_}", f"/EWS/fifth-{round_}"
                (oldest, _), idle = idle[0], idle[1:]
                if round_ % 2:  # the new TCP connection first (the close starts at once), then the request
                    tcp = socket.create_connection(("127.0.0.1", gw.port))
                    oldest[1].write(head(racing))
                else:  # the request first, then the new connection
                    oldest[1].write(head(racing))
                    tcp = socket.create_connection(("127.0.0.1", gw.port))
                tcp.close()  # gone before its handshake: what its slot cost is given back; a device proper follows
                fifth = await asyncio.wait_for(device("bob", fifth_path), SERVED_WITHIN)
                try:
                    status: int | None = (await asyncio.wait_for(answer(oldest[0]), 60))[0]
                except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
                    status = None
                print("race round", round_, "answered" if status else "closed unread")
                if status is None:  # closed: the request was never read
                    gw.wait_event("request", path=fifth_path)
                    assert not [e for e in gw.events("request", gw.since) if e.get("path") == racing]
                    oldest[1].close()
                else:
                    assert status == 200
                    idle.append((oldest, f"127.0.0.1:{oldest[1].get_extra_info('sockname')[1]}"))
                idle.append(fifth)
                closed = {e["peer"] for e in gw.events("device_idle_reclaimed", gw.since)}
                for stream, peer in idle:
                    if peer in closed:
                        stream[1].close()
                idle = [(stream, peer) for stream, peer in idle if peer not in closed]
                while len(idle) < CAP:
                    idle.append(await device("carol", "/EWS/refill"))
            for (_, writer), _ in idle:
                writer.close()

        asyncio.run(run())


def test_an_address_over_its_cap_closes_no_idle_keepalive(lab: LabLayout, tmp_path: Path, server: str) -> None:
    """max_connections_per_address = 2: at the cap (two idle devices from 127.0.0.2, two busy connections from
    127.0.0.1), 127.0.0.1's next connections are reset and close no idle keep-alive of 127.0.0.2's; a device from
    127.0.0.3 is served, one idle connection closed for it."""
    with capped(lab, tmp_path, server, "max_connections_per_address = 2\n") as (gw, _admin):

        async def run() -> None:
            idle = [await served(lab, gw.port, user, "/EWS/idle", source="127.0.0.2") for user in ("alice", "bob")]
            busy = [await connect(lab, gw.port, "carol") for _ in range(2)]
            for _, writer in busy:
                writer.write(b"GET /EWS/slow HTTP/1.1\r\nHost: 127")  # a head coming in: busy
                await writer.drain()
            gw.mark()
            for _ in range(3):
                with pytest.raises((ConnectionError, ssl.SSLError, OSError)):
                    await asyncio.wait_for(connect(lab, gw.port, "carol"), 30)
            gw.wait_events("address_connection_limit_reached", 3)
            assert not gw.events("device_idle_reclaimed", gw.since)
            for stream in idle:
                assert (await exchange(stream, "/EWS/still"))[0] == 200
            third = await asyncio.wait_for(served(lab, gw.port, "alice", "/EWS/third", source="127.0.0.3"), 30)
            assert gw.wait_event("device_idle_reclaimed")["peer"].startswith("127.0.0.2:")
            for _, writer in (*idle, *busy, third):
                writer.close()

        asyncio.run(run())


class RecordDevice:
    """A device whose TLS records the test holds in hand (`ssl.MemoryBIO`s over a blocking socket), to send a record
    in parts as a slow network delivers it."""

    def __init__(self, lab: LabLayout, port: int, user: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = client_context(lab, user).wrap_bio(self._in, self._out, server_hostname="127.0.0.1")
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self.sock.sendall(self._out.read())
                self._fill()
        self.sock.sendall(self._out.read())
        self.peer = f"127.0.0.1:{self.sock.getsockname()[1]}"

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("the gateway closed the connection")
        self._in.write(data)

    def _read(self) -> bytes:
        while True:
            try:
                return self.tls.read(65536)
            except ssl.SSLWantReadError:
                self._fill()

    def record(self, path: str) -> bytes:
        """The TLS record (one, a head being short) that carries a request for `path`."""
        self.tls.write(head(path))
        return self._out.read()

    def status(self) -> int:
        """The status of the answer the gateway sends (Content-Length framed), once read whole."""
        received = b""
        while b"\r\n\r\n" not in received:
            received += self._read()
        head_text, _, body = received.partition(b"\r\n\r\n")
        length = int(head_text.lower().split(b"content-length:", 1)[1].split(b"\r\n", 1)[0])
        while len(body) < length:
            body += self._read()
        return int(head_text.split()[1])

    def ask(self, path: str) -> int:
        self.sock.sendall(self.record(path))
        return self.status()


def test_a_request_whose_tls_record_is_half_received_is_not_cut(lab: LabLayout, tmp_path: Path, server: str) -> None:
    """Four devices served once hold the cap of 4; each then sends the first half of the TLS record carrying its next
    request (the rest delayed, as on a slow network). None is idle: /readyz is 503 with the listener named (it said
    200), a fifth device waits and no connection is closed for it (one was, and its request cut: OpenSSL had taken the
    half record out of the BIO, unseen by the quiet check). A device whose record then ends is answered 200, and the
    fifth is served in its place once it is idle; the other three are answered 200 too."""
    with capped(lab, tmp_path, server) as (gw, admin):

        async def run() -> None:
            devices = [await asyncio.to_thread(RecordDevice, lab, gw.port, user) for user in USERS]
            for n, device in enumerate(devices):
                assert await asyncio.to_thread(device.ask, f"/EWS/{n}") == 200
            rests = []
            for n, device in enumerate(devices):
                record = device.record(f"/EWS/next-{n}")
                device.sock.sendall(record[: len(record) // 2])
                rests.append(record[len(record) // 2 :])
            why = "a fifth device was served: a connection with half a record was closed for it"
            fifth = await fifth_waits(lab, gw, admin, why)
            devices[0].sock.sendall(rests[0])
            assert await asyncio.to_thread(devices[0].status) == 200
            _, writer = await asyncio.wait_for(fifth, SERVED_WITHIN)
            assert gw.wait_event("device_idle_reclaimed")["peer"] == devices[0].peer
            for device, rest in zip(devices[1:], rests[1:], strict=True):
                device.sock.sendall(rest)
                assert await asyncio.to_thread(device.status) == 200
            writer.close()
            for device in devices:
                device.sock.close()

        asyncio.run(run())


@pytest.mark.slow(seconds=40)
def test_connections_that_cannot_be_closed_do_not_hide_an_idle_one(lab: LabLayout, tmp_path: Path, server: str) -> None:
    """At a cap of STUCK + 1: the STUCK oldest connections each hold half a TLS record (idle to look at, but not to be
    closed), the newest is a plain idle keep-alive. A new device is served in the latter's place within seconds (the
    scan's batch of the 64 oldest was all of the former: the gateway found none to close and the new device waited
    for the keep-alive timeout)."""
    with capped(lab, tmp_path, server, cap=STUCK + 1) as (gw, _admin):

        async def run() -> None:
            stuck = []
            for n in range(STUCK):
                tls = await asyncio.to_thread(strict_device, lab, gw.port, USERS[n % len(USERS)], f"/EWS/{n}")
                half_record(tls)
                stuck.append(tls)
            idle = await served(lab, gw.port, "carol", "/EWS/newest")
            gw.mark()
            fifth = await asyncio.wait_for(served(lab, gw.port, "bob", "/EWS/new"), SERVED_WITHIN)
            assert await closed_by_gateway(idle[0])
            assert len(gw.events("device_idle_reclaimed", gw.since)) == 1
            for writer in (idle[1], fifth[1]):
                writer.close()
            for tls in stuck:
                tls.close()

        asyncio.run(run())


def v2_header(source: str, port: int) -> bytes:
    """A balancer's PROXY v2 header naming the device `source`:`port` (TCP over IPv4)."""
    body = socket.inet_aton(source) + socket.inet_aton("127.0.0.1") + struct.pack("!HH", port, 443)
    return V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", len(body)) + body


async def balanced_connect(lab: LabLayout, port: int, user: str, address: str) -> Stream:
    """A device's TLS connection behind the balancer (`address`, in a PROXY v2 header), its certificate `user`'s."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=30)
    raw.sendall(v2_header(address, 40000))
    raw.setblocking(False)
    return await asyncio.open_connection(sock=raw, ssl=client_context(lab, user), server_hostname="127.0.0.1")


async def balanced_device(lab: LabLayout, port: int, user: str, address: str, path: str) -> Stream:
    """A device behind the balancer (`address`, told by a PROXY v2 header), served once (`path`: 200) and kept idle."""
    stream = await balanced_connect(lab, port, user, address)
    status, body = await exchange(stream, path)
    assert status == 200, (status, body[:200])
    return stream


async def two_busy_behind_a_balancer(lab: LabLayout, port: int) -> list[Stream]:
    """Alice and bob behind the balancer, each served once, then busy: a next request's head half sent."""
    busy = [
        await balanced_device(lab, port, user, f"203.0.113.{n}", "/EWS/first")
        for n, user in enumerate(("alice", "bob"), 1)
    ]
    for _, writer in busy:
        writer.write(b"GET /EWS/slow HTTP/1.1\r\nHost: 127")  # a head coming in: busy
        await writer.drain()
    return busy


async def local_check(lab: LabLayout, port: int) -> Stream:
    """A balancer's health check: a PROXY v2 LOCAL header, then TLS with alice's certificate."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=30)
    raw.sendall(LOCAL)
    raw.setblocking(False)
    return await asyncio.open_connection(sock=raw, ssl=client_context(lab, "alice"), server_hostname="127.0.0.1")


async def served_check(lab: LabLayout, port: int) -> Stream:
    """A health check as HAProxy's `check-ssl` + `httpchk` makes one: a v2 LOCAL header, TLS with a certificate, one
    request answered 200; then left idle."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=30)
    raw.sendall(LOCAL)
    raw.setblocking(False)
    check = await asyncio.open_connection(sock=raw, ssl=client_context(lab, "alice"), server_hostname="127.0.0.1")
    assert (await exchange(check, "/EWS/check"))[0] == 200
    return check


async def stalled_checks(port: int, count: int) -> list[socket.socket]:
    """`count` health checks that sent their LOCAL header and nothing more, once the gateway has accepted them all."""
    checks = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(count)]
    for raw in checks:
        raw.sendall(LOCAL)
    await asyncio.to_thread(eventually, lambda: accept_queue(port) == 0, "the gateway accepted them")
    return checks


BALANCED = 'proxy_protocol = true\ntrusted_proxies = ["127.0.0.1/32"]\nmax_connections_per_address = 1\n'


def test_behind_a_balancer_an_address_over_its_cap_closes_no_idle_keepalive(
    lab: LabLayout, tmp_path: Path, server: str
) -> None:
    """Behind a balancer, max_connections = 5 and max_connections_per_address = 1: five idle devices (five PROXY
    addresses); four more connections, accepted together, then each a header naming one of those addresses, are reset
    after their headers and close no idle keep-alive (hardening.md section 26); nor does a connection that sends no
    header; a device from a sixth address is then served, one idle keep-alive closed for it."""
    with capped(lab, tmp_path, server, BALANCED, cap=5) as (gw, _admin):

        async def run() -> None:
            users = ("alice", "bob", "carol", "alice", "bob")
            idle = [
                await balanced_device(lab, gw.port, user, f"203.0.113.{n}", "/EWS/idle")
                for n, user in enumerate(users, 1)
            ]
            gw.mark()
            burst = [socket.create_connection(("127.0.0.1", gw.port), timeout=30) for _ in range(4)]
            silent = socket.create_connection(("127.0.0.1", gw.port), timeout=30)  # never sends its header
            eventually(lambda: accept_queue(gw.port) == 0, what="the gateway accepted the burst")
            for n, raw in enumerate(burst):
                raw.sendall(v2_header("203.0.113.1", 41000 + n))  # the address of the oldest idle device
            gw.wait_events("address_connection_limit_reached", 4)
            assert not gw.events("device_idle_reclaimed", gw.since)
            for stream in idle:
                assert (await exchange(stream, "/EWS/still"))[0] == 200  # no idle device lost its connection
            sixth = await asyncio.wait_for(
                balanced_device(lab, gw.port, "carol", "203.0.113.6", "/EWS/sixth"), SERVED_WITHIN
            )
            assert len(gw.wait_events("device_idle_reclaimed", 1)) == 1
            for raw in (*burst, silent):
                raw.close()
            for _, writer in (*idle, sixth):
                writer.close()

        asyncio.run(run())


async def _checked_at_an_idle_cap(lab: LabLayout, tmp_path: Path, gw: Gateway, admin: str, *, v1: bool) -> list[Stream]:
    """Four idle devices behind the balancer hold the cap of 4; a real HAProxy (PROXY v1 `send-proxy`, else v2) checks
    the gateway every 200 ms until ten checks passed (L4OK) and none closed an idle keep-alive. The devices' streams."""
    idle = [await balanced_device(lab, gw.port, user, f"203.0.113.{n}", "/EWS/idle") for n, user in enumerate(USERS, 1)]
    await asyncio.to_thread(eventually, lambda: readyz(admin)[0] == 200, "the idle keep-alives as room")
    gw.mark()
    directory, port = tmp_path / "haproxy", free_port()
    directory.mkdir()
    stats = directory / "stats.sock"
    checks = metric(admin, "kcd_listener_empty_connections_total")
    config = _haproxy_config(port, (gw,), stats, "check check-send-proxy inter 200ms")
    with _haproxy(directory, port, config.replace(" send-proxy-v2 ", " send-proxy ") if v1 else config):
        await asyncio.to_thread(
            eventually,
            lambda: metric(admin, "kcd_listener_empty_connections_total") >= checks + 10,
            "ten of HAProxy's health checks",
        )
        assert _check_status(stats) == {"gw1": "L4OK"}
    assert not gw.events("device_idle_reclaimed", gw.since)
    return idle


def test_a_balancers_health_checks_and_unnamed_devices_close_no_idle_keepalive_at_the_cap(
    lab: LabLayout, tmp_path: Path, server: str
) -> None:
    """Behind a real HAProxy checking the gateway every 200 ms (`check check-send-proxy`: a PROXY v2 LOCAL header, then
    a reset), four idle devices hold the cap of 4: ten checks pass (L4OK, each an empty connection to the gateway) and
    close no idle keep-alive (each closed one: a LOCAL header was a device's claim to a slot); nor does a connection
    whose v2 header names no device (UNSPEC: its requests would be refused), which is closed at once (it waited for a
    free slot until handshake_timeout, 3 s). The four devices are served again on their own connections."""
    with capped(lab, tmp_path, server, BALANCED + "handshake_timeout = 3\n") as (gw, admin):

        async def run() -> None:
            idle = await _checked_at_an_idle_cap(lab, tmp_path, gw, admin, v1=False)
            unnamed = socket.create_connection(("127.0.0.1", gw.port), timeout=30)
            unnamed.sendall(V2_SIGNATURE + b"\x21\x00\x00\x00")  # PROXY, family UNSPEC, no addresses
            assert await asyncio.to_thread(until_closed, unnamed, 3 + SERVED_WITHIN) == b""
            unnamed.close()
            assert not gw.events("device_idle_reclaimed", gw.since)
            gw.wait_event("proxy_header_refused", refusal="no_device_address")
            for stream in idle:
                assert (await exchange(stream, "/EWS/still"))[0] == 200  # no device lost its keep-alive
            for _, writer in idle:
                writer.close()

        asyncio.run(run())


def test_a_balancers_v1_health_checks_naming_themselves_close_no_idle_keepalive_at_the_cap(
    lab: LabLayout, tmp_path: Path, server: str
) -> None:
    """Behind a real HAProxy speaking PROXY v1 (`send-proxy`) and checking every 200 ms: HAProxy 2.6 sends no LOCAL
    in v1, its check's header names the check's own connection (`PROXY TCP4 <its address> <ours> <its port> ...`).
    Four idle devices hold the cap of 4: ten checks pass and close no idle keep-alive (each closed one, a device's
    claim to a slot); the four devices are served again on their own connections."""
    with capped(lab, tmp_path, server, BALANCED) as (gw, admin):

        async def run() -> None:
            idle = await _checked_at_an_idle_cap(lab, tmp_path, gw, admin, v1=True)
            for stream in idle:
                assert (await exchange(stream, "/EWS/still"))[0] == 200  # no device lost its keep-alive
            for _, writer in idle:
                writer.close()

        asyncio.run(run())


def test_a_device_at_the_balancers_own_address_is_counted_under_its_cap_not_taken_for_a_check(
    lab: LabLayout, tmp_path: Path
) -> None:
    """Behind a real HAProxy speaking PROXY v1 (`send-proxy`), devices at the balancer's own address (127.0.0.1, as
    the balancer's connections to the gateway come from): their headers name their own connections to HAProxy, never
    HAProxy's to the gateway (`names_itself`), so each is a device counted under max_connections_per_address = 1: the
    first is served, the second reset at its header (`address_connection_limit_reached`), not served as a check."""
    with capped(lab, tmp_path, "aiohttp", BALANCED) as (gw, _admin):
        directory, port = tmp_path / "haproxy", free_port()
        directory.mkdir()
        config = _haproxy_config(port, (gw,), directory / "stats.sock", "")
        with _haproxy(directory, port, config.replace(" send-proxy-v2 ", " send-proxy ")):

            async def run() -> None:
                first = await served(lab, port, "alice", "/EWS/first")  # through HAProxy, from 127.0.0.1
                gw.mark()

                async def second() -> tuple[int, bytes]:
                    return await exchange(await connect(lab, port, "bob"), "/EWS/second")

                with pytest.raises((OSError, asyncio.IncompleteReadError, ssl.SSLError)):
                    await second()
                refused = gw.wait_event("address_connection_limit_reached")
                assert refused["address"] == "127.0.0.1", refused
                assert not [e for e in gw.events("request", gw.since) if e.get("path") == "/EWS/second"]
                first[1].close()

            asyncio.run(run())


def until_closed(raw: socket.socket, within: float) -> bytes:
    """What the gateway sends on `raw` until it closes it (a FIN or a reset), waiting `within` seconds at most."""
    raw.settimeout(within)
    received = b""
    try:
        while chunk := raw.recv(65536):
            received += chunk
    except ConnectionResetError:
        pass
    return received


def test_behind_a_balancer_a_connection_waiting_at_a_busy_cap_is_closed_at_handshake_timeout(
    lab: LabLayout, tmp_path: Path, server: str, event_loop_name: str
) -> None:
    """Behind a balancer, handshake_timeout 3 s, four busy connections (a head half read) at the cap of 4: a device
    whose PROXY header was read waits for a slot no longer than handshake_timeout from its accept, then is closed with
    nothing sent and logged (`connection_wait_expired`, its address); it waited for as long as the cap stayed busy.
    The busy four are answered 200 once their heads end. On uvloop and on asyncio's loop."""
    listener = f'{BALANCED}handshake_timeout = 3\nevent_loop = "{event_loop_name}"\n'
    with capped(lab, tmp_path, server, listener) as (gw, _admin):

        async def run() -> None:
            busy = [await balanced_connect(lab, gw.port, user, f"203.0.113.{n}") for n, user in enumerate(USERS, 1)]
            for _, writer in busy:
                writer.write(b"GET /EWS/busy HTTP/1.1\r\nHost: 127")
                await writer.drain()
            gw.mark()
            raw = socket.create_connection(("127.0.0.1", gw.port), timeout=30)
            raw.sendall(v2_header("203.0.113.9", 40009))
            started = time.monotonic()
            assert await asyncio.to_thread(until_closed, raw, 3 + SERVED_WITHIN) == b""
            assert time.monotonic() - started < 3 + SERVED_WITHIN, "still waiting for a slot"
            raw.close()
            assert gw.wait_event("connection_wait_expired")["peer"] == "203.0.113.9:40009"
            for reader, writer in busy:
                writer.write(b".0.0.1\r\n\r\n")
                assert (await asyncio.wait_for(answer(reader), 60))[0] == 200
                writer.close()

        asyncio.run(run())


LOCAL = V2_SIGNATURE + b"\x20\x00\x00\x00"  # a PROXY v2 LOCAL header: the balancer's own health check
# behind a balancer, a handshake's time 3 s: a LOCAL health check's place lasts twice that from its accept
LOCAL_CHECKED = 'proxy_protocol = true\ntrusted_proxies = ["127.0.0.1/32"]\nhandshake_timeout = 3\n'


def test_health_checks_stalled_in_tls_at_a_busy_cap_keep_no_device_out(
    lab: LabLayout, tmp_path: Path, server: str
) -> None:
    """Behind a balancer at a cap of 2, both connections busy (a head half read), handshake_timeout 60 s: HEALTH_CHECKS
    v2 LOCAL checks send their header and never start TLS (a hung `check-ssl`), going on with no slot; a device that
    comes next is served once a busy one leaves, within seconds (the checks held the 16 places that gate the accept
    loop until their connections ended: the device waited in the listen backlog up to handshake_timeout)."""
    listener = 'proxy_protocol = true\ntrusted_proxies = ["127.0.0.1/32"]\nhandshake_timeout = 60\n'
    with capped(lab, tmp_path, server, listener, cap=2) as (gw, _admin):

        async def run() -> None:
            busy = [
                await balanced_device(lab, gw.port, user, f"203.0.113.{n}", "/EWS/first")
                for n, user in enumerate(("alice", "bob"), 1)
            ]
            for _, writer in busy:
                writer.write(b"GET /EWS/slow HTTP/1.1\r\nHost: 127")  # a head coming in: busy
                await writer.drain()
            checks = await stalled_checks(gw.port, HEALTH_CHECKS)
            device = asyncio.ensure_future(
                asyncio.wait_for(balanced_device(lab, gw.port, "carol", "203.0.113.9", "/EWS/new"), SERVED_WITHIN)
            )
            busy[0][1].close()
            _, writer = await device  # its 200 asserted there
            writer.close()
            busy[1][1].close()
            for raw in checks:
                raw.close()

        asyncio.run(run())


def test_behind_a_balancer_handshake_timeout_bounds_the_accept_to_the_end_of_tls(
    lab: LabLayout, tmp_path: Path, server: str
) -> None:
    """Behind a balancer, handshake_timeout 6 s: a connection whose PROXY header comes 4 s after its accept and which
    then sends no TLS byte is closed at handshake_timeout from its accept, about 2 s after its header, and logged
    (`tls_handshake_abandoned`); it was given a fresh 6 s for TLS (held pre-TLS for up to twice handshake_timeout)."""
    listener = 'proxy_protocol = true\ntrusted_proxies = ["127.0.0.1/32"]\nhandshake_timeout = 6\n'
    with capped(lab, tmp_path, server, listener) as (gw, _admin):
        gw.mark()
        raw = socket.create_connection(("127.0.0.1", gw.port), timeout=30)
        eventually(lambda: accept_queue(gw.port) == 0, "the gateway accepted it")
        time.sleep(4)  # the scenario, not a wait for a state: the header comes late in handshake_timeout
        raw.sendall(v2_header("203.0.113.9", 40009))
        assert until_closed(raw, 4) == b""  # 2 s left of handshake_timeout (a fresh one: 6 s); still open: TimeoutError
        raw.close()
        assert gw.wait_event("tls_handshake_abandoned")["peer"] == "203.0.113.9:40009"


WAITERS = 8  # connections behind the balancer waiting for a slot, their headers read, that all leave at once


def test_waiters_that_leave_together_give_back_what_they_held(
    lab: LabLayout, tmp_path: Path, server: str, event_loop_name: str
) -> None:
    """Behind a balancer at a cap of 2, both connections busy (a head half read): WAITERS connections send their PROXY
    headers and wait for a slot, then all leave at once. Once the busy ones end, the gauge is back to 0 (a waiter whose
    leaving came with a slot freed kept waiting, took that slot and held it for ever: 2 such and no device was served
    again) and a new device is served; no idle keep-alive was closed for one that had left."""
    listener = f'proxy_protocol = true\ntrusted_proxies = ["127.0.0.1/32"]\nevent_loop = "{event_loop_name}"\n'
    with capped(lab, tmp_path, server, listener, cap=2) as (gw, admin):

        async def run() -> None:
            busy = await two_busy_behind_a_balancer(lab, gw.port)
            gw.mark()
            waiters = [socket.create_connection(("127.0.0.1", gw.port), timeout=30) for _ in range(WAITERS)]
            for n, raw in enumerate(waiters):
                raw.sendall(v2_header(f"198.51.100.{n + 1}", 42000 + n))
            gw.wait_events("connection_limit_reached", WAITERS)  # each waits for a slot, its header read
            for raw in waiters:  # all at once: a reset each
                raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                raw.close()
            for _, writer in busy:
                writer.close()
            eventually(lambda: metric(admin, "kcd_listener_connections") == 0, what="every slot given back")
            new = await asyncio.wait_for(
                balanced_device(lab, gw.port, "carol", "203.0.113.9", "/EWS/new"), SERVED_WITHIN
            )
            assert not gw.events("device_idle_reclaimed", gw.since)
            new[1].close()

        asyncio.run(run())


def send_queue(port: int, peer: int) -> int | None:
    """Bytes the gateway (listening on `port`) has written to the kernel for the connection from local port `peer` and
    the device has not acknowledged (`ss`'s Send-Q: SIOCOUTQ); None once the gateway's socket is gone."""
    out = subprocess.run(
        ["ss", "-Htn", f"sport = :{port} and dport = :{peer}"], capture_output=True, text=True, check=True, timeout=30
    ).stdout.split()
    return int(out[2]) if out else None


TAIL = 160 * 1024  # bytes of the answer the slow device leaves unread, held by the kernels' buffers


def test_an_answer_still_in_the_kernels_send_queue_reaches_a_device_whose_keepalive_is_closed(
    lab: LabLayout, tmp_path: Path, server: str, event_loop_name: str
) -> None:
    """Cap 1: a device with a 16 KiB receive buffer reads a 1 MiB answer but its last 160 KiB, and stops. The gateway
    has written it all (nothing in its own buffers: /readyz counts the connection as idle room) while the kernel still
    holds part of it unacknowledged (Send-Q > 0). A new device is served, this connection closed for it; the first
    device, reading again, gets every byte of the answer and then the gateway's close_notify: the kernel sends an
    orphaned socket's queue before its FIN (a stall of 260 s lost nothing either, docs/throttles-and-limits.md)."""
    size = 1024 * 1024
    with capped(lab, tmp_path, server, f'event_loop = "{event_loop_name}"\n', cap=1) as (gw, admin):
        raw = socket.socket()
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
        raw.settimeout(60)
        raw.connect(("127.0.0.1", gw.port))
        context = client_context(lab, "alice")
        with context.wrap_socket(raw, server_hostname="127.0.0.1", suppress_ragged_eofs=False) as tls:
            tls.sendall(head(f"/EWS/big?lab_body_bytes={size}"))
            received = b""
            while b"\r\n\r\n" not in received:
                received += tls.recv(65536)
            head_text, _, body = received.partition(b"\r\n\r\n")
            assert head_text.startswith(b"HTTP/1.1 200 "), head_text
            got = len(body)
            while got < size - TAIL:
                got += len(tls.recv(min(65536, size - TAIL - got)))
            peer = tls.getsockname()[1]
            eventually(lambda: readyz(admin)[0] == 200, "the connection idle, the answer handed to the kernel")
            assert (send_queue(gw.port, peer) or 0) > 0, "the kernel holds none of the answer: nothing to lose"
            gw.mark()
            asyncio.run(_served_and_closed(lab, gw.port))
            assert gw.wait_event("device_idle_reclaimed")["peer"] == f"127.0.0.1:{peer}"
            while chunk := tls.recv(65536):  # b"" at the close_notify (an end without it raises here)
                got += len(chunk)
            assert got == size


async def _served_and_closed(lab: LabLayout, port: int) -> None:
    """A new device (bob) served at the cap, then gone."""
    _, writer = await asyncio.wait_for(served(lab, port, "bob", "/EWS/new"), SERVED_WITHIN)
    writer.close()


def test_a_slot_freed_goes_to_a_waiter_not_to_a_connection_yet_to_come(
    lab: LabLayout, tmp_path: Path, server: str
) -> None:
    """Behind a balancer at a cap of 2, both connections busy (a head half read): HEADER_WAITS connections, accepted
    together (the most a worker lets wait), then each sends its PROXY header and ClientHello and waits for a slot. One
    busy device leaves: a waiting device is served within seconds (the accept loop took that slot, held it for a
    connection not yet come, and every waiting device waited on)."""
    listener = 'proxy_protocol = true\ntrusted_proxies = ["127.0.0.1/32"]\n'
    with capped(lab, tmp_path, server, listener, cap=2) as (gw, _admin):
        streams: list[Stream] = []

        async def waiting(n: int, raw: socket.socket) -> tuple[int, bytes]:
            raw.sendall(v2_header(f"198.51.100.{n + 1}", 43000 + n))
            raw.setblocking(False)
            context = client_context(lab, "carol")
            stream = await asyncio.open_connection(sock=raw, ssl=context, server_hostname="127.0.0.1")
            streams.append(stream)
            return await exchange(stream, f"/EWS/waited-{n}")

        async def run() -> None:
            busy = await two_busy_behind_a_balancer(lab, gw.port)
            gw.mark()
            raws = [socket.create_connection(("127.0.0.1", gw.port), timeout=30) for _ in range(HEADER_WAITS)]
            await asyncio.to_thread(eventually, lambda: accept_queue(gw.port) == 0, "the gateway accepted them")
            waiters = [asyncio.ensure_future(waiting(n, raw)) for n, raw in enumerate(raws)]
            await asyncio.to_thread(gw.wait_events, "connection_limit_reached", HEADER_WAITS)
            busy[0][1].close()
            done, _ = await asyncio.wait(waiters, timeout=SERVED_WITHIN, return_when=asyncio.FIRST_COMPLETED)
            assert done, "no waiting device was served once a busy one left"
            assert next(iter(done)).result()[0] == 200
            for task in waiters:
                task.cancel()
            await asyncio.gather(*waiters, return_exceptions=True)
            for _, writer in (*streams, busy[1]):
                writer.close()
            for raw in raws:
                raw.close()

        asyncio.run(run())


def test_a_health_check_served_in_a_place_of_its_own_is_not_closed_for_a_device_over_the_cap(
    lab: LabLayout, tmp_path: Path, server: str
) -> None:
    """Behind a balancer at a cap of 2, both connections busy: a v2 LOCAL check that found no slot goes on in a place
    of its own (`SlotWait.aside`), completes TLS with a certificate and is answered once (HAProxy's `check-ssl` with a
    `crt` and `option httpchk`), then idles. A device that comes next took it for an idle keep-alive, closed it and
    took a slot it never freed (3 connections counted at a cap of 2, more with every such check); it now waits for a
    busy one to leave, and the check's connection is not closed for it (handshake_timeout 60 s: a check's place is
    kept twice that from its accept at most)."""
    listener = 'proxy_protocol = true\ntrusted_proxies = ["127.0.0.1/32"]\nhandshake_timeout = 60\n'
    with capped(lab, tmp_path, server, listener, cap=2) as (gw, admin):

        async def run() -> None:
            busy = await two_busy_behind_a_balancer(lab, gw.port)
            check = await served_check(lab, gw.port)
            gw.mark()
            device = asyncio.ensure_future(balanced_device(lab, gw.port, "carol", "203.0.113.9", "/EWS/new"))
            done, _ = await asyncio.wait({device}, timeout=3)
            assert not done, "served over the cap: the check's connection was closed for it, freeing no slot"
            assert metric(admin, "kcd_listener_connections") <= 2
            busy[0][1].close()
            _, writer = await asyncio.wait_for(device, SERVED_WITHIN)
            assert (await exchange(check, "/EWS/again"))[0] == 200  # not closed for the device
            assert metric(admin, "kcd_listener_connections") <= 2
            for w in (check[1], busy[1][1], writer):
                w.close()

        asyncio.run(run())


def test_a_health_check_in_a_place_of_its_own_is_closed_once_served_not_kept_for_keepalive_timeout(
    lab: LabLayout, tmp_path: Path, server: str
) -> None:
    """Behind a balancer at a cap of 2, both connections busy, handshake_timeout 3 s, keepalive_timeout 120 s: a v2
    LOCAL check that found no slot goes on in a place of its own, completes TLS with a certificate, is answered once,
    then idles. It is closed about twice handshake_timeout after its accept, logged (`health_check_closed`); it held
    its place until keepalive_timeout (sixteen such held every `HEALTH_CHECKS` place for 120 s here)."""
    with capped(lab, tmp_path, server, LOCAL_CHECKED, cap=2) as (gw, _admin):

        async def run() -> None:
            busy = await two_busy_behind_a_balancer(lab, gw.port)
            gw.mark()
            check = await served_check(lab, gw.port)
            assert await closed_by_gateway(check[0]), "the check's connection was kept idle"
            event = gw.wait_event("health_check_closed")
            assert event["peer"].startswith("127.0.0.1:"), event
            for w in (check[1], *(writer for _, writer in busy)):
                w.close()

        asyncio.run(run())


def test_a_local_connection_in_a_place_of_its_own_is_answered_not_cut_mid_request(
    lab: LabLayout, tmp_path: Path, server: str
) -> None:
    """Behind a balancer at a cap of 2, both connections busy, handshake_timeout 3 s: a v2 LOCAL connection that found
    no slot goes on in a place of its own, completes TLS with alice's certificate and asks for an answer the backend
    holds 8 s (an ActiveSync Ping). HAProxy sends LOCAL for a device it relays without IP addresses (a frontend on a
    Unix socket: its `make_proxy_line_v2`), so this may be a device. The place's timer (twice handshake_timeout from
    the accept) reset it mid-request, no answer; it now closes the connection once that answer is sent, logged
    (`health_check_closed`, `serving` true)."""
    with capped(lab, tmp_path, server, LOCAL_CHECKED, cap=2) as (gw, _admin):

        async def run() -> None:
            busy = await two_busy_behind_a_balancer(lab, gw.port)
            gw.mark()
            check = await local_check(lab, gw.port)
            status, body = await exchange(check, "/EWS/held?hold=8")
            assert status == 200, body[:200]
            assert await closed_by_gateway(check[0]), "kept open past its place's time"
            event = gw.wait_event("health_check_closed")
            assert event["serving"] is True, event
            for w in (check[1], *(writer for _, writer in busy)):
                w.close()

        asyncio.run(run())


def test_a_local_connection_trickling_a_request_body_is_cut_at_its_places_time(
    lab: LabLayout, tmp_path: Path, server: str
) -> None:
    """Behind a balancer at a cap of 2, both connections busy, handshake_timeout 3 s: a v2 LOCAL connection in a place
    of its own sends a POST's head and then its body one byte every 0.5 s. At its place's time (twice
    handshake_timeout from the accept) it is reset, its request not read whole, logged (`health_check_closed`,
    `serving` false); it was served on until its body ended (each gap within client_body_timeout), 30 s here."""
    with capped(lab, tmp_path, server, LOCAL_CHECKED, cap=2) as (gw, _admin):

        async def run() -> None:
            busy = await two_busy_behind_a_balancer(lab, gw.port)
            gw.mark()
            reader, writer = await local_check(lab, gw.port)
            length = 60
            writer.write(head("/EWS/upload", f"Content-Length: {length}\r\n").replace(b"GET", b"POST", 1))
            sent = 0

            async def trickle() -> None:
                nonlocal sent
                with suppress(ConnectionError, ssl.SSLError):
                    while sent < length:
                        writer.write(b"x")
                        await writer.drain()
                        sent += 1
                        await asyncio.sleep(0.5)  # the scenario: a body one byte at a time

            trickling = asyncio.ensure_future(trickle())
            try:
                try:
                    answered = await asyncio.wait_for(reader.read(), 60)
                except (ConnectionError, ssl.SSLError):
                    answered = b""
                assert (answered[:12], sent < length) == (b"", True), (answered[:200], sent)
            finally:
                trickling.cancel()
            event = gw.wait_event("health_check_closed")
            assert event["serving"] is False, event
            for w in (writer, *(w for _, w in busy)):
                w.close()

        asyncio.run(run())


def test_health_checks_past_their_places_keep_no_device_out_of_the_waits(
    lab: LabLayout, tmp_path: Path, server: str
) -> None:
    """Behind a balancer at a cap of 2, both connections busy, handshake_timeout 60 s: HEALTH_CHECKS v2 LOCAL checks
    stalled in TLS hold their places of their own; HEADER_WAITS more checks come. A device that comes next is served
    once a busy one leaves (the extra checks waited for a slot among the HEADER_WAITS: the device stayed in the listen
    backlog and the freed slot went to a check, up to handshake_timeout and for as long as checks kept coming); the
    extra checks are closed at once, each logged (`health_check_closed`)."""
    listener = 'proxy_protocol = true\ntrusted_proxies = ["127.0.0.1/32"]\nhandshake_timeout = 60\n'
    with capped(lab, tmp_path, server, listener, cap=2) as (gw, _admin):

        async def run() -> None:
            busy = await two_busy_behind_a_balancer(lab, gw.port)
            stalled = await stalled_checks(gw.port, HEALTH_CHECKS)
            gw.mark()
            extra = await stalled_checks(gw.port, HEADER_WAITS)
            device = asyncio.ensure_future(
                asyncio.wait_for(balanced_device(lab, gw.port, "carol", "203.0.113.9", "/EWS/new"), SERVED_WITHIN)
            )
            busy[0][1].close()
            _, writer = await device  # its 200 asserted there
            for raw in extra:
                assert await asyncio.to_thread(until_closed, raw, SERVED_WITHIN) == b""
            assert len(gw.wait_events("health_check_closed", HEADER_WAITS)) >= HEADER_WAITS
            for w in (writer, busy[1][1]):
                w.close()
            for raw in (*stalled, *extra):
                raw.close()

        asyncio.run(run())


def _accepted_within(port: int, seconds: float) -> bool:
    """Whether the listener on `port` accepts what waits in its backlog within `seconds` (polled, not asserted)."""
    deadline = time.monotonic() + seconds
    while accept_queue(port) != 0:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_connections_naming_no_device_keep_no_device_out_of_the_waits_at_a_busy_cap(
    lab: LabLayout, tmp_path: Path, server: str
) -> None:
    """Behind a balancer at a cap of 2, both connections busy, handshake_timeout 60 s: HEADER_WAITS connections whose
    v2 header names no device (UNSPEC: their requests would be refused 400) come, then a device. The device is served
    once a busy one leaves (they waited for a slot among the HEADER_WAITS: the device stayed in the listen backlog and
    the freed slot went to one of them, up to handshake_timeout); they are closed at once, each logged
    (`proxy_header_refused`, `no_device_address`)."""
    listener = 'proxy_protocol = true\ntrusted_proxies = ["127.0.0.1/32"]\nhandshake_timeout = 60\n'
    with capped(lab, tmp_path, server, listener, cap=2) as (gw, _admin):

        async def run() -> None:
            busy = await two_busy_behind_a_balancer(lab, gw.port)
            gw.mark()
            unnamed = [socket.create_connection(("127.0.0.1", gw.port), timeout=30) for _ in range(HEADER_WAITS)]
            for raw in unnamed:
                raw.sendall(V2_SIGNATURE + b"\x21\x00\x00\x00")  # PROXY, family UNSPEC, no addresses
            await asyncio.to_thread(eventually, lambda: accept_queue(gw.port) == 0, "the gateway accepted them")
            device = asyncio.ensure_future(
                asyncio.wait_for(balanced_device(lab, gw.port, "carol", "203.0.113.9", "/EWS/new"), SERVED_WITHIN)
            )
            await asyncio.to_thread(_accepted_within, gw.port, 5.0)  # before a slot is free; the old code never did
            busy[0][1].close()
            _, writer = await device  # its 200 asserted there
            for raw in unnamed:
                assert await asyncio.to_thread(until_closed, raw, SERVED_WITHIN) == b""
                raw.close()
            refused = gw.wait_events("proxy_header_refused", HEADER_WAITS)
            assert {e["refusal"] for e in refused} == {"no_device_address"}, refused
            for w in (writer, busy[1][1]):
                w.close()

        asyncio.run(run())


CHECK_REQUESTS = {  # what a health check (HAProxy's `option httpchk`, `http-check send`) may send, read whole
    "content-length-0": [b"GET /EWS/held?hold=8 HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n"],
    "head": [b"HEAD /EWS/held?hold=8 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"],
    "pipelined-body-to-come": [
        b"GET /EWS/held?hold=8 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        b"POST /EWS/upload HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 60\r\n\r\nx"
    ],
    "chunked-slowly": [
        b"POST /EWS/held?hold=8 HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"0\r\n",
        b"\r\n",
    ],
}


@pytest.mark.parametrize("request_kind", sorted(CHECK_REQUESTS))
def test_a_local_check_whose_request_was_read_whole_is_answered_past_its_places_time(
    lab: LabLayout, tmp_path: Path, server: str, request_kind: str
) -> None:
    """Behind a balancer at a cap of 2, both connections busy, handshake_timeout 3 s: a v2 LOCAL check in a place of its
    own sends a request with no body to come (`Content-Length: 0`, a HEAD, a chunked body's zero chunk sent in parts,
    or one pipelined behind it whose body still comes) that the backend holds 8 s, past its place's time: it is
    answered, then closed (`serving` true)."""
    with capped(lab, tmp_path, server, LOCAL_CHECKED, cap=2) as (gw, _admin):

        async def run() -> None:
            busy = await two_busy_behind_a_balancer(lab, gw.port)
            gw.mark()
            reader, writer = await local_check(lab, gw.port)
            for part in CHECK_REQUESTS[request_kind]:
                writer.write(part)
                await writer.drain()
                await asyncio.sleep(0.3)  # the scenario: a request in parts, whole long before its place's time
            try:
                line = await asyncio.wait_for(reader.readline(), 60)
            except (ConnectionError, ssl.SSLError):
                line = b""
            assert line.startswith(b"HTTP/1.1 200"), line
            event = gw.wait_event("health_check_closed")
            assert event["serving"] is True, event
            for w in (writer, *(w for _, w in busy)):
                w.close()

        asyncio.run(run())
