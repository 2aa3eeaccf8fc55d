"""The TLS handshake as a hostile or broken device drives it, against both device-side servers: garbage, a
ClientHello in one-byte records, a handshake dripped slower than `listener.handshake_timeout`, a device that ends
or resets the connection mid-handshake, KeyUpdates after it (one, a flood, and about 8 MB of them from a device that
reads none of their answers).

Each case is sent on a raw socket, the TLS client an `ssl.SSLObject` on memory BIOs, so the test decides how its
bytes are cut into records and reads. What the gateway holds afterwards is read from its admin listener
(`kcd_listener_connections`: connections holding a slot of `listener.max_connections`), and each case ends with
an ordinary request served on a new connection: the attack cost the gateway nothing lasting.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import signal
import socket
import ssl
import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from proxy.lab.layout import LabLayout
from proxy.tls.openssl import _ssl as _ssl_pointer
from proxy.tls.server import LATE
from tests.integration.conftest import (
    ServerScene,
    client_context,
    free_port,
    gateway_on_server,
    lab_config,
    start_gateway,
)
from tests.integration.jsonlog import WAIT, eventually
from tests.integration.recorder import Recorder, read_until_closed

LIMIT_S = 3  # listener.handshake_timeout here
# listener.keepalive_timeout here: longer than the KeyUpdate flood below can last (30 sends of at most 5 s). At the
# default 75 s, a flood that took 81 s at load 22 had its connection closed as idle (no request had come) and reset
# 30 s later, mid-send.
KEEPALIVE_S = 300
GET = b"GET /rec/x HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"


class Scene(ServerScene):
    """The scene with raw-socket probes: a TCP connection, and every slot given back."""

    def tcp(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.gw.port), timeout=30)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def settled(self) -> None:
        """No connection holds a slot any more, and alice is served on a new connection."""
        eventually(lambda: self.gauge("kcd_listener_connections") == 0 or None, "every slot given back", timeout=60)
        with client_context(self.lab, "alice").wrap_socket(self.tcp(), server_hostname="127.0.0.1") as tls:
            tls.sendall(GET)
            assert read_until_closed(tls).startswith(b"HTTP/1.1 200 ")


@pytest.fixture(scope="module", params=["own", "aiohttp"])
def scene(request: pytest.FixtureRequest, lab: LabLayout, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scene]:
    server = request.param
    recorder = Recorder()
    admin = free_port()
    text = lab_config(lab, port=free_port())
    text += f'\n[[routes]]\nprefix = "/rec/"\nupstream = "{recorder.url}"\nspn = "HTTP/cas.lab.test"\n'
    text += f'[admin]\nbind = "127.0.0.1:{admin}"\n'
    directory = tmp_path_factory.mktemp(f"handshake-{server}")
    listener = f"handshake_timeout = {LIMIT_S}\nkeepalive_timeout = {KEEPALIVE_S}\n"
    try:
        with gateway_on_server(lab, directory, server, text, listener=listener) as gw:
            yield Scene(gw, recorder, f"http://127.0.0.1:{admin}", lab, server)
    finally:
        recorder.close()


def _records(data: bytes) -> list[tuple[int, bytes]]:
    """TLS records (type, payload) in `data`, which holds whole ones."""
    out = []
    while data:
        kind, _, length = struct.unpack("!BHH", data[:5])
        out.append((kind, data[5 : 5 + length]))
        data = data[5 + length :]
    return out


def _one_byte_records(data: bytes) -> bytes:
    """The same records with each plaintext handshake record's payload cut into records of one byte each (those
    after a ChangeCipherSpec, TLS 1.2's encrypted Finished, are ciphertext and stay whole)."""
    out = b""
    encrypted = False
    for kind, payload in _records(data):
        encrypted = encrypted or kind == 20
        cut = kind == 22 and not encrypted
        pieces = [payload[i : i + 1] for i in range(len(payload))] if cut else [payload]
        out += b"".join(struct.pack("!BHH", kind, 0x0303, len(p)) + p for p in pieces)
    return out


class _Client:
    """A TLS client on memory BIOs over a raw socket: the test cuts its bytes as it likes."""

    def __init__(self, scene: Scene, version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_3) -> None:
        ctx = client_context(scene.lab, "alice")
        ctx.maximum_version = version
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = ctx.wrap_bio(self.incoming, self.outgoing, server_hostname="127.0.0.1")
        self.sock = scene.tcp()

    def hello(self) -> bytes:
        with pytest.raises(ssl.SSLWantReadError):
            self.tls.do_handshake()
        return self.outgoing.read()

    def handshake(self, cut: bool) -> None:
        """The whole handshake, every flight of ours in one-byte records when `cut`."""
        while True:
            try:
                self.tls.do_handshake()
                done = True
            except ssl.SSLWantReadError:
                done = False
            flight = self.outgoing.read()
            if flight:
                self.sock.sendall(_one_byte_records(flight) if cut else flight)
            if done:
                return
            data = self.sock.recv(65536)
            assert data, "the gateway closed the connection mid-handshake"
            self.incoming.write(data)

    def request(self, data: bytes) -> bytes:
        self.tls.write(data)
        self.sock.sendall(self.outgoing.read())
        answer = b""
        while True:
            try:
                chunk = self.tls.read(65536)
            except ssl.SSLWantReadError:
                more = self.sock.recv(65536)
                if not more:
                    return answer
                self.incoming.write(more)
                continue
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return answer
            if not chunk:
                return answer
            answer += chunk


def test_garbage_instead_of_a_client_hello_is_refused_and_costs_nothing(scene: Scene) -> None:
    """Bytes that are not TLS, a handshake record of junk, a fatal alert instead of a ClientHello: the connection ends
    at once (an alert at most), the refusal is logged, and the slot is given back."""
    fatal_alert = b"\x15\x03\x01\x00\x02\x02\x28"  # handshake_failure, before any ClientHello
    for junk in (
        # random, but for a head no TLS record has (type 0, version 0.x): 2,048 random bytes started like a record
        # header about once in a thousand runs (a second byte 3, a length past what was sent), and the gateway then
        # rightly waited for the rest of that record until its handshake timeout
        b"\x00\x00" + os.urandom(2046),
        b"\x16\x03\x01\x00\x40" + os.urandom(64),
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        fatal_alert,
    ):
        scene.gw.mark()
        with scene.tcp() as sock:
            sock.sendall(junk)
            answer = read_until_closed(sock)
        assert len(answer) < 64, answer  # an alert, or nothing: never an HTTP answer
        scene.gw.wait_for("tls_handshake_refused", lambda e: True)
    scene.settled()


@pytest.mark.parametrize("version", ["TLSv1_2", "TLSv1_3"])
def test_a_client_hello_in_one_byte_records_is_served(scene: Scene, version: str) -> None:
    """Every handshake message of the device cut into one-byte TLS records (RFC 8446 5.1 allows it; some
    middleboxes and fuzzers do it): the handshake completes and the request is served as alice."""
    client = _Client(scene, getattr(ssl.TLSVersion, version))
    scene.recorder.taken()
    with client.sock:
        client.handshake(cut=True)
        assert client.tls.version() == version.replace("_", ".")
        answer = client.request(GET)
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
    assert [r.path for r in scene.recorder.taken()] == ["/rec/x"]
    scene.settled()


def test_a_handshake_dripped_slower_than_the_timeout_is_cut(scene: Scene) -> None:
    """A device that sends its ClientHello a byte at a time, each byte before the last could time out an idle
    wait: the handshake's deadline is counted from the connection's start, so it is cut at handshake_timeout."""
    hello = _Client(scene).hello()
    scene.gw.mark()
    with scene.tcp() as sock:
        start = time.monotonic()
        cut = None
        for byte in hello:
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                cut = time.monotonic() - start
                break
            ready = _wait_readable(sock, 0.2)
            if ready and not sock.recv(1, socket.MSG_PEEK):
                cut = time.monotonic() - start
                break
        assert cut is not None, "the whole ClientHello was dripped in without the gateway ending the connection"
    event = scene.gw.wait_for("tls_handshake_abandoned", lambda e: "longer than" in str(e.get("reason")))
    assert cut < LIMIT_S * 10, cut  # far less than the drip's ~len(hello) * 0.2 s
    assert "the gateway" not in event["reason"], event  # the client was slow: the timer was on time
    assert event["loop_late_seconds"] < LATE, event
    scene.settled()


def _accepted(port: int) -> bool:
    """Whether the gateway has accepted every connection made to its listener (none waits in its accept queue)."""
    listening = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, check=True).stdout
    return bool(listening.split()) and listening.split()[1] == "0"  # Recv-Q of a listener: connections not accepted


def test_a_handshake_timeout_while_the_gateway_was_stopped_blames_the_gateway(scene: Scene) -> None:
    """A device connects, the gateway takes the connection (its handshake timer starts), then the gateway is stopped
    (SIGSTOP) for longer than handshake_timeout and continued as the device sends its ClientHello: the handshake is
    abandoned, and `tls_handshake_abandoned` says the gateway's event loop ran the timer late (by about the stop's
    length less the timeout), not that the device was slow."""
    scene.gw.mark()
    with scene.tcp() as sock:
        eventually(lambda: _accepted(scene.gw.port) or None, "the gateway took the connection")
        scene.gw.proc.send_signal(signal.SIGSTOP)
        try:
            stopped = time.monotonic()
            while time.monotonic() - stopped < LIMIT_S + 2 * LATE:  # the stimulus: the gateway stopped this long
                time.sleep(0.1)
            sock.sendall(_Client(scene).hello())
        finally:
            scene.gw.proc.send_signal(signal.SIGCONT)
        event = scene.gw.wait_for("tls_handshake_abandoned", lambda e: "longer than" in str(e.get("reason")))
    assert event["loop_late_seconds"] >= LATE, event
    assert "the gateway's event loop ran the timer" in event["reason"], event
    assert "the client may not have been slow" in event["reason"], event
    scene.settled()


def _wait_readable(sock: socket.socket, timeout: float) -> bool:
    return bool(select.select([sock], [], [], timeout)[0])


@pytest.mark.parametrize("how", ["fin", "reset", "half-hello-then-fin"])
def test_a_device_that_leaves_mid_handshake_gives_its_slot_back(scene: Scene, how: str) -> None:
    """The device sends its ClientHello (or half of it) and ends (FIN) or resets the connection before the
    handshake completes: the gateway logs an abandoned handshake and gives the slot back at once, not at
    handshake_timeout."""
    hello = _Client(scene).hello()
    scene.gw.mark()
    sock = scene.tcp()
    sock.sendall(hello if how != "half-hello-then-fin" else hello[: len(hello) // 2])
    if how == "reset":
        time.sleep(0.2)  # not a wait for anything: the gateway's ServerHello is under way
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    else:
        sock.shutdown(socket.SHUT_WR)
        read_until_closed(sock)
        sock.close()
    event = scene.gw.wait_for("tls_handshake_abandoned", lambda e: True, what="the abandoned handshake's line")
    assert "longer than" not in str(event.get("reason"))  # not handshake_timeout's end ("taking longer than")
    scene.settled()


def key_update_asker(tls: ssl.SSLObject) -> Callable[[], None]:
    """A function that has OpenSSL write a TLS 1.3 KeyUpdate asking for the peer's into `tls`'s outgoing BIO
    (`SSL_key_update`, which Python's `ssl` does not expose: called through ctypes on the client's `SSL`, found as
    proxy.tls.openssl finds it; then the handshake step that writes it, OpenSSL taking one pending update at a time)."""
    lib = ctypes.CDLL(ssl._ssl.__file__)  # type: ignore[attr-defined]
    lib.SSL_key_update.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.SSL_do_handshake.argtypes = [ctypes.c_void_p]
    pointer = _ssl_pointer(tls)
    assert pointer is not None

    def ask() -> None:
        assert lib.SSL_key_update(pointer, 1) == 1  # SSL_KEY_UPDATE_REQUESTED
        lib.SSL_do_handshake(pointer)  # writes it

    return ask


@contextlib.contextmanager
def small_window_client(
    ctx: ssl.SSLContext, port: int
) -> Iterator[tuple[socket.socket, ssl.SSLObject, ssl.MemoryBIO, ssl.MemoryBIO]]:
    """A TLS client on memory BIOs over a raw socket to 127.0.0.1:`port` that offers a 4 KiB receive window (what the
    gateway sends it and it does not read stays in the gateway's socket), its handshake done: its socket, `SSLObject`
    and incoming and outgoing BIOs, the socket closed at the end."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connecting: the window it offers
    sock.settimeout(30)
    sock.connect(("127.0.0.1", port))
    with sock:
        while True:
            try:
                tls.do_handshake()
                done = True
            except ssl.SSLWantReadError:
                done = False
            if flight := outgoing.read():
                sock.sendall(flight)
            if done:
                break
            incoming.write(sock.recv(65536))
        yield sock, tls, incoming, outgoing


def _key_updates(client: _Client, count: int) -> None:
    """`count` TLS 1.3 KeyUpdate messages from `client`, each asking for the gateway's, sent in one write."""
    ask = key_update_asker(client.tls)
    for _ in range(count):
        ask()
    client.sock.sendall(client.outgoing.read())


@pytest.mark.parametrize("count", [1, 2000])
def test_key_updates_after_the_handshake_are_answered_and_the_request_served(scene: Scene, count: int) -> None:
    """After the handshake (TLS 1.3), KeyUpdates each asking for the gateway's (one; a flood of 2000 in one write),
    then a request on the same connection: the gateway's records after them are readable under the updated keys
    and the request is served (what OpenSSL answers by itself is sent: proxy.tls.record), once."""
    client = _Client(scene)
    scene.recorder.taken()
    with client.sock:
        client.handshake(cut=False)
        _key_updates(client, count)
        answer = client.request(GET)
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
    assert len(scene.recorder.taken()) == 1
    scene.settled()


UPLOAD_BYTES = 16 * 1024 * 1024  # an ActiveSync attachment's size


def _stalled(scene: Scene, sent: int) -> str:
    """What an upload that waited 30 s on the socket was waiting for: a send (the gateway read none of it) or the
    answer, how much of the body the backend has, and the end of the gateway's log (a run's temporary directory, and
    so its log, may be gone by the time anyone looks)."""
    waiting = "the answer" if sent == UPLOAD_BYTES else f"a send, {sent} body bytes sent"
    log = scene.gw.log_path.read_text(errors="replace").splitlines()[-30:]
    return (
        f"30 s without progress, waiting for {waiting}: the backend has {scene.recorder.body_bytes} of"
        f" {UPLOAD_BYTES} body bytes; the gateway's log ends:\n" + "\n".join(log)
    )


def test_a_large_upload_after_100_continue_with_key_updates_midway_is_not_stalled(scene: Scene) -> None:
    """A device's 16 MiB POST with `Expect: 100-continue` (an ActiveSync attachment), its body sent once `100
    Continue` came, a KeyUpdate asking for the gateway's after every 4 MiB, nothing of the gateway's read meanwhile
    (a device that writes its whole body first): review36's read pause (reading stops while OpenSSL's own answers wait
    on a send buffer past its high-water mark) never holds it, since the gateway's answers wait on no full buffer; the
    whole body reaches the backend and the device gets 200, each send within the socket's 30 s."""
    client = _Client(scene)
    scene.recorder.taken()
    head = (
        b"POST /rec/upload HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/vnd.ms-sync.wbxml\r\n"
        b"Content-Length: %d\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n" % UPLOAD_BYTES
    )
    with client.sock:
        client.handshake(cut=False)
        client.tls.write(head)
        client.sock.sendall(client.outgoing.read())
        interim = b""
        while b"\r\n\r\n" not in interim:
            try:
                interim += client.tls.read(65536)
            except ssl.SSLWantReadError:
                more = client.sock.recv(65536)
                assert more, interim
                client.incoming.write(more)
        assert interim.startswith(b"HTTP/1.1 100 "), interim
        piece = b"x" * 65536
        sent = 0
        try:
            for sent in range(0, UPLOAD_BYTES, len(piece)):
                if sent and sent % (4 * 1024 * 1024) == 0:
                    _key_updates(client, 1)
                client.tls.write(piece)
                client.sock.sendall(client.outgoing.read())
            sent = UPLOAD_BYTES
            answer = client.request(b"")
        except TimeoutError:
            raise AssertionError(_stalled(scene, sent)) from None
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
    (recorded,) = scene.recorder.taken()
    assert len(recorded.body) == UPLOAD_BYTES
    scene.settled()


UNREAD_KEY_UPDATES = 300_000  # about 8 MB of KeyUpdate records: past what the kernel's socket buffers absorb
HELD_AT_MOST = 2 * 1024  # KiB of the gateway's memory one such device may grow it by


def _rss_kib(pid: int) -> int:
    """The resident set of process `pid`, KiB."""
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    return int(next(line for line in status if line.startswith("VmRSS:")).split()[1])


def _cpu_ticks(pid: int) -> int:
    """The CPU time process `pid` has used (user and system), in clock ticks."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return int(fields[11]) + int(fields[12])


def _until_idle(pid: int, timeout: float = 120) -> None:
    """Polled until the process's CPU time stays the same for half a second (within `timeout`)."""
    deadline = time.monotonic() + timeout
    last = _cpu_ticks(pid)
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = _cpu_ticks(pid)
        if now == last:
            return
        last = now
    raise AssertionError(f"process {pid} still busy after {timeout} s")


def test_a_device_that_reads_none_of_its_key_update_answers_is_not_buffered_for(scene: Scene) -> None:
    """After the handshake (TLS 1.3) a device sends KeyUpdates, each asking for the gateway's, about 8 MB of them,
    and reads nothing (a 4 KiB receive buffer). OpenSSL answers each with a KeyUpdate of its own; once the socket's
    buffers are full, the gateway stops reading from the device (its sends block) rather than hold the answers in
    its own memory: its RSS grows by less than HELD_AT_MOST KiB (it grew 4.4 MB for 8.1 MB, and 9.6 MB for 16.2 MB,
    given back only when the connection ended at keepalive_timeout). The device that then reads is served."""
    pid = scene.gw.proc.pid
    with small_window_client(client_context(scene.lab, "alice"), scene.gw.port) as (sock, tls, _, outgoing):
        before = _rss_kib(pid)
        ask = key_update_asker(tls)
        sock.settimeout(5)  # a send blocked this long: the gateway has stopped reading
        blocked = False
        for _ in range(UNREAD_KEY_UPDATES // 10_000):
            for _ in range(10_000):
                ask()
            try:
                sock.sendall(outgoing.read())
            except TimeoutError:
                blocked = True
                break
        _until_idle(pid)  # the gateway has done what it will with what it read
        grown = _rss_kib(pid) - before
    assert grown < HELD_AT_MOST, f"the gateway grew by {grown} KiB for a device that reads nothing ({blocked=})"
    scene.settled()


IDLE_S = 3  # listener.keepalive_timeout in the test below


@pytest.mark.parametrize("sends", ["nothing", "key-updates"])
def test_a_device_that_sends_no_request_is_closed_at_keepalive_timeout_and_logged(
    lab: LabLayout, tmp_path: Path, sends: str
) -> None:
    """A device (alice's certificate) that completes TLS 1.3 and then sends no request, nothing or only KeyUpdates
    asking for the gateway's (every 0.5 s), is closed at keepalive_timeout, and the log says so at info level, naming
    its address and that it sent no request (`device_sent_no_request`). The KeyUpdates' close was logged at debug
    only (`device_idle_closed`, as a kept-alive connection's between two requests): an operator saw nothing."""
    text = lab_config(lab, port=free_port()).replace("[listener]\n", f"[listener]\nkeepalive_timeout = {IDLE_S}\n", 1)
    gw = start_gateway(lab, tmp_path / "gw", text)
    ctx = client_context(lab, "alice")
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    gw.mark()
    with small_window_client(ctx, gw.port) as (sock, tls, _, outgoing):
        peer = f"127.0.0.1:{sock.getsockname()[1]}"
        opened = time.monotonic()
        ask = key_update_asker(tls)
        closed = False
        while not closed and time.monotonic() - opened < WAIT:
            try:
                if sends == "key-updates":
                    ask()
                    sock.sendall(outgoing.read())
                closed = sock.recv(65536) == b"" if select.select([sock], [], [], 0.5)[0] else False
            except (ConnectionResetError, BrokenPipeError):
                closed = True
        held = time.monotonic() - opened
    try:
        assert closed, f"still open {held:.1f} s after the handshake"
        assert held >= IDLE_S - 0.5, held
        line = gw.wait_event("device_sent_no_request", peer=peer)
        assert line["level"] == "info", line
        assert line["reason"] == f"sent no request within {IDLE_S} s of its TLS handshake (listener.keepalive_timeout)"
        assert all(e.get("peer") != peer for e in gw.events("request")), gw.events("request")
    finally:
        gw.stop()
