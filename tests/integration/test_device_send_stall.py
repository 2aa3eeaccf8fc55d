"""A device that stops reading its answers, over real TLS: the gateway's own server cuts it at
`listener.client_send_timeout` instead of holding the connection (and its slot) forever."""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from proxy.lab.layout import LabLayout
from tests.integration.conftest import Gateway, client_context, free_port, lab_config, start_gateway

PIPELINED = 60_000  # `OPTIONS *` requests (404 each, no stage runs): their answers outgrow the socket buffers


def _gateway(lab: LabLayout, tmp_path: Path, *, client_send_timeout: int) -> Gateway:
    """The lab's gateway with `listener.client_send_timeout` set."""
    setting = f"[listener]\nclient_send_timeout = {client_send_timeout}\n"
    return start_gateway(
        lab, tmp_path / "gateway", lab_config(lab, port=free_port()).replace("[listener]\n", setting, 1)
    )


def _small_window(lab: LabLayout, gw: Gateway, tcp: socket.socket, *, timeout: float) -> ssl.SSLSocket:
    """alice's device on `tcp`, with a 4 KiB receive buffer so that unread answers back up into the gateway, its
    handshake done and the gateway's log marked."""
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    tcp.settimeout(timeout)
    tcp.connect(("127.0.0.1", gw.port))
    tls = client_context(lab, "alice").wrap_socket(tcp, server_hostname="127.0.0.1")
    gw.mark()
    return tls


@contextlib.contextmanager
def _device_that_never_reads(lab: LabLayout, tmp_path: Path, requests: bytes) -> Iterator[Gateway]:
    """A gateway with client_send_timeout = 1 and alice's device (a 4 KiB receive buffer) pipelining `requests` from
    a thread without reading an answer; on leaving, that thread must have been stopped by the gateway's cut."""
    gw = _gateway(lab, tmp_path, client_send_timeout=1)
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        tls = _small_window(lab, gw, tcp, timeout=120)

        def send() -> None:
            with contextlib.suppress(OSError):  # the gateway cuts the connection while this still sends
                tls.sendall(requests)

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        yield gw
        sender.join(timeout=120)
        assert not sender.is_alive()
    finally:
        tcp.close()
        gw.stop()


def test_a_device_that_never_reads_its_answers_is_cut_at_client_send_timeout(lab: LabLayout, tmp_path: Path) -> None:
    """Tens of thousands of pipelined requests whose answers the device never reads (a 4 KiB receive buffer):
    the gateway's writes back up, and within client_send_timeout (1 s here) of the stall it logs
    device_send_stalled and cuts the connection; before, the answer waited for the device forever."""
    with _device_that_never_reads(lab, tmp_path, b"OPTIONS * HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" * PIPELINED) as gw:
        stalled = gw.wait_for("device_send_stalled", lambda e: True, timeout=180, what="a stalled device")
        assert stalled["waited_s"] == 1


def test_whole_backend_answers_the_device_never_reads_are_cut_at_client_send_timeout(
    lab: LabLayout, tmp_path: Path
) -> None:
    """Forwarded answers that arrive whole (8 KiB each from the lab backend), pipelined to a device that never reads
    them: once the device's connection backs up, the answer's write is bounded by client_send_timeout (1 s here) and
    the gateway logs stream_stalled (the forwarding stage's bound, which starts before the device server's own),
    never device_send_stalled, and cuts the connection."""
    requests = b"GET /owa/stall HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Lab-Body-Bytes: 8192\r\n\r\n" * 2_000
    with _device_that_never_reads(lab, tmp_path, requests) as gw:
        stalled = gw.wait_for("stream_stalled", lambda e: True, timeout=180, what="a stalled device")
        assert stalled["error"].startswith("TimeoutError")
        assert gw.events("device_send_stalled", gw.since) == []


def _answers(data: bytes) -> tuple[list[bytes], int]:
    """The status lines of the whole answers (each framed by a Content-Length) at the start of `data`, in order, and
    where the first answer not yet whole begins."""
    heads = []
    start = 0
    while (end := data.find(b"\r\n\r\n", start)) >= 0:
        head = data[start:end]
        length = next(
            int(line.split(b":", 1)[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")
        )
        if len(data) < end + 4 + length:
            break
        heads.append(head.split(b"\r\n", 1)[0])
        start = end + 4 + length
    return heads, start


def test_whole_answers_a_device_takes_after_stalls_shorter_than_client_send_timeout_are_served(
    lab: LabLayout, tmp_path: Path
) -> None:
    """perf7 arms the whole answer's send timeout only when the device has yet to take what was written: a device
    that stops reading while its pipelined whole answers (32 KiB each) back up, and resumes each time well before
    client_send_timeout (3 s here; stalls of 1 s, each past what the socket buffers hold: 6 MiB of answers) is served
    every answer, as before: nothing is cut (no stream_stalled, no device_send_stalled)."""
    count, stall = 200, 1.0
    gw = _gateway(lab, tmp_path, client_send_timeout=3)
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        tls = _small_window(lab, gw, tcp, timeout=60)
        tls.sendall(b"GET /owa/stall HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Lab-Body-Bytes: 32768\r\n\r\n" * count)
        statuses: list[bytes] = []
        pending, taken, stalls = b"", 0, 0
        while len(statuses) < count:
            if taken >= stalls * 1024 * 1024:  # at first and every MiB taken, the device stops reading a while
                stalls += 1
                time.sleep(stall)
            chunk = tls.recv(65536)
            assert chunk, f"the gateway closed the connection after {len(statuses)} answers"
            taken += len(chunk)
            more, used = _answers(pending + chunk)  # what is pending is less than one answer: no quadratic parsing
            statuses += more
            pending = (pending + chunk)[used:]
        assert stalls >= 6
        assert set(statuses) == {b"HTTP/1.1 200 OK"}
        assert gw.events("stream_stalled", gw.since) == []
        assert gw.events("device_send_stalled", gw.since) == []
    finally:
        tcp.close()
        gw.stop()
