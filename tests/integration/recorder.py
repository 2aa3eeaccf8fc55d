"""A backend that records exactly the bytes of each request it receives, and raw TLS requests to a gateway.

The recorder parses no more than it must to find where a request ends (its header block, then a
Content-Length body or chunks), keeps the bytes as they came, and answers `200 ok` with `Connection:
close`. Tests read what a backend would have acted on: the request line, the headers, the body.
"""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass

from proxy.lab.layout import LabLayout
from tests.integration.conftest import client_context
from tests.integration.jsonlog import WAIT
from tests.integration.loopback import stop_listening


@dataclass(frozen=True)
class Recorded:
    head: bytes  # request line and header fields, CRLFs included
    body: bytes  # as it came on the wire (chunk framing included when chunked)

    @property
    def request_line(self) -> str:
        return self.head.split(b"\r\n", 1)[0].decode("latin-1")

    @property
    def path(self) -> str:
        """The request target as the backend got it."""
        return self.request_line.split(" ")[1]

    def headers(self, name: str) -> list[str]:
        """Every value of header `name` (any case)."""
        lines = self.head.decode("latin-1").split("\r\n")[1:]
        pairs = [line.split(":", 1) for line in lines if ":" in line]
        return [value.strip() for key, value in pairs if key.strip().lower() == name.lower()]


class Recorder:
    """An upstream on a free loopback port that keeps every request's bytes (`requests`)."""

    def __init__(self) -> None:
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        self.requests: list[Recorded] = []
        self.holds: dict[str, threading.Event] = {}  # path -> answered once set (`hold`)
        self.open = 0  # connections accepted and not yet recorded or given up (a witness that nothing is in flight)
        self.heads: list[str] = []  # the path of each request whose head has arrived, its body perhaps not yet
        self.body_bytes = 0  # bytes of the body being read (or last read): what a test waiting for an answer reports
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with self._lock:
                self.open += 1
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        conn.settimeout(30)
        with conn:
            try:
                recorded = _read_request(conn, self.heads.append, self._body_read)
            except (OSError, ValueError):
                with self._lock:
                    self.open -= 1
                return
            with self._lock:
                self.requests.append(recorded)
                self.open -= 1
            held = self.holds.get(recorded.path)
            if held is not None:
                held.wait(30)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")

    def _body_read(self, size: int) -> None:
        self.body_bytes = size

    def hold(self, path: str) -> threading.Event:
        """Requests for `path` are recorded at once and answered only once the event returned is set."""
        self.holds[path] = threading.Event()
        return self.holds[path]

    def taken(self) -> list[Recorded]:
        """The requests recorded so far, forgotten here."""
        with self._lock:
            taken, self.requests = self.requests, []
        return taken

    def close(self) -> None:
        stop_listening(self._sock)
        self._thread.join(timeout=WAIT)  # closed means its thread is gone, not about to go


def _read_request(
    conn: socket.socket,
    head_read: Callable[[str], None] = lambda _: None,
    body_read: Callable[[int], None] = lambda _: None,
) -> Recorded:
    """One request's bytes; `head_read` is given its path once its head is in, `body_read` its body's size so far
    after each read. The body grows in a bytearray: as bytes (`rest += chunk`, a copy of all of it per read) a 16 MiB
    upload cost the test process 2 GB of copies, 0.3-1.8 s of CPU after the device's last byte, and its answer came
    19 s later at load 13 where it comes in 0.4 s now."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            raise ValueError("closed before the end of the header block")
        data += chunk
    head, _, first = data.partition(b"\r\n\r\n")
    rest = bytearray(first)
    recorded = Recorded(head + b"\r\n\r\n", b"")
    head_read(recorded.path)
    length = recorded.headers("Content-Length")
    chunked = any("chunked" in v.lower() for v in recorded.headers("Transfer-Encoding"))
    while True:
        body_read(len(rest))
        if length and len(rest) >= int(length[0]):
            break
        if chunked and chunks_complete(rest):
            break
        if not length and not chunked:
            break
        chunk = conn.recv(65536)
        if not chunk:
            break
        rest += chunk
    return Recorded(recorded.head, bytes(rest))


def chunks_complete(body: bytes | bytearray) -> bool:
    """Whether `body` holds a whole chunked body (its last chunk and the end of its trailer section)."""
    at = 0
    while True:
        end = body.find(b"\r\n", at)
        if end < 0:
            return False
        size = int(body[at:end].split(b";")[0], 16)
        at = end + 2 + size + 2
        if size == 0:
            return len(body) >= at
        if len(body) < at:
            return False


def read_head(sock: socket.socket | ssl.SSLSocket) -> bytes:
    """One answer's head (an interim `100 Continue`, say), read a byte at a time up to its blank line: nothing after
    it is taken from the socket."""
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(1)
        assert chunk, head
        head += chunk
    return head


def read_until_closed(sock: socket.socket | ssl.SSLSocket) -> bytes:
    """Everything `sock` reads until the gateway ends the connection (a TLS error or a reset ends it too)."""
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except (ssl.SSLError, ConnectionResetError, TimeoutError):
            return data
        if not chunk:
            return data
        data += chunk


def dechunk(body: bytes) -> bytes:
    """The payload of a chunked body."""
    out, at = b"", 0
    while True:
        end = body.index(b"\r\n", at)
        size = int(body[at:end].split(b";")[0], 16)
        if size == 0:
            return out
        out += body[end + 2 : end + 2 + size]
        at = end + 2 + size + 2


@dataclass(frozen=True)
class RawAnswer:
    status_line: str
    head: str
    body: bytes

    @property
    def status(self) -> int:
        parts = self.status_line.split(" ")
        return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0


def raw_request(
    lab: LabLayout, port: int, request: bytes, user: str | None = "alice", timeout: float = 30
) -> RawAnswer:
    """Send `request` byte for byte over TLS (with `user`'s certificate) and read the answer until the
    gateway closes (requests should say `Connection: close`)."""
    ctx = client_context(lab, user)
    with (
        socket.create_connection(("127.0.0.1", port), timeout=timeout) as tcp,
        ctx.wrap_socket(tcp, server_hostname="127.0.0.1") as tls,
    ):
        tls.sendall(request)
        data = read_until_closed(tls)
    head, _, body = data.partition(b"\r\n\r\n")
    text = head.decode("latin-1")
    return RawAnswer(text.split("\r\n", 1)[0], text, body)


def get_resuming(
    context: ssl.SSLContext, port: int, session: ssl.SSLSession | None = None, timeout: float = WAIT
) -> tuple[int, bool, ssl.SSLSession | None]:
    """One `GET /owa/` on a new TLS connection to the gateway, offering `session` if given: (the answer's status,
    whether the session was resumed, the session to offer next)."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=timeout) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1", session=session) as tls,
    ):
        tls.sendall(b"GET /owa/ HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := tls.recv(65536):
            answer += chunk
        return int(answer.split(b" ", 2)[1]), bool(tls.session_reused), tls.session
