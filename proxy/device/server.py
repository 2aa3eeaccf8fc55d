"""The device side: HTTP/1.1 over the TLS connection a device opened, parsed by llhttp (`httptools`).

Theory of operation
-------------------
This replaces aiohttp's web server on the request path (`listener.http_server = "own"`) with what the
gateway needs of one: read a request, hand it to the pipeline as a `DeviceRequest`, write the answer
the pipeline gives, and read the next request on the same connection. aiohttp's server (request
handler, middlewares, `web.Request`, `web.StreamResponse`) had been 10-15% of a request's CPU
(docs/performance.md); aiohttp stays for the admin listener.

One `DeviceConnection` (an asyncio Protocol) per connection, given the TLS transport by
`proxy.tls.server.TlsGate` once the handshake is done. Its bytes go to llhttp with none of its
leniencies, which refuses (400, the connection closed) what aiohttp's parser (llhttp too) refused:
Content-Length with Transfer-Encoding, two Content-Lengths, a length that is not digits, a
Transfer-Encoding other than a final `chunked` (`chunked, chunked` included), obs-fold, bare LF, CR or
NUL or other controls in a field, a bad chunk size, a method or a version it does not know. On top of
llhttp, as aiohttp did: a request target over `MAX_TARGET_BYTES`, a field name or value over
`max_field_bytes`, more than `MAX_FIELDS` fields, HTTP/1.1 without `Host`, two `Host` or `Transfer-Encoding` fields are
400, and so is a request asking for an `Upgrade` (or CONNECT) that carries a body (llhttp reads nothing
after such a head); HTTP/0.9 (a request line without a version) reaches the pipeline, which refuses it (400).

Bounds before any stage runs (`proxy.tls.limits` has the why):
- the header block: bytes read while a request's head is incomplete are counted, and past
  `listener.max_header_bytes` the device gets 431 (`proxy.tls.limits.refuse_header_block`), whatever
  TLS records the head came in: the parser is fed at most the budget, so a head of exactly the budget
  passes and one byte more does not. llhttp reports no offsets, so each message part is cut out before it
  is fed (a head ends at its first CRLF CRLF, a body at its length or its last chunk's trailer: `BodyEnd`),
  and a head that shares a read with the end of the request before it is counted from its first byte;
- time: from the connection's start, and from the end of each answer, a request's head must be
  complete within `listener.keepalive_timeout`, or the connection is closed (aiohttp's rule); a device
  that stops taking an answer is cut after `listener.client_send_timeout` (each wait, local answers too);
- bodies: at most `BODY_HIGH` bytes of a request body are held; past that, reading from the device
  pauses until the backend stage takes them. What is not payload in a chunked body (sizes, extensions,
  trailers) is held to `listener.max_header_bytes` per run between payload bytes, to the byte (`BodyEnd.framing`):
  one byte over is 400.

Requests are answered one at a time, in order. A request that arrives while the one before is still being
served (pipelining) waits, parsed; the bytes after it are kept unparsed (up to `BACKLOG_HIGH`, then reading
pauses) and parsed one request at a time as their turn comes. Reading goes on meanwhile, so a device's TCP end
is seen at once (asyncio's TLS protocol reported nothing of it while reading was paused, and the requests
queued behind were all served, for nobody), and no more than one request is held parsed ahead. Each request
runs in its own task; when the device goes away, the task is cancelled (the backend connection is then closed
at once: `proxy.backend.forward`). After an answer the connection is kept only when both sides may keep it
(HTTP/1.1 without `Connection: close`, or HTTP/1.0 with `Connection: keep-alive`) and the request was read
whole: a body the pipeline left unread (a refusal before `100 Continue`), a malformed request or an `Upgrade`
ends the connection after its answer, so no byte of one request is ever read as the start of another.
"""

from __future__ import annotations

import asyncio
import functools
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from email.utils import formatdate
from http import HTTPStatus
from typing import ClassVar
from urllib.parse import unquote

import httptools
import structlog
from multidict import CIMultiDict, CIMultiDictProxy, MultiMapping

from proxy.device.framing import BodyEnd, head_end
from proxy.device.request import CONTINUE, expectations
from proxy.errors import BadRequest
from proxy.tls.limits import Linger, answer_too_large, frees_a_slot, idle_closed, refuse_header_block
from proxy.tls.record import TlsRecords
from proxy.tls.server import peer_text, socket_transport

log = structlog.get_logger("proxy.device")

MAX_TARGET_BYTES = 8190  # the request target (aiohttp's max_line_size)
MAX_FIELDS = 128  # header fields of one request (aiohttp's max_headers)
BODY_HIGH = 256 * 1024  # request body bytes held for the backend stage before reading pauses
BACKLOG_HIGH = 64 * 1024  # bytes of pipelined requests kept unparsed behind a waiting one before reading pauses
_NO_BODY_STATUS = frozenset({204, 304})
_NO_FIELDS: MultiMapping[str] = CIMultiDictProxy(CIMultiDict())  # a request's, once its head went to the backend
_NOT_IN_HEAD: CIMultiDict[str] = CIMultiDict()  # the connection's fields between heads (never added to: a message
# begins with a new one, `on_message_begin`)


@dataclass(frozen=True)
class DeviceLimits:
    """The listener's settings the device side enforces."""

    max_header_bytes: int
    max_field_bytes: int
    keepalive_timeout: float
    send_timeout: float = 60.0  # listener.client_send_timeout: each wait for the device to take our bytes


class _Refused(Exception):
    """Raised in a parser callback: the head breaks one of our bounds (400)."""


@functools.lru_cache(maxsize=1)
def _fqdn() -> str:
    return socket.getfqdn()  # the host of a request without Host (HTTP/1.0), as aiohttp reports it


class _Date:
    """The Date header's value, formatted once a second."""

    second: ClassVar[int] = -1
    value: ClassVar[bytes] = b""

    @classmethod
    def now(cls) -> bytes:
        second = int(time.time())
        if second != cls.second:
            cls.second, cls.value = second, formatdate(second, usegmt=True).encode("ascii")
        return cls.value


class RequestBody:
    """A request body as it arrives from the device: buffered up to `BODY_HIGH`, then reading pauses."""

    __slots__ = ("_chunks", "_connection", "_error", "_size", "_waiter", "complete")

    def __init__(self, connection: DeviceConnection) -> None:
        self._connection = connection
        self._chunks: deque[bytes] = deque()
        self._size = 0
        self._waiter: asyncio.Future[None] | None = None
        self._error: BaseException | None = None
        self.complete = False

    def feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self._size += len(data)
        if self._size > BODY_HIGH:
            self._connection.pause(_BODY)
        self._wake()

    def end(self) -> None:
        self.complete = True
        self._wake()

    def fail(self, error: BaseException) -> None:
        if not self.complete:
            self._error = error
            self._wake()

    def let_go(self) -> None:
        """The request was answered without reading this body, and nothing ever will: its buffered bytes go now (the
        connection's TLS close may wait up to 30 s for the device's close_notify)."""
        self._chunks.clear()
        self._size = 0
        self.fail(ConnectionResetError("the request was answered without its body"))

    async def read(self) -> bytes:
        while not self._chunks:
            if self._error is not None:
                raise self._error
            if self.complete:
                return b""
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        data = self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)
        self._chunks.clear()
        self._size = 0
        self._connection.resume(_BODY)
        return data

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


class DeviceHttpRequest:
    """One request as `DeviceConnection` parsed it: a `proxy.device.request.DeviceRequest`."""

    __slots__ = (
        "_answered",
        "_chunked",
        "_connection",
        "_head_only",
        "body",
        "body_exists",
        "headers",
        "keep_alive",
        "method",
        "raw_path",
        "status",
        "version",
    )

    def __init__(
        self,
        connection: DeviceConnection,
        method: str,
        raw_path: str,
        version: tuple[int, int],
        headers: CIMultiDict[str],
        keep_alive: bool,
        body: RequestBody | None,
    ) -> None:
        self._connection = connection
        self.method = method
        self.raw_path = raw_path
        self.version = version
        self.headers: MultiMapping[str] = headers
        self.keep_alive = keep_alive
        self.body = body
        self.body_exists = body is not None
        self.status: int | None = None  # of the answer, once its head is written
        self._answered = False  # the answer is complete
        self._chunked = False
        self._head_only = method == "HEAD"

    @property
    def rel_raw_path(self) -> str:
        return self.raw_path.partition("?")[0]

    @property
    def path(self) -> str:
        return unquote(self.raw_path.partition("?")[0], errors="surrogateescape")

    @property
    def host(self) -> str:
        return self.headers.get("Host") or _fqdn()

    @property
    def remote(self) -> str | None:
        return self._connection.remote

    @property
    def transport(self) -> asyncio.Transport | None:
        return self._connection.transport

    @property
    def answer_started(self) -> bool:
        return self.status is not None

    async def read_body(self) -> bytes:
        return b"" if self.body is None else await self.body.read()

    async def send_continue(self) -> None:
        if (
            self.version >= (1, 1)
            and self.body is not None
            and self.status is None
            and CONTINUE in expectations(self.headers)
        ):
            self._connection.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            await self._connection.drain()

    def head_forwarded(self) -> None:
        self.headers = _NO_FIELDS  # the connection no longer refers to them either (`on_headers_complete`)

    async def answer(self, status: int, reason: str | None, headers: MultiMapping[str], body: bytes) -> None:
        self.answer_written(status, reason, headers, body)
        await self._connection.drain()

    def answer_written(self, status: int, reason: str | None, headers: MultiMapping[str], body: bytes) -> bool:
        bodyless = status in _NO_BODY_STATUS
        length = None if bodyless else len(body)
        head = self._head(status, reason, headers, length, chunked=False)
        connection = self._connection
        connection.write(head if bodyless or self._head_only or not body else head + body)
        self._answered = True
        return connection.transport is None or connection.write_paused  # what `drain` would wait for, or raise on

    async def drain(self) -> None:
        await self._connection.drain()

    async def start_answer(
        self, status: int, reason: str | None, headers: MultiMapping[str], content_length: int | None
    ) -> None:
        if status in _NO_BODY_STATUS:
            content_length = None
        bodyless = status in _NO_BODY_STATUS or self._head_only
        chunked = content_length is None and not bodyless and self.version >= (1, 1)
        if content_length is None and not bodyless and not chunked:
            self.keep_alive = False  # HTTP/1.0 and no length: the end of the body is the end of the connection
        self._chunked = chunked
        self._connection.write(self._head(status, reason, headers, content_length, chunked=chunked))
        await self._connection.drain()

    async def write(self, chunk: bytes) -> None:
        if not chunk or self._head_only or self.status in _NO_BODY_STATUS:
            return
        self._connection.write(b"%x\r\n%b\r\n" % (len(chunk), chunk) if self._chunked else chunk)
        await self._connection.drain()

    async def end_answer(self) -> None:
        if self._chunked:
            self._connection.write(b"0\r\n\r\n")
        self._answered = True
        await self._connection.drain()

    def abort(self) -> None:
        self._connection.abort()

    def _head(
        self, status: int, reason: str | None, headers: MultiMapping[str], length: int | None, *, chunked: bool
    ) -> bytes:
        """The status line and header fields; whether the connection is kept is decided here, once."""
        if self.body is not None and not self.body.complete:
            self.keep_alive = False  # the rest of the body would be read as the next request
        if self._connection.winding_down:
            self.keep_alive = False  # the gateway is stopping: the device learns it here, not from a cut
        if reason is None:
            try:
                reason = HTTPStatus(status).phrase
            except ValueError:
                reason = ""
        lines = [f"HTTP/1.1 {status} {reason}\r\n"]
        lines.extend(f"{name}: {value}\r\n" for name, value in headers.items())
        if length is not None:
            lines.append(f"Content-Length: {length}\r\n")
        elif chunked:
            lines.append("Transfer-Encoding: chunked\r\n")
        if not self.keep_alive:
            lines.append("Connection: close\r\n")
        elif self.version < (1, 1):
            lines.append("Connection: keep-alive\r\n")
        text = "".join(lines)
        if text.count("\n") != len(lines) or text.count("\r") != len(lines) or "\x00" in text:
            raise BadRequest("an answer header field holds CR, LF or NUL")  # never split into two answers
        self.status = status
        date = b"" if "Date" in headers else b"Date: " + _Date.now() + b"\r\n"
        return text.encode("utf-8", "surrogateescape") + date + b"\r\n"


class _Unparsed:
    """In the queue of requests: the place where the device's bytes stopped being HTTP."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


class _TooLarge:
    """In the queue of requests: a head that passed `listener.max_header_bytes` (431, then the connection ends)."""


_TOO_LARGE = _TooLarge()

Serve = Callable[[DeviceHttpRequest], Awaitable[None]]
Unparsed = Callable[[str | None, int], None]  # the peer's address, the status it got

# why reading is paused (bits)
_BODY, _QUEUE = 1, 2


class DeviceConnection(asyncio.Protocol):
    """One device connection: parse, queue, serve in order, keep alive or close."""

    __slots__ = (  # no instance dict: thousands are held open by long-polls (bench: memory per held request)
        "_backlog",
        "_begun",
        "_body_end",
        "_connections",
        "_drain",
        "_field_count",
        "_fields",
        "_head_seen",
        "_head_tail",
        "_heads",
        "_hosts",
        "_idle",
        "_idle_since",
        "_in_head",
        "_limits",
        "_linger",
        "_loop",
        "_on_headers_refused",
        "_on_unparsed",
        "_parser",
        "_parsing",
        "_paused",
        "_queue",
        "_receiving",
        "_serve",
        "_stopped",
        "_target",
        "_target_bytes",
        "_task",
        "_winding",
        "_write_paused",
        "remote",
        "transport",
    )

    takes_tls_records = True  # after the handshake, TLS records are proxy.tls.record's, not asyncio's SSLProtocol

    def __init__(
        self,
        serve: Serve,
        limits: DeviceLimits,
        *,
        on_headers_refused: Callable[[], None],
        on_unparsed: Unparsed,
        connections: set[DeviceConnection] | None = None,
    ) -> None:
        self._serve = serve
        self._limits = limits
        self._on_headers_refused = on_headers_refused
        self._on_unparsed = on_unparsed
        self._connections = connections
        self._loop = asyncio.get_running_loop()
        # made when bytes come to parse, dropped while a request is served and none are (`_next`): llhttp's parser
        # and the six callbacks it binds are 0.9 KiB a held long-poll would keep for nothing (docs/performance.md)
        self._parser: httptools.HttpRequestParser | None = None
        self.transport: asyncio.Transport | None = None
        self.remote: str | None = None
        # a list, not a deque: a deque's first block is about 600 bytes, kept per held connection; the queue
        # holds one request but for pipelining (bench: memory per held request)
        self._queue: list[DeviceHttpRequest | _Unparsed | _TooLarge] = []
        self._task: asyncio.Task[None] | None = None
        self._receiving: RequestBody | None = None  # the body llhttp is parsing now
        self._parsing: DeviceHttpRequest | None = None  # the request whose message llhttp is in
        self._in_head = True
        self._head_seen = 0  # bytes read while the current head is incomplete
        self._head_tail = b""  # the last bytes (at most 3) of the current head fed so far
        self._heads = 0  # heads llhttp has read to their end
        self._begun = 0  # messages llhttp has started
        self._body_end: BodyEnd | None = None  # where the body being read ends
        self._stopped = False  # no more bytes are parsed (malformed, refused, upgraded)
        self._linger: Linger | None = None  # once a 431 is written: told of what is read and discarded after it
        self._paused = 0
        self._backlog = bytearray()  # pipelined bytes not parsed yet: a request before them waits (`_keep`)
        self._write_paused = False
        self._drain: asyncio.Future[None] | None = None
        self._idle: asyncio.TimerHandle | None = None
        self._idle_since = 0.0  # the loop's time the last answer ended (`idle_since`)
        self._winding = False  # the gateway is stopping: this connection closes after the answer it owes (`wind_down`)
        # the head being parsed
        self._target: list[bytes] = []
        self._target_bytes = 0
        self._fields = _NOT_IN_HEAD
        self._field_count = 0
        self._hosts = 0

    # -- asyncio's side ------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = socket_transport(transport)
        peer = self.transport.get_extra_info("peername")
        self.remote = str(peer[0]) if isinstance(peer, tuple) and peer else None
        if self._connections is not None:
            self._connections.add(self)
        self._arm_idle()

    def data_received(self, data: bytes) -> None:
        if self._stopped:
            if self._linger is not None:
                self._linger.heard(len(data))
            return
        if self._backlog:
            self._keep(data)
            return
        self._read(data)

    def _read(self, data: bytes) -> None:
        """Feed llhttp one message part at a time: a head up to its end, a body up to its end. Where each part ends
        is found before it is fed (`_head_end`, `BodyEnd`), so every head is counted against the budget from its
        first byte, whichever read brought it and whatever ended in that read before it. Once a whole request
        waits to be served, what follows it is kept unparsed (`_keep`) until it is."""
        while data and not self._stopped:
            if self._in_head and self._queue:
                self._keep(data)
                break
            if self._in_head:
                take = self._head_end(data)
                room = self._limits.max_header_bytes - self._head_seen
                if take > room:
                    self._head_seen += room
                    self._feed(data[:room])
                    if self._in_head and not self._stopped:
                        self._refuse_head_block()  # the budget is spent on one head, and it goes on
                        break
                    take = room
                else:
                    self._head_seen += take
                    heads = self._heads
                    self._feed(data[:take])
                    if self._heads == heads:  # the head goes on: its last bytes may start its end
                        self._head_tail = (self._head_tail + data[max(0, take - 3) : take])[-3:]
            else:
                # None is never seen here (llhttp ends a bodiless message at its head); if it were, 0 bytes ending
                # a body the parser is still in is refused below as any disagreement is
                body_end = self._body_end
                take, ended = (0, True) if body_end is None else body_end.end(data)
                if body_end is not None and body_end.framing > self._limits.max_header_bytes:
                    # Inside a body, what is not payload (chunk sizes, extensions, trailers) is bounded like a head,
                    # to the byte (llhttp holds a trailer field whole until it ends): none of these bytes is fed.
                    self._malformed("chunk extensions or trailer fields longer than listener.max_header_bytes")
                    break
                begun = self._begun
                self._feed(data[:take])
                if not self._stopped and (ended != self._in_head or begun != self._begun):
                    self._malformed("the body ends where the parser did not end it")  # never guess which is right
                    break
            data = data[take:]
        if self._task is None and self._queue:
            self._next()

    def _keep(self, data: bytes) -> None:
        """Pipelined bytes behind a request that waits: kept, unparsed, while reading goes on, so that the device's
        leaving is seen at once (asyncio's TLS transport tells nothing of a closed connection while reading is
        paused: the requests queued behind were all served, their answers dropped). Past `BACKLOG_HIGH`, reading
        pauses."""
        self._backlog += data
        if len(self._backlog) > BACKLOG_HIGH:
            self.pause(_QUEUE)

    def _head_end(self, data: bytes) -> int:
        """How many bytes of `data` to feed as head (`proxy.device.framing.head_end`)."""
        return head_end(self._head_tail, data)

    def eof_received(self) -> bool | None:
        if self._receiving is not None:
            self._receiving.fail(ConnectionResetError("the device closed its side mid-body"))
        return False  # the transport closes; a request still being served is cancelled (connection_lost)

    def connection_lost(self, exc: Exception | None) -> None:
        self._stopped = True
        if self._connections is not None:
            self._connections.discard(self)
        self._cancel_idle()
        error = ConnectionResetError("the device closed the connection")
        if self._receiving is not None:
            self._receiving.fail(error)
        for queued in self._queue:
            if isinstance(queued, DeviceHttpRequest) and queued.body is not None:
                queued.body.fail(error)
        self._queue.clear()
        self._backlog.clear()
        if self._task is not None and not self._task.done():
            self._task.cancel()  # the device left: nobody is waiting for this answer (499)
        self._wake_drain(error)
        self.transport = None

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake_drain(None)

    # -- llhttp's callbacks ------------------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._begun += 1
        self._target = []
        self._target_bytes = 0
        self._fields = CIMultiDict()
        self._field_count = 0
        self._hosts = 0

    def on_url(self, piece: bytes) -> None:
        self._target_bytes += len(piece)
        if self._target_bytes > MAX_TARGET_BYTES:
            raise _Refused(f"the request target is longer than {MAX_TARGET_BYTES} bytes")
        self._target.append(piece)

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._in_head:
            return  # a trailer field: framing of the body, never a header field of the request (nor forwarded)
        self._field_count += 1
        if self._field_count > MAX_FIELDS:
            raise _Refused(f"more than {MAX_FIELDS} header fields")
        limit = self._limits.max_field_bytes
        if len(name) > limit or len(value) > limit:
            raise _Refused(f"a header field is longer than {limit} bytes")
        if len(name) == 4 and name.lower() == b"host":
            self._hosts += 1
        # as aiohttp's parser: names are tokens (ASCII); values keep their bytes (surrogateescape)
        self._fields.add(name.decode("ascii"), value.decode("utf-8", "surrogateescape").strip(" \t"))

    def on_headers_complete(self) -> None:
        parser = self._parser
        assert parser is not None  # llhttp calls back from inside `_feed`
        major, _, minor = parser.get_http_version().partition(".")
        version = (int(major or 0), int(minor or 0))
        if version == (1, 1) and self._hosts == 0:
            raise _Refused("an HTTP/1.1 request without Host")
        if self._hosts > 1:
            raise _Refused("two Host header fields")
        fields = self._fields
        if len(fields.getall("Transfer-Encoding", ())) > 1:  # llhttp reads all; the framing below reads one field
            raise _Refused("two Transfer-Encoding header fields")  # as aiohttp's parser refuses them
        length = fields.get("Content-Length")
        has_body = "chunked" in fields.get("Transfer-Encoding", "").lower() or (
            length is not None and int(length) > 0  # llhttp checked it is digits
        )
        if has_body and parser.should_upgrade():
            # llhttp ends such a message at its head and reads nothing after it (HttpParserUpgrade): its body
            # would be forwarded empty, or cut short. A WebSocket handshake has no body; this is refused.
            raise _Refused("a request that asks for an Upgrade (or CONNECT) carries a body")
        body = RequestBody(self) if has_body else None
        self._heads += 1
        self._head_tail = b""
        chunked = "chunked" in fields.get("Transfer-Encoding", "").lower()
        if has_body:
            self._body_end = BodyEnd(0 if chunked or length is None else int(length), chunked=chunked)
        request = DeviceHttpRequest(
            self,
            parser.get_method().decode("ascii"),
            b"".join(self._target).decode("utf-8", "surrogateescape"),
            version,
            fields,
            parser.should_keep_alive(),
            body,
        )
        self._target = []
        self._fields = _NOT_IN_HEAD  # the request's now: not kept here once the request lets go of them
        self._receiving = body
        self._parsing = request
        self._in_head = False
        self._cancel_idle()
        self._queue.append(request)  # served once llhttp has read all of this read's bytes (`_read`)

    def on_body(self, data: bytes) -> None:
        if self._receiving is not None:
            self._receiving.feed(data)

    def on_message_complete(self) -> None:
        self._body_end = None
        self._parsing = None
        if self._receiving is not None:
            self._receiving.end()
            self._receiving = None
        self._in_head = True
        self._head_seen = 0

    # -- parsing -------------------------------------------------------------------------------------------

    def _feed(self, data: bytes) -> None:
        """llhttp reads `data` (the first request it completed the head of is served once the whole read is fed:
        `data_received`)."""
        parser = self._parser
        if parser is None:  # a new parser reads a new message as the old one would after a kept-alive request
            parser = self._parser = httptools.HttpRequestParser(self)
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # `Connection: Upgrade` or CONNECT: the request is served (or refused) as any other, upgraded to
            # nothing; what follows it is not HTTP the gateway reads, so the connection ends after its answer.
            self._stop()
        except httptools.HttpParserError as e:
            cause = e.__context__
            reason = str(cause) if isinstance(cause, _Refused) else f"the request is malformed: {e}"
            self._malformed(reason)

    def _malformed(self, reason: str) -> None:
        """The bytes stopped being HTTP. A request they belong to that is not being served yet never will be
        (nothing of it is forwarded); one being served fails reading its body (400)."""
        self._stop()
        request, self._parsing = self._parsing, None
        if request is not None and request in self._queue:
            self._queue.remove(request)
        elif self._receiving is not None:
            self._receiving.fail(BadRequest(reason))
            self._receiving = None
            return
        self._queue.append(_Unparsed(reason))

    def _stop(self) -> None:
        """Parse no more of this connection's bytes; it closes once what was read has been answered."""
        self._stopped = True
        if self.transport is not None:
            self.transport.pause_reading()

    def _refuse_head_block(self) -> None:
        """The head being read passed the budget: logged and counted now, nothing more is parsed, the requests read
        before it (the device's own) are answered in order, then the 431, which ends the connection
        (`_answer_too_large`). Logged when the 431 was written, a device that left before it left no trace."""
        refuse_header_block(self.transport, self._limits.max_header_bytes, self._on_headers_refused)
        self._stop()
        self._queue.append(_TOO_LARGE)

    def _answer_too_large(self) -> None:
        self._queue.clear()  # nothing was parsed after it; no answer may follow it
        self._cancel_idle()
        if self.transport is not None:
            self.transport.resume_reading()  # read and discarded until the linger ends (proxy.tls.limits)
            self._linger = answer_too_large(self.transport)

    # -- serving, in order -----------------------------------------------------------------------------------

    def _next(self) -> None:
        """Serve the first queued request, or wait for the next head (or close, when nothing more is read)."""
        self._task = None
        if not self._queue:
            if self._stopped or self._winding:
                self._close()
            else:
                self.resume(_QUEUE)
                self._arm_idle()
                self._idle_since = self._loop.time()
                if isinstance(self.transport, TlsRecords):
                    self.transport.between_requests()  # buffers grown by the last answer are given back
            return
        queued = self._queue.pop(0)
        if isinstance(queued, _TooLarge):
            self._answer_too_large()
            return
        if isinstance(queued, _Unparsed):
            self._answer_unparsed(queued.reason)
            return
        self._task = self._loop.create_task(self._run(queued))
        if queued.keep_alive and self._in_head and not self._head_seen:
            # llhttp is between messages (its state then is a new parser's): dropped until the next bytes come, so a
            # long-poll is held without it. Not after a request that ends the connection: llhttp refuses what
            # follows such a request, where a new parser would read it as a request (it is never served either way).
            self._parser = None
        if self._backlog and not self._queue:  # the next request, if it has come whole, waits its turn
            kept, self._backlog = bytes(self._backlog), bytearray()
            self.resume(_QUEUE)
            self._read(kept)

    async def _run(self, request: DeviceHttpRequest) -> None:
        try:
            await self._serve(request)
        except ConnectionError:
            pass  # the device left, or stopped taking the answer (`drain`): the connection is cut, nobody to tell
        finally:
            if not request._answered:
                self.abort()  # the answer did not end (a stream cut short, a device too slow): so must the connection
            elif not request.keep_alive or self._winding or (request.body is not None and not request.body.complete):
                self._stop()
                self._queue.clear()
                self._backlog.clear()
                if request.body is not None and not request.body.complete:
                    request.body.let_go()  # up to BODY_HIGH, which the close would otherwise keep
            self._loop.call_soon(self._after, request)

    def _after(self, request: DeviceHttpRequest) -> None:
        if self.transport is None:
            return
        if self._task is not None and self._task.done():
            self._next()

    def _answer_unparsed(self, reason: str) -> None:
        self._stop()
        self._queue.clear()
        log.warning("request_unparsed", stage="request", peer=self.remote, reason=reason)
        # The reason is ours or llhttp's (a fixed description: no byte of the request is quoted), as aiohttp's server
        # says why; it used to be the same sentence for every shape, the reason in the log only.
        body = f"the request could not be parsed: {reason}\n".encode("utf-8", "replace")
        self.write(
            b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\nX-KCD-Refused-Stage: request\r\n"
            b"Connection: close\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body)
        )
        self._on_unparsed(self.remote, 400)
        self._close()

    # -- idle keep-alives closed for new devices ---------------------------------------------------------------

    def idle_since(self, quiet: bool = True) -> float | None:
        """Since when (the loop's time) the connection has been idle between two requests: at least one answered,
        nothing being served or queued, no byte of a next request read, and (with `quiet`) nothing moves on it
        (`TlsRecords.quiet`: none of the device's bytes unread, half a TLS record included, none of ours unsent);
        None when it is not so idle (a connection that has had no request yet, whose request may be on the wire, is
        not). What cannot be closed for a new device is not idle: not room for /readyz, and not closed. Without
        `quiet`, the cheap part only: the scan that orders connections by age (`proxy.tls.limits.IdleKeepAlives`)."""
        transport = self.transport
        if (
            self._heads == 0
            or self._task is not None
            or self._queue
            or self._backlog
            or self._head_seen
            or self._begun > self._heads
            or self._stopped
            or self._winding
            or transport is None
            or (isinstance(transport, TlsRecords) and not frees_a_slot(transport._closed))  # a health check's place
            or (quiet and isinstance(transport, TlsRecords) and not transport.quiet())
        ):
            return None
        return self._idle_since

    def close_idle(self, since: float) -> bool:
        """Close the connection for a new device at the cap (`proxy.tls.limits.IdleKeepAlives`) if it is still idle
        since `since` and nothing moves on it: a device's bytes waiting to be read (its next request, in the race) keep
        it open, to be served. Closed at once: our close_notify, then TCP's end (`TlsRecords.close_at_once`); a request
        the device sends after that reaches a closed socket, no byte of it read (the kernel answers with a reset)."""
        transport = self.transport
        if self.idle_since() != since or transport is None:
            return False
        if isinstance(transport, TlsRecords):  # quiet: `idle_since` asked it just now
            idle_closed(transport, since)
            self._stop()
            self._cancel_idle()
            transport.close_at_once()
        else:  # not over TLS records (a unit test's transport): closed as the idle timer closes it
            idle_closed(transport, since)
            self._stop()
            self._close()
        return True

    # -- writing -------------------------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    @property
    def write_paused(self) -> bool:
        """Whether the device is not taking our bytes now (`drain` would wait)."""
        return self._write_paused

    async def drain(self) -> None:
        """Wait while the device is not taking our bytes, at most `send_timeout`; then the connection is cut (no
        idle deadline runs while a request is served, and a local answer has no other bound)."""
        if self.transport is None:
            raise ConnectionResetError("the device closed the connection")
        if not self._write_paused:
            return
        try:
            async with asyncio.timeout(self._limits.send_timeout):
                while self._write_paused:
                    self._drain = self._loop.create_future()
                    await self._drain
        except TimeoutError:
            log.warning("device_send_stalled", peer=self.remote, waited_s=self._limits.send_timeout)
            self.abort()
            raise ConnectionResetError(
                "the device took none of the answer within listener.client_send_timeout"
            ) from None

    def _wake_drain(self, error: BaseException | None) -> None:
        waiter, self._drain = self._drain, None
        if waiter is not None and not waiter.done():
            if error is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(error)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    @property
    def winding_down(self) -> bool:
        return self._winding

    def wind_down(self, *, unused_too: bool) -> bool:
        """The gateway is stopping (SIGTERM; `proxy.app.drain` calls this until the connection is gone): a
        connection between two requests closes now; one serving a request answers it with `Connection: close` and
        then closes, serving nothing pipelined after it. One that has not begun a request yet (its handshake ended as
        the stop came: its request may be on the wire), or whose request head is still coming in, closes only when
        `unused_too`, once the drain has given it time to send one (a head a device sends whole; one still
        unfinished then is a slow client's, which would hold the stop for the whole drain_timeout). True once the
        connection owes the device nothing: closed, every byte of its answers handed to the kernel (the drain need
        not wait for the device's close_notify)."""
        self._winding = True
        if self._task is not None or self._queue:
            return False  # a request being served, or read whole and waiting its turn: it is answered
        if (self._heads == 0 or self._begun > self._heads) and not unused_too:
            return False
        self._stop()
        self._close()
        return self.transport is None or self.transport.get_write_buffer_size() == 0

    def close_after_answer(self) -> bool:
        """A health check's place of its own has had its time (`proxy.tls.proxy_protocol`): a request being served, or
        read whole and waiting its turn, is answered with `Connection: close`, then the connection closes (True), as
        `wind_down` does; False when no request is being answered, or a body is still coming (the caller resets the
        connection: served on, a body sent a byte at a time held the place as long as each gap stayed within
        `client_body_timeout`). A pipelined request whose body still comes behind the one being served is dropped
        unserved (nothing of it forwarded), as aiohttp's `close` does, and the one being served answered."""
        pipelined = self._parsing
        if (
            self._receiving is not None
            and pipelined is not None
            and pipelined in self._queue
            and self._task is not None
        ):
            self._stop()
            self._queue.remove(pipelined)
            self._parsing = self._receiving = None
        if (self._task is None and not self._queue) or self._receiving is not None:
            return False
        self._winding = True
        return True

    def _close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    # -- reading pauses and the idle deadline ----------------------------------------------------------------

    def pause(self, why: int) -> None:
        if not self._paused and self.transport is not None and not self._stopped:
            self.transport.pause_reading()
        self._paused |= why

    def resume(self, why: int) -> None:
        if not self._paused & why:
            return
        self._paused &= ~why
        if not self._paused and self.transport is not None and not self._stopped:
            self.transport.resume_reading()

    def _arm_idle(self) -> None:
        self._cancel_idle()
        if self._limits.keepalive_timeout > 0:
            self._idle = self._loop.call_later(self._limits.keepalive_timeout, self._idle_expired)

    def _cancel_idle(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None

    def _answer_head_timeout(self) -> None:
        """408 to a request whose head began and never ended (RFC 9110 15.5.9): the device saw its connection end
        without a word. Only once a request line has begun: an idle kept-alive connection, or one that sent nothing but
        the empty lines a server ignores before a request (an old client's CRLF after a body), gets none, since a
        request the device sends meanwhile would take the 408 as its answer."""
        body = f"the request's head was not complete within {self._limits.keepalive_timeout:g} s\n".encode()
        self.write(
            b"HTTP/1.1 408 Request Timeout\r\nContent-Type: text/plain; charset=utf-8\r\n"
            b"X-KCD-Refused-Stage: request\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body)
        )

    def _idle_expired(self) -> None:
        self._idle = None
        if self._task is None and not self._queue:  # no request is being served: a head never came whole
            peer = self.transport.get_extra_info("peername") if self.transport is not None else None
            # a request line begun and its head never ended: a slow or stalled client (slowloris), said so. Bytes
            # without one are the empty lines a server ignores before a request (an old client's CRLF after a body).
            if self._begun > self._heads:
                log.warning(
                    "request_head_timeout",
                    stage="request",
                    peer=peer_text(peer),
                    received=self._head_seen,
                    reason=f"the request's head was not complete {self._limits.keepalive_timeout:g} s after the "
                    "connection opened or the last answer ended (listener.keepalive_timeout)",
                )
                self._answer_head_timeout()
            elif self._heads == 0:
                # past its handshake, nothing but empty lines or TLS records of no data (KeyUpdates): held a slot for
                # keepalive_timeout and never asked anything, said at info as a handshake that timed out is
                log.info(
                    "device_sent_no_request",
                    peer=peer_text(peer),
                    reason=f"sent no request within {self._limits.keepalive_timeout:g} s of its TLS handshake "
                    "(listener.keepalive_timeout)",
                )
            else:
                log.debug("device_idle_closed", peer=peer_text(peer))
            self._stop()
            self._close()


def connection_factory(
    serve: Serve,
    limits: DeviceLimits,
    *,
    on_headers_refused: Callable[[], None],
    on_unparsed: Unparsed,
    connections: set[DeviceConnection],
) -> Callable[[], asyncio.Protocol]:
    """What `proxy.tls.server.gate_factory` hands each completed handshake to."""

    def make() -> asyncio.Protocol:
        return DeviceConnection(
            serve, limits, on_headers_refused=on_headers_refused, on_unparsed=on_unparsed, connections=connections
        )

    return make


def idle_connections(
    connections: set[DeviceConnection], quiet: bool = True
) -> Iterator[tuple[float, Callable[[float], bool]]]:
    """The connections idle between requests, as `proxy.tls.limits.IdleKeepAlives` scans them (`quiet`: as
    `DeviceConnection.idle_since` says)."""
    for connection in connections:
        since = connection.idle_since(quiet)
        if since is not None:
            yield since, connection.close_idle


def close_all(connections: set[DeviceConnection]) -> None:
    """At shutdown: every device connection closed (their requests' tasks are cancelled)."""
    for connection in list(connections):
        connection.abort()
