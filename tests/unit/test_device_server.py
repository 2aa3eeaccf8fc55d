"""The device-side server's parsing and connection rules (`proxy.device.server`), fed bytes directly: no TLS,
no socket, a transport that records what is written. The integration tests send the same shapes over TLS."""

from __future__ import annotations

import asyncio
import gc
import re
import tracemalloc
from typing import Any

import httptools
import pytest
from multidict import CIMultiDict
from structlog.testing import capture_logs

from proxy.device.framing import ChunkedEnd
from proxy.device.server import DeviceConnection, DeviceHttpRequest, DeviceLimits, Serve

LIMITS = DeviceLimits(max_header_bytes=4096, max_field_bytes=2048, keepalive_timeout=5)


class Transport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.closed = False
        self.paused = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += data

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("192.0.2.1", 4711) if name == "peername" else default


class Served:
    """A serve function that reads each request's body and answers with what it read."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, CIMultiDict[str], bytes]] = []

    async def __call__(self, request: DeviceHttpRequest) -> None:
        body = b""
        while chunk := await request.read_body():
            body += chunk
        self.requests.append((request.method, request.raw_path, CIMultiDict(request.headers), body))
        await request.answer(200, None, CIMultiDict(), b"got " + body)


async def run(pieces: list[bytes], limits: DeviceLimits = LIMITS) -> tuple[Served, Transport, list[int]]:
    served = Served()
    unparsed: list[int] = []
    refused: list[int] = []
    connection = DeviceConnection(
        served, limits, on_headers_refused=lambda: refused.append(431), on_unparsed=lambda _, s: unparsed.append(s)
    )
    transport = Transport()
    connection.connection_made(transport)
    for piece in pieces:
        for _ in range(100):  # the served request takes what is queued, and reading resumes
            if not transport.paused or transport.closed:
                break
            await asyncio.sleep(0)
        if transport.closed:
            break
        connection.data_received(piece)
        await asyncio.sleep(0)
    for _ in range(20):
        await asyncio.sleep(0)
    connection.connection_lost(None)
    return served, transport, unparsed + refused


def statuses(written: bytes) -> list[int]:
    return [int(status) for status in re.findall(rb"HTTP/1\.1 (\d{3}) ", written)]


def every_byte(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


GET = b"GET /a HTTP/1.1\r\nHost: h\r\n\r\n"
POST = b"POST /b HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello"
CHUNKED = (
    b"POST /c HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n2;x=y\r\nhe\r\n3\r\nllo\r\n0\r\nX-T: 1\r\n\r\n"
)


@pytest.mark.parametrize("split", ["whole", "every byte"])
def test_pipelined_requests_are_served_in_order_with_their_bodies(split: str) -> None:
    """Three pipelined requests (none, a length, chunked with an extension and a trailer), whole or a byte at a
    time: served in order, each with its own body, the trailer never a header."""
    data = GET + POST + CHUNKED
    served, transport, _ = asyncio.run(run([data] if split == "whole" else every_byte(data)))
    assert [(m, p, b) for m, p, _, b in served.requests] == [
        ("GET", "/a", b""),
        ("POST", "/b", b"hello"),
        ("POST", "/c", b"hello"),
    ]
    assert "X-T" not in served.requests[2][2]
    assert statuses(bytes(transport.written)) == [200, 200, 200]
    assert not transport.closed


def _connected(handler: Serve, limits: DeviceLimits = LIMITS) -> tuple[DeviceConnection, Transport]:
    """A device connection serving with `handler`, made on a fresh `Transport` (refusals not counted)."""
    connection = DeviceConnection(handler, limits, on_headers_refused=lambda: None, on_unparsed=lambda _, s: None)
    transport = Transport()
    connection.connection_made(transport)
    return connection, transport


def _head(size: int) -> bytes:
    base = b"GET /a HTTP/1.1\r\nHost: h\r\nX-Pad: \r\n\r\n"
    return base.replace(b"X-Pad: ", b"X-Pad: " + b"a" * (size - len(base)))


@pytest.mark.parametrize("split", [1, 7, 1000, 10_000])
def test_the_header_budget_is_exact_whatever_the_pieces(split: int) -> None:
    """A head of exactly max_header_bytes is served; one byte more is 431 and not served, in pieces of any size."""
    fields = DeviceLimits(max_header_bytes=LIMITS.max_header_bytes, max_field_bytes=8192, keepalive_timeout=5)
    for size, expected in ((4096, [200]), (4097, [431])):
        data = _head(size)
        assert len(data) == size
        pieces = [data[i : i + split] for i in range(0, len(data), split)]
        served, transport, _ = asyncio.run(run(pieces, fields))
        assert statuses(bytes(transport.written)) == expected, (size, split)
        assert len(served.requests) == (1 if expected == [200] else 0)


def _trailed(run: int) -> bytes:
    """A chunked request whose longest run of bytes that are not payload (after `abc`: CRLF, the last chunk, one
    trailer field, the empty line) is exactly `run` bytes."""
    end = b"\r\n0\r\nX-T: \r\n\r\n"
    trailer = end.replace(b"X-T: ", b"X-T: " + b"a" * (run - len(end)))
    assert len(trailer) == run
    return b"POST /c HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc" + trailer


@pytest.mark.parametrize("split", [1, 7, 1000, 10_000])
def test_the_framing_budget_inside_a_body_is_exact_whatever_the_pieces(split: int) -> None:
    """A run of chunk framing and trailer fields of exactly max_header_bytes is served; with one byte more the
    request's body never ends at the pipeline (its read fails: the gateway's pipeline answers that 400, this bare
    handler does not; whole, it is never served and the connection answers 400), in pieces of any size (it was
    counted per read, so one byte more ending in the same read passed)."""
    fields = DeviceLimits(max_header_bytes=LIMITS.max_header_bytes, max_field_bytes=8192, keepalive_timeout=5)
    data = _trailed(4096)
    served, transport, _ = asyncio.run(run([data[i : i + split] for i in range(0, len(data), split)], fields))
    assert statuses(bytes(transport.written)) == [200], split
    assert [b for _, _, _, b in served.requests] == [b"abc"]
    data = _trailed(4097)
    served, transport, _ = asyncio.run(run([data[i : i + split] for i in range(0, len(data), split)], fields))
    assert statuses(bytes(transport.written)) == ([400] if split > len(data) else []), split
    assert not served.requests, split


@pytest.mark.parametrize(
    "bad",
    [
        b"GET /a HTTP/1.1\r\nHost: h\r\nX: a\x00b\r\n\r\n",
        b"POST /a HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"POST /a HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n",
        b"POST /a HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"GET /a HTTP/1.1\r\nX: a\r\n\r\n",
        b"GET /a HTTP/1.1\r\nHost: h\r\nHost: i\r\n\r\n",
        b"GET /a HTTP/1.1\r\nHost: h\r\nX: " + b"a" * 2049 + b"\r\n\r\n",
    ],
)
def test_a_request_whose_bytes_go_bad_is_never_served(bad: bytes) -> None:
    """NUL, CL+TE, `chunked, chunked`, a bad chunk size (after the head was whole), no Host, two Hosts, a field
    over the cap: 400, counted as unparsed, the request never handed to the pipeline, the connection closed."""
    served, transport, unparsed = asyncio.run(run([bad + GET]))
    assert not served.requests
    assert statuses(bytes(transport.written)) == [400]
    assert unparsed == [400]
    assert transport.closed


def test_an_unread_body_ends_the_connection() -> None:
    """An answer given before the request's body arrived whole closes the connection (`Connection: close`): the
    rest of the body is never read as a request."""

    async def refuse(request: DeviceHttpRequest) -> None:
        await request.answer(403, None, CIMultiDict(), b"no")

    async def scenario() -> tuple[bytes, bool]:
        connection, transport = _connected(refuse)
        connection.data_received(b"POST /a HTTP/1.1\r\nHost: h\r\nContent-Length: 40\r\n\r\n")
        for _ in range(10):
            await asyncio.sleep(0)
        connection.data_received(GET)  # inside the body, as the device meant it
        for _ in range(10):
            await asyncio.sleep(0)
        return bytes(transport.written), transport.closed

    written, closed = asyncio.run(scenario())
    assert statuses(written) == [403]
    assert b"Connection: close" in written
    assert closed


def test_an_answer_the_device_never_takes_ends_the_connection_at_the_send_timeout() -> None:
    """A device that stops reading (its pipelined requests' answers fill the socket: the transport pauses our
    writing) holds no connection forever: a local answer waits at most `send_timeout`, then the connection is
    cut. No idle deadline runs while a request is being served, so nothing else would end it."""

    async def scenario() -> Transport:
        limits = DeviceLimits(max_header_bytes=4096, max_field_bytes=2048, keepalive_timeout=5, send_timeout=0.2)
        connection, transport = _connected(Served(), limits)
        connection.pause_writing()  # the device's receive window is full
        connection.data_received(GET)
        for _ in range(200):
            if transport.closed:
                break
            await asyncio.sleep(0.05)
        connection.connection_lost(None)
        return transport

    assert asyncio.run(scenario()).closed


@pytest.mark.parametrize("lead", [GET, POST, CHUNKED], ids=["bodiless", "content-length", "chunked"])
@pytest.mark.parametrize("split", [None, 1, 7, 1000])
def test_a_head_after_another_request_in_the_same_read_is_budgeted_to_the_byte(lead: bytes, split: int | None) -> None:
    """A head that comes in the same read as the end of the request before it (its head, its length body, its
    chunked body and trailer) is counted from its first byte: exactly the budget is served, one byte more is 431
    (after the first request's own answer), in one read or in pieces of any size."""
    fields = DeviceLimits(max_header_bytes=LIMITS.max_header_bytes, max_field_bytes=8192, keepalive_timeout=5)
    for size, expected in ((4096, [200, 200]), (4097, [200, 431])):
        data = lead + _head(size)
        pieces = [data] if split is None else [data[i : i + split] for i in range(0, len(data), split)]
        served, transport, _ = asyncio.run(run(pieces, fields))
        assert statuses(bytes(transport.written)) == expected, (size, split)
        assert len(served.requests) == len(expected) - expected.count(431)


@pytest.mark.parametrize(
    ("body", "end"),
    [
        (b"0\r\n\r\n", 5),
        (b'2;x="a;b"\r\nhe\r\n0\r\nX-T: 1\r\nX-U: 2\r\n\r\nGET', 36),
        (b"0" * 40 + b"4\r\n\r\nab\r\n0\r\n\r\n", 54),
        (b"a\r\n0\r\n\r\n0\r\n\r\n\r\n0\r\n\r\n", 20),
        (b"3\r\nabc\r\n0\r\nX", None),
    ],
)
def test_the_end_of_a_chunked_body_is_found_where_it_is(body: bytes, end: int | None) -> None:
    """`ChunkedEnd` finds the end of a chunked body (extensions, trailers, payload that looks like framing, leading
    zeros) at the same offset whether the bytes come at once or one by one."""
    assert ChunkedEnd().end(body) == end
    scan, found = ChunkedEnd(), None
    for i in range(len(body)):
        if (at := scan.end(body[i : i + 1])) is not None:
            found = i + at
            break
    assert found == end


def test_a_body_end_the_parser_does_not_share_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the gateway's reading of a chunked body's end and llhttp's differ (here a scan made to stop early),
    the connection's bytes stop being HTTP: 400, nothing served, never a guess at where the next head starts."""

    class Early(ChunkedEnd):
        def end(self, data: bytes) -> int | None:
            return min(len(data), 3)

    monkeypatch.setattr("proxy.device.framing.ChunkedEnd", Early)
    data = b"POST /c HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    served, transport, unparsed = asyncio.run(run([data + GET]))
    assert statuses(bytes(transport.written)) == [400]
    assert served.requests == []
    assert unparsed == [400]


def test_no_answer_follows_a_431() -> None:
    """Two whole requests, then a head over twice the budget (what follows other requests in a read may reach
    that), in one read: the 431 (which closes the connection) is the last answer written; a queued request
    answered after it would be read as the 431's successor."""

    async def scenario() -> bytes:
        _, transport, refused = await run([GET + GET + b"GET /x HTTP/1.1\r\nHost: h\r\nX-A: " + b"a" * 9000])
        assert refused == [431]
        return bytes(transport.written)

    written = statuses(asyncio.run(scenario()))
    assert written[-1:] == [431], written


def test_pipelined_heads_are_budgeted_one_by_one() -> None:
    """Three hundred small requests in one read (ten times the 4 KiB budget): every head is under the budget,
    so every request is served; the budget is per head, not per read."""

    async def scenario() -> list[int]:
        _, transport, refused = await run([GET * 300])
        assert refused == []
        return statuses(bytes(transport.written))

    written = asyncio.run(scenario())  # served one at a time, in order, until the harness ends the connection
    assert written[:5] == [200] * 5
    assert 431 not in written


class _ClockLoop(asyncio.SelectorEventLoop):
    """An event loop whose clock moves only when the test moves it: timers fire by the test's clock, so a busy
    machine's late wake-ups cannot make a deadline look passed (or not)."""

    now = 0.0

    def time(self) -> float:
        return self.now


def test_the_idle_deadline_runs_from_the_last_answer_and_is_kept() -> None:
    """keepalive_timeout counts from the end of the last answer, however many requests came before: never cut
    sooner (not at the deadline the first request set), and cut once it has passed."""
    loop = _ClockLoop()

    async def passes() -> None:
        for _ in range(20):
            await asyncio.sleep(0)

    async def scenario() -> list[bool]:
        limits = DeviceLimits(max_header_bytes=4096, max_field_bytes=2048, keepalive_timeout=1.0)
        connection = DeviceConnection(Served(), limits, on_headers_refused=lambda: None, on_unparsed=lambda _, s: None)
        transport = Transport()
        connection.connection_made(transport)
        seen = []
        for _ in range(3):  # requests 0.6 s apart: each within the deadline the one before set, the sum beyond it
            loop.now += 0.6
            await passes()
            seen.append(transport.closed)
            connection.data_received(GET)
            await passes()  # answered: the deadline runs from here
        loop.now += 0.99
        await passes()
        seen.append(transport.closed)  # just before the last answer's deadline: open
        loop.now += 0.02
        await passes()
        seen.append(transport.closed)  # just after it: closed
        assert statuses(bytes(transport.written)) == [200, 200, 200]
        connection.connection_lost(None)
        return seen

    try:
        assert loop.run_until_complete(scenario()) == [False, False, False, False, True]
    finally:
        loop.close()


def _parsers() -> int:
    gc.collect()
    return sum(isinstance(o, httptools.HttpRequestParser) for o in gc.get_objects())


def test_a_held_request_keeps_no_parser_and_what_follows_is_read_as_before() -> None:
    """While a request is served (a long-poll held), its connection keeps no llhttp parser (0.9 KiB with its
    callbacks); a request the device pipelines meanwhile is read by a new one and served after it, in order."""

    async def scenario() -> tuple[int, int, list[str], list[int]]:
        release = asyncio.Event()
        served: list[str] = []

        async def serve(request: DeviceHttpRequest) -> None:
            served.append(request.raw_path)
            if request.raw_path == "/held":
                await release.wait()
            await request.answer(200, None, CIMultiDict(), b"ok")

        before = _parsers()
        connection, transport = _connected(serve)
        connection.data_received(b"POST /held HTTP/1.1\r\nHost: h\r\nContent-Length: 4\r\n\r\nping")
        for _ in range(5):
            await asyncio.sleep(0)
        held = _parsers() - before
        connection.data_received(GET)  # pipelined behind the held one
        await asyncio.sleep(0)
        release.set()
        for _ in range(20):
            await asyncio.sleep(0)
        connection.connection_lost(None)
        return held, _parsers() - before, served, statuses(bytes(transport.written))

    held, after, served, answered = asyncio.run(scenario())
    assert held == 0
    assert served == ["/held", "/a"]
    assert answered == [200, 200]
    assert after == 0


def test_nothing_after_a_request_that_closes_the_connection_is_served() -> None:
    """Bytes after `Connection: close` are never read as a request, whether they came in its read or later."""
    closing = b"GET /a HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"
    for pieces in ([closing + GET], [closing, GET]):
        served, transport, _ = asyncio.run(run(pieces))
        assert [p for _, p, _, _ in served.requests] == ["/a"]
        assert statuses(bytes(transport.written)) == [200]


async def _until_closed(sent: bytes) -> bytes:
    """What a connection with keepalive_timeout 0.2 s wrote after receiving `sent`, once it closed itself (the
    30 s deadline is for a failure only)."""
    limits = DeviceLimits(max_header_bytes=4096, max_field_bytes=2048, keepalive_timeout=0.2)
    connection, transport = _connected(Served(), limits)
    ended = asyncio.Event()
    close = transport.close

    def noted_close() -> None:
        close()
        ended.set()

    transport.close = noted_close  # type: ignore[method-assign]
    connection.data_received(sent)
    await asyncio.wait_for(ended.wait(), timeout=30)
    connection.connection_lost(None)
    return bytes(transport.written)


@pytest.mark.parametrize(
    ("sent", "answered"),
    [
        (b"GET /a HTTP/1.1\r\nHost: h\r\nX-Slow: a", [408]),  # a head begun and never ended
        (b"G", [408]),
        (GET, [200]),  # an idle kept-alive connection
        (POST + b"\r\n", [200]),  # an old client's CRLF after a body: ignored before a request line, no request
        (b"\r\n", []),
    ],
    ids=["slow head", "one byte", "idle after a request", "CRLF after a body", "CRLF alone"],
)
def test_a_head_that_never_ends_is_told_408_and_an_idle_connection_nothing(sent: bytes, answered: list[int]) -> None:
    """At keepalive_timeout a request line begun and never ended gets a 408 saying why, then the connection closes;
    a connection with no request begun (idle after an answer, or holding only empty lines) is closed without one,
    since a request the device sends meanwhile would read it as its answer."""

    written = asyncio.run(_until_closed(sent))
    assert statuses(written) == answered
    if 408 in answered:
        assert written.endswith(b"the request's head was not complete within 0.2 s\n")


@pytest.mark.parametrize(("sent", "warned"), [(b"GET /a HTTP/1.1\r\nHost: h\r\n", True), (POST + b"\r\n", False)])
def test_only_a_request_line_begun_is_a_head_timeout_in_the_log(sent: bytes, warned: bool) -> None:
    """`request_head_timeout` (a warning: a slow or stalled client) is logged for a request line begun and never
    ended; a kept-alive connection that holds only the CRLF an old client sends after a body is an idle one
    (`device_idle_closed`, debug). It was a warning naming 2 bytes received, at every such connection's end."""

    with capture_logs() as logs:
        asyncio.run(_until_closed(sent))
    events = [e["event"] for e in logs]
    assert ("request_head_timeout" in events) == warned, events
    assert ("device_idle_closed" in events) == (not warned), events


def test_the_buffered_body_of_a_request_answered_unread_is_let_go_at_once() -> None:
    """A request answered before its body was read (a refusal: 401 before a password is checked, 403) ends its
    connection, whose TLS close then waits up to 30 s for the device's close_notify. The body bytes buffered
    meanwhile (up to BODY_HIGH, 256 KiB, before reading pauses) are let go when the answer is given, not kept for
    those 30 s: the connection holds almost nothing of them afterwards (it held all 256 KiB)."""

    async def refuse(request: DeviceHttpRequest) -> None:
        await request.answer(401, None, CIMultiDict(), b"sign in")

    async def scenario() -> int:
        connection, transport = _connected(refuse)
        tracemalloc.start()
        try:
            connection.data_received(b"POST /a HTTP/1.1\r\nHost: h\r\nContent-Length: 1000000\r\n\r\n")
            for _ in range(300):  # the device's reads, as TLS hands them over, until reading pauses
                if transport.paused:
                    break
                connection.data_received(bytes(1000))
            assert transport.paused  # BODY_HIGH reached: the body waits for the pipeline, which never reads it
            for _ in range(20):
                await asyncio.sleep(0)
            assert statuses(bytes(transport.written)) == [401]
            assert transport.closed  # closing: asyncio's transport (or TlsRecords) still holds the protocol
            gc.collect()
            kept = tracemalloc.get_traced_memory()[0]
        finally:
            tracemalloc.stop()
        connection.connection_lost(None)
        return kept

    assert asyncio.run(scenario()) < 64 * 1024


# llhttp's method table (its HTTP methods, RTSP's, PRI), and others a client may send (TRACK, WebDAV's older ones)
CANDIDATE_METHODS = (
    "DELETE",
    "GET",
    "HEAD",
    "POST",
    "PUT",
    "CONNECT",
    "OPTIONS",
    "TRACE",
    "COPY",
    "LOCK",
    "MKCOL",
    "MOVE",
    "PROPFIND",
    "PROPPATCH",
    "SEARCH",
    "UNLOCK",
    "BIND",
    "REBIND",
    "UNBIND",
    "ACL",
    "REPORT",
    "MKACTIVITY",
    "CHECKOUT",
    "MERGE",
    "M-SEARCH",
    "NOTIFY",
    "SUBSCRIBE",
    "UNSUBSCRIBE",
    "PATCH",
    "PURGE",
    "MKCALENDAR",
    "LINK",
    "UNLINK",
    "SOURCE",
    "QUERY",
    "PRI",
    "DESCRIBE",
    "ANNOUNCE",
    "SETUP",
    "PLAY",
    "PAUSE",
    "TEARDOWN",
    "GET_PARAMETER",
    "SET_PARAMETER",
    "REDIRECT",
    "RECORD",
    "FLUSH",
    "TRACK",
    "BPROPFIND",
    "BDELETE",
    "BMOVE",
    "POLL",
    "VERSION-CONTROL",
    "CHECKIN",
    "UNCHECKOUT",
    "UPDATE",
    "LABEL",
    "MKWORKSPACE",
    "ORDERPATCH",
    "FOO",
)


def test_the_405s_allow_is_what_llhttp_reads_less_what_is_refused() -> None:
    """`FORWARDED_METHODS` (the 405's `Allow`) is every method llhttp reads, as the gateway's server reads them
    (httptools), less TRACE and CONNECT: a new llhttp reading more shows here. aiohttp's server parses with llhttp too;
    tests/integration/test_hardening_aiohttp.py sends it every method listed."""
    from proxy.app import _NOT_FORWARDED
    from proxy.errors import FORWARDED_METHODS, MethodNotAllowed

    def reads(method: str) -> bool:
        target = "x:443" if method == "CONNECT" else "/"
        try:
            httptools.HttpRequestParser(object()).feed_data(f"{method} {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        except httptools.HttpParserUpgrade:  # CONNECT, read: what follows is the tunnel's
            return True
        except httptools.HttpParserError:
            return False
        return True

    read = {method for method in CANDIDATE_METHODS if reads(method)}
    assert {"TRACE", "CONNECT"} <= read
    assert set(FORWARDED_METHODS) == read - _NOT_FORWARDED
    assert len(FORWARDED_METHODS) == len(set(FORWARDED_METHODS))
    assert MethodNotAllowed.headers["Allow"] == ", ".join(FORWARDED_METHODS)
