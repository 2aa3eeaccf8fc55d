"""The device's TLS records after the handshake, without asyncio's `SSLProtocol`.

Theory of operation. The handshake is the listener's (`proxy.tls.server._Handshake`, with its alerts, timeout,
chain caps and PROXY header). Once it is done, the connection's `ssl.SSLObject` and its two memory BIOs
(new ones: the handshake's flights are left behind) are driven here, by one object that is both the socket
transport's (buffered) protocol and the device-side server's transport:

- reading: the socket transport reads into the per-thread buffer (`proxy.tls.server._read_buffer`); the
  bytes go into the incoming BIO and every whole record is decrypted and handed to the server in one
  `data_received`. Records split across reads wait in the BIO for their rest. Reading stops asking OpenSSL
  once neither the BIO nor the `SSLObject` holds anything (no `SSLWantReadError` raised per read);
- writing: the server's bytes are encrypted at once and the records handed to the socket transport in one
  `write` (one `send` when the socket takes them); the socket transport's flow control (`pause_writing`,
  `resume_writing`) is the server's;
- whatever OpenSSL answers by itself while reading (a refused TLS 1.2 renegotiation's alert, a TLS 1.3
  KeyUpdate) is sent after each read; when the socket transport already holds more than its high-water mark of
  our records (`pause_writing`) and OpenSSL's answers handed to it since pass `ANSWERS_HELD` bytes, reading from the
  device stops until it has taken them (`resume_writing`): a device that sent KeyUpdates asking for the gateway's and
  read nothing had the gateway keep every answer, 4.4 MB for 8 MB of them, until the connection ended
  (docs/hardening.md, section 17). Not at the first answer: a device that renews its keys mid-upload while it reads
  nothing until its upload is sent (the backend's answer filling the socket's buffers meanwhile) then waited for
  `client_body_timeout` (OpenSSL 3.0 writes its answer to a KeyUpdate at the gateway's next write, or as it reads
  the next KeyUpdate: two did it); a device's KeyUpdate is rare (a TLS stack renews its keys after gigabytes), and
  `ANSWERS_HELD` is over two thousand of the gateway's;
- closing sends close_notify and waits for the device's, at most `SHUTDOWN_TIMEOUT` seconds (asyncio's
  rule), reading and discarding what else arrives (in the same read as the device's close_notify or not; at most
  `DISCARD_LIMIT` bytes, then the connection is aborted);
  the device's close_notify or a TCP end is the server's `eof_received`, and then the connection closes.

A memory BIO keeps the largest buffer it ever needed for the connection's life (OpenSSL's `BUF_MEM` never
shrinks): the handshake's flights, and then any large answer or upload, about 4/3 of the most bytes it held
at once (a 64 KiB answer: about 100 KiB per connection, kept through a long-poll held afterwards). So the
BIOs are replaced by empty ones when the connection is taken over, and `RELEASE_AFTER` seconds after the
server waits for the device's next request (`between_requests`) if one of them held more than
`KEEP_BIO_BYTES` (`proxy.tls.openssl.fresh_bios`: about 8 µs, and the old buffers are wiped as they are
freed). Not at once: a device fetching large answers one after another would pay for new buffers on every
request; this way a connection pays at most once a second, and a long-poll held after a large answer is
held without them.

Why: asyncio's protocol, its application transport and their buffers and state were 2.7 KiB of Python
(3.5 KiB of RSS) of every held long-poll, the gateway's binding limit in front of Exchange; a keep-alive
request costs 1-2% less CPU (docs/performance.md, "The device's TLS records"). Not done: taking the socket
out of the loop's transport as well (`add_reader`, `recv_into`, `send`): about 1 µs more a request in a
micro-benchmark, asyncio's loop only, and the write buffering and flow control would be ours to keep.
"""

from __future__ import annotations

import asyncio
import fcntl
import ssl
import struct
import termios
from collections.abc import Callable
from typing import Any

from proxy.tls.openssl import fresh_bios, holds_device_bytes

SHUTDOWN_TIMEOUT = 30.0  # asyncio's ssl_shutdown_timeout: how long a close waits for the device's close_notify
KEEP_BIO_BYTES = 8 * 1024  # a BIO that held more at once is replaced between requests
RELEASE_AFTER = 1.0  # seconds from the end of such an exchange to the replacement
# Bytes of application data read and discarded while a close waits for the device's close_notify; past that the
# device is streaming at a closed connection, and it is aborted (decrypting its bytes costs the gateway CPU).
DISCARD_LIMIT = 1024 * 1024
_READ = 32 * 1024
# Bytes of OpenSSL's own answers (KeyUpdates, alerts) handed to the socket transport while it is over its high-water
# mark, past which reading from the device stops until it takes our records: 27 bytes a KeyUpdate.
ANSWERS_HELD = 64 * 1024

_OPEN, _SHUTDOWN, _CLOSED = 0, 1, 2


def unread_bytes(transport: asyncio.BaseTransport) -> int:
    """Bytes the device sent that wait unread in the socket's receive queue (FIONREAD); 0 without a socket."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return 0
    try:
        return int(struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0])
    except OSError:
        return 0


class TlsRecords(asyncio.BufferedProtocol, asyncio.Transport):
    """The TLS connection's transport for the server, and the socket transport's protocol."""

    __slots__ = (
        "_answered",
        "_app",
        "_app_paused",
        "_buffer",
        "_closed",
        "_discarded",
        "_grown",
        "_held",
        "_incoming",
        "_loop",
        "_outgoing",
        "_peername",
        "_release",
        "_send_paused",
        "_sslobj",
        "_state",
        "_stream",
        "_timer",
        "_view",
    )

    def __init__(
        self,
        stream: asyncio.Transport,
        sslobj: ssl.SSLObject,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
        buffer: tuple[bytearray, memoryview],
        *,
        peername: object = None,
        closed: Callable[[], None] = lambda: None,
    ) -> None:
        super().__init__()
        self._loop = asyncio.get_running_loop()
        self._stream = stream
        self._sslobj = sslobj
        self._incoming = incoming
        self._outgoing = outgoing
        self._buffer, self._view = buffer
        self._peername = peername
        self._closed = closed
        self._app: asyncio.Protocol | None = None
        self._app_paused = False
        self._state = _OPEN
        self._timer: asyncio.TimerHandle | None = None
        self._grown = False  # a BIO held more than KEEP_BIO_BYTES since it was made
        self._release: asyncio.TimerHandle | None = None  # the replacement, when one is due
        self._discarded = 0  # application data bytes read and discarded since close()
        self._send_paused = False  # the socket transport holds more than its high-water mark of our records
        self._held = False  # reading stopped: OpenSSL answered the device by itself while it took none of our records
        self._answered = 0  # bytes OpenSSL answered by itself since the socket transport went over its high-water mark

    # -- the socket transport's protocol ----------------------------------------------------------------------

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._view

    def buffer_updated(self, nbytes: int) -> None:
        self._incoming.write(self._view[:nbytes])
        if self._incoming.pending > KEEP_BIO_BYTES:
            self._grown = True
        if self._state == _OPEN:
            if not self._app_paused and not self._held:
                self._read()
        elif self._state == _SHUTDOWN:
            self._shutdown()

    def eof_received(self) -> bool | None:
        if self._state == _OPEN:
            self._state = _SHUTDOWN  # no close_notify of ours after the device's TCP end (asyncio's rule)
            if self._app is not None:
                self._app.eof_received()
        return False  # the socket transport closes

    def connection_lost(self, exc: Exception | None) -> None:
        self._state = _CLOSED
        if self._release is not None:
            self._release.cancel()
            self._release = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        app, self._app = self._app, None
        if app is not None:
            app.connection_lost(exc)
        self._closed()

    def pause_writing(self) -> None:
        self._send_paused = True
        if self._app is not None:
            self._app.pause_writing()

    def resume_writing(self) -> None:
        self._send_paused, self._answered = False, 0
        if self._held:  # the device took our records: its own are read again
            self._held = False
            if self._state == _OPEN and not self._app_paused:
                self._stream.resume_reading()
                if self._incoming.pending or self._sslobj.pending():
                    self._loop.call_soon(self._resume_read)
        if self._app is not None:
            self._app.resume_writing()

    # -- records -------------------------------------------------------------------------------------------

    def _read(self) -> None:
        sslobj, incoming = self._sslobj, self._incoming
        data: list[bytes] = []
        ended = False
        try:
            while True:
                chunk = sslobj.read(_READ)
                if not chunk:
                    ended = True  # the device's close_notify
                    break
                data.append(chunk)
                if not incoming.pending and not sslobj.pending():
                    break
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLError:
            self._flush()  # OpenSSL's alert, if it wrote one
            self._stream.abort()
            return
        answered = self._flush()  # what OpenSSL wrote by itself
        if answered and self._send_paused:
            self._answered += answered
            if self._answered > ANSWERS_HELD and not self._held:
                self._held = True
                if not self._app_paused:
                    self._stream.pause_reading()
        app = self._app
        if data and app is not None:
            app.data_received(data[0] if len(data) == 1 else b"".join(data))
        if ended and self._state == _OPEN:
            if self._app is not None:
                self._app.eof_received()
            self.close()

    def read_early(self) -> None:
        """Serve what the device sent with its Finished message, already in the incoming BIO when the server was given
        this transport (TLS 1.3 clients often send their request at once)."""
        if self._incoming.pending and self._state == _OPEN and not self._app_paused and not self._held:
            self._read()

    def _flush(self) -> int:
        """Hand what OpenSSL wrote to the socket transport; how many bytes."""
        if not self._outgoing.pending:
            return 0
        records = self._outgoing.read()
        if len(records) > KEEP_BIO_BYTES:
            self._grown = True
        self._stream.write(records)
        return len(records)

    def between_requests(self) -> None:
        """The server waits for the device's next request: if a BIO held more than `KEEP_BIO_BYTES` for the last
        exchange (a large answer, an upload), both are replaced by empty ones `RELEASE_AFTER` seconds later, so
        that what the connection does next, a long-poll held for half an hour say, does not keep their buffers."""
        if self._grown and self._release is None and self._state == _OPEN:
            self._release = self._loop.call_later(RELEASE_AFTER, self._release_bios)

    def _release_bios(self) -> None:
        self._release = None
        if self._state != _OPEN or self._outgoing.pending:
            return
        self._grown = False
        fresh = fresh_bios(self._sslobj, self._incoming, self._outgoing)
        if fresh is not None:
            self._incoming, self._outgoing = fresh

    def _shutdown(self) -> None:
        """Our close_notify, then the device's awaited. What the device still sends first is read and discarded:
        asked to wait for the device's close_notify while application data comes, OpenSSL's `SSL_shutdown` fails
        (APPLICATION_DATA_AFTER_CLOSE_NOTIFY), and the connection was then aborted, a reset when more of those
        bytes were still unread (a reset can destroy the answer's end before the device reads it). A device that
        goes on sending past `DISCARD_LIMIT` bytes is aborted."""
        sslobj = self._sslobj
        try:
            while chunk := sslobj.read(_READ):  # b"": the device's close_notify, before ours was sent
                self._discarded += len(chunk)
                if self._discarded > DISCARD_LIMIT:
                    self._stream.abort()
                    return
        except ssl.SSLZeroReturnError:  # the device's close_notify, after ours
            pass
        except ssl.SSLWantReadError:  # everything read: the device's close_notify is still to come
            pass
        except ssl.SSLError:
            self._flush()  # OpenSSL's alert, if it wrote one
            self._stream.abort()
            return
        try:
            sslobj.unwrap()
        except ssl.SSLWantReadError:
            self._flush()  # our close_notify; the device's is awaited
            return
        except ssl.SSLError:
            self._stream.abort()
            return
        except ValueError:  # the SSLObject is already unwrapped
            pass
        self._flush()
        self._stream.close()

    def _shutdown_expired(self) -> None:
        self._timer = None
        if self._state == _SHUTDOWN:
            self._stream.abort()

    # -- the server's transport --------------------------------------------------------------------------

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._app = protocol  # type: ignore[assignment]

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._app  # type: ignore[return-value]

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "ssl_object":
            return self._sslobj
        if name == "peername" and self._peername is not None:
            return self._peername
        if name == "sslcontext":
            return self._sslobj.context
        if name == "peercert":
            return self._sslobj.getpeercert()
        if name == "cipher":
            return self._sslobj.cipher()
        if name == "compression":
            return self._sslobj.compression()
        return self._stream.get_extra_info(name, default)

    def is_closing(self) -> bool:
        return self._state != _OPEN or self._stream.is_closing()

    def is_reading(self) -> bool:
        return not self._app_paused

    def pause_reading(self) -> None:
        if not self._app_paused:
            self._app_paused = True
            if not self._held:
                self._stream.pause_reading()

    def resume_reading(self) -> None:
        if self._app_paused:
            self._app_paused = False
            if self._held:  # until the device takes our records (`resume_writing`)
                return
            self._stream.resume_reading()
            if self._incoming.pending or self._sslobj.pending():
                self._loop.call_soon(self._resume_read)

    def _resume_read(self) -> None:
        if self._state == _OPEN and not self._app_paused and not self._held:
            self._read()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._state != _OPEN:
            return
        view = memoryview(data)
        try:
            while view:
                n = self._sslobj.write(view)
                view = view[n:]
        except ssl.SSLError:
            self._stream.abort()
            return
        self._flush()

    def writelines(self, list_of_data: Any) -> None:
        self.write(b"".join(list_of_data))

    def can_write_eof(self) -> bool:
        return False

    def write_eof(self) -> None:
        raise NotImplementedError("TLS has no half-close: close() sends close_notify")

    def get_write_buffer_size(self) -> int:
        return self._stream.get_write_buffer_size()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._stream.set_write_buffer_limits(high, low)

    def close(self) -> None:
        if self._state != _OPEN:
            return
        self._state = _SHUTDOWN
        self._timer = self._loop.call_later(SHUTDOWN_TIMEOUT, self._shutdown_expired)
        if self._app_paused or self._held:  # the device's close_notify must be read
            self._app_paused = self._held = False
            self._stream.resume_reading()
        self._shutdown()

    def abort(self) -> None:
        self._state = _CLOSED
        self._stream.abort()

    def quiet(self) -> bool:
        """Whether nothing moves on the connection: no byte of the device's waits to be read (in the socket, the
        incoming BIO or OpenSSL), none of ours to be sent, and it is open (an idle keep-alive may be closed now)."""
        return (
            self._state == _OPEN
            and not self._incoming.pending
            and not holds_device_bytes(self._sslobj, self._incoming)  # half a record included
            and not self._outgoing.pending
            and self._stream.get_write_buffer_size() == 0
            and unread_bytes(self._stream) == 0
        )

    def close_at_once(self) -> None:
        """Our close_notify, then the TCP connection closed without waiting for the device's (nginx's
        `no_wait_shutdown` for keep-alive connections): an idle keep-alive closed for a new device gives its slot back
        now, not when the device answers (a device that reads nothing while idle would hold it `SHUTDOWN_TIMEOUT`)."""
        if self._state != _OPEN:
            return
        self._state = _SHUTDOWN  # nothing more is written or read
        try:
            self._sslobj.unwrap()
        except ssl.SSLWantReadError:  # ours is written; the device's is not awaited
            pass
        except (ssl.SSLError, ValueError):
            self._stream.abort()
            return
        self._flush()
        self._stream.close()
