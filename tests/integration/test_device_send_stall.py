"""A device that stops reading its answers, over real TLS: the gateway's own server cuts it at
`listener.client_send_timeout` instead of holding the connection (and its slot) forever."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

from proxy.lab.layout import LabLayout
from tests.integration.conftest import Gateway, client_context, free_port, lab_config, start_gateway

PIPELINED = 60_000  # `OPTIONS *` requests (404 each, no stage runs): their answers outgrow the socket buffers


@contextlib.contextmanager
def _device_that_never_reads(lab: LabLayout, tmp_path: Path, requests: bytes) -> Iterator[Gateway]:
    """A gateway with client_send_timeout = 1 and alice's device (a 4 KiB receive buffer) pipelining `requests` from
    a thread without reading an answer; on leaving, that thread must have been stopped by the gateway's cut."""
    text = lab_config(lab, port=free_port()).replace("[listener]\n", "[listener]\nclient_send_timeout = 1\n", 1)
    gw = start_gateway(lab, tmp_path / "gateway", text)
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        tcp.settimeout(120)
        tcp.connect(("127.0.0.1", gw.port))
        tls = client_context(lab, "alice").wrap_socket(tcp, server_hostname="127.0.0.1")
        gw.mark()

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
