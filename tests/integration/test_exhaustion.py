"""Devices that leave, stall or never read, attacked over raw TLS against both device-side servers: what they
opened is closed in the end, on the device's side and on the backend's.

The gateway runs with short idle limits (3 s: handshake, head, body, send) in front of a recorder that takes
50 ms per request (a busy backend). What the gateway holds is read from outside: its admin listener's gauges and
its sockets (/proc/<pid>/fd, matched against /proc/net/tcp by inode)."""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.lab.layout import LabLayout
from tests.integration.conftest import ServerScene, client_context, free_port, gateway_on_server, lab_config
from tests.integration.jsonlog import eventually
from tests.integration.recorder import Recorder

LIMIT_S = 3


class SlowRecorder(Recorder):
    """A recorder that takes 50 ms before it reads each request: a busy backend."""

    def _one(self, conn: socket.socket) -> None:
        time.sleep(0.05)
        super()._one(conn)


class Scene(ServerScene):
    """The scene with probes of its own: the gateway's sockets to a port."""

    def sockets_to(self, port: int) -> int:
        """How many of the gateway's sockets are connected to 127.0.0.1:`port` (any TCP state)."""
        inodes = set()
        for fd in Path(f"/proc/{self.gw.proc.pid}/fd").iterdir():
            try:
                target = str(fd.readlink())
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
        lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
        return sum(1 for f in map(str.split, lines) if f[2] == f"0100007F:{port:04X}" and f[9] in inodes)


@pytest.fixture(scope="module", params=["own", "aiohttp"])
def scene(request: pytest.FixtureRequest, lab: LabLayout, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scene]:
    server = request.param
    recorder = SlowRecorder()
    admin = free_port()
    text = lab_config(lab, port=free_port()).split("[[routes]]", 1)[0]
    limits = "".join(
        f"{key} = {LIMIT_S}\n"
        for key in ("handshake_timeout", "keepalive_timeout", "client_body_timeout", "client_send_timeout")
    )
    text += f'[[routes]]\nprefix = "/"\nupstream = "{recorder.url}"\nspn = "HTTP/cas.lab.test"\n'
    text += f'[admin]\nbind = "127.0.0.1:{admin}"\n'
    directory = tmp_path_factory.mktemp(f"exhaustion-{server}")
    try:
        with gateway_on_server(lab, directory, server, text, listener=limits) as gw:
            yield Scene(gw, recorder, f"http://127.0.0.1:{admin}", lab, server)
    finally:
        recorder.close()


async def _send_and_leave(port: int, ctx: ssl.SSLContext, data: bytes, stay: float, recorder: Recorder) -> int:
    """Open a TLS connection, write `data`, read nothing, and reset the connection after `stay` seconds; how many
    requests `recorder` had received when it did."""
    _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
    writer.write(data)
    await writer.drain()
    await asyncio.sleep(stay)
    served = len(recorder.requests)
    writer.transport.abort()
    return served


def test_a_device_that_pipelines_and_leaves_is_served_no_further(scene: Scene) -> None:
    """A device pipelines a thousand requests (37 KB: less than the server keeps unparsed without pausing) to a busy
    backend, reads nothing and resets its connection a second later: the gateway stops there (the request in hand
    may finish) and leaves no backend connection open. Under asyncio's TLS protocol the own server went on serving
    every queued request for the device that had left (983 of them), its answers dropped: reading was paused while
    they waited, and that protocol says nothing of a closed connection while reading is paused; aiohttp's server,
    which pauses at its own queue's limit, went on the same way (138 requests after the device had left)."""
    port = int(scene.recorder.url.rpartition(":")[2])
    pipelined = b"GET /x HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" * 1000
    ctx = client_context(scene.lab, "alice")
    scene.recorder.taken()
    served_before = asyncio.run(_send_and_leave(scene.gw.port, ctx, pipelined, 1.0, scene.recorder))
    eventually(lambda: scene.gauge("kcd_requests_in_flight") == 0 or None, "no request in flight", timeout=60)
    served = len(scene.recorder.taken())
    assert served - served_before <= 2, (served_before, served)
    eventually(lambda: scene.sockets_to(port) == 0 or None, "no backend connection open", timeout=30)


def test_a_head_that_never_ends_is_closed_and_logged(scene: Scene) -> None:
    """A slow head (a few bytes, then nothing) is closed at keepalive_timeout, and the own server says so with a
    warning naming the peer and how much it sent (it was a debug line, invisible at the default level), and to the
    device with a 408 saying why before it closes (it closed without a word, as aiohttp's server still does); a
    connection idle between requests is closed without one."""
    scene.gw.mark()
    ctx = client_context(scene.lab, "alice")

    async def slow_head() -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", scene.gw.port, ssl=ctx)
        writer.write(b"GET /x HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: a")
        await writer.drain()
        try:
            return await asyncio.wait_for(reader.read(), timeout=LIMIT_S * 10)  # b"" once the gateway closes
        finally:
            writer.close()

    answer = asyncio.run(slow_head())
    if scene.server == "own":
        assert answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), answer
        assert b"Connection: close\r\n" in answer
        assert answer.endswith(b"the request's head was not complete within 3 s\n"), answer
    else:
        assert answer == b""
    if scene.server == "own":
        event = scene.gw.wait_event("request_head_timeout")
        assert event["received"] == len(b"GET /x HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: a")
        assert event["level"] == "warning"
