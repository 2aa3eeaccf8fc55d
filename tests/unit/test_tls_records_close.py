"""`TlsRecords.close`: the gateway's close_notify, then the device's, with the records cut every way they can come.

The device is an `SSLObject` over memory BIOs, the gateway's socket transport a recorder: each test sees whether the
connection ended cleanly (the socket transport's `close`, after the gateway's close_notify), was aborted, or waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl

import pytest

from proxy.tls.record import DISCARD_LIMIT, TlsRecords
from tests.pem import write_self_signed


class Stream:
    """The socket transport under `TlsRecords`: what was written, how it ended, whether it reads."""

    def __init__(self) -> None:
        self.sent = b""
        self.ended: str | None = None
        self.reading = True

    def write(self, data: bytes) -> None:
        self.sent += bytes(data)

    def close(self) -> None:
        self.ended = self.ended or "close"

    def abort(self) -> None:
        self.ended = self.ended or "abort"

    def is_closing(self) -> bool:
        return self.ended is not None

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def get_extra_info(self, name: str, default: object = None) -> object:
        return default


class Server(asyncio.Protocol):
    def __init__(self) -> None:
        self.data = b""

    def data_received(self, data: bytes) -> None:
        self.data += data


@pytest.fixture(scope="module")
def contexts(tmp_path_factory: pytest.TempPathFactory) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(*write_self_signed(tmp_path_factory.mktemp("tls"), "gateway"))
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    client.verify_mode = ssl.CERT_NONE
    return server, client


class Connection:
    """A handshaken connection: the device's `SSLObject`, and the gateway's `TlsRecords` over a `Stream`."""

    def __init__(self, contexts: tuple[ssl.SSLContext, ssl.SSLContext], version: ssl.TLSVersion) -> None:
        server_ctx, client_ctx = contexts
        client_ctx.maximum_version = version
        self.incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.device_in, self.device_out = ssl.MemoryBIO(), ssl.MemoryBIO()
        gateway = server_ctx.wrap_bio(self.incoming, outgoing, server_side=True)
        self.device = client_ctx.wrap_bio(self.device_in, self.device_out)
        for _ in range(8):
            for side in (self.device, gateway):
                with contextlib.suppress(ssl.SSLWantReadError):
                    side.do_handshake()
            self.incoming.write(self.device_out.read())
            self.device_in.write(outgoing.read())
            if gateway.version() is not None and self.device.version() is not None:
                break
        assert gateway.version() == self.device.version() == version.name.replace("_", ".")
        self.buffer = bytearray(64 * 1024)
        self.stream = Stream()
        self.records = TlsRecords(
            self.stream,  # type: ignore[arg-type]
            gateway,
            self.incoming,
            outgoing,
            (self.buffer, memoryview(self.buffer)),
        )
        self.server = Server()
        self.records.set_protocol(self.server)

    def read(self, data: bytes) -> None:
        """One read of the gateway's socket transport."""
        memoryview(self.buffer)[: len(data)] = data
        self.records.buffer_updated(len(data))

    def device_records(self, data: bytes, *, close_notify: bool) -> bytes:
        """What the device sends: `data` in records, then its close_notify if asked."""
        if data:
            self.device.write(data)
        if close_notify:
            with contextlib.suppress(ssl.SSLWantReadError):  # sent, read or not the gateway's
                self.device.unwrap()
        return self.device_out.read()

    def gateways_close_notify_seen(self) -> bool:
        self.device_in.write(self.stream.sent)
        self.stream.sent = b""
        try:
            return self.device.read(1024) == b""
        except ssl.SSLZeroReturnError:
            return True
        except ssl.SSLWantReadError:
            return False


async def _connection(contexts: tuple[ssl.SSLContext, ssl.SSLContext], version: ssl.TLSVersion) -> Connection:
    return Connection(contexts, version)


VERSIONS = [ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2]
LATE = [b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", b"x" * 40_000]


@pytest.mark.parametrize("version", VERSIONS, ids=["tls1.3", "tls1.2"])
@pytest.mark.parametrize("late", LATE, ids=["request", "40k"])
def test_data_and_close_notify_in_one_read_after_ours_end_the_connection_cleanly(
    contexts: tuple[ssl.SSLContext, ssl.SSLContext], version: ssl.TLSVersion, late: bytes
) -> None:
    """The gateway closes; the device's data and its close_notify then come in one read: the data is discarded
    and the connection ends cleanly in that read (no abort, no wait for SHUTDOWN_TIMEOUT)."""

    async def run() -> None:
        c = await _connection(contexts, version)
        c.records.close()
        assert c.gateways_close_notify_seen()
        c.read(c.device_records(late, close_notify=True))
        assert c.stream.ended == "close"
        assert c.server.data == b""

    asyncio.run(run())


@pytest.mark.parametrize("version", VERSIONS, ids=["tls1.3", "tls1.2"])
def test_data_after_ours_is_discarded_and_the_close_waits_for_the_devices_close_notify(
    contexts: tuple[ssl.SSLContext, ssl.SSLContext], version: ssl.TLSVersion
) -> None:
    """Data alone after the gateway's close_notify (cut anywhere across reads) is discarded and the close goes on
    waiting; the device's close_notify, in a later read, ends the connection cleanly."""

    async def run() -> None:
        c = await _connection(contexts, version)
        c.records.close()
        wire = c.device_records(b"y" * 40_000, close_notify=False)
        for at in range(0, len(wire), 7_001):
            c.read(wire[at : at + 7_001])
            assert c.stream.ended is None
        c.read(c.device_records(b"", close_notify=True))
        assert c.stream.ended == "close"
        assert c.server.data == b""

    asyncio.run(run())


@pytest.mark.parametrize("version", VERSIONS, ids=["tls1.3", "tls1.2"])
def test_a_close_while_data_and_close_notify_wait_unread_ends_the_connection_cleanly(
    contexts: tuple[ssl.SSLContext, ssl.SSLContext], version: ssl.TLSVersion
) -> None:
    """Reading paused by the server (pipelined bytes behind a request being served), the device's next request
    and close_notify are held in the BIO when the gateway closes: discarded, and the connection ends at once."""

    async def run() -> None:
        c = await _connection(contexts, version)
        c.records.pause_reading()
        c.read(c.device_records(LATE[0], close_notify=True))
        assert c.stream.ended is None
        c.records.close()
        assert c.stream.ended == "close"
        assert c.server.data == b""

    asyncio.run(run())


@pytest.mark.parametrize("version", VERSIONS, ids=["tls1.3", "tls1.2"])
def test_the_devices_close_notify_alone_after_ours_ends_the_connection(
    contexts: tuple[ssl.SSLContext, ssl.SSLContext], version: ssl.TLSVersion
) -> None:
    """The plain case stays as it was: the gateway's close_notify, the device's, a clean end."""

    async def run() -> None:
        c = await _connection(contexts, version)
        c.records.close()
        assert c.stream.ended is None
        assert c.gateways_close_notify_seen()
        c.read(c.device_records(b"", close_notify=True))
        assert c.stream.ended == "close"

    asyncio.run(run())


def test_a_device_streaming_at_a_closed_connection_is_aborted(contexts: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    """Data after the gateway's close_notify is discarded up to DISCARD_LIMIT bytes; a device that goes on sending
    without its close_notify is then aborted, not decrypted for the whole shutdown timeout."""

    async def run() -> None:
        c = await _connection(contexts, ssl.TLSVersion.TLSv1_3)
        c.records.close()
        sent = 0
        while c.stream.ended is None:
            c.read(c.device_records(b"z" * 16_000, close_notify=False))
            sent += 16_000
            assert sent <= DISCARD_LIMIT + 16_000
        assert c.stream.ended == "abort"
        assert sent > DISCARD_LIMIT

    asyncio.run(run())
