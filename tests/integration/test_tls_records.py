"""The device's TLS connection after the handshake (`proxy.tls.record`), attacked with raw TLS clients.

Each test drives the gateway of the lab with Python's own TLS (an `SSLObject` over a raw socket where the
test decides how the records are cut), and checks what a device sees: close_notify before the end, records
split anywhere across reads, several records in one read, a large answer taken slowly, renegotiation refused.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import subprocess
import time
from collections.abc import Callable

import pytest

from proxy.lab.backend import body_pattern
from proxy.lab.layout import LabLayout
from proxy.tls import openssl
from proxy.tls import server as tls_server
from proxy.tls.record import SHUTDOWN_TIMEOUT, TlsRecords
from tests.integration.conftest import Gateway, client_context

PATH = b"/EWS/Exchange.asmx"


class RawTls:
    """A device's TLS by hand: an `SSLObject` and two memory BIOs over a blocking socket, records sent as cut."""

    def __init__(self, lab: LabLayout, port: int, user: str = "alice") -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        ctx = client_context(lab, user)
        ctx.maximum_version = ssl.TLSVersion.TLSv1_3
        self.tls = ctx.wrap_bio(self.incoming, self.outgoing, server_hostname="127.0.0.1")
        self.eof = False  # the TCP connection ended
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._flush()
                self._receive()
        self._flush()

    def records(self, *pieces: bytes) -> bytes:
        """The TLS records of `pieces`, one record (at least) per piece, not yet sent."""
        for piece in pieces:
            self.tls.write(piece)
        return self.outgoing.read()

    def send(self, data: bytes, *, step: int = 0, pause: float = 0.0) -> None:
        """Raw bytes on the wire, all at once or `step` bytes at a time with `pause` seconds between."""
        if not step:
            self.sock.sendall(data)
            return
        for i in range(0, len(data), step):
            self.sock.sendall(data[i : i + step])
            time.sleep(pause)

    def read(self, size: int = 1 << 16) -> bytes:
        """Application data (b"" at the gateway's close_notify); ssl.SSLEOFError if TCP ended without one."""
        while True:
            try:
                return self.tls.read(size)
            except ssl.SSLWantReadError:
                self._flush()
                if self.eof:
                    raise ssl.SSLEOFError("the connection ended without close_notify") from None
                self._receive()

    def answer(self) -> tuple[bytes, bytes]:
        """One answer with a Content-Length: its head and its body."""
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = self.read()
            assert chunk, f"the connection closed after {data!r}"
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = next(
            int(line.split(b":", 1)[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")
        )
        while len(body) < length:
            chunk = self.read()
            assert chunk, "the connection closed mid-body"
            body += chunk
        return head, body

    def close(self) -> None:
        self.sock.close()

    def _flush(self) -> None:
        if self.outgoing.pending:
            self.sock.sendall(self.outgoing.read())

    def _receive(self) -> None:
        data = self.sock.recv(1 << 16)
        if data:
            self.incoming.write(data)
        else:
            self.eof = True
            self.incoming.write_eof()


def get(path: bytes = PATH, extra: bytes = b"") -> bytes:
    return b"GET %b HTTP/1.1\r\nHost: 127.0.0.1\r\n%b\r\n" % (path, extra)


def test_the_gateway_ends_a_connection_with_close_notify(lab: LabLayout, gateway: Gateway) -> None:
    """An answer to `Connection: close` is followed by the gateway's close_notify, not a bare TCP end (a
    device cannot otherwise tell a whole answer from a cut one)."""
    device = RawTls(lab, gateway.port)
    try:
        device.send(device.records(get(extra=b"Connection: close\r\n")))
        head, _ = device.answer()
        assert head.startswith(b"HTTP/1.1 200 "), head
        assert device.read() == b""  # SSLEOFError here: TCP ended without close_notify
    finally:
        device.close()


def test_a_refused_request_still_ends_with_close_notify(lab: LabLayout, gateway: Gateway) -> None:
    """A request llhttp refuses (400, the connection closed by the server) ends with close_notify too."""
    device = RawTls(lab, gateway.port)
    try:
        device.send(device.records(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"))
        head, _ = device.answer()
        assert head.startswith(b"HTTP/1.1 400 "), head
        assert device.read() == b""
    finally:
        device.close()


def test_a_devices_close_notify_gets_the_gateways_and_the_end(lab: LabLayout, gateway: Gateway) -> None:
    """A device that sends close_notify after an answer gets the gateway's close_notify and the TCP end at
    once (not at the idle deadline, minutes later)."""
    device = RawTls(lab, gateway.port)
    try:
        device.send(device.records(get()))
        assert device.answer()[0].startswith(b"HTTP/1.1 200 ")
        device.sock.settimeout(10)  # well below listener.keepalive_timeout
        with pytest.raises(ssl.SSLWantReadError):
            device.tls.unwrap()  # ours sent; the gateway's awaited
        device.send(device.outgoing.read())
        while True:
            try:
                device.tls.unwrap()
                break
            except ssl.SSLWantReadError:
                assert not device.eof, "TCP ended without the gateway's close_notify"
                device._receive()
        assert device.sock.recv(1) == b""
    finally:
        device.close()


@pytest.mark.parametrize("step", [1, 5, 4096])
def test_records_split_across_reads_are_put_back_together(lab: LabLayout, gateway: Gateway, step: int) -> None:
    """Two requests, each in several TLS records, sent `step` bytes at a time (a record's header, its body and
    its tag in separate reads): both are answered, in order, on the one connection."""
    device = RawTls(lab, gateway.port)
    try:
        first = get(extra=b"X-Order: 1\r\n")
        second = get(extra=b"X-Order: 2\r\n")
        wire = device.records(first[:7], first[7:30], first[30:], second[:1], second[1:])
        device.send(wire, step=step, pause=0.002 if step < 4096 else 0.0)
        for _ in (first, second):
            head, body = device.answer()
            assert head.startswith(b"HTTP/1.1 200 "), head
            assert b"alice@LAB.TEST" in body
    finally:
        device.close()


def test_many_records_in_one_read_are_all_served(lab: LabLayout, gateway: Gateway) -> None:
    """Twenty requests, each its own record, in one send (one read for the gateway): twenty answers."""
    device = RawTls(lab, gateway.port)
    try:
        device.send(device.records(*[get(extra=b"X-Order: %d\r\n" % i) for i in range(20)]))
        for _ in range(20):
            head, _ = device.answer()
            assert head.startswith(b"HTTP/1.1 200 "), head
    finally:
        device.close()


def test_a_3mb_answer_taken_slowly_arrives_whole(lab: LabLayout, gateway: Gateway) -> None:
    """A 3 MB answer to a device that reads in small bites with pauses (the gateway's writes back up and wait):
    every byte arrives, in order, and the connection then serves the next request."""
    size = 3 * 1024 * 1024
    device = RawTls(lab, gateway.port)
    device.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
    try:
        device.send(device.records(get(b"/owa/big", b"X-Lab-Body-Bytes: %d\r\n" % size)))
        time.sleep(0.5)  # the gateway's socket buffer fills meanwhile
        data = b""
        while b"\r\n\r\n" not in data:
            data += device.read(4096)
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 "), head
        pieces = [body]
        received = len(body)
        while received < size:
            chunk = device.read(16 * 1024)
            assert chunk, f"the connection closed after {received} bytes"
            pieces.append(chunk)
            received += len(chunk)
            if len(pieces) % 16 == 0:
                time.sleep(0.01)
        assert b"".join(pieces) == body_pattern(size)
        device.send(device.records(get()))
        assert device.answer()[0].startswith(b"HTTP/1.1 200 ")
    finally:
        device.close()


def test_a_tls12_renegotiation_request_after_a_request_ends_the_connection(lab: LabLayout, gateway: Gateway) -> None:
    """TLS 1.2, after a request was served: a ClientHello on the connection (renegotiation, a chance to swap the
    certificate the stages judged) gets the no_renegotiation alert, no handshake, and the connection ends."""
    users = lab.pki_dir / "users"
    argv = ["openssl", "s_client", "-tls1_2", "-connect", f"127.0.0.1:{gateway.port}"]
    argv += ["-CAfile", str(lab.pki_dir / "root.pem"), "-cert", str(users / "alice.pem")]
    argv += ["-key", str(users / "alice.key")]
    with subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as proc:
        assert proc.stdin is not None
        assert proc.stdout is not None
        proc.stdin.write(get())
        proc.stdin.flush()
        seen = b""
        deadline = time.monotonic() + 30
        while b"alice@LAB.TEST" not in seen:
            assert time.monotonic() < deadline, seen
            chunk = os.read(proc.stdout.fileno(), 65536)
            assert chunk, seen
            seen += chunk
        proc.stdin.write(b"R\n")  # s_client's command: renegotiate
        proc.stdin.flush()
        try:
            rest = proc.communicate(timeout=30)[0]  # stdin stays open: only the gateway can end it
        except subprocess.TimeoutExpired:
            proc.kill()
            raise AssertionError("the connection survived a renegotiation request") from None
    assert b"RENEGOTIATING" in rest, rest
    assert b"no renegotiation" in rest, rest


async def _gated(
    lab: LabLayout, protocol: Callable[[], asyncio.Protocol]
) -> tuple[asyncio.Server, asyncio.StreamReader, asyncio.StreamWriter]:
    """A listener's TLS gate (the lab's server certificate) in front of `protocol`, and a client connected to it."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(lab.pki_dir / "server-chain.pem", lab.pki_dir / "server.key")
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: tls_server.TlsGate(protocol(), ctx, 10), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = ssl.create_default_context(cafile=str(lab.pki_dir / "root.pem"))
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client, server_hostname="127.0.0.1")
    return server, reader, writer


def test_the_handshaken_connection_is_taken_from_asyncio(lab: LabLayout, monkeypatch: pytest.MonkeyPatch) -> None:
    """After the listener's handshake the gateway's own server is handed a `TlsRecords`, not asyncio's TLS
    transport, reading and writing through new memory BIOs (the handshake's buffers freed): fails if asyncio's
    `SSLProtocol` stops having what `_take_records` takes, or if CPython's objects stop having the layout
    `fresh_bios` expects (a CPython upgrade)."""
    swapped: list[tuple[ssl.MemoryBIO, ssl.MemoryBIO] | None] = []

    def fresh_bios(
        sslobj: ssl.SSLObject, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO
    ) -> tuple[ssl.MemoryBIO, ssl.MemoryBIO] | None:
        swapped.append(openssl.fresh_bios(sslobj, incoming, outgoing))
        return swapped[-1]

    monkeypatch.setattr(tls_server, "fresh_bios", fresh_bios)

    async def run() -> type:
        handed: asyncio.Future[asyncio.BaseTransport] = asyncio.get_running_loop().create_future()

        class Server(asyncio.Protocol):
            takes_tls_records = True

            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                handed.set_result(transport)

            def data_received(self, data: bytes) -> None:
                transport = handed.result()
                assert isinstance(transport, asyncio.WriteTransport)
                transport.write(data)
                transport.close()

        server, reader, writer = await _gated(lab, Server)
        writer.write(b"ping")
        assert await asyncio.wait_for(reader.read(), 30) == b"ping"  # then EOF: the close_notify
        writer.close()
        transport = await handed
        server.close()
        ssl_object = transport.get_extra_info("ssl_object")
        assert isinstance(ssl_object, ssl.SSLObject)  # what the certificate stages read the client certificate from
        assert transport.get_extra_info("cipher") == ssl_object.cipher()
        assert transport.get_extra_info("peername")[0] == "127.0.0.1"
        assert len(swapped) == 1
        assert swapped[0] is not None, "the handshake's BIOs were kept"
        fresh_in, fresh_out = swapped[0]
        assert (transport._incoming, transport._outgoing) == (fresh_in, fresh_out)  # type: ignore[attr-defined]
        return type(transport)

    assert asyncio.run(run()) is TlsRecords


def test_bios_grown_by_a_large_answer_are_replaced_between_requests(
    lab: LabLayout, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A BIO keeps the largest buffer it needed: after an answer of 64 KiB the connection's BIOs are replaced
    `RELEASE_AFTER` after the server waits for the next request (nothing is due after small answers), and the
    connection goes on through the new ones: fails when `between_requests` keeps the grown BIOs."""
    from proxy.tls import record

    swaps: list[tuple[ssl.MemoryBIO, ssl.MemoryBIO] | None] = []
    swapped = asyncio.Event()

    def fresh_bios(
        sslobj: ssl.SSLObject, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO
    ) -> tuple[ssl.MemoryBIO, ssl.MemoryBIO] | None:
        swaps.append(openssl.fresh_bios(sslobj, incoming, outgoing))
        swapped.set()
        return swaps[-1]

    monkeypatch.setattr(record, "fresh_bios", fresh_bios)
    monkeypatch.setattr(record, "RELEASE_AFTER", 0.2)

    async def run() -> None:
        handed: asyncio.Future[TlsRecords] = asyncio.get_running_loop().create_future()
        due: list[bool] = []  # after each answer: is a replacement due?

        class Server(asyncio.Protocol):
            takes_tls_records = True

            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                assert isinstance(transport, TlsRecords)
                handed.set_result(transport)

            def data_received(self, data: bytes) -> None:
                transport = handed.result()
                size = int(data)
                transport.write(b"x" * size)
                transport.between_requests()
                due.append(transport._release is not None)
                if size == 0:
                    transport.close()

        server, reader, writer = await _gated(lab, Server)

        async def exchange(size: int) -> None:
            writer.write(b"%d" % size)
            assert len(await asyncio.wait_for(reader.readexactly(size), 30)) == size

        await exchange(1000)
        await exchange(65536)
        assert due == [False, True]
        assert swaps == []  # not at once
        await asyncio.wait_for(swapped.wait(), 30)
        assert len(swaps) == 1
        assert swaps[0] is not None
        await exchange(1000)
        await exchange(0)
        assert due == [False, True, False, False]
        assert await asyncio.wait_for(reader.read(), 30) == b""  # the close_notify, through the new BIOs
        writer.close()
        transport = await handed
        server.close()
        assert (transport._incoming, transport._outgoing) == swaps[0]

    asyncio.run(run())


@pytest.mark.parametrize(
    ("late_bytes", "together"),
    [(0, True), (0, False), (256 * 1024, True), (256 * 1024, False)],
    ids=["request-one-read", "request-two-reads", "256k-one-read", "256k-two-reads"],
)
def test_data_after_the_gateways_close_notify_is_discarded_and_the_devices_ends_it(
    lab: LabLayout, gateway: Gateway, late_bytes: int, together: bool
) -> None:
    """After the gateway's close_notify, a device still sends a request (discarded) and then its close_notify, in
    the same read or later: the gateway ends the TCP connection cleanly at once (no reset, which can destroy an
    answer the device has not read yet; no wait for the shutdown timeout)."""
    device = RawTls(lab, gateway.port)
    try:
        device.send(device.records(get(extra=b"Connection: close\r\n")))
        assert device.answer()[0].startswith(b"HTTP/1.1 200 ")
        assert device.read() == b""  # the gateway's close_notify: it waits for the device's
        late = device.records(get(extra=b"X-Order: late\r\n"), *[b"x" * 16384] * (late_bytes // 16384))
        device.tls.unwrap()  # the device's close_notify (the gateway's was read: this completes)
        farewell = device.outgoing.read()
        if together:
            device.send(late + farewell)
        else:
            device.send(late)
            time.sleep(0.2)  # the request reaches the gateway in a read of its own
            device.send(farewell)
        device.sock.settimeout(SHUTDOWN_TIMEOUT / 2)
        assert device.sock.recv(1) == b""  # a reset raises ConnectionResetError; a wait, TimeoutError
    finally:
        device.close()


def test_a_device_that_ends_tcp_without_close_notify_gets_the_end_at_once(lab: LabLayout, gateway: Gateway) -> None:
    """A device that ends its TCP side without close_notify (a truncation, or a careless client) gets the TCP end
    at once, and no close_notify after it (asyncio's rule: none is sent after the peer's TCP end)."""
    device = RawTls(lab, gateway.port)
    try:
        device.send(device.records(get()))
        assert device.answer()[0].startswith(b"HTTP/1.1 200 ")
        device.sock.shutdown(socket.SHUT_WR)
        device.sock.settimeout(SHUTDOWN_TIMEOUT / 2)
        with pytest.raises(ssl.SSLEOFError):
            device.read()
    finally:
        device.close()
