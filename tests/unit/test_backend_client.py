"""The backend client's pure parts (the request head, the upstream read from a route) and its pool's
bookkeeping against a loopback listener: places per upstream, idle connections closed after keep-alive."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from pathlib import Path

import pytest
from multidict import CIMultiDict

from proxy.backend.client import BackendProtocolError, PoolBusy, Upstream, UserPool, connect, request_head


def test_the_request_head_is_one_block_with_host_first() -> None:
    """Request line, Host first (the device's when kept, else the upstream's), the rest in order, a blank line."""
    headers = CIMultiDict([("Accept", "*/*"), ("Host", "mail.lab.test"), ("Authorization", "Negotiate YQ==")])
    head = request_head("GET", "/owa/?a=1", headers, "127.0.0.1:8080", chunked=False)
    assert head == (
        b"GET /owa/?a=1 HTTP/1.1\r\nHost: mail.lab.test\r\nAccept: */*\r\nAuthorization: Negotiate YQ==\r\n\r\n"
    )
    assert request_head("GET", "/", CIMultiDict(), "cas:81", chunked=False) == b"GET / HTTP/1.1\r\nHost: cas:81\r\n\r\n"


def test_the_body_framing_is_said() -> None:
    """A body without a length goes chunked; a POST without a body says Content-Length: 0 (GET says nothing)."""
    assert b"Transfer-Encoding: chunked\r\n" in request_head("POST", "/", CIMultiDict(), "h", chunked=True)
    assert b"Content-Length: 0\r\n" in request_head("POST", "/", CIMultiDict(), "h", chunked=False)
    assert b"Content-Length" not in request_head("GET", "/", CIMultiDict(), "h", chunked=False)
    sized = request_head("PUT", "/", CIMultiDict([("Content-Length", "5")]), "h", chunked=False)
    assert sized.count(b"Content-Length") == 1


@pytest.mark.parametrize("bad", ["a\r\nX-Injected: 1", "a\nb", "a\rb", "a\x00b"])
def test_no_field_can_add_a_line_of_its_own(bad: str) -> None:
    """CR, LF or NUL in any value (or name) is refused before anything is written."""
    with pytest.raises(BackendProtocolError):
        request_head("GET", "/", CIMultiDict([("X-Value", bad)]), "h", chunked=False)
    with pytest.raises(BackendProtocolError):
        request_head("GET", "/", CIMultiDict([(bad, "v")]), "h", chunked=False)


def test_upstreams_are_read_once_with_their_default_ports() -> None:
    """Host, port (80/443 by default), the Host header, and for https the name verified (server_name or host)."""
    plain = Upstream.of("http://cas.lab.test", None, None)
    assert (plain.host, plain.port, plain.authority, plain.server_hostname) == (
        "cas.lab.test",
        80,
        "cas.lab.test",
        None,
    )
    tls = ssl.create_default_context()
    secure = Upstream.of("https://[::1]:8443", tls, "cas.lab.test")
    assert (secure.host, secure.port, secure.authority, secure.server_hostname) == (
        "::1",
        8443,
        "[::1]:8443",
        "cas.lab.test",
    )
    assert Upstream.of("https://10.0.0.5", tls, None).server_hostname == "10.0.0.5"
    assert Upstream.of("https://10.0.0.5", tls, None).port == 443


async def _listener() -> tuple[asyncio.Server, Upstream, list[asyncio.StreamWriter]]:
    accepted: list[asyncio.StreamWriter] = []

    async def keep(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)
        await reader.read()  # until the client closes

    server = await asyncio.start_server(keep, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, Upstream.of(f"http://127.0.0.1:{port}", None, None), accepted


def test_a_user_has_at_most_limit_connections_per_upstream() -> None:
    """Past the limit a request waits for one of the user's connections to come back, then gets a place."""

    async def case() -> None:
        server, upstream, _ = await _listener()
        pool = UserPool(limit=1)
        first = await pool.acquire(upstream, 5)
        second = asyncio.ensure_future(pool.acquire(upstream, 5, fresh=True))
        await asyncio.sleep(0.1)
        assert not second.done()
        pool.discard(upstream, first)
        assert (await asyncio.wait_for(second, 30)) is not first
        pool.close()
        server.close()

    asyncio.run(case())


def test_a_wait_for_a_place_ends_at_connect_timeout_and_leaves_no_turn_behind() -> None:
    """With every place taken and none coming back, a request waits `connect_timeout` at most (PoolBusy); the
    wait it gave up takes no turn from the next one, which gets the place as soon as it is free."""

    async def case() -> None:
        server, upstream, _ = await _listener()
        pool = UserPool(limit=1)
        first = await pool.acquire(upstream, 5)
        started = time.monotonic()
        with pytest.raises(PoolBusy, match="all 1 of the user's connections"):
            await pool.acquire(upstream, 0.2)
        assert 0.15 < time.monotonic() - started < 10
        after = asyncio.ensure_future(pool.acquire(upstream, 30))
        await asyncio.sleep(0)
        pool.discard(upstream, first)
        assert (await asyncio.wait_for(after, 30)) is not first
        pool.close()
        server.close()

    asyncio.run(case())


def test_idle_connections_close_after_keepalive() -> None:
    """A connection handed back is kept for the next request, and closed once idle for `keepalive` seconds."""

    async def case() -> None:
        server, upstream, accepted = await _listener()
        pool = UserPool(keepalive=0.2)
        connection = await pool.acquire(upstream, 5)
        connection.begin("GET", 0)
        connection.data_received(b"HTTP/1.1 204 No Content\r\n\r\n")
        connection.request_sent()
        pool.release(upstream, connection)
        assert (await pool.acquire(upstream, 5)) is connection  # reused
        pool.release(upstream, connection)
        deadline = time.monotonic() + 30  # keepalive is 0.2 s; a loaded machine may run the sweep late
        while not connection.closed and time.monotonic() < deadline:  # noqa: ASYNC110  the pool's state
            await asyncio.sleep(0.05)
        assert connection.closed
        assert len(accepted) == 1
        pool.close()
        server.close()

    asyncio.run(case())


def test_a_connection_taken_and_put_back_unused_is_still_closed_after_keepalive() -> None:
    """A request that stopped before writing hands its connection back unused: it is idle from then on, and the
    keep-alive sweep closes it like any other (it used to stay open for ever when no release followed)."""

    async def case() -> None:
        server, upstream, _ = await _listener()
        pool = UserPool(keepalive=0.2)
        connection = await pool.acquire(upstream, 5)  # new: no request ever goes on it
        pool.unused(upstream, connection)
        for _ in range(100):
            if connection.closed:
                break
            await asyncio.sleep(0.05)
        assert connection.closed
        assert (await pool.acquire(upstream, 5)) is not connection  # a new one: the idle one was closed and counted
        pool.close()
        server.close()

    asyncio.run(case())


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\n\r\n",
    ],
    ids=["no length", "chunked", "HTTP/1.0 keep-alive"],
)
def test_a_head_answer_without_a_length_can_be_reused(head: bytes) -> None:
    """A HEAD answer has no body whatever its headers say: without a Content-Length it is complete at its blank
    line, and the connection can carry the next request (llhttp alone would wait for the close)."""

    async def case() -> None:
        server, upstream, _ = await _listener()
        pool = UserPool()
        connection = await pool.acquire(upstream, 5)
        connection.begin("HEAD", 0)
        connection.request_sent()
        connection.data_received(head)
        assert connection.complete
        assert connection.reusable
        pool.close()
        server.close()

    asyncio.run(case())


@pytest.mark.parametrize(
    "head",
    [b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n", b"HTTP/1.0 200 OK\r\n\r\n"],
    ids=["Connection: close", "HTTP/1.0"],
)
def test_a_head_answer_that_asks_to_close_is_not_reused(head: bytes) -> None:
    """`Connection: close`, or HTTP/1.0 without keep-alive, still ends the connection after a HEAD answer."""

    async def case() -> None:
        server, upstream, _ = await _listener()
        pool = UserPool()
        connection = await pool.acquire(upstream, 5)
        connection.begin("HEAD", 0)
        connection.request_sent()
        connection.data_received(head)
        assert connection.complete
        assert not connection.reusable
        pool.close()
        server.close()

    asyncio.run(case())


def _connected_to(port: int) -> int:
    """This process's TCP sockets connected to 127.0.0.1:`port`, in any state (from /proc/net/tcp, by inode)."""
    inodes = set()
    for fd in Path("/proc/self/fd").iterdir():
        with contextlib.suppress(OSError):
            target = str(fd.readlink())
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
    return sum(1 for f in map(str.split, lines) if f[2] == f"0100007F:{port:04X}" and f[9] in inodes)


def test_a_connect_cancelled_at_any_moment_leaves_no_socket_open() -> None:
    """A device that leaves cancels its request while the backend connection is being made, at any point of it:
    no socket is left open (asyncio's happy-eyeballs connect loses the socket of a connect it cancels as that
    connect completes: python/cpython#128475; here one in a few dozen did)."""

    async def scenario() -> int:
        held: list[asyncio.StreamWriter] = []

        async def accept(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            held.append(writer)  # the backend keeps its side open

        server = await asyncio.start_server(accept, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        upstream = Upstream.of(f"http://127.0.0.1:{port}", None, None)
        for i in range(300):
            attempt = asyncio.ensure_future(connect(upstream, 10))
            for _ in range(i % 9):
                await asyncio.sleep(0)
            attempt.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                (await attempt).abort()  # a connect that won the race with the cancel: the caller closes it
        await asyncio.sleep(0.3)
        left = _connected_to(port)
        for writer in held:
            writer.close()
        server.close()
        return left

    assert asyncio.run(scenario()) == 0
