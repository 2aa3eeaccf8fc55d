"""A hostile or broken backend against the gateway's backend client: a raw asyncio server scripted per test
sends answers byte by byte as written here, and a real aiohttp device goes through `forward` in front.

What is pinned: an answer that is not one well-framed HTTP/1.1 answer to the request sent is never passed
on as if it were (502 before anything reached the device, the device's connection cut after), and a
connection that misbehaved is never used for the next request."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import random
import socket
import ssl
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, MutableMapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest
import structlog
import uvloop
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from multidict import CIMultiDict

from proxy.backend.client import (
    BUFFER_HIGH,
    LIMIT_PER_UPSTREAM,
    Exchange,
    ResponseHead,
    Upstream,
    UserPool,
    read_timers,
)
from proxy.backend.forward import Pools, forward
from proxy.config import Route
from proxy.errors import GatewayError
from tests.integration.loopback import stop_listening

Serve = Callable[["Conn"], Awaitable[None]]
HINTS: list[str] = []  # the log hints of this test's refusals, latest last (`_hints_of_this_test`)


@pytest.fixture(autouse=True)
def _hints_of_this_test() -> None:
    """HINTS starts empty for each test: a test reading HINTS[-1] after a request of its own that recorded no hint
    read the previous test's in this worker (the read-timeout cases share `read_timeout=0.5 s`), and passed on it."""
    HINTS.clear()


@dataclass
class Conn:
    """One backend connection as the script sees it."""

    number: int
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    requests: list[bytes]

    async def request(self) -> bytes:
        """The next request's head and its Content-Length body (b"" when the gateway closed instead)."""
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            return b""
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        body = await self.reader.readexactly(length) if length else b""
        self.requests.append(head + body)
        return head + body

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()


@dataclass
class Backend:
    serve: Serve
    conns: list[Conn] = field(default_factory=list)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = Conn(len(self.conns) + 1, reader, writer, [])
        self.conns.append(conn)
        try:
            await self.serve(conn)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


def ok(body: bytes, *extra: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%b\r\n%b" % (len(body), b"".join(extra), body)


@dataclass
class Outcome:
    status: int | None  # None: the device's connection was cut
    body: bytes
    headers: dict[str, str]


@asynccontextmanager
async def gateway(serve: Serve, scheme: str = "http", **route_options: object) -> AsyncIterator[tuple[str, Backend]]:
    """The scripted backend and, in front of it, a minimal gateway that forwards as alice."""
    backend = Backend(serve)
    server = await asyncio.start_server(backend.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    route = Route(prefix="/", upstream=f"{scheme}://127.0.0.1:{port}", spn="HTTP/cas.lab.test", **route_options)  # type: ignore[arg-type]
    try:
        async with front(route) as url:
            yield url, backend
    finally:
        server.close()


@asynccontextmanager
async def front(route: Route) -> AsyncIterator[str]:
    """A minimal gateway that forwards every request to `route` as alice; its URL."""
    pools = Pools([route])

    async def handler(request: web.Request) -> web.StreamResponse:
        try:
            response, _ = await forward(request, route, pools, "alice@LAB.TEST", "Negotiate dG9rZW4=")
        except GatewayError as e:
            HINTS.append(e.hint or "")
            return web.Response(status=e.status, text=e.reason)  # as the gateway: the hint is for the log
        return response

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    # aiohttp reads and discards a body its handler left unread for up to lingering_time (10 s) before the
    # handler's end: a stand-in for the gateway need not; the 504 of a backend that takes no body left 12 MB unread
    async with _served(web.AppRunner(app, lingering_time=0.5), pools) as url:
        yield url


@asynccontextmanager
async def _served(runner: web.AppRunner, pools: Pools) -> AsyncIterator[str]:
    """`runner`'s application on a free loopback port, its URL; `pools` closed with it."""
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await pools.close()
        await runner.cleanup()


async def ask(session: aiohttp.ClientSession, url: str, method: str = "GET", data: bytes | None = None) -> Outcome:
    try:
        async with session.request(method, url, data=data) as r:
            body = await r.read()
            return Outcome(r.status, body, dict(r.headers))
    except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
        return Outcome(None, b"", {})


def run(
    serve: Serve, *requests: tuple[str, str], scheme: str = "http", loop: str = "asyncio", **route_options: object
) -> tuple[list[Outcome], Backend]:
    """The requests one after another from one device (its own keep-alive connection), on `loop`."""

    async def case() -> tuple[list[Outcome], Backend]:
        async with gateway(serve, scheme, **route_options) as (url, backend):
            async with aiohttp.ClientSession() as session:
                outcomes = [await ask(session, url + path, method) for method, path in requests]
            return outcomes, backend

    return on_loop(loop, asyncio.wait_for(case(), 30))


def answering(*answers: bytes) -> Serve:
    """A backend whose n-th request (on whichever connection) gets the n-th of `answers`; it keeps
    connections open until the gateway closes them."""
    left = list(answers)

    async def serve(conn: Conn) -> None:
        while await conn.request():
            if not left:
                return
            await conn.send(left.pop(0))

    return serve


# -- framing the backend cannot be trusted with --------------------------------------------------------


BAD = [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", "both"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\nhello", "two lengths"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: -5\r\n\r\nhello", "negative length"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n", "bad chunk size"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-5\r\nhello\r\n0\r\n\r\n", "negative chunk size"),
    (b"HTTP/1.1 200 OK\r\nX-A: 1\r\n folded\r\nContent-Length: 0\r\n\r\n", "obs-fold"),
    (b"HTTP/1.1 200 OK\nContent-Length: 0\n\n", "bare LF"),
    (b"HTTP/1.1 200 OK\r\nBad Name: x\r\nContent-Length: 0\r\n\r\n", "space in a name"),
    (b"HTTP/1.1 2000 OK\r\nContent-Length: 0\r\n\r\n", "four-digit status"),
    (b"hello, this is not HTTP\r\n\r\n", "HTTP/0.9 or garbage"),
    (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n", "unasked upgrade"),
    # transfer codings the gateway does not decode: the device would get the coded bytes without the coding
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n4\r\n\x1f\x8b\x08\x00\r\n0\r\n\r\n", "gzip, chunked"),
    (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"4\r\n\x1f\x8b\x08\x00\r\n0\r\n\r\n",
        "gzip then chunked, two fields",
    ),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n\x1f\x8b\x08\x00", "gzip to the close"),
    # chunked applied twice (RFC 9112, 6.1: never): read once, the device would get the inner chunks as the body
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", "chunked twice"),
    # statuses outside 100-599 (RFC 9110, 15): below 100 was read as an interim answer and waited past it
    (b"HTTP/1.1 099 Early\r\nContent-Length: 5\r\n\r\nhello", "status below 100"),
    (b"HTTP/1.1 000 Zero\r\nContent-Length: 5\r\n\r\nhello", "status 000"),
    (b"HTTP/1.1 600 Beyond\r\nContent-Length: 5\r\n\r\nhello", "status above 599"),
    # a reason phrase is HTAB, SP, VCHAR and obs-text (RFC 9112, 4): a control byte reached the device raw, or
    # made aiohttp's device side raise (a 500 'Internal Server Error' and a traceback)
    (b"HTTP/1.1 200 O\x01K\r\nContent-Length: 5\r\n\r\nhello", "control byte in the reason"),
    (b"HTTP/1.1 200 O\x7fK\r\nContent-Length: 5\r\n\r\nhello", "DEL in the reason"),
]


@pytest.mark.parametrize(("answer", "why"), BAD, ids=[why for _, why in BAD])
def test_badly_framed_answers_are_502_and_the_connection_is_not_reused(answer: bytes, why: str) -> None:
    """An answer framed two ways, with a bad length or chunk size, folded or LF-only lines, a status that
    is not one, or an upgrade nobody asked for: the device gets 502 with nothing of it, and the next
    request goes on a new backend connection."""
    outcomes, backend = run(answering(answer, ok(b"fine")), ("GET", "/a"), ("GET", "/b"))
    first, second = outcomes
    assert first.status == 502, (why, first)
    assert b"hello" not in first.body
    assert (second.status, second.body) == (200, b"fine"), why
    assert [len(c.requests) for c in backend.conns][-1] == 1  # the second request found a new connection


def test_an_over_long_answer_head_is_502() -> None:
    """A backend whose header block never ends (here 70 KiB of fields) is refused at 64 KiB: 502."""
    head = b"HTTP/1.1 200 OK\r\n" + b"X-Filler: " + b"a" * 1000 + b"\r\n"
    answer = head + b"".join(b"X-F%d: %b\r\n" % (i, b"b" * 1000) for i in range(70)) + b"Content-Length: 0\r\n\r\n"
    (outcome,), _ = run(answering(answer), ("GET", "/a"))
    assert outcome.status == 502
    assert "65536 bytes" in HINTS[-1]  # the log's hint names the limit


def test_too_many_header_fields_is_502() -> None:
    """More than 256 header fields in one answer: 502."""
    answer = b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-F%d: 1\r\n" % i for i in range(300)) + b"Content-Length: 0\r\n\r\n"
    (outcome,), _ = run(answering(answer), ("GET", "/a"))
    assert outcome.status == 502


def test_a_body_that_breaks_after_the_head_cuts_the_device() -> None:
    """The head was fine and went to the device, then a chunk size is garbage: the device's connection is
    cut (it can tell the answer is incomplete), and the backend connection is not reused."""

    async def serve(conn: Conn) -> None:
        await conn.request()
        await conn.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await asyncio.sleep(0.3)
        await conn.send(b"zz\r\nworld\r\n0\r\n\r\n")
        await conn.request()

    (outcome,), backend = run(serve, ("GET", "/a"))
    assert outcome.status is None
    assert len(backend.conns) == 1


def test_a_length_delimited_body_cut_short_cuts_the_device() -> None:
    """The backend promises 100 bytes and closes after 5: the device's connection is cut, not ended as if whole."""

    async def serve(conn: Conn) -> None:
        await conn.request()
        await conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
        await asyncio.sleep(0.3)
        await conn.send(b"hello")

    (outcome,), _ = run(serve, ("GET", "/a"))
    assert outcome.status is None


# -- answers to requests that were not sent -----------------------------------------------------------


def test_a_second_answer_to_one_request_never_reaches_the_next_request() -> None:
    """A backend that sends two answers for one request (a desync, or a smuggled answer): the first goes to
    its request; the second is never read as the answer to the next request, which gets its own."""
    smuggled = ok(b"first") + ok(b"SMUGGLED")
    outcomes, backend = run(answering(smuggled, ok(b"second")), ("GET", "/a"), ("GET", "/b"))
    assert [(o.status, o.body) for o in outcomes] == [(200, b"first"), (200, b"second")]
    assert len(backend.conns) == 2


def test_bytes_on_an_idle_connection_end_it() -> None:
    """Bytes a backend sends on a pooled connection while no request is outstanding are no answer to
    anything: that connection is closed and the next request gets a new one and its own answer."""

    async def serve(conn: Conn) -> None:
        await conn.request()
        await conn.send(ok(b"first"))
        await asyncio.sleep(0.2)
        await conn.send(ok(b"SMUGGLED"))
        await conn.request()

    async def case() -> tuple[list[Outcome], Backend]:
        async with gateway(serve) as (url, backend), aiohttp.ClientSession() as session:
            first = await ask(session, url + "/a")
            deadline = time.monotonic() + 25  # (within the case's 30 s) until the unsolicited bytes have arrived
            while time.monotonic() < deadline:
                if len(backend.conns[0].requests) == 1 and backend.conns[0].writer.transport.is_closing():
                    break
                await asyncio.sleep(0.05)
            second = await ask(session, url + "/b")
            return [first, second], backend

    outcomes, backend = asyncio.run(asyncio.wait_for(case(), 30))
    assert [(o.status, o.body) for o in outcomes] == [(200, b"first"), (200, b"first")]
    assert len(backend.conns) == 2


def test_a_body_after_the_answer_to_head_ends_the_connection() -> None:
    """HEAD's answer says Content-Length: 5 and (wrongly) sends 5 bytes: the HEAD answer reaches the device
    with its length and no body, and those bytes are not read as the next request's answer."""
    outcomes, backend = run(
        answering(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", ok(b"second")), ("HEAD", "/a"), ("GET", "/b")
    )
    head, get = outcomes
    assert (head.status, head.body, head.headers["Content-Length"]) == (200, b"", "5")
    assert (get.status, get.body) == (200, b"second")
    assert len(backend.conns) == 2


def test_head_answers_keep_the_connection() -> None:
    """A well-behaved HEAD answer (a Content-Length, no body) leaves the connection usable for the next request."""
    outcomes, backend = run(
        answering(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", ok(b"second")), ("HEAD", "/a"), ("GET", "/b")
    )
    assert [(o.status, o.body) for o in outcomes] == [(200, b""), (200, b"second")]
    assert len(backend.conns) == 1


def test_a_head_answer_without_a_length_keeps_the_connection() -> None:
    """A HEAD answer with neither Content-Length nor chunked (it has no body whatever it says): the device gets it
    at once, and the next request goes on the same backend connection."""
    outcomes, backend = run(answering(b"HTTP/1.1 200 OK\r\n\r\n", ok(b"second")), ("HEAD", "/a"), ("GET", "/b"))
    assert [(o.status, o.body) for o in outcomes] == [(200, b""), (200, b"second")]
    assert len(backend.conns) == 1


# -- framings that are fine ----------------------------------------------------------------------------


def test_interim_answers_are_dropped_and_the_final_one_passes() -> None:
    """100 Continue and 103 Early Hints before the answer are read and dropped; the answer itself passes."""
    interim = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\n"
    (outcome,), _ = run(answering(interim + ok(b"final")), ("GET", "/a"))
    assert (outcome.status, outcome.body) == (200, b"final")


def test_two_100_continues_are_dropped_and_the_final_answer_passes() -> None:
    """A backend that sends 100 Continue twice (and 102 between) before its answer: all dropped, the answer
    passes, and its connection serves the next request."""
    interim = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 102 Processing\r\n\r\nHTTP/1.1 100 Continue\r\n\r\n"
    outcomes, backend = run(answering(interim + ok(b"final"), ok(b"next")), ("GET", "/a"), ("GET", "/b"))
    assert [(o.status, o.body) for o in outcomes] == [(200, b"final"), (200, b"next")]
    assert len(backend.conns) == 1


def test_a_flood_of_interim_answers_is_502_and_the_connection_is_not_reused() -> None:
    """Interim answers count toward the answer head's bound (64 KiB): 5000 of them (130 KB) in front of an answer
    are a 502, and the next request goes on a new connection."""
    flood = b"HTTP/1.1 102 Processing\r\n\r\n" * 5000
    outcomes, backend = run(answering(flood + ok(b"late"), ok(b"fine")), ("GET", "/a"), ("GET", "/b"))
    assert [(o.status, o.body) for o in outcomes][1] == (200, b"fine")
    assert outcomes[0].status == 502, outcomes[0]
    assert len(backend.conns) == 2


def test_an_answer_before_the_body_is_taken_passes_and_its_connection_is_never_reused() -> None:
    """A backend that answers 413 (keep-alive, framed) after reading only the head of a 4 MB upload: the device
    gets the 413 whole, and the next request goes on a new backend connection (on the old one, the rest of the body
    would have been read as the next request's bytes)."""

    async def serve(conn: Conn) -> None:
        head = await conn.reader.readuntil(b"\r\n\r\n")
        conn.requests.append(head)
        if head.startswith(b"POST "):
            await conn.send(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 8\r\n\r\ntoo big!")
            await asyncio.sleep(30)  # reads nothing more, keeps the connection open
            return
        await conn.send(ok(b"fine"))
        while await conn.request():
            await conn.send(ok(b"fine"))

    async def case() -> tuple[list[Outcome], Backend]:
        async with gateway(serve) as (url, backend), aiohttp.ClientSession() as session:
            first = await ask(session, url + "/upload", "POST", b"x" * (4 << 20))
            second = await ask(session, url + "/after")
            return [first, second], backend

    (first, second), backend = on_loop("asyncio", asyncio.wait_for(case(), 60))
    assert (first.status, first.body) in ((413, b"too big!"), (None, b"")), first  # the device may see the cut first
    assert (second.status, second.body) == (200, b"fine")
    assert [c.requests[0].split(b" ", 2)[:2] for c in backend.conns] == [[b"POST", b"/upload"], [b"GET", b"/after"]]


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_an_answer_ended_by_close_passes_whole_and_is_not_reused(loop: str) -> None:
    """An answer with neither Content-Length nor chunked ends when the backend closes (plain TCP: its FIN):
    the device gets all of it, and the next request opens a new connection."""

    async def serve(conn: Conn) -> None:
        await conn.request()
        await conn.send(b"HTTP/1.1 200 OK\r\n\r\npart one, ")
        await asyncio.sleep(0.2)
        await conn.send(b"part two")

    outcomes, backend = run(serve, ("GET", "/a"), ("GET", "/b"), loop=loop)
    assert (outcomes[0].status, outcomes[0].body) == (200, b"part one, part two")
    assert outcomes[1].status == 200
    assert len(backend.conns) == 2


def test_chunked_answers_with_extensions_and_trailers_pass() -> None:
    """Chunk extensions and a trailer section are valid framing: the body passes whole."""
    answer = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n0\r\nX-Trailer: t\r\n\r\n"
    outcomes, backend = run(answering(answer, ok(b"again")), ("GET", "/a"), ("GET", "/b"))
    assert [(o.status, o.body) for o in outcomes] == [(200, b"hello"), (200, b"again")]
    assert len(backend.conns) == 1


@pytest.mark.parametrize(
    "answer",
    [
        ok(b"first") + b"EXTRA",
        ok(b"first") + b"HTTP/1.1 200 OK\r\n",
        ok(b"first") + b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nSMUGGLED",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n0\r\n\r\nEXTRA",
    ],
    ids=["junk", "half-a-head", "whole-answer", "after-chunked"],
)
def test_bytes_past_an_answers_end_never_reach_the_users_next_request(answer: bytes) -> None:
    """A backend that sends more than its answer's framing says (past its Content-Length or its last chunk), in the
    same write: the answer passes, its connection is never reused, and the user's next request gets its own answer
    on a new connection (a desync inside one user's pool would hand it another request's answer)."""
    outcomes, backend = run(answering(answer, ok(b"second")), ("GET", "/a"), ("GET", "/b"))
    assert [(o.status, o.body) for o in outcomes] == [(200, b"first"), (200, b"second")]
    assert len(backend.conns) == 2


def test_a_long_chunk_extension_from_the_backend_is_skipped_not_held() -> None:
    """A chunk extension of 1 MiB (`1;ext=...`): llhttp skips extensions without keeping them, so the answer passes
    whole and the connection is reused; what such a backend costs is time, bounded per byte by read_timeout as any
    trickle is (docs/hardening.md)."""
    answer = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=" + b"e" * (1 << 20) + b"\r\nhello\r\n0\r\n\r\n"
    )
    outcomes, backend = run(answering(answer, ok(b"again")), ("GET", "/a"), ("GET", "/b"))
    assert [(o.status, o.body) for o in outcomes] == [(200, b"hello"), (200, b"again")]
    assert len(backend.conns) == 1


# -- a pooled connection the backend closed meanwhile ----------------------------------------------------


def closes_after_first() -> Serve:
    """Answers the first request, then reads the next one and closes without a byte (a keep-alive race)."""

    async def serve(conn: Conn) -> None:
        await conn.request()
        if conn.number == 1:
            await conn.send(ok(b"first"))
            await conn.request()
            return
        await conn.send(ok(b"retried"))
        await conn.request()

    return serve


def test_an_idempotent_request_is_retried_once_on_a_new_connection() -> None:
    """A GET on a pooled connection the backend closes without answering goes again, on a new connection."""
    outcomes, backend = run(closes_after_first(), ("GET", "/a"), ("GET", "/b"))
    assert [(o.status, o.body) for o in outcomes] == [(200, b"first"), (200, b"retried")]
    assert [len(c.requests) for c in backend.conns] == [2, 1]


def test_a_post_is_never_retried() -> None:
    """A POST on a pooled connection the backend closes without answering is a 502: it may have been acted on."""
    outcomes, backend = run(closes_after_first(), ("GET", "/a"), ("POST", "/b"))
    assert outcomes[0].status == 200
    assert outcomes[1].status == 502
    assert len(backend.conns) == 1


def test_a_new_connection_closed_without_an_answer_is_502() -> None:
    """A backend that closes a new connection without answering: 502 (a retry would only double the load)."""

    async def serve(conn: Conn) -> None:
        await conn.request()

    (outcome,), backend = run(serve, ("GET", "/a"))
    assert outcome.status == 502
    assert len(backend.conns) == 1


def test_a_read_timeout_before_the_head_is_504_and_after_it_cuts() -> None:
    """read_timeout: silence before the head is a 504; silence in the middle of the body cuts the device."""

    async def serve(conn: Conn) -> None:
        await conn.request()
        if conn.number == 1:
            await asyncio.sleep(5)
            return
        await conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello")
        await asyncio.sleep(5)

    outcomes, _ = run(serve, ("GET", "/a"), ("GET", "/b"), read_timeout=0.5)
    assert outcomes[0].status == 504
    assert outcomes[1].status is None


def test_a_tls_handshake_that_never_ends_is_bounded_by_connect_timeout() -> None:
    """An https upstream that accepts the TCP connection and never answers the TLS handshake: connect_timeout
    bounds the handshake too, and the device gets 504 in about that time."""

    async def serve(conn: Conn) -> None:
        await conn.reader.read()  # takes the ClientHello and says nothing

    started = time.monotonic()
    (outcome,), _ = run(serve, ("GET", "/a"), scheme="https", connect_timeout=0.5)
    assert outcome.status == 504
    assert time.monotonic() - started < 10
    assert "connect_timeout=0.5 s" in HINTS[-1]


def test_an_answer_that_says_connection_close_is_not_reused() -> None:
    """`Connection: close` (or an HTTP/1.0 answer without keep-alive): the next request opens a new connection."""
    close = ok(b"one", b"Connection: close\r\n")
    old = b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\ntwo"
    outcomes, backend = run(answering(close, old, ok(b"three")), ("GET", "/a"), ("GET", "/b"), ("GET", "/c"))
    assert [(o.status, o.body) for o in outcomes] == [(200, b"one"), (200, b"two"), (200, b"three")]
    assert len(backend.conns) == 3


# -- the client's own contract, driven directly --------------------------------------------------------


def test_a_whole_answer_that_filled_the_buffer_leaves_its_pooled_connection_reading() -> None:
    """An answer that arrived whole while filling the buffer (body BUFFER_HIGH + 1 bytes: reading pauses on
    its last byte) and is taken in one piece (`body()`, the one-write path) leaves the pooled connection
    reading: the next request on it gets its answer, not a wait the read timeout no longer bounds."""
    big = b"x" * (BUFFER_HIGH + 1)

    async def case() -> tuple[bytes, ResponseHead]:
        backend = Backend(answering(ok(big), ok(b"second")))
        server = await asyncio.start_server(backend.handle, "127.0.0.1", 0)
        upstream = Upstream.of(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", None, None)
        pool = UserPool()
        try:
            connection = await pool.acquire(upstream, 5)
            first = Exchange(pool, upstream, connection)
            first.start("GET", "/a", CIMultiDict(), None, 1.0)
            await connection.response_head()
            deadline = time.monotonic() + 25  # (within the case's 30 s) until the whole answer is in
            while not connection.complete and time.monotonic() < deadline:  # noqa: ASYNC110  the client's state
                await asyncio.sleep(0.02)  # (reading pauses as the answer's last byte arrives)
            body = connection.body()
            first.finish()
            again = await pool.acquire(upstream, 5)
            assert again is connection  # pooled and taken again
            Exchange(pool, upstream, again).start("GET", "/b", CIMultiDict(), None, 1.0)
            head = await asyncio.wait_for(again.response_head(), 5)
            return body, head
        finally:
            pool.close()
            server.close()

    body, head = asyncio.run(asyncio.wait_for(case(), 30))
    assert body == big
    assert head.status == 200


def test_a_401_answers_body_never_reaches_the_next_request() -> None:
    """A backend 401 with a body (IIS's "Access is denied" page) is a 502 for its request; the connection goes
    back to the user's pool (request binding), and the next answer on it reaches the device with its own body
    only, not the 401 page's bytes in front of it."""
    denied = b"HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Negotiate\r\nContent-Length: 13\r\n\r\nACCESS DENIED"
    outcomes, backend = run(answering(denied, ok(b"second")), ("GET", "/a"), ("GET", "/b"))
    assert outcomes[0].status == 502
    assert (outcomes[1].status, outcomes[1].body) == (200, b"second")
    assert len(backend.conns) == 1  # the second request went on the pooled connection


def test_a_backend_that_takes_no_body_and_answers_nothing_is_bounded_by_read_timeout() -> None:
    """A backend that reads the request head, then neither takes the body nor answers: the upload stops on the
    full socket buffers, and read_timeout bounds that wait for the backend too; the device gets 504, not a
    request held open for ever."""

    async def stuck(conn: Conn) -> None:
        await conn.reader.readuntil(b"\r\n\r\n")
        await asyncio.sleep(20)  # takes no byte of the body, says nothing

    async def case() -> tuple[Outcome, float]:
        async with gateway(stuck, read_timeout=0.5) as (url, _):
            timeout = aiohttp.ClientTimeout(total=15)
            async with aiohttp.ClientSession(timeout=timeout) as session:
                started = time.monotonic()
                outcome = await ask(session, url + "/upload", "POST", b"x" * 12_000_000)
                return outcome, time.monotonic() - started

    outcome, took = asyncio.run(asyncio.wait_for(case(), 40))
    assert outcome.status == 504
    assert took < 14  # the gateway's answer, not the device giving up
    assert "read_timeout=0.5 s" in HINTS[-1]


# -- https upstreams: the answer ends where TLS says it ends ---------------------------------------------

T = TypeVar("T")


@dataclass
class TlsUpstream:
    """An https upstream scripted per test, over blocking TLS sockets in a thread: each connection reads one
    request head, gets the next of `answers` (pieces sent 0.3 s apart) and ends with TLS's close_notify
    (`close_notify`) or with a bare TCP close, which is what an attacker who cuts the connection produces."""

    answers: list[list[bytes]]
    close_notify: bool
    cert: Path
    key: Path
    sock: socket.socket = field(default_factory=socket.socket)

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    def start(self) -> None:
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert, self.key)
        for pieces in self.answers:
            raw, _ = self.sock.accept()
            with context.wrap_socket(raw, server_side=True) as tls:
                head = b""
                while b"\r\n\r\n" not in head and (more := tls.recv(4096)):
                    head += more
                for i, piece in enumerate(pieces):
                    if i:
                        time.sleep(0.3)
                    tls.sendall(piece)
                if self.close_notify:
                    with contextlib.suppress(OSError):  # ssl.SSLError is an OSError
                        tls.unwrap()  # close_notify, then the gateway's
                else:
                    tls.shutdown(socket.SHUT_RDWR)  # the TCP connection ends; TLS never said so


@pytest.fixture(scope="module")
def upstream_cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (the upstream's certificate and the route's ca_bundle)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "upstream.test")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("upstream.test")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    directory = tmp_path_factory.mktemp("upstream-tls")
    (directory / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    (directory / "key.pem").write_bytes(pem)
    return directory / "cert.pem", directory / "key.pem"


def on_loop(loop: str, case: Coroutine[Any, Any, T]) -> T:
    """Run `case` on asyncio's loop or on uvloop (listener.event_loop): their TLS transports end differently."""
    if loop == "uvloop":
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(case)
    return asyncio.run(case)


def tls_run(
    cert: tuple[Path, Path], loop: str, close_notify: bool, *answers: list[bytes]
) -> tuple[list[Outcome], list[MutableMapping[str, Any]]]:
    """One GET per answer through a gateway whose https route goes to a `TlsUpstream`; the outcomes and the
    gateway's log events."""
    upstream = TlsUpstream(list(answers), close_notify, *cert)
    upstream.start()
    route = Route(
        prefix="/",
        upstream=f"https://127.0.0.1:{upstream.port}",
        spn="HTTP/cas.lab.test",
        ca_bundle=cert[0],
        server_name="upstream.test",
    )

    async def case() -> list[Outcome]:
        async with front(route) as url, aiohttp.ClientSession() as session:
            return [await ask(session, f"{url}/{i}") for i in range(len(answers))]

    try:
        with structlog.testing.capture_logs() as logs:
            outcomes = on_loop(loop, asyncio.wait_for(case(), 30))
    finally:
        stop_listening(upstream.sock)
    return outcomes, logs


LOOPS = ["asyncio", "uvloop"]


@pytest.mark.parametrize("loop", LOOPS)
def test_an_answer_ended_by_close_notify_passes_whole(upstream_cert: tuple[Path, Path], loop: str) -> None:
    """An https answer with neither Content-Length nor chunked, ended by TLS's close_notify: that is its end,
    and the device gets all of it."""
    (outcome,), _ = tls_run(upstream_cert, loop, True, [b"HTTP/1.1 200 OK\r\n\r\npart one, ", b"part two"])
    assert (outcome.status, outcome.body) == (200, b"part one, part two")


@pytest.mark.parametrize("loop", LOOPS)
def test_an_answer_ended_by_close_without_close_notify_cuts_the_device(
    upstream_cert: tuple[Path, Path], loop: str
) -> None:
    """The same answer ended by a bare TCP close (no close_notify: anyone on the path can cut a TLS stream
    there): the device's connection is cut, never ended as if the answer were whole, and the log says why."""
    (outcome,), logs = tls_run(upstream_cert, loop, False, [b"HTTP/1.1 200 OK\r\n\r\npart one, ", b"part two"])
    assert outcome.status is None, outcome
    broken = [e for e in logs if e["event"] == "backend_stream_broken"]
    assert broken, logs
    assert "close_notify" in broken[0]["error"]


@pytest.mark.parametrize("loop", LOOPS)
def test_a_whole_answer_ended_without_close_notify_is_never_a_complete_200(
    upstream_cert: tuple[Path, Path], loop: str
) -> None:
    """Head, body and the bare close in one go: a 502 (known before the head went out) or a cut connection,
    never a 200 with a Content-Length the gateway made up for a body that may be truncated."""
    (outcome,), _ = tls_run(upstream_cert, loop, False, [b"HTTP/1.1 200 OK\r\n\r\nall of it?"])
    assert outcome.status in (None, 502), outcome


LENGTH_CUT = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n"
CHUNKED_CUT = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("close_notify", [True, False], ids=["close_notify", "bare close"])
@pytest.mark.parametrize("head", [LENGTH_CUT, CHUNKED_CUT], ids=["content-length", "chunked"])
def test_a_framed_https_answer_cut_short_cuts_the_device(
    upstream_cert: tuple[Path, Path], loop: str, close_notify: bool, head: bytes
) -> None:
    """An https answer framed by Content-Length or chunks that ends early, with or without close_notify: the
    device's connection is cut and the log says the backend closed before its answer ended."""
    (outcome,), logs = tls_run(upstream_cert, loop, close_notify, [head, b"hello"])
    assert outcome.status is None, outcome
    assert any(e["event"] == "backend_stream_broken" for e in logs), logs


def test_a_request_behind_a_users_held_requests_is_answered_within_connect_timeout() -> None:
    """One user holds all 32 of their connections to the upstream (long-polls the backend has not answered):
    a 33rd request waits for one at most the route's connect_timeout, then 504 naming the busy connections;
    it is not kept until a long-poll ends. Once the held ones are answered, the user is served again."""
    release, all_held = asyncio.Event(), asyncio.Event()
    held_now = 0

    async def serve(conn: Conn) -> None:
        nonlocal held_now
        while request := await conn.request():
            if b"/held" in request.split(b"\r\n", 1)[0]:
                held_now += 1
                if held_now == LIMIT_PER_UPSTREAM:
                    all_held.set()
                await release.wait()
            await conn.send(ok(b"done"))

    async def case() -> tuple[list[Outcome], Outcome, Outcome]:
        async with gateway(serve, connect_timeout=1) as (url, _):
            sessions = [aiohttp.ClientSession() for _ in range(LIMIT_PER_UPSTREAM + 1)]
            try:
                held = [asyncio.create_task(ask(s, url + "/held")) for s in sessions[:-1]]
                await all_held.wait()  # (within the case's 30 s)
                behind = await asyncio.wait_for(ask(sessions[-1], url + "/behind"), 20)
                release.set()
                answered = await asyncio.gather(*held)
                after = await ask(sessions[-1], url + "/after")
            finally:
                for session in sessions:
                    await session.close()
            return answered, behind, after

    answered, behind, after = asyncio.run(asyncio.wait_for(case(), 30))
    assert behind.status == 504
    assert f"all {LIMIT_PER_UPSTREAM} of the user's connections" in HINTS[-1]
    assert "connect_timeout=1 s" in HINTS[-1]
    assert all((o.status, o.body) == (200, b"done") for o in answered)
    assert (after.status, after.body) == (200, b"done")


# -- many users at once on a backend that misbehaves at random -------------------------------------------


@asynccontextmanager
async def front_of_users(route: Route) -> AsyncIterator[str]:
    """A minimal gateway that forwards `/u/<user>/...` as `<user>@LAB.TEST` with a token naming the user."""
    pools = Pools([route])

    async def handler(request: web.Request) -> web.StreamResponse:
        user = request.path.split("/")[2]
        token = base64.b64encode(user.encode()).decode()
        try:
            response, _ = await forward(request, route, pools, f"{user}@LAB.TEST", f"Negotiate {token}")
        except GatewayError as e:
            return web.Response(status=e.status, text=e.reason)
        return response

    app = web.Application(handler_args={"handler_cancellation": True})  # as the gateway: a device that leaves
    app.router.add_route("*", "/{tail:.*}", handler)
    async with _served(web.AppRunner(app), pools) as url:
        yield url


def test_many_users_on_a_backend_that_misbehaves_at_random_never_share_a_connection() -> None:
    """Six users on three devices each, all at once, against a backend that at random closes before answering
    (a pooled GET is then retried on a new connection), mid-body, or after answering; answers slowly; sends a
    second answer behind the first; and devices that give up mid-request. No backend connection ever carries
    two users' tokens, and every answer a device reads whole is its own request's, with its own user's token."""
    rng = random.Random(20261205)
    tokens: dict[int, set[bytes]] = {}

    async def serve(conn: Conn) -> None:
        while request := await conn.request():
            lines = request.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
            token = next(line for line in lines if line.lower().startswith(b"authorization:")).split()[-1]
            tokens.setdefault(conn.number, set()).add(token)
            body = b"%b %b" % (token, lines[0].split(b" ")[1])
            move = rng.random()
            if move < 0.1:
                return  # closed without an answer
            if move < 0.2:
                await conn.send(ok(body)[:-3])  # closed mid-body
                return
            if move < 0.3:
                await conn.send(ok(body, b"Connection: close\r\n"))
                return
            if move < 0.4:
                await asyncio.sleep(0.1)
            elif move < 0.45:
                await conn.send(ok(body) + ok(b"SMUGGLED"))
                continue
            await conn.send(ok(body))

    async def device(url: str, user: str, number: int) -> list[tuple[str, Outcome]]:
        outcomes = []
        async with aiohttp.ClientSession() as session:
            for i in range(20):
                path = f"/u/{user}/{number}-{i}"
                if i % 7 == 6:  # this device gives up early on this one
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(0.05):
                            await ask(session, url + path)
                    continue
                outcomes.append((path, await ask(session, url + path)))
        return outcomes

    async def case() -> list[tuple[str, Outcome]]:
        backend = Backend(serve)
        server = await asyncio.start_server(backend.handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        route = Route(prefix="/", upstream=f"http://127.0.0.1:{port}", spn="HTTP/cas.lab.test", read_timeout=5)
        users = [f"user{n}" for n in range(6)]
        try:
            async with front_of_users(route) as url:
                devices = [device(url, user, number) for user in users for number in range(3)]
                done = await asyncio.gather(*devices)
        finally:
            server.close()
        return [answer for answers in done for answer in answers]

    outcomes = on_loop("asyncio", asyncio.wait_for(case(), 60))
    assert all(len(seen) == 1 for seen in tokens.values()), tokens  # no connection carried two users
    assert len(tokens) > 1
    whole = [(path, o) for path, o in outcomes if o.status == 200]
    assert len(whole) > len(outcomes) / 2
    for path, o in whole:
        user = path.split("/")[2]
        assert o.body == b"%b %b" % (base64.b64encode(user.encode()), path.encode()), (path, o.body)
    assert {o.status for _, o in outcomes} <= {200, 502, None}


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_dripping_answer_is_never_cut_early_and_a_held_one_ends_at_its_read_timeout(loop: str) -> None:
    """The shared read timers (`ReadTimers`): an answer whose body comes a byte every 0.6 read timeouts, for three
    read timeouts, passes whole; the next request on that kept-alive connection (whose first timer is still in its
    slot), held by the backend, ends in 504 no sooner than the read timeout and soon after it; and after 300 more
    requests whose connections the backend closes, no closed connection is left in a slot, and every slot (one per
    1/64 of the read timeout in which a timer was armed, most of them emptied as their connections closed) is gone
    once its loop timer has fired."""
    timeout = 0.5

    async def serve(conn: Conn) -> None:
        while request := await conn.request():
            if b"/drip" in request:
                await conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")
                for byte in b"drips":
                    await asyncio.sleep(timeout * 0.6)
                    await conn.send(bytes([byte]))
            elif b"/held" in request:
                await asyncio.sleep(timeout * 10)
                return
            else:
                await conn.send(ok(b"short", b"Connection: close\r\n"))
                return

    async def case() -> tuple[Outcome, Outcome, float, list[Outcome], int, int]:
        async with gateway(serve, read_timeout=timeout) as (url, _), aiohttp.ClientSession() as session:
            dripped = await ask(session, url + "/drip")
            started = asyncio.get_running_loop().time()
            held = await ask(session, url + "/held")
            waited = asyncio.get_running_loop().time() - started
            short = [await ask(session, url + f"/short/{i}") for i in range(300)]
            timers = read_timers(asyncio.get_running_loop())
            armed = len(timers)
            deadline = asyncio.get_running_loop().time() + timeout * 2 + 10
            while timers._slots and asyncio.get_running_loop().time() < deadline:  # noqa: ASYNC110  the timers state
                await asyncio.sleep(0.05)  # each slot's loop timer fires once and takes the slot with it
            return dripped, held, waited, short, armed, len(timers._slots)

    dripped, held, waited, short, armed, slots = on_loop(loop, asyncio.wait_for(case(), 60))
    assert (dripped.status, dripped.body) == (200, b"drips")
    assert held.status == 504
    assert timeout <= waited < timeout + 1.5, waited  # at most 1/64 late, plus a loaded machine's scheduling
    assert {(o.status, o.body) for o in short} == {(200, b"short")}
    assert armed == 0  # each connection left its slot as it closed (the held one too)
    assert slots == 0, slots  # no slot outlives its loop timer, empty or not
