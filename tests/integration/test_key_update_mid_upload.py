"""A device renewing its TLS 1.3 keys mid-upload while it reads nothing, against a real gateway (both servers).

The backend answers a large body as soon as the request's head arrives and reads the body meanwhile (a raw socket
server, two threads); the device is Python's `ssl` over memory BIOs on a raw socket with a small receive buffer, which
writes its whole upload before it reads, and sends KeyUpdates asking for the gateway's (`SSL_key_update` through
ctypes, as `proxy.tls.openssl` reaches the `SSL`) on the way. The gateway's records of the answer fill the
socket meanwhile, so the gateway's send buffer is over its high-water mark when the KeyUpdate comes
(`proxy.tls.record`, `ANSWERS_HELD`).
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from proxy.lab.layout import LabLayout
from tests.integration.conftest import Gateway, client_context, free_port, gateway_on_server, lab_config
from tests.integration.jsonlog import eventually
from tests.integration.loopback import stop_listening
from tests.integration.test_handshake_attacks import key_update_asker, small_window_client

STEP = 64 * 1024
ANSWER = 16 * 1024 * 1024  # bytes of the backend's answer: past the sockets' buffers and the high-water mark
UPLOAD = 32 * 1024 * 1024  # bytes of the device's body: what follows the KeyUpdate is past the sockets' buffers
# bytes of the body sent before each KeyUpdate: OpenSSL (3.0) answers one when the gateway next writes or when it reads
# the next one, so the second is what has it write the first one's answer while reading
KEY_UPDATES_AT = (4 * 1024 * 1024, 4 * 1024 * 1024 + 4 * STEP)


class EarlyAnswer:
    """A backend on a free loopback port that answers 200 with ANSWER bytes once a request's head has come, reading
    its body (Content-Length) in another thread meanwhile; `bodies` holds the length of each body read whole."""

    def __init__(self) -> None:
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        self.bodies: list[int] = []
        self.answered = 0  # bytes of answers sent so far
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        conn.settimeout(60)
        with conn, contextlib.suppress(OSError):
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                head += chunk
            head, _, body = head.partition(b"\r\n\r\n")
            length = next(
                int(line.split(b":", 1)[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            reader = threading.Thread(target=self._read_body, args=(conn, length - len(body)))
            reader.start()
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % ANSWER)
            for _ in range(0, ANSWER, STEP):
                conn.sendall(b"a" * STEP)
                self.answered += STEP
            reader.join()

    def _read_body(self, conn: socket.socket, left: int) -> None:
        with contextlib.suppress(OSError):
            while left > 0:
                chunk = conn.recv(min(left, 65536))
                if not chunk:
                    return
                left -= len(chunk)
            self.bodies.append(UPLOAD)

    def close(self) -> None:
        stop_listening(self._sock)


@pytest.fixture(scope="module", params=["own", "aiohttp"])
def gateway(
    request: pytest.FixtureRequest, lab: LabLayout, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Gateway, EarlyAnswer]]:
    backend = EarlyAnswer()
    text = lab_config(lab, port=free_port())
    text += f'\n[[routes]]\nprefix = "/early/"\nupstream = "{backend.url}"\nspn = "HTTP/cas.lab.test"\n'
    directory: Path = tmp_path_factory.mktemp(f"key-update-{request.param}")
    try:
        with gateway_on_server(lab, directory, request.param, text) as gw:
            yield gw, backend
    finally:
        backend.close()


def _until_still(count: Callable[[], int], timeout: float = 60) -> None:
    """Polled until `count()` is above 0 and stays the same for a second (within `timeout`)."""
    deadline = time.monotonic() + timeout
    last, since = count(), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = count()
        if now != last:
            last, since = now, time.monotonic()
        elif now and time.monotonic() - since >= 1.0:
            return
    raise AssertionError(f"still changing after {timeout} s: {last}")


def test_a_key_update_mid_upload_from_a_device_that_reads_afterwards_is_served(
    lab: LabLayout, gateway: tuple[Gateway, EarlyAnswer]
) -> None:
    """The device sends its 32 MB upload, two KeyUpdates asking for the gateway's after 4 MB (the backend's 16 MB
    answer filling the socket by then), reading nothing until the upload is sent: every part of the upload is taken
    within 20 s (the gateway goes on reading), the backend gets the whole body, and the device then reads the whole
    answer. Before, the first KeyUpdate's answer, which OpenSSL writes as it reads the second, stopped the gateway
    reading until the device took its records, which it does only after its upload: its sends blocked. (One KeyUpdate
    alone did not: OpenSSL answers it with the gateway's next write.)"""
    gw, backend = gateway
    ctx = client_context(lab, "alice")
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    with small_window_client(ctx, gw.port) as (sock, tls, incoming, outgoing):
        assert tls.version() == "TLSv1.3"
        ask = key_update_asker(tls)
        head = f"POST /early/upload HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {UPLOAD}\r\n\r\n"
        tls.write(head.encode())
        sock.settimeout(20)  # a send blocked this long: the gateway has stopped reading
        for sent in range(0, UPLOAD, STEP):
            if sent == KEY_UPDATES_AT[0]:
                # the backend's answer no longer taken: the gateway's records fill the socket, its send buffer is over
                # its high-water mark (its reading from the backend paused)
                _until_still(lambda: backend.answered)
                assert backend.answered < ANSWER
            if sent in KEY_UPDATES_AT:
                ask()
            tls.write(b"u" * STEP)
            try:
                sock.sendall(outgoing.read())
            except TimeoutError:
                pytest.fail(f"the gateway stopped reading the upload after {sent} of {UPLOAD} bytes")
        answer = bytearray()  # appended to in place: 16 MB in records of 16 KiB, not a copy of the whole per record
        sock.settimeout(30)
        while (end := answer.find(b"\r\n\r\n")) < 0 or len(answer) - end - 4 < ANSWER:
            try:
                answer += tls.read(65536)
                continue
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLZeroReturnError:
                break
            if flight := outgoing.read():
                sock.sendall(flight)
            data = sock.recv(65536)
            if not data:
                break
            incoming.write(data)
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
    assert len(answer.partition(b"\r\n\r\n")[2]) == ANSWER
    assert eventually(lambda: backend.bodies or None, "the backend reading the whole body") == [UPLOAD]
