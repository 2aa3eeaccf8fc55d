"""The backend client: HTTP/1.1 to an upstream, one exchange at a time on a connection of one user.

Theory of operation
-------------------
This replaces aiohttp's `ClientSession` behind `proxy.backend.forward` with what that one job needs
(docs/performance.md: the general client was 45% of the gateway's busy thread). A `UserPool` is one
user's connections: per upstream, a deque of idle `BackendConnection`s, at most `LIMIT_PER_UPSTREAM`
open at once (more requests wait for one), an idle one closed after `KEEPALIVE_SECONDS`. A connection
never leaves the pool it was opened for, so it never carries two users. All users' pools together hold at
most `BackendSockets.limit` connections (the worker's file descriptors: `proxy.descriptors`): a new one
past it first closes an idle one of the least recently used user (`BackendSockets.reclaim`), and with none
idle is refused (`BackendSocketsExhausted`, a 503). There are no tracing hooks, no
cookie jar, no URL parsing per request: the request head is one string join of what the caller hands
over (`Exchange.start`), the target as the gateway read it (`proxy.target`).

A `BackendConnection` is one asyncio `Protocol` per TCP or TLS connection. The answer is parsed by llhttp
(`httptools`) with none of its leniencies, and refused (the connection is closed; the request gets a 502,
or, once the answer has begun, the device's connection is cut) when it is:
- not HTTP/1.x, a status outside 100-599, a reason phrase with a control character, or a head over
  `MAX_HEAD_BYTES` or with more than `MAX_HEAD_FIELDS` fields;
- framed two ways (Content-Length and Transfer-Encoding), with two Content-Lengths, or with a chunk size
  that is not hexadecimal (llhttp's own checks);
- in a transfer coding other than chunked (`gzip, chunked`: the coding is hop-by-hop, so the device would get
  the coded bytes without it), or chunked twice;
- a `101 Switching Protocols` (the gateway never asks for an upgrade), a second answer to one request,
  a body after the answer to HEAD, or any byte while no request is outstanding.
Interim answers (100, 102, 103) are read and dropped, as aiohttp did. HEAD answers and 204/304 have no
body whatever their Content-Length says (a HEAD answer without one is complete at its blank line, and its
connection is reused unless it asks to close); an answer with neither Content-Length nor chunked ends when
the backend closes the connection (and the connection is not reused). Over TLS that end counts only when
the backend said so with close_notify: a bare TCP close (which anyone on the path can forge) ends the
answer as truncated, a 502 or a cut device connection, as for a Content-Length or chunked body cut short.

Flow control. The answer's body is buffered up to `BUFFER_HIGH` bytes; past that the connection stops
reading from the backend until the device has taken what is buffered. The request body goes out at the
pace the backend takes it (`drain` waits while the transport's buffer is full).

Timeouts. The route's `read_timeout` is armed once the request has been sent whole, runs while the
gateway waits for the backend's next bytes, and stops while reading is paused for a slow device (that
wait is the device's, bounded by `client_send_timeout`) and once the answer is complete; it also bounds
each wait for the backend to take more of the request body (`drain`). The
connection itself is bounded by `connect_timeout` (TCP and TLS handshake), as with aiohttp's `sock_connect`.
The read timers of every connection of an event loop share its timers (`ReadTimers`): a timer is due at its
deadline rounded up to a 64th of its length (a power of two of seconds), and connections due in the same slot
wait on one loop timer, so that a held long-poll keeps a place in a set instead of a timer of its own (about
0.6 KiB with the loop's handle, its libuv timer, context and bound method). A read timeout therefore ends the
exchange up to 1/64 of its length after it is due (a second's at most 16 ms later, an hour's at most 32 s).

Reuse. A connection goes back to its pool only when its answer was complete, framed by length or chunks,
the request was sent whole, and neither side asked to close. A pooled connection the backend has
closed meanwhile is found dead when taken, or fails before any byte of the answer: `BackendClosed` with
`answered` False, which `proxy.backend.forward` retries once, on a new connection, for an idempotent
method whose body (if any) was not read yet (RFC 9112, 9.3.1).
"""

from __future__ import annotations

import asyncio
import math
import re
import ssl
import weakref
from collections import deque
from collections.abc import AsyncIterable, Callable
from dataclasses import dataclass
from typing import cast
from urllib.parse import urlsplit

import httptools
from multidict import CIMultiDict

MAX_HEAD_BYTES = 64 * 1024  # status line and header fields of one answer (interim answers included)
MAX_HEAD_FIELDS = 256
BUFFER_HIGH = 256 * 1024  # answer bytes held for the device before reading from the backend pauses
KEEPALIVE_SECONDS = 30.0  # an idle pooled connection is closed after this (aiohttp's keepalive_timeout)
LIMIT_PER_UPSTREAM = 32  # connections of one user to one upstream (aiohttp's limit_per_host)
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})  # RFC 9110, 9.2.2
_NO_BODY_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})  # no Content-Length: 0 added when bodiless
_NOT_REASON = re.compile(rb"[^\t\x20-\x7e\x80-\xff]")  # a reason phrase is HTAB, SP, VCHAR, obs-text (RFC 9112, 4)


class BackendProtocolError(Exception):
    """The backend's bytes are not a valid HTTP/1.1 answer to the request that was sent."""


class BackendClosed(ConnectionError):
    """The backend closed the connection before its answer was complete.

    `answered` says whether any byte of the answer had arrived (without one, nothing says the backend
    processed the request)."""

    def __init__(self, message: str, *, answered: bool) -> None:
        super().__init__(message)
        self.answered = answered


class ReadTimeout(TimeoutError):
    """No byte from the backend within the route's read_timeout."""


class PoolBusy(TimeoutError):
    """All of one user's connections to the upstream (`LIMIT_PER_UPSTREAM`) stayed busy for the route's
    connect_timeout: held long-polls, most likely, or a device sending more at once than a user needs."""


class BackendSocketsExhausted(Exception):
    """Every backend connection the worker's descriptors allow (`BackendSockets.limit`) is open and busy."""


class BackendSockets:
    """The backend connections of all users' pools together: at most `limit` open at once.

    `reclaim` (set by the owner of the pools: `proxy.backend.forward.Pools`) closes one idle connection somewhere
    and says whether it did; a pool that would open one past the limit calls it first."""

    __slots__ = ("limit", "open", "reclaim", "reclaimed")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open = 0
        self.reclaimed = 0  # idle connections closed to make room (kcd_backend_connections_reclaimed_total)
        self.reclaim: Callable[[], bool] = lambda: False

    def take(self) -> None:
        """A place for one more connection, an idle one closed for it if need be; `BackendSocketsExhausted` if none."""
        while self.open >= self.limit:
            if not self.reclaim():
                raise BackendSocketsExhausted(
                    f"all {self.limit} backend connections this worker's file descriptors allow are busy"
                )
            self.reclaimed += 1
        self.open += 1


@dataclass(frozen=True, eq=False)
class Upstream:
    """Where a route's requests go, read once from its configuration (`Pools.upstream`).

    Compared by identity: it is the key of a user's pool, one per route."""

    host: str
    port: int
    authority: str  # the Host header the backend gets unless the route preserves the device's
    tls: ssl.SSLContext | None
    server_hostname: str | None  # https: the name sent as SNI and verified

    @classmethod
    def of(cls, upstream: str, tls: ssl.SSLContext | None, server_name: str | None) -> Upstream:
        parts = urlsplit(upstream)
        host = parts.hostname or ""
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return cls(host, port, parts.netloc, tls, (server_name or host) if tls is not None else None)


@dataclass(frozen=True)
class ResponseHead:
    status: int
    reason: str
    headers: CIMultiDict[str]
    content_length: int | None  # as the backend framed it; None when chunked or ended by close
    chunked: bool


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")  # as aiohttp's parser decodes headers: bytes kept


# The states of a connection's current exchange.
_IDLE, _WAITING, _BODY, _DONE = range(4)


class BackendConnection(asyncio.Protocol):
    """One connection to a backend: writes a request, parses its answer, pauses and resumes both ways."""

    __slots__ = (
        "_body",
        "_buffered",
        "_clean_eof",
        "_drain",
        "_due",
        "_error",
        "_field_bytes",
        "_fields",
        "_head_bytes",
        "_head_method",
        "_head_waiter",
        "_interim",
        "_keep_alive",
        "_last_read",
        "_loop",
        "_parser",
        "_read_timeout",
        "_reading_paused",
        "_reason",
        "_sent",
        "_spoiled",
        "_state",
        "_timers",
        "_until_close",
        "_waiter",
        "_writing_paused",
        "bound_spn",
        "closed",
        "complete",
        "exchanges",
        "head",
        "idle_since",
        "transport",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.exchanges = 0  # requests begun on this connection
        self.bound_spn: str | None = None  # connection-bound routes: the SPN this connection's identity is for
        self.idle_since = 0.0
        self._parser: httptools.HttpResponseParser | None = None
        self._state = _IDLE
        self._error: BaseException | None = None
        self._spoiled = False  # the backend misbehaved after a complete answer: never reused
        self._waiter: asyncio.Future[None] | None = None
        self._head_waiter: asyncio.Future[ResponseHead] | None = None
        self._drain: asyncio.Future[None] | None = None
        self._writing_paused = False
        self._reading_paused = False
        self._timers = read_timers(loop)
        self._due = 0.0  # when this connection's read timer fires (its slot in `_timers`); 0: not armed
        self._read_timeout = 0.0
        self._last_read = 0.0
        self._sent = False
        self._body: list[bytes] = []  # not a deque: its first block, about 600 bytes, stayed per connection
        self._buffered = 0
        self._head_method = False
        self._interim = False
        self._keep_alive = False
        self._until_close = False
        self._clean_eof = False  # the backend ended its side, and over TLS said so (close_notify)
        self._reason = b""
        self._fields: list[tuple[str, str]] = []
        self._head_bytes = 0
        self._field_bytes = 0
        self.head: ResponseHead | None = None
        self.complete = False

    # -- the exchange, as the caller sees it --------------------------------------------------------

    def begin(self, method: str, read_timeout: float) -> None:
        """A new request on this connection: nothing received yet (a fresh parser is made with the first bytes of
        the answer: a held long-poll waits without one, 0.9 KiB with the callbacks it binds)."""
        self.exchanges += 1
        self._parser = None
        self._state = _WAITING
        self._head_method = method == "HEAD"
        self._read_timeout = read_timeout
        self._sent = False
        self._interim = self._keep_alive = self._until_close = False
        self._reason = b""
        self._fields = []
        self._head_bytes = self._field_bytes = 0
        self.head = None
        self.complete = False

    def write(self, data: bytes) -> None:
        if self._error is not None:
            raise self._error
        assert self.transport is not None
        self.transport.write(data)

    async def drain(self) -> None:
        """Wait while the backend does not take what was written (its socket buffer is full), at most the
        route's read_timeout: a backend that takes no byte of the body for that long is not answering."""
        if self._error is not None:
            raise self._error
        if self._writing_paused:
            self._drain = self._loop.create_future()
            try:
                async with asyncio.timeout(self._read_timeout or None):
                    await self._drain
            except TimeoutError:
                raise ReadTimeout(f"the backend took no request bytes for {self._read_timeout:g} s") from None
            finally:
                self._drain = None

    def request_sent(self) -> None:
        """The request is out whole: the read timeout starts."""
        self._sent = True
        if not self.complete and self._error is None:
            self._last_read = self._loop.time()
            self._arm(self._read_timeout)

    def response_head(self) -> asyncio.Future[ResponseHead]:
        """The answer's status and headers, once they are here: a future, so that a held long-poll waits for them
        without a coroutine (and its frame) of its own. A failure already known when they are (a bad chunk in the
        packet of the head, say) fails the answer before anything reaches the device: the future is settled once
        every byte read with the head has been parsed (`data_received`), or when the exchange fails."""
        self._head_waiter = self._loop.create_future()
        self._settle_head()
        return self._head_waiter

    async def read(self) -> bytes:
        """The answer's body bytes that have arrived (waiting for some); b"" once it is complete."""
        while True:
            if self._body:
                return self.body()
            if self.complete:
                return b""
            if self._error is not None:
                raise self._error
            await self._wait()

    def body(self) -> bytes:
        """The body bytes that have arrived, all taken (`read`; of a complete answer: the whole body, for the
        one-write path). Reading resumes if they filled the buffer: a connection going back to its pool paused would
        never see its next answer."""
        data = b"".join(self._body)  # (one block: that block itself, not a copy)
        self._body.clear()
        self._buffered = 0
        if self._reading_paused:
            self._resume_reading()
        return data

    @property
    def reusable(self) -> bool:
        """Whether the exchange ended so that another request can follow on this connection."""
        return (
            self._state == _DONE
            and self._sent
            and self._keep_alive
            and not self._spoiled
            and self._error is None
            and not self.closed
            and self.transport is not None
            and not self.transport.is_closing()
        )

    def idle(self, now: float) -> None:
        """Back in the pool: from now on any byte from the backend is a protocol error. A body nobody read (a
        401's page, refused before relaying) is dropped here, or the next answer would be read behind it."""
        self._state = _IDLE
        self._parser = None
        self.idle_since = now
        self._body.clear()
        self._buffered = 0
        if self._reading_paused:
            self._resume_reading()

    @property
    def usable(self) -> bool:
        """Whether a pooled connection can carry another request (the backend may have closed it)."""
        return not self.closed and self.transport is not None and not self.transport.is_closing()

    def fail(self, error: BaseException) -> None:
        """The exchange failed on the gateway's side (the request body): close and wake the reader."""
        self._set_error(error)

    def abort(self) -> None:
        self._drop_timer()
        if self.transport is not None and not self.closed:
            self.transport.abort()

    def close(self) -> None:
        self._drop_timer()
        if self.transport is not None and not self.closed:
            self.transport.close()

    # -- asyncio.Protocol ---------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A cast, not an isinstance check: uvloop's transports (listener.event_loop) do not derive from asyncio's.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        state = self._state
        if state in (_IDLE, _DONE):  # bytes while no request is outstanding: the next answer would be wrong
            self._spoil()
            return
        self._last_read = self._loop.time()
        if state == _WAITING:
            self._head_bytes += len(data)
        parser = self._parser
        if parser is None:
            parser = self._parser = httptools.HttpResponseParser(self)
        try:
            parser.feed_data(data)
        except httptools.HttpParserError as e:
            cause = e.__context__ if isinstance(e.__context__, BackendProtocolError) else None
            self._set_error(cause or BackendProtocolError(f"malformed answer from the backend: {e}"))
            return
        if self._state == _WAITING and self._head_bytes > MAX_HEAD_BYTES:
            self._set_error(BackendProtocolError(f"the backend's answer head is over {MAX_HEAD_BYTES} bytes"))
        self._settle_head()

    def eof_received(self) -> None:
        """The backend ended its side of the connection (the transport then closes). Over TLS, asyncio's loop
        calls this after close_notify and also after a bare TCP close; uvloop only after close_notify. The
        TLS object tells them apart: after close_notify it reads the end of the stream (b""), after a bare
        close it wants more bytes. Python 3.11's `ssl` has no other way to ask (no SSL_get_shutdown)."""
        transport = self.transport
        tls = transport.get_extra_info("ssl_object") if transport is not None else None
        if tls is None:
            self._clean_eof = True  # plain TCP: the FIN is the end
            return
        try:
            self._clean_eof = tls.read(1) == b""
        except ssl.SSLZeroReturnError:
            self._clean_eof = True
        except ssl.SSLError:  # SSLWantReadError: the TCP connection ended inside the TLS stream
            self._clean_eof = False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._drop_timer()
        if self._state == _BODY and self._until_close and exc is None and self._clean_eof:
            self._message_complete()  # the answer framed by the end of the connection
        elif self._state in (_WAITING, _BODY):
            why = f": {exc}" if exc else ""
            answered = self._state == _BODY or self._head_bytes > 0
            message = f"the backend closed the connection before its answer ended{why}"
            if self._state == _BODY and self._until_close and exc is None:
                message = (
                    "the backend's TLS connection ended without close_notify: its answer, delimited by the end of "
                    "the connection, may be truncated"
                )
            self._set_error(BackendClosed(message, answered=answered))
        self._wake_drain(ConnectionResetError("the backend connection is closed"))

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._wake_drain(None)

    # -- llhttp's callbacks (httptools) ---------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._state == _DONE:
            raise BackendProtocolError("a second answer to one request")

    def on_status(self, status: bytes) -> None:
        self._reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        self._field_bytes += len(name) + len(value)
        if self._field_bytes > MAX_HEAD_BYTES:
            raise BackendProtocolError(f"the backend's answer head is over {MAX_HEAD_BYTES} bytes")
        if len(self._fields) >= MAX_HEAD_FIELDS:
            raise BackendProtocolError(f"the backend's answer has more than {MAX_HEAD_FIELDS} header fields")
        self._fields.append((_text(name), _text(value)))

    def on_headers_complete(self) -> None:
        assert self._parser is not None
        status = self._parser.get_status_code()
        if not 100 <= status <= 599:  # llhttp takes any three digits; below 100 would pass for an interim answer
            raise BackendProtocolError(f"status {status:03d} is not an HTTP status (100-599)")
        if _NOT_REASON.search(self._reason):  # llhttp lets control bytes through; the device's writer would not
            raise BackendProtocolError("the answer's reason phrase holds a control character")
        if status < 200:
            if status == 101:
                raise BackendProtocolError("101 Switching Protocols to a request that asked for no upgrade")
            self._interim = True  # 100, 102, 103: dropped; the answer follows
            self._reason = b""
            self._fields = []
            return
        headers: CIMultiDict[str] = CIMultiDict(self._fields)
        codings = [c.strip().lower() for v in headers.getall("Transfer-Encoding", ()) for c in v.split(",")]
        if any(coding != "chunked" for coding in codings):  # the device would get the coded bytes, the coding dropped
            raise BackendProtocolError(f"the answer's transfer coding is not decoded here: {', '.join(codings)}")
        if len(codings) > 1:  # llhttp refuses two `chunked` fields, not `chunked, chunked` in one (decoded once)
            raise BackendProtocolError("the answer is chunked more than once (RFC 9112, 6.1)")
        chunked = bool(codings)
        length = headers.get("Content-Length")
        bodyless = self._head_method or status in (204, 304)
        self._until_close = not bodyless and length is None and not chunked
        if self._head_method:  # llhttp cannot be told it was HEAD: without a length it would wait for the close
            self._keep_alive = _keeps_alive(self._parser.get_http_version(), headers)
        else:
            self._keep_alive = self._parser.should_keep_alive() and not self._until_close
        self.head = ResponseHead(
            status=status,
            reason=_text(self._reason).strip(),
            headers=headers,
            content_length=int(length) if length is not None and not chunked else None,
            chunked=chunked,
        )
        self._state = _BODY
        if self._head_method:
            self._message_complete()  # llhttp cannot be told it was HEAD: its Content-Length describes nothing
        else:
            self._wake()

    def on_body(self, data: bytes) -> None:
        if self.complete:
            raise BackendProtocolError("a body after the answer to HEAD")
        self._body.append(data)
        self._buffered += len(data)
        if self._buffered > BUFFER_HIGH and not self._reading_paused and self.transport is not None:
            self._reading_paused = True
            self.transport.pause_reading()
            self._drop_timer()  # the wait is the device's now
        self._wake()

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        if not self.complete:
            self._message_complete()

    # -- inside ---------------------------------------------------------------------------------------

    def _message_complete(self) -> None:
        self.complete = True
        self._state = _DONE
        self._wake()  # the read timer stays: when it fires it finds nothing to wait for (`_check_read`)

    def _resume_reading(self) -> None:
        self._reading_paused = False
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()
            if self._sent and not self.complete:
                self._last_read = self._loop.time()
                self._arm(self._read_timeout)

    async def _wait(self) -> None:
        self._waiter = self._loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def _settle_head(self) -> None:
        """The head's waiter (`response_head`) gets the failure or the head, once there is either."""
        waiter = self._head_waiter
        if waiter is None:
            return
        if not waiter.done():  # (done: its request was cancelled)
            if self._error is not None:
                waiter.set_exception(self._error)
            elif self.head is not None:
                waiter.set_result(self.head)
            else:
                return
        self._head_waiter = None

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _wake_drain(self, error: BaseException | None) -> None:
        drain = self._drain
        if drain is not None and not drain.done():
            if error is None:
                drain.set_result(None)
            else:
                drain.set_exception(error)

    def _set_error(self, error: BaseException) -> None:
        """The exchange fails (unless its answer was already complete) and the connection ends."""
        if self._error is None and not self.complete:
            self._error = error
        self._spoiled = True
        self._wake()
        self._settle_head()
        self._wake_drain(error)
        self.abort()

    def _spoil(self) -> None:
        self._spoiled = True
        self.abort()

    def _arm(self, delay: float) -> None:
        """The read timer fires `delay` seconds from now at the latest (rounded up to its slot: `ReadTimers`). A
        timer already due earlier is kept: when it fires it waits the rest (`_check_read`), so a request on a
        kept-alive connection usually schedules nothing."""
        if not delay:
            return
        when = self._loop.time() + delay
        if self._due:
            if self._due <= when:
                return
            self._timers.remove(self, self._due)
        self._due = self._timers.add(self, self._loop, when, delay)

    def _drop_timer(self) -> None:
        if self._due:
            self._timers.remove(self, self._due)
            self._due = 0.0

    def _check_read(self) -> None:
        """The read timer: bytes came since it was armed, so wait the rest; or none did, and the wait is over.

        One timer per connection rather than one per read or per request: data_received only notes the time."""
        self._due = 0.0
        if not self._sent or self.complete or self._reading_paused or self._error is not None:
            return  # no wait is running: the next one arms a timer of its own
        waited = self._loop.time() - self._last_read
        if waited < self._read_timeout:
            self._arm(self._read_timeout - waited)
            return
        self._set_error(ReadTimeout(f"no bytes from the backend for {self._read_timeout:g} s"))


class ReadTimers:
    """The read timers of one event loop's backend connections, in slots (module docstring, "Timeouts").

    A timer of `delay` seconds due at `when` goes in the slot at `when` rounded up to a multiple of the largest
    power of two of seconds not above `delay / 64`; each slot is a set of connections and one loop timer, made
    when the slot is. A connection is in one slot at most (`BackendConnection._due`), and leaves it when its
    timer is dropped (the answer is paused for the device, the connection closes) or fires."""

    __slots__ = ("__weakref__", "_slots")

    def __init__(self) -> None:
        self._slots: dict[float, set[BackendConnection]] = {}

    def add(self, connection: BackendConnection, loop: asyncio.AbstractEventLoop, when: float, delay: float) -> float:
        """Put `connection` in the slot of `when`; returns that slot's time (when its `_check_read` runs)."""
        _, exponent = math.frexp(delay / 64)
        grain = math.ldexp(1.0, exponent - 1)  # delay / 64 = m * 2**exponent, 0.5 <= m < 1
        due = math.ceil(when / grain) * grain
        slot = self._slots.get(due)
        if slot is None:
            slot = self._slots[due] = set()
            loop.call_at(due, self._fire, due)
        slot.add(connection)
        return due

    def remove(self, connection: BackendConnection, due: float) -> None:
        slot = self._slots.get(due)
        if slot is not None:
            slot.discard(connection)

    def _fire(self, due: float) -> None:
        """The slot's loop timer: each connection still in it is checked. One whose check fails is reported as a loop
        timer's callback would be, and the others are checked all the same (each had a timer of its own before)."""
        for connection in self._slots.pop(due, ()):
            if connection._due != due:  # its timer is another slot's by now (a connection is in one slot at most)
                continue
            try:
                connection._check_read()
            except Exception as e:  # noqa: BLE001  reported like a failing loop callback; the slot goes on
                connection._loop.call_exception_handler(
                    {"message": "a backend connection's read timer failed", "exception": e}
                )

    def __len__(self) -> int:
        """Connections with a read timer armed."""
        return sum(len(slot) for slot in self._slots.values())


_read_timers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, ReadTimers] = weakref.WeakKeyDictionary()


def read_timers(loop: asyncio.AbstractEventLoop) -> ReadTimers:
    """The loop's `ReadTimers` (made on first use; gone with the loop)."""
    timers = _read_timers.get(loop)
    if timers is None:
        timers = _read_timers[loop] = ReadTimers()
    return timers


async def connect(upstream: Upstream, within: float) -> BackendConnection:
    """A new connection to the upstream, TCP and TLS handshake within `within` seconds.

    The attempt itself is never cancelled: when the request is (the device left) or `within` runs out, it goes on
    by itself and its connection, if it is made, is closed at once. Workaround: asyncio's happy-eyeballs connect
    (`staggered_race`, Python 3.11) loses the socket of a connect it cancels just as that connect completes: one
    backend socket left open for good, now and then, per device that leaves (python/cpython#128475, #124847;
    aiohttp's aio-libs/aiohappyeyeballs#143)."""
    attempt = asyncio.ensure_future(_connect(upstream))
    try:
        async with asyncio.timeout(within):
            return await asyncio.shield(attempt)
    except BaseException:
        attempt.add_done_callback(_close_if_made)
        raise


def _close_if_made(attempt: asyncio.Future[BackendConnection]) -> None:
    if not attempt.cancelled() and attempt.exception() is None:  # reading the exception marks it handled
        attempt.result().abort()


async def _connect(upstream: Upstream) -> BackendConnection:
    loop = asyncio.get_running_loop()

    def protocol() -> BackendConnection:
        return BackendConnection(loop)

    tls, name = upstream.tls, upstream.server_hostname
    if isinstance(loop, asyncio.BaseEventLoop):  # as aiohttp: a name with IPv6 and IPv4 addresses tries both
        made = loop.create_connection(
            protocol, upstream.host, upstream.port, ssl=tls, server_hostname=name, happy_eyeballs_delay=0.25
        )
    else:  # uvloop (listener.event_loop): its create_connection has no happy_eyeballs_delay; addresses in turn
        made = loop.create_connection(protocol, upstream.host, upstream.port, ssl=tls, server_hostname=name)
    _, connection = await made
    return connection


def _keeps_alive(version: str, headers: CIMultiDict[str]) -> bool:
    """Whether an answer leaves its connection open (RFC 9112, 9.3): HTTP/1.1 unless `Connection: close`,
    HTTP/1.0 only with `Connection: keep-alive`."""
    tokens = {t.strip().lower() for v in headers.getall("Connection", []) for t in v.split(",")}
    if version == "1.1":
        return "close" not in tokens
    return version == "1.0" and "keep-alive" in tokens and "close" not in tokens


class UserPool:
    """One user's backend connections: per upstream, the idle ones (most recently used last) and a count
    of all that are open, at most `limit` of them; every user's counted in `sockets` too."""

    def __init__(
        self,
        *,
        limit: int = LIMIT_PER_UPSTREAM,
        keepalive: float = KEEPALIVE_SECONDS,
        sockets: BackendSockets | None = None,
    ) -> None:
        self.closed = False
        self._limit = limit
        self._sockets = BackendSockets(1 << 20) if sockets is None else sockets
        self._keepalive = keepalive
        self._idle: dict[Upstream, deque[BackendConnection]] = {}
        self._open: dict[Upstream, int] = {}
        self._waiters: dict[Upstream, deque[asyncio.Future[None]]] = {}
        self._sweep: asyncio.TimerHandle | None = None

    async def acquire(self, upstream: Upstream, connect_timeout: float, *, fresh: bool = False) -> BackendConnection:
        """An idle connection of this user to `upstream`, or a new one (`fresh`: always a new one). With `limit`
        of them open and none idle, it waits for one to come back, at most `connect_timeout` seconds (`PoolBusy`):
        a request behind held long-polls is answered, not kept waiting until one of them ends."""
        deadline: float | None = None
        while True:
            idle = self._idle.get(upstream)
            while idle and not fresh:
                connection = idle.pop()  # the most recently used: the least likely to have been closed meanwhile
                if connection.usable:
                    return connection
                self._gone(upstream)
            if self._open.get(upstream, 0) < self._limit:
                break
            if idle:  # a new one is wanted and the idle ones take all the places: one of them makes room
                idle.popleft().close()
                self._gone(upstream)
                continue
            if deadline is None:
                deadline = asyncio.get_running_loop().time() + connect_timeout
            await self._wait_turn(upstream, deadline)
        self._sockets.take()  # (an idle connection of another user closed for it, if need be)
        self._open[upstream] = self._open.get(upstream, 0) + 1
        try:
            return await connect(upstream, connect_timeout)
        except BaseException:
            self._gone(upstream)
            raise

    def release(self, upstream: Upstream, connection: BackendConnection) -> None:
        """A connection whose exchange is over: back to the idle ones if it can carry another request."""
        if self.closed or not connection.reusable:
            self.discard(upstream, connection)
            return
        connection.idle(asyncio.get_running_loop().time())
        self._put_idle(upstream, connection)

    def unused(self, upstream: Upstream, connection: BackendConnection) -> None:
        """A connection taken but not written to (the request stopped before): back as it was, idle since it was
        last used (a new one: since now), and closed by the keep-alive sweep like any other."""
        if self.closed or not connection.usable:
            self.discard(upstream, connection)
            return
        if connection.exchanges == 0:
            connection.idle_since = asyncio.get_running_loop().time()
        self._put_idle(upstream, connection)

    def _put_idle(self, upstream: Upstream, connection: BackendConnection) -> None:
        """Among the idle ones, with the sweep that closes it after `keepalive` seconds scheduled."""
        self._idle.setdefault(upstream, deque()).append(connection)
        if self._sweep is None:
            self._sweep = asyncio.get_running_loop().call_later(self._keepalive, self._close_stale)
        self._wake(upstream)

    def discard(self, upstream: Upstream, connection: BackendConnection) -> None:
        connection.abort()
        self._gone(upstream)

    def close(self) -> None:
        """Close the idle connections; busy ones are closed as their exchanges end."""
        self.closed = True
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        for upstream, idle in self._idle.items():
            for connection in idle:
                connection.close()
                self._gone(upstream)
        self._idle.clear()

    def drop_idle(self) -> bool:
        """Close the connection idle the longest, of any upstream (room for another user's); whether there was one."""
        oldest: tuple[float, Upstream] | None = None
        for upstream, idle in self._idle.items():
            if idle and (oldest is None or idle[0].idle_since < oldest[0]):
                oldest = (idle[0].idle_since, upstream)
        if oldest is None:
            return False
        self._idle[oldest[1]].popleft().abort()  # its descriptor free at once (a TLS close waits for the peer)
        self._gone(oldest[1])
        return True

    def _gone(self, upstream: Upstream) -> None:
        self._open[upstream] -= 1
        self._sockets.open -= 1
        self._wake(upstream)

    async def _wait_turn(self, upstream: Upstream, deadline: float) -> None:
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(upstream, deque()).append(waiter)
        try:
            async with asyncio.timeout_at(deadline):
                await waiter
        except (TimeoutError, asyncio.CancelledError) as e:
            if waiter.done() and not waiter.cancelled():
                self._wake(upstream)  # the turn handed to this one goes to the next
            if isinstance(e, TimeoutError):
                busy = f"all {self._limit} of the user's connections to {upstream.authority} stayed busy"
                raise PoolBusy(f"{busy} (held requests?)") from None
            raise

    def _wake(self, upstream: Upstream) -> None:
        waiters = self._waiters.get(upstream)
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _close_stale(self) -> None:
        """Close connections idle for `keepalive` seconds; look again while some are left."""
        self._sweep = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        left = False
        for upstream, idle in self._idle.items():
            while idle and (now - idle[0].idle_since >= self._keepalive or not idle[0].usable):
                idle.popleft().close()
                self._gone(upstream)
            left = left or bool(idle)
        if left:
            self._sweep = loop.call_later(self._keepalive, self._close_stale)


class Exchange:
    """One request on one connection of a user's pool: the head written in one write, the body streamed
    (at the backend's pace) while the answer is read, the connection handed back or closed at the end."""

    __slots__ = ("_writer", "connection", "pool", "reused", "upstream")

    def __init__(self, pool: UserPool, upstream: Upstream, connection: BackendConnection) -> None:
        self.pool = pool
        self.upstream = upstream
        self.connection = connection
        self.reused = connection.exchanges > 0
        self._writer: asyncio.Task[None] | None = None

    def start(
        self,
        method: str,
        target: str,
        headers: CIMultiDict[str],
        body: AsyncIterable[bytes] | None,
        read_timeout: float,
    ) -> None:
        """Write the request's head (its body follows in a task); the answer's head is `connection.response_head`.

        Apart from `send` so that a caller can let go of the headers (the token) before the answer comes: an
        ActiveSync `Ping` waits for it up to half an hour (`proxy.backend.forward._send`)."""
        connection = self.connection
        length = headers.get("Content-Length")
        chunked = body is not None and length is None
        connection.begin(method, read_timeout)
        connection.write(request_head(method, target, headers, self.upstream.authority, chunked=chunked))
        if body is None:
            connection.request_sent()
        else:
            expected = None if chunked or length is None else int(length)
            self._writer = asyncio.get_running_loop().create_task(self._send_body(body, chunked, expected))

    async def _send_body(self, body: AsyncIterable[bytes], chunked: bool, expected: int | None) -> None:
        try:
            await self._write_body(body, chunked, expected)
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # noqa: BLE001  the reader of the answer raises it
            self.connection.fail(e)

    async def _write_body(self, body: AsyncIterable[bytes], chunked: bool, expected: int | None) -> None:
        connection = self.connection
        sent = 0
        async for chunk in body:
            sent += len(chunk)
            if expected is not None and sent > expected:
                raise BackendProtocolError("the request body is longer than its Content-Length")
            connection.write(b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunked else chunk)
            await connection.drain()
        if chunked:
            connection.write(b"0\r\n\r\n")
        elif expected is not None and sent != expected:
            raise BackendProtocolError("the request body ended before its Content-Length")
        connection.request_sent()

    @property
    def body_pending(self) -> bool:
        return self._writer is not None and not self._writer.done()

    def finish(self, *, reuse: bool = True) -> None:
        """The exchange is over: the connection back to the pool if it can carry another request, else closed.

        A request body still being sent (the backend answered before taking it all) means the connection
        is mid-request: closed."""
        if self.body_pending:
            assert self._writer is not None
            self._writer.cancel()
            reuse = False
        if reuse:
            self.pool.release(self.upstream, self.connection)
        else:
            self.pool.discard(self.upstream, self.connection)

    async def abandon(self) -> None:
        """Close the connection and wait until the body's sender has stopped reading the device's body."""
        writer = self._writer
        self.finish(reuse=False)
        if writer is not None:
            await asyncio.gather(writer, return_exceptions=True)


def request_head(method: str, target: str, headers: CIMultiDict[str], authority: str, *, chunked: bool) -> bytes:
    """The request line and header fields, Host first (RFC 9112, 3.2), as one bytes object.

    Refuses CR, LF and NUL anywhere in a name or value: nothing a device or a configuration sent can add a
    header field or a request of its own."""
    host = headers.get("Host", authority)
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}"]
    for name, value in headers.items():
        if len(name) == 4 and name.lower() == "host":
            continue
        lines.append(f"{name}: {value}")
    if chunked:
        lines.append("Transfer-Encoding: chunked")
    elif method not in _NO_BODY_METHODS and "Content-Length" not in headers:
        lines.append("Content-Length: 0")  # as aiohttp: a POST without a body says so
    # the lines without their CRLFs, looked through by memchr: counting CR and LF in the head character by character
    # was 2% of a request with a Negotiate token (docs/performance.md, "Instructions per request, counted")
    inside = "".join(lines)
    if "\n" in inside or "\r" in inside or "\x00" in inside:
        raise BackendProtocolError("a request header field holds CR, LF or NUL")
    lines.append("")  # the empty line that ends the head
    return ("\r\n".join(lines) + "\r\n").encode("utf-8", "surrogateescape")
