"""What a new device-side parser could get wrong, sent byte for byte over TLS to both servers
(`listener.http_server = "own"`, the gateway's own asyncio Protocol on llhttp, and `"aiohttp"`).

Each case is sent on a raw TLS socket (tests/integration/recorder.py's recorders stand behind the gateway and
keep exactly what they receive): pipelining, a body left unread, a request split across TLS records at every
byte, heads at and one byte over the caps, chunk extensions and trailers, NUL or CR in a value, `Upgrade`,
`Transfer-Encoding: chunked, chunked`, a body on GET (refused), requests sent while an answer still streams, and the
idle deadline for a head that never ends.
"""

from __future__ import annotations

import re
import socket
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from proxy.lab.layout import LabLayout
from tests.integration.conftest import Gateway, client_context, free_port, gateway_on_server, lab_config
from tests.integration.jsonlog import eventually
from tests.integration.recorder import Recorded, Recorder, chunks_complete, dechunk, read_head, read_until_closed

MAX_HEADER_BYTES = 16384
SERVERS = ("own", "aiohttp")


@dataclass
class Scene:
    gw: Gateway
    recorder: Recorder  # behind /rec/
    lab: LabLayout
    server: str

    def connect(self, timeout: float = 30) -> ssl.SSLSocket:
        ctx = client_context(self.lab, "alice")
        tcp = socket.create_connection(("127.0.0.1", self.gw.port), timeout=timeout)
        tcp.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return ctx.wrap_socket(tcp, server_hostname="127.0.0.1")


@pytest.fixture(scope="module", params=SERVERS)
def scene(request: pytest.FixtureRequest, lab: LabLayout, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scene]:
    server = request.param
    recorder = Recorder()
    text = lab_config(lab, port=free_port())
    text += f'\n[[routes]]\nprefix = "/rec/"\nupstream = "{recorder.url}"\nspn = "HTTP/cas.lab.test"\n'
    listener = f"max_header_bytes = {MAX_HEADER_BYTES}\nkeepalive_timeout = 3\n"
    try:
        with gateway_on_server(lab, tmp_path_factory.mktemp(f"device-{server}"), server, text, listener=listener) as gw:
            yield Scene(gw, recorder, lab, server)
    finally:
        recorder.close()


def answers(data: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """The HTTP answers in `data`, in order: (status, headers by lower-case name, body); bodies framed by
    Content-Length or chunked."""
    out = []
    while data:
        head, sep, rest = data.partition(b"\r\n\r\n")
        if not sep:
            break
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        fields = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        if status == 100:
            data = rest
            continue
        if "content-length" in fields:
            n = int(fields["content-length"])
            body, data = rest[:n], rest[n:]
        elif fields.get("transfer-encoding") == "chunked":
            end = rest.index(b"0\r\n\r\n")
            while True:  # the terminating chunk is the first 0-size chunk at a chunk boundary
                try:
                    body = dechunk(rest[: end + 5])
                    break
                except (ValueError, IndexError):
                    end = rest.index(b"0\r\n\r\n", end + 1)
            data = rest[end + 5 :]
        else:
            body, data = rest, b""
        out.append((status, fields, body))
    return out


def get(path: str, *extra: str, close: bool = True) -> bytes:
    lines = [f"GET {path} HTTP/1.1", "Host: 127.0.0.1", *extra, *(["Connection: close"] if close else []), "", ""]
    return "\r\n".join(lines).encode("latin-1")


def exchange(scene: Scene, data: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    with scene.connect() as tls:
        tls.sendall(data)
        return answers(read_until_closed(tls))


def test_a_body_left_unread_is_never_read_as_the_next_request(scene: Scene) -> None:
    """A refused request (an ambiguous path: 400 before any stage reads the body) whose body is a whole request
    of its own, then a pipelined request: the request hidden in the body never reaches a backend."""
    smuggled = get("/rec/smuggled", close=False)
    first = (
        f"POST /rec/%2f../x HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(smuggled)}\r\n\r\n".encode() + smuggled
    )
    scene.recorder.taken()
    got = exchange(scene, first + get("/rec/after"))
    assert got[0][0] == 400
    paths = [r.path for r in _taken(scene)]
    assert "/rec/smuggled" not in paths
    assert paths in ([], ["/rec/after"])  # served after the body was read whole, or the connection ended first


def test_a_request_split_at_every_byte_is_read_as_one(scene: Scene) -> None:
    """A request with a chunked body sent one byte per TLS record: the backend gets the same request, the same
    body, as when it is sent in one piece."""
    body = b"4\r\nwiki\r\n5;ext=1\r\npedia\r\n0\r\n\r\n"
    head = b"POST /rec/split HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    scene.recorder.taken()
    with scene.connect() as tls:
        for i in range(len(head + body)):
            tls.sendall((head + body)[i : i + 1])
        got = answers(read_until_closed(tls))
    assert [status for status, _, _ in got] == [200]
    (recorded,) = _taken(scene)
    assert recorded.path == "/rec/split"
    assert dechunk(recorded.body) == b"wikipedia"


def _head_of(size: int) -> bytes:
    """A GET whose header block (request line to the empty line) is exactly `size` bytes."""
    base = get("/rec/cap", "X-Pad: ")
    pad = size - len(base)
    assert pad > 0
    return get("/rec/cap", "X-Pad: " + "a" * pad)


def test_a_head_exactly_at_the_budget_passes_and_one_byte_more_is_431(scene: Scene) -> None:
    """`max_header_bytes` counts the header block to the byte, in whatever records it comes: exactly the budget
    is served, one byte over is 431 and never forwarded."""
    scene.recorder.taken()
    at = _head_of(MAX_HEADER_BYTES)
    assert len(at) == MAX_HEADER_BYTES
    assert [s for s, _, _ in exchange(scene, at)] == [200]
    assert [s for s, _, _ in exchange(scene, _head_of(MAX_HEADER_BYTES + 1))] == [431]
    assert [r.path for r in _taken(scene)] == ["/rec/cap"]


_LEADS = {
    "bodiless": get("/rec/lead", close=False),
    "content-length": b"POST /rec/lead HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5\r\n\r\nhello",
    "chunked": b"POST /rec/lead HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5;x=y\r\nhello\r\n0\r\nX-T: 1\r\n\r\n",
}


@pytest.mark.parametrize("lead", list(_LEADS))
def test_a_head_that_follows_another_request_in_one_read_is_budgeted_to_the_byte(scene: Scene, lead: str) -> None:
    """A head written right after a whole request (bodiless, a Content-Length body, a chunked body with a trailer)
    arrives in the same read as that request's end: it is counted from its first byte, so exactly the budget is
    served and one byte more is 431, never forwarded."""
    scene.recorder.taken()
    at = [s for s, _, _ in exchange(scene, _LEADS[lead] + _head_of(MAX_HEADER_BYTES))]
    over = [s for s, _, _ in exchange(scene, _LEADS[lead] + _head_of(MAX_HEADER_BYTES + 1))]
    paths = [r.path for r in _taken(scene)]
    assert at == [200, 200]
    if scene.server == "aiohttp":
        # aiohttp drops the requests it parsed in the read that passed the budget (docs/hardening.md, section 7)
        assert over in ([431], [200, 431]), over
        assert paths.count("/rec/cap") == 1
        return
    assert over == [200, 431]
    assert paths == ["/rec/lead", "/rec/cap", "/rec/lead"]


def test_the_431_of_a_head_read_while_a_request_is_answered_comes_after_that_answer(scene: Scene) -> None:
    """A request whose backend has not answered yet, then (in a later read) a head one byte over the budget: the
    device gets the first request's answer, then the 431 (HTTP/1.1 answers in order). Before, aiohttp's server
    wrote the 431 at once: the device took it for the first request's answer, and lost the real one."""
    scene.recorder.taken()
    release = scene.recorder.hold("/rec/slow")
    with scene.connect() as tls:
        scene.gw.mark()
        tls.sendall(get("/rec/slow", close=False))
        eventually(
            lambda: any(r.path == "/rec/slow" for r in scene.recorder.requests), "the slow request at the backend"
        )
        tls.sendall(_head_of(MAX_HEADER_BYTES + 1))
        scene.gw.wait_events("request_headers_too_large")
        release.set()
        got = answers(read_until_closed(tls))
    assert [(s, b) for s, _, b in got] == [(200, b"ok"), (431, got[-1][2])], got
    assert [r.path for r in _taken(scene)] == ["/rec/slow"]


def test_the_budget_holds_when_the_head_comes_a_byte_at_a_time(scene: Scene) -> None:
    """One byte over the budget, one byte per TLS record: 431, as when sent at once."""
    over = _head_of(MAX_HEADER_BYTES + 1)
    scene.recorder.taken()
    with scene.connect() as tls:
        try:
            for i in range(0, len(over), 512):  # a record per 512 bytes: 33 records, the last one over
                tls.sendall(over[i : i + 512])
        except (ssl.SSLError, OSError):
            pass
        got = answers(read_until_closed(tls))
    assert [s for s, _, _ in got] == [431]
    assert not _taken(scene)


def test_chunk_extensions_and_trailers_stay_at_the_gateway(scene: Scene) -> None:
    """Chunk extensions and trailer fields are the device's framing: the backend gets the payload re-framed,
    with no extension and no trailer (a trailer cannot add a header field the gateway never checked)."""
    body = b"3;name=value\r\nabc\r\n0\r\nX-Smuggled: 1\r\nAuthorization: Basic eDp5\r\n\r\n"
    head = b"POST /rec/trailer HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    scene.recorder.taken()
    assert [s for s, _, _ in exchange(scene, head + body)] == [200]
    (recorded,) = _taken(scene)
    assert dechunk(recorded.body) == b"abc"
    raw = recorded.head + recorded.body
    assert b"name=value" not in raw
    assert b"X-Smuggled" not in raw
    assert b"Basic" not in raw


FRAMING = "/rec/framing"  # the path of the framing tests' requests (`_chunked`)


def _taken(scene: Scene) -> list[Recorded]:
    """What the recorder got since it was last asked, less a framing test's request: refused mid-body, its head may
    reach the recorder after that test ended (the gateway connects and sends it before the framing is read, then
    aborts), and would be read as the next test's."""
    return [r for r in scene.recorder.taken() if r.path != FRAMING]


def _chunked(body: bytes, path: str = FRAMING) -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    return head.encode() + body


@pytest.mark.parametrize(
    ("name", "body"),
    [
        ("a chunk extension", b"3;x=" + b"a" * MAX_HEADER_BYTES + b"\r\nabc\r\n0\r\n\r\n"),
        ("a trailer field", b"3\r\nabc\r\n0\r\nX-T: " + b"a" * MAX_HEADER_BYTES + b"\r\n\r\n"),
        ("trailer fields", b"3\r\nabc\r\n0\r\n" + b"X-T: aaaaaaaaaa\r\n" * (MAX_HEADER_BYTES // 17 + 1) + b"\r\n"),
        ("a chunk size's zeros", b"0" * MAX_HEADER_BYTES + b"3\r\nabc\r\n0\r\n\r\n"),
    ],
)
def test_framing_inside_a_body_past_the_header_budget_is_400_even_in_one_read(
    scene: Scene, name: str, body: bytes
) -> None:
    """What is not payload inside a chunked body (a size, an extension, trailer fields) is held to
    `max_header_bytes`, counted to the byte wherever the reads fall: one run of it a little over the budget, sent
    in one write with the request's end, is 400 and the backend never gets a whole request (its head, if the bytes
    before the framing came in a read of their own, and never the body's end). The own server counted whole reads
    and looked only before the next one, so such a body that ended in the same read was served (200). Refused once
    its head had been handed over, the refusal is the gateway's own on both servers: aiohttp's read the failed body
    again after the answer (its lingering close) and logged `Unhandled exception` with a traceback."""
    scene.recorder.taken()
    mark = scene.gw.mark()
    got = exchange(scene, _chunked(body))
    assert [s for s, _, _ in got] == [400], name
    assert not [r for r in scene.recorder.taken() if chunks_complete(r.body)], name
    scene.gw.wait_event("request", status=400)  # (aiohttp logs its unhandled exception before it closes)
    unhandled = [e for e in scene.gw.logs()[mark:] if e.get("event") == "Unhandled exception" or "traceback" in e]
    assert not [e for e in unhandled if e.get("error") != "BadHttpMessage"], unhandled


def test_framing_inside_a_body_within_the_header_budget_is_served(scene: Scene) -> None:
    """Chunk extensions and trailer fields that together stay under `max_header_bytes` (each run of framing between
    payload bytes counted on its own) pass: the backend gets the payload."""
    extension = b";x=" + b"a" * (MAX_HEADER_BYTES - 100)
    body = b"3" + extension + b"\r\nabc\r\n4" + extension + b"\r\ndefg\r\n0\r\nX-T: " + b"b" * 10000 + b"\r\n\r\n"
    scene.recorder.taken()
    got = exchange(scene, _chunked(body, "/rec/framed"))  # not FRAMING: its own request is the one to find
    assert [s for s, _, _ in got] == [200]
    (recorded,) = _taken(scene)
    assert recorded.path == "/rec/framed"
    assert dechunk(recorded.body) == b"abcdefg"


@pytest.mark.parametrize(
    ("name", "request_bytes"),
    [
        ("NUL in a value", b"GET /rec/x HTTP/1.1\r\nHost: 127.0.0.1\r\nX-A: a\x00b\r\n\r\n"),
        ("CR in a value", b"GET /rec/x HTTP/1.1\r\nHost: 127.0.0.1\r\nX-A: a\rb\r\n\r\n"),
        ("bare LF", b"GET /rec/x HTTP/1.1\nHost: 127.0.0.1\n\n"),
        ("obs-fold", b"GET /rec/x HTTP/1.1\r\nHost: 127.0.0.1\r\nX-A: a\r\n b\r\n\r\n"),
        (
            "chunked, chunked",
            b"POST /rec/x HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked, chunked\r\n\r\n"
            b"1\r\na\r\n0\r\n\r\n",
        ),
        (
            "two Transfer-Encoding fields",
            b"POST /rec/x HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked"
            b"\r\n\r\n1\r\na\r\n0\r\n\r\n",
        ),
        (
            "Content-Length and Transfer-Encoding",
            b"POST /rec/x HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"0\r\n\r\nG",
        ),
        (
            "two Content-Lengths",
            b"POST /rec/x HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
        ),
        ("a length that is a list", b"POST /rec/x HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1, 1\r\n\r\na"),
        (
            "Transfer-Encoding not ending in chunked",
            b"POST /rec/x HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: gzip\r\n\r\n",
        ),
        (
            "a bad chunk size",
            b"POST /rec/x HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\na\r\n0\r\n\r\n",
        ),
        ("HTTP/1.1 without Host", b"GET /rec/x HTTP/1.1\r\nX-A: a\r\n\r\n"),
        ("two Host fields", b"GET /rec/x HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"),
        ("a space before the colon", b"GET /rec/x HTTP/1.1\r\nHost: 127.0.0.1\r\nX-A : b\r\n\r\n"),
        ("an unknown version", b"GET /rec/x HTTP/1.2\r\nHost: 127.0.0.1\r\n\r\n"),
        ("chunked with HTTP/1.0", b"POST /rec/x HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n0\r\n\r\n"),
        ("a target over 8190 bytes", b"GET /rec/" + b"a" * 8190 + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"),
        (
            "129 fields",
            b"GET /rec/x HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"".join(b"X-%d: a\r\n" % i for i in range(128)) + b"\r\n",
        ),
    ],
)
def test_malformed_framing_is_400_and_nothing_is_forwarded(scene: Scene, name: str, request_bytes: bytes) -> None:
    """Each shape a parser could read two ways (or that aiohttp's parser refused): 400, the connection closed,
    nothing forwarded, and the request counted in a summary line."""
    scene.recorder.taken()
    got = exchange(scene, request_bytes + get("/rec/next"))
    assert [s for s, _, _ in got] == [400], name
    assert not _taken(scene), name


@pytest.mark.parametrize(
    ("limit", "request_bytes", "named"),
    [
        ("the target's length", b"GET /rec/" + b"a" * 8190 + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", "8190"),
        (
            "the number of fields",
            b"GET /rec/x HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"".join(b"X-%d: a\r\n" % i for i in range(128)) + b"\r\n",
            "header",
        ),
        ("Host is required", b"GET /rec/x HTTP/1.1\r\nX-A: a\r\n\r\n", "Host"),
        ("one Host", b"GET /rec/x HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", "Host"),
        ("framing in a body", _chunked(b"3;" + b"a" * MAX_HEADER_BYTES + b"\r\nabc\r\n0\r\n\r\n"), "max_header_bytes"),
    ],
)
def test_a_request_the_parser_refuses_is_told_why(scene: Scene, limit: str, request_bytes: bytes, named: str) -> None:
    """A request refused while it is parsed (a limit of the device side, a missing or doubled Host, framing over the
    budget) gets a 400 whose text names what is wrong, as every other refusal's does. The own server answered
    each with the same `the request could not be parsed` (the reason was in its log only)."""
    got = exchange(scene, request_bytes)
    assert [s for s, _, _ in got] == [400], limit
    assert named in got[0][2].decode(), (limit, got[0][2])


_CODINGS = {  # the codings, and the status: 501 for a coding not implemented, 400 for two fields (aiohttp's parser)
    "gzip, chunked": (b"Transfer-Encoding: gzip, chunked\r\n", 501),
    "deflate then chunked, two fields": (b"Transfer-Encoding: deflate\r\nTransfer-Encoding: chunked\r\n", 400),
}


@pytest.mark.parametrize("split", [False, True], ids=["one-write", "head-then-body"])
@pytest.mark.parametrize("name", list(_CODINGS))
def test_a_transfer_coding_the_gateway_does_not_decode_is_refused_and_never_forwarded(
    scene: Scene, name: str, split: bool
) -> None:
    """A body whose transfer codings end in chunked but include another (gzip, deflate): the gateway dropped the
    coding with the hop-by-hop header and forwarded the still-compressed bytes as the body (and the own server, with
    the codings in two fields, read the request as bodiless): 501 (400 for two fields) before any stage, and the coded
    request never forwarded."""
    compressed = b"\x1f\x8b\x08\x00junk"
    fields, status = _CODINGS[name]
    head = b"POST /rec/coded HTTP/1.1\r\nHost: 127.0.0.1\r\n" + fields + b"\r\n"
    body = b"%x\r\n%b\r\n0\r\n\r\n" % (len(compressed), compressed)
    scene.recorder.taken()
    with scene.connect() as tls:
        tls.sendall(head)
        if split:
            time.sleep(0.3)  # not a wait for anything: the head alone, in its own TLS record and read
        tls.sendall(body + get("/rec/next"))
        got = answers(read_until_closed(tls))
    assert got[0][0] == status, (name, got)
    paths = [r.path for r in _taken(scene)]
    assert paths in ([], ["/rec/next"]), name  # served once the coded body was read whole, or the connection ended


def test_upgrade_is_not_a_way_around_the_parser(scene: Scene) -> None:
    """`Connection: Upgrade` (a WebSocket handshake) is forwarded as a plain GET without its Upgrade, and the
    bytes after it are never read as a request for another route."""
    scene.recorder.taken()
    upgrade = get("/rec/ws", "Connection: Upgrade", "Upgrade: websocket", close=False)
    got = exchange(scene, upgrade + get("/rec/smuggled"))
    assert got
    assert got[0][0] == 200
    recorded = _taken(scene)
    assert [r.path for r in recorded][:1] == ["/rec/ws"]
    assert b"upgrade" not in recorded[0].head.lower()
    if scene.server == "own":
        assert [r.path for r in recorded] == ["/rec/ws"]  # nothing after an Upgrade is read


@pytest.mark.parametrize("end", ["tcp-fin", "close_notify"])
@pytest.mark.parametrize("framing", ["chunked", "content-length"])
def test_a_body_cut_short_by_the_devices_end_never_reaches_the_backend_whole(
    scene: Scene, framing: str, end: str
) -> None:
    """The device sends half its body and ends the connection (a TCP end without close_notify, a truncation; or its
    close_notify) once the backend has the request's head: the backend never gets the body's end (no last chunk, or
    fewer bytes than the Content-Length), so it never acts on a body cut short; the request ends at the gateway as
    one the device left (499)."""
    path = f"/rec/cut-{framing}-{end}"
    if framing == "chunked":
        head, part = "Transfer-Encoding: chunked", b"5\r\nhello\r\n3\r\nab"
    else:
        head, part = "Content-Length: 10", b"hello"
    scene.recorder.taken()
    scene.gw.mark()
    with scene.connect() as tls:
        tls.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{head}\r\nExpect: 100-continue\r\n\r\n".encode())
        interim = b""
        while b"\r\n\r\n" not in interim:  # 100 Continue: every stage passed and the request is being forwarded
            chunk = tls.recv(1000)
            assert chunk, interim
            interim += chunk
        assert interim.startswith(b"HTTP/1.1 100 "), interim
        tls.sendall(part)
        eventually(lambda: path in scene.recorder.heads, "the request's head at the backend")
        if end == "tcp-fin":
            tls.shutdown(socket.SHUT_WR)  # SSLSocket.shutdown: the TCP end, no close_notify
        else:
            tls.unwrap()
        read_until_closed(tls) if end == "tcp-fin" else None
    assert scene.gw.wait_event("request", path=path)["status"] == 499
    eventually(lambda: scene.recorder.open == 0, "the backend's connection ended")  # closed before the line above
    (got,) = (r for r in _taken(scene) if r.path == path)
    assert not chunks_complete(got.body) if framing == "chunked" else len(got.body) < 10, got.body


def test_a_body_on_get_is_refused_and_never_read_as_a_request(scene: Scene) -> None:
    """A GET whose Content-Length body is a whole request of its own is 400 (it was forwarded with its body: a backend
    that ignores a body on GET reads it as the user's next request); the request hidden in the body never reaches a
    backend, the one pipelined after it may (as after any refusal whose body was read whole)."""
    smuggled = get("/rec/smuggled", close=False)
    first = f"GET /rec/one HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(smuggled)}\r\n\r\n".encode() + smuggled
    scene.recorder.taken()
    got = exchange(scene, first + get("/rec/two"))
    assert got[0][0] == 400
    assert [r.path for r in _taken(scene)] in ([], ["/rec/two"])


def test_pipelined_requests_are_answered_in_order_while_an_answer_streams(scene: Scene) -> None:
    """Three requests in one write, the first with a 3 MB answer that streams while the others have arrived:
    three answers, in order, each whole."""
    big = 3_000_000
    data = (
        get("/owa/a", f"X-Lab-Body-Bytes: {big}", close=False)
        + get("/owa/b", close=False)
        + get("/owa/c", "X-Lab-Body-Bytes: 10")
    )
    got = exchange(scene, data)
    assert [s for s, _, _ in got] == [200, 200, 200]
    assert len(got[0][2]) == big
    assert b"/owa/b" in got[1][2]
    assert len(got[2][2]) == 10


def test_keep_alive_serves_many_requests_and_connection_close_ends_it(scene: Scene) -> None:
    """Ten requests one after another on one connection, the last with `Connection: close`: ten answers, then
    the gateway closes."""
    with scene.connect() as tls:
        for i in range(9):
            tls.sendall(get(f"/owa/k{i}", close=False))
            buffered = b""
            while not re.search(rb"\r\n\r\n", buffered) or len(answers(buffered)) < 1:
                buffered += tls.recv(65536)
            assert answers(buffered)[0][0] == 200
        tls.sendall(get("/owa/last"))
        last = answers(read_until_closed(tls))
    assert [s for s, _, _ in last] == [200]
    assert last[0][1].get("connection") == "close"


def test_http_1_0_keep_alive_and_head(scene: Scene) -> None:
    """HTTP/1.0 with `Connection: keep-alive` keeps the connection; HEAD carries the length and no body."""
    with scene.connect() as tls:
        tls.sendall(b"GET /owa/x HTTP/1.0\r\nHost: 127.0.0.1\r\nConnection: keep-alive\r\nX-Lab-Body-Bytes: 7\r\n\r\n")
        buffered = b""
        while len(answers(buffered)) < 1 or len(answers(buffered)[0][2]) < 7:
            buffered += tls.recv(65536)
        tls.sendall(b"HEAD /owa/x HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Lab-Body-Bytes: 5000\r\nConnection: close\r\n\r\n")
        rest = read_until_closed(tls)
    assert answers(buffered)[0][0] == 200
    head, _, body = rest.partition(b"\r\n\r\n")
    assert b" 200 " in head.split(b"\r\n")[0]
    assert b"content-length: 5000" in head.lower()
    assert body == b""


def test_a_head_that_never_ends_is_closed_at_keepalive_timeout(scene: Scene) -> None:
    """A slow client trickling header bytes (slowloris) is closed `keepalive_timeout` (3 s here) after it
    connected, whatever it keeps sending; nothing is forwarded."""
    scene.recorder.taken()
    with scene.connect(timeout=20) as tls:
        tls.sendall(b"GET /rec/slow HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        start = time.monotonic()
        closed = False
        while time.monotonic() - start < 15:
            try:
                tls.sendall(b"X-A: b\r\n")
            except (ssl.SSLError, OSError):
                closed = True
                break
            tls.settimeout(0.5)
            try:
                if tls.recv(100) == b"":
                    closed = True
                    break
            except TimeoutError:
                continue
            except (ssl.SSLError, OSError):
                closed = True
                break
        assert closed
        assert time.monotonic() - start < 12
    assert not _taken(scene)


@pytest.mark.parametrize(
    ("framing", "body"),
    [("Transfer-Encoding: chunked", b"3\r\nabc\r\n0\r\n\r\n"), ("Content-Length: 3", b"abc")],
)
def test_an_upgrade_with_a_body_is_never_forwarded_without_it(scene: Scene, framing: str, body: bytes) -> None:
    """A POST that asks for an Upgrade and carries a body (llhttp stops parsing at the end of such a head, so
    its body is never read): the backend never gets that request with another body (none, or cut short)."""
    scene.recorder.taken()
    head = f"POST /rec/up HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n{framing}\r\n\r\n"
    got = exchange(scene, head.encode("latin-1") + body)
    assert got
    for recorded in _taken(scene):
        sent = dechunk(recorded.body) if recorded.headers("Transfer-Encoding") else recorded.body
        assert sent == b"abc", (got[0][0], recorded.head, recorded.body)
    assert got[0][0] in (200, 400), got[0][0]  # forwarded whole, or refused; never a 502 for a body cut short


def test_pipelined_requests_longer_than_the_head_budget_together_are_all_served(scene: Scene) -> None:
    """Two thousand small pipelined requests in one write (80 KB, five times listener.max_header_bytes): each
    head is far below the budget, so each server answers each (404 for `OPTIONS *`): the budget is per head,
    not per read (aiohttp's used to count whole reads and end the connection partway with a 431)."""
    one = b"OPTIONS * HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    data = one * 1999 + b"OPTIONS * HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    assert len(data) > 4 * MAX_HEADER_BYTES
    got = exchange(scene, data)
    assert [s for s, _, _ in got] == [404] * 2000


_UNMET = {  # Expect fields no server behind the gateway is asked to meet
    "unknown": b"Expect: foo\r\n",
    "100-continue and another": b"Expect: 100-continue, foo\r\n",
    "100-continue with a parameter": b"Expect: 100-continue;x=1\r\n",
    "obfuscated 100-continue": b"Expect: y 100-continue\r\n",
    "a second Expect field": b"Expect: 100-continue\r\nExpect: foo\r\n",
}


@pytest.mark.parametrize("version", ["1.1", "1.0"])
@pytest.mark.parametrize("name", list(_UNMET))
def test_an_expectation_the_gateway_cannot_meet_is_417_and_never_forwarded(
    scene: Scene, name: str, version: str
) -> None:
    """An `Expect` member other than `100-continue` (RFC 9110 10.1.1): 417 naming it, before any stage, and the
    request never forwarded (it was forwarded without its Expect field, so the device and any server in front
    could read the request two ways)."""
    head = f"POST /rec/expect HTTP/{version}\r\nHost: 127.0.0.1\r\nContent-Length: 5\r\n".encode() + _UNMET[name]
    scene.recorder.taken()
    scene.gw.mark()
    after = get("/rec/next") if version == "1.1" else b""  # HTTP/1.0 without keep-alive: nothing after it
    got = exchange(scene, head + b"\r\nhello" + after)
    assert got[0][0] == 417, (name, got)
    assert b"only 100-continue" in got[0][2], got[0][2]
    assert [r.path for r in _taken(scene)] in ([], ["/rec/next"]), name
    line = scene.gw.wait_event("request", status=417)
    assert line["refused_stage"] == "request"


@pytest.mark.parametrize(
    ("name", "head", "continued"),
    [
        ("any case", b"POST /rec/continue HTTP/1.1\r\nExpect: 100-Continue\r\n", True),
        ("HTTP/1.0 (ignored)", b"POST /rec/continue HTTP/1.0\r\nExpect: 100-continue\r\n", False),
        ("empty (ignored)", b"POST /rec/continue HTTP/1.1\r\nExpect:\r\n", False),
    ],
)
def test_100_continue_is_met_whatever_its_case_and_ignored_where_it_must_be(
    scene: Scene, name: str, head: bytes, continued: bool
) -> None:
    """`Expect: 100-continue` in any case gets `100 Continue` and the request is forwarded with its body and without
    the field; in HTTP/1.0 (RFC 9110 10.1.1: ignored) and empty, no 100 and the request is served as if unasked."""
    scene.recorder.taken()
    with scene.connect() as tls:
        tls.sendall(head + b"Host: 127.0.0.1\r\nContent-Length: 5\r\nConnection: close\r\n\r\n")
        if continued:
            interim = read_head(tls)
            assert interim.startswith(b"HTTP/1.1 100 Continue\r\n"), interim
        tls.sendall(b"hello")
        rest = read_until_closed(tls)
    assert b"100 Continue" not in rest
    assert [s for s, _, _ in answers(rest)] == [200], name
    (recorded,) = _taken(scene)
    assert recorded.body == b"hello"
    assert not recorded.headers("Expect")


def test_a_head_over_the_budget_is_logged_when_read_even_if_the_device_leaves_before_its_431(scene: Scene) -> None:
    """A request the backend holds, then a head one byte over the budget, then the device leaves: the refusal is
    logged (`request_headers_too_large`, with the metric) when the head is read, not when its 431 would be written.
    The own server wrote it only with the 431, after the answers before it: a device that left first (or whose
    request ahead was a half-hour long-poll) left no trace of the attack."""
    release = scene.recorder.hold("/rec/held-then-gone")
    try:
        with scene.connect() as tls:
            scene.gw.mark()
            tls.sendall(get("/rec/held-then-gone", close=False))
            eventually(
                lambda: any(r.path == "/rec/held-then-gone" for r in scene.recorder.requests), "the request held"
            )
            tls.sendall(_head_of(MAX_HEADER_BYTES + 1))
        line = scene.gw.wait_event("request_headers_too_large")
        assert str(MAX_HEADER_BYTES) in line["reason"]
    finally:
        release.set()
        scene.recorder.taken()
