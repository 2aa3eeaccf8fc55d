"""The listener's own TLS handshake (`proxy.tls.server._Handshake`), attacked with devices that cut their flights.

For the gateway's own server the handshake is no longer asyncio's `SSLProtocol`: an `SSLObject` on memory BIOs is
stepped on each read. So these tests cut the device's flights where a hostile or careless one would (one byte at a
time, the request in the same write as the Finished message, application data before the handshake's end, a
reset after the ClientHello, a ClientHello dribbled past the timeout), against the lab's gateway and against a
bare `TlsGate` on both event loops.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from asyncio import sslproto
from collections.abc import Callable, Coroutine, MutableMapping
from pathlib import Path
from typing import Any

import pytest
import uvloop
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from structlog.testing import capture_logs

from proxy.lab.layout import LabLayout
from proxy.tls import server as tls_server
from proxy.tls.record import TlsRecords
from tests.integration.conftest import Gateway, client_context, s_client_resumed

GET = b"GET /EWS/Exchange.asmx HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}


class DeviceFlights:
    """A device's handshake by hand over a blocking socket: the test sends each flight as it chooses."""

    def __init__(
        self, lab: LabLayout, port: int, user: str | None = "alice", version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_3
    ) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        ctx = client_context(lab, user)
        ctx.minimum_version = ctx.maximum_version = version
        self.tls = ctx.wrap_bio(self.incoming, self.outgoing, server_hostname="127.0.0.1")
        with pytest.raises(ssl.SSLWantReadError):
            self.tls.do_handshake()
        self.hello = self.outgoing.read()

    def second_flight(self) -> bytes:
        """Reads the server's flight and returns the device's answer (its Certificate ... Finished), not yet sent."""
        while True:
            try:
                self.tls.do_handshake()
                return self.outgoing.read()
            except ssl.SSLWantReadError:
                data = self.sock.recv(1 << 16)
                assert data, "the gateway closed the connection during the handshake"
                self.incoming.write(data)

    def records(self, data: bytes) -> bytes:
        """`data` as TLS records, not yet sent."""
        self.tls.write(data)
        return self.outgoing.read()

    def send(self, data: bytes, *, step: int = 0) -> None:
        """`data` at once, or `step` bytes per write (each its own TCP segment: TCP_NODELAY and a pause)."""
        if not step:
            self.sock.sendall(data)
            return
        for i in range(0, len(data), step):
            self.sock.sendall(data[i : i + step])
            time.sleep(0.002)

    def answer(self) -> bytes:
        """Application data up to the end of an answer's head."""
        data = b""
        while b"\r\n\r\n" not in data:
            try:
                chunk = self.tls.read(1 << 16)
                assert chunk, f"close_notify after {data!r}"
                data += chunk
            except ssl.SSLWantReadError:
                received = self.sock.recv(1 << 16)
                assert received, f"the connection ended after {data!r}"
                self.incoming.write(received)
        return data

    def close(self) -> None:
        self.sock.close()


def served_as_alice(head: bytes) -> bool:
    return b" 200 " in head.split(b"\r\n", 1)[0] and b"x-lab-principal: alice@lab.test" in head.lower()


def test_a_handshake_cut_into_single_bytes_is_put_together(lab: LabLayout, gateway: Gateway) -> None:
    """A ClientHello one byte per TCP segment, and the device's second flight seven bytes per segment: every read
    steps the handshake, none is lost between steps, and the request is served as alice."""
    device = DeviceFlights(lab, gateway.port)
    try:
        device.send(device.hello, step=1)
        device.send(device.second_flight(), step=7)
        device.send(device.records(GET))
        assert served_as_alice(device.answer())
    finally:
        device.close()


def test_the_request_sent_with_the_finished_message_is_answered(lab: LabLayout, gateway: Gateway) -> None:
    """TLS 1.3 lets a device send its request with its Finished message, in one write: the request is read from
    what is left in the BIO when the handshake ends, and answered (not left waiting for a read that never comes)."""
    device = DeviceFlights(lab, gateway.port)
    try:
        device.send(device.hello)
        device.send(device.second_flight() + device.records(GET))
        assert served_as_alice(device.answer())
    finally:
        device.close()


def test_application_data_before_the_handshake_ends_is_refused_with_an_alert(lab: LabLayout, gateway: Gateway) -> None:
    """A device that sends an application data record of its own making after its ClientHello, instead of its
    certificate (TLS 1.2, where the alert is a plain record): the handshake is refused, OpenSSL's alert (a record
    of type 21) reaches the device before the end, and the refusal is logged with the device's address."""
    gateway.mark()
    device = DeviceFlights(lab, gateway.port, version=ssl.TLSVersion.TLSv1_2)
    try:
        device.send(device.hello)
        device.sock.settimeout(30)
        junk = b"\x17\x03\x03\x00\x40" + bytes(range(64))
        received = b""
        device.send(junk)
        while chunk := device.sock.recv(1 << 16):
            received += chunk
    finally:
        device.close()
    records = _record_types(received)
    assert records[-1] == 21, records  # the server's flight, then the alert, then FIN
    assert set(records[:-1]) == {22}, records
    event = gateway.wait_for("tls_handshake_refused", lambda e: str(e.get("peer", "")).startswith("127.0.0.1:"))
    assert "unexpected" in event["reason"], event


def _record_types(data: bytes) -> list[int]:
    """The content types of the TLS records in `data`, in order."""
    types = []
    while len(data) >= 5:
        types.append(data[0])
        data = data[5 + int.from_bytes(data[3:5], "big") :]
    return types


def test_a_reset_after_the_client_hello_is_an_abandoned_handshake(lab: LabLayout, gateway: Gateway) -> None:
    """A device that sends its ClientHello and resets: logged as an abandoned handshake (it sent a byte, so it is
    not an empty connection), and nothing is refused."""
    gateway.mark()
    device = DeviceFlights(lab, gateway.port)
    device.send(device.hello)
    device.second_flight()  # the gateway's flight has arrived: the ClientHello was read
    device.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    device.close()  # SO_LINGER 0: a reset
    gateway.wait_for("tls_handshake_abandoned", lambda e: "reset" in e["reason"].lower(), what="a reset")
    assert gateway.events("tls_handshake_refused", gateway.since) == []


def _run(loop: str, main: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        return runner.run(main())


def _server_context(lab: LabLayout) -> ssl.SSLContext:
    """The lab's server certificate, a client certificate required and verified against the lab's CAs."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(lab.pki_dir / "server-chain.pem", lab.pki_dir / "server.key")
    ctx.verify_mode = ssl.CERT_REQUIRED
    for ca in ("root.pem", "issuing.pem"):
        ctx.load_verify_locations(lab.pki_dir / ca)
    return ctx


class _Echo(asyncio.Protocol):
    """A server that takes the TLS records (as the gateway's own does) and echoes one read, then closes."""

    takes_tls_records = True

    def __init__(self, handed: asyncio.Future[asyncio.BaseTransport]) -> None:
        self._handed = handed

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._handed.set_result(transport)

    def data_received(self, data: bytes) -> None:
        transport = tls_server.socket_transport(self._handed.result())  # TlsRecords, or asyncio's for aiohttp's
        transport.write(data)
        transport.close()


@pytest.mark.parametrize("loop", LOOPS)
def test_no_asyncio_tls_protocol_is_made_for_the_gateways_own_server(
    lab: LabLayout, loop: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On both loops, a connection for a server that takes the TLS records is handshaken without asyncio's
    `SSLProtocol` (none is made) and handed a `TlsRecords` that carries the client certificate; one for aiohttp's
    server (no `takes_tls_records`) still gets asyncio's protocol."""
    made: list[object] = []
    original = sslproto.SSLProtocol.__init__

    def counting(self: sslproto.SSLProtocol, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        if self._server_side:  # not the test's own client (asyncio's loop)
            made.append(self)

    monkeypatch.setattr(sslproto.SSLProtocol, "__init__", counting)

    async def echo_once(own: bool) -> tuple[bytes, asyncio.BaseTransport]:
        handed: asyncio.Future[asyncio.BaseTransport] = asyncio.get_running_loop().create_future()
        ctx = _server_context(lab)

        def protocol() -> asyncio.Protocol:
            app = _Echo(handed)
            if not own:
                app.takes_tls_records = False
            return tls_server.TlsGate(app, ctx, 10)

        server = await asyncio.get_running_loop().create_server(protocol, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        client = client_context(lab, "alice")
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client, server_hostname="127.0.0.1")
        writer.write(b"ping")
        echoed = await asyncio.wait_for(reader.read(), 30)
        writer.close()
        server.close()
        return echoed, await handed

    async def both() -> None:
        echoed, transport = await echo_once(own=True)
        assert echoed == b"ping"
        assert type(transport) is TlsRecords
        alice = x509.load_pem_x509_certificates((lab.pki_dir / "users" / "alice.pem").read_bytes())[0]
        assert transport.get_extra_info("ssl_object").getpeercert(True) == alice.public_bytes(Encoding.DER)
        assert made == []
        server_side = len(made)
        echoed, transport = await echo_once(own=False)
        assert echoed == b"ping"
        assert type(transport) is not TlsRecords
        assert len(made) == server_side + 1  # aiohttp's server keeps asyncio's TLS protocol

    _run(loop, both)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_client_hello_dribbled_past_the_timeout_is_cut(lab: LabLayout, loop: str) -> None:
    """A device that sends its ClientHello a byte every 0.2 s keeps the handshake going with every read; the timeout
    bounds the whole handshake, not the time between reads: cut after 1 s (the gate's timeout), logged as abandoned
    in asyncio's words, and its slot given back once."""
    ctx = client_context(lab, "alice")
    hello_bio_in, hello_bio_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = ctx.wrap_bio(hello_bio_in, hello_bio_out, server_hostname="127.0.0.1")
    with pytest.raises(ssl.SSLWantReadError):
        client.do_handshake()
    hello = hello_bio_out.read()

    async def dribble() -> tuple[float, int, list[MutableMapping[str, Any]]]:
        given_back: list[None] = []
        slot_back = asyncio.Event()

        def closed() -> None:
            given_back.append(None)
            slot_back.set()

        handed: asyncio.Future[asyncio.BaseTransport] = asyncio.get_running_loop().create_future()
        gate_ctx = _server_context(lab)
        server = await asyncio.get_running_loop().create_server(
            lambda: tls_server.TlsGate(_Echo(handed), gate_ctx, 1.0, closed=closed),
            "127.0.0.1",
            0,
        )
        port = server.sockets[0].getsockname()[1]
        with capture_logs() as logs:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            started = time.monotonic()
            for byte in hello[:-1]:  # never the whole ClientHello: the handshake cannot end
                if reader.at_eof() or writer.is_closing():
                    break
                writer.write(bytes([byte]))
                try:
                    if await asyncio.wait_for(reader.read(1), 0.2) == b"":
                        break
                except TimeoutError:
                    continue
                except ConnectionError:
                    break
            waited = time.monotonic() - started
            writer.close()
            await asyncio.wait_for(slot_back.wait(), 30)
        server.close()
        assert not handed.done()
        return waited, len(given_back), logs

    waited, given_back, logs = _run(loop, dribble)
    assert 0.9 <= waited < 10, waited
    assert given_back == 1
    abandoned = [e for e in logs if e["event"] == "tls_handshake_abandoned"]
    assert len(abandoned) == 1, logs
    assert "taking longer" in abandoned[0]["reason"]


def test_one_session_ticket_per_handshake_and_the_device_resumes_with_it(
    lab: LabLayout, gateway: Gateway, tmp_path: Path
) -> None:
    """A TLS 1.3 device gets one session ticket per full handshake (OpenSSL's default is two, each costing a decode
    of the client certificate), resumes its next connection with it, and is served as alice again."""
    first, second = s_client_resumed(lab, gateway.port, "-tls1_3", tmp_path / "alice.session")
    assert first.count(b"New Session Ticket arrived") == 1, first
    assert b"x-lab-principal: alice@lab.test" in first.lower(), first
    assert b"Reused, TLSv1.3" in second, second
    assert b"x-lab-principal: alice@lab.test" in second.lower(), second
