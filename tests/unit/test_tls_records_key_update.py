"""`TlsRecords` and the device's TLS 1.3 KeyUpdates while the gateway's socket transport is over its high-water mark:
a KeyUpdate or two (a device renewing its keys mid-upload) never stops the gateway reading the device; a flood of them
that reads none of the gateway's answers does (`proxy.tls.record`).

The device is an `SSLObject` over memory BIOs whose KeyUpdates OpenSSL makes (`SSL_key_update`, through ctypes as
`proxy.tls.openssl` reaches the `SSL`); the gateway's socket transport a recorder (`test_tls_records_close.Stream`).
"""

from __future__ import annotations

import asyncio
import ctypes
import ssl

from proxy.tls.openssl import _ssl as _ssl_pointer
from proxy.tls.record import ANSWERS_HELD
from tests.unit.test_tls_records_close import Connection, contexts

__all__ = ["contexts"]  # the fixture, shared with the close tests


def _key_updates(conn: Connection, count: int) -> bytes:
    """`count` KeyUpdates from the device, each asking for the gateway's, as records."""
    lib = ctypes.CDLL(ssl._ssl.__file__)  # type: ignore[attr-defined]
    lib.SSL_key_update.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.SSL_do_handshake.argtypes = [ctypes.c_void_p]
    pointer = _ssl_pointer(conn.device)
    assert pointer is not None
    for _ in range(count):
        assert lib.SSL_key_update(pointer, 1) == 1  # SSL_KEY_UPDATE_REQUESTED
        lib.SSL_do_handshake(pointer)  # writes it (one pending update at a time)
    return conn.device_out.read()


def _upload(conn: Connection, records: bytes) -> None:
    """The gateway's socket transport reads `records` as they come, 16 KiB at a time, while it reads at all."""
    for at in range(0, len(records), 16 * 1024):
        assert conn.stream.reading, f"the gateway stopped reading after {at} of {len(records)} bytes"
        conn.read(records[at : at + 16 * 1024])


def test_a_key_update_mid_upload_never_stops_the_gateway_reading(
    contexts: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:
    """The gateway's socket transport is over its high-water mark (the device reads nothing while it uploads) and the
    device renews its keys asking for the gateway's, twice, between two parts of its upload: the gateway goes on
    reading, the upload's bytes reach the server whole, and the gateway's KeyUpdates are sent. Before, the first one
    stopped the gateway reading until the device took the gateway's records: a device that reads only once its upload
    is sent waited for client_body_timeout. (OpenSSL writes its answer to the first as it reads the second.)"""

    async def run() -> None:
        conn = Connection(contexts, ssl.TLSVersion.TLSv1_3)
        conn.records.pause_writing()  # the socket transport holds more than its high-water mark
        part = b"x" * 100_000
        conn.device.write(part)
        _upload(conn, conn.device_out.read() + _key_updates(conn, 1))
        conn.device.write(part)
        _upload(conn, conn.device_out.read() + _key_updates(conn, 1))
        conn.device.write(part)
        _upload(conn, conn.device_out.read())
        assert conn.stream.reading
        assert conn.server.data == part * 3
        assert conn.stream.sent  # the gateway's KeyUpdates, handed to the socket transport

    asyncio.run(run())


def test_a_flood_of_key_updates_while_nothing_is_read_stops_the_gateway_reading(
    contexts: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:
    """The gateway's socket transport is over its high-water mark and the device sends KeyUpdates asking for the
    gateway's, thousands of them: once OpenSSL's answers not taken pass ANSWERS_HELD bytes the gateway stops reading,
    holding no more than that and a read's worth; it reads again once the device takes its records."""

    async def run() -> None:
        conn = Connection(contexts, ssl.TLSVersion.TLSv1_3)
        conn.records.pause_writing()
        flood = _key_updates(conn, 10_000)
        at = 0
        while conn.stream.reading and at < len(flood):
            conn.read(flood[at : at + 16 * 1024])
            at += 16 * 1024
        assert not conn.stream.reading, "the gateway read every KeyUpdate while the device took none of its answers"
        assert ANSWERS_HELD <= len(conn.stream.sent) <= ANSWERS_HELD + 16 * 1024
        conn.records.resume_writing()  # the device took them
        assert conn.stream.reading

    asyncio.run(run())
