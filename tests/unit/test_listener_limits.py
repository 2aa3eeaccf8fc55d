"""The listener's caps: their settings, the connection slots and the header block budget's counting."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import pytest
import uvloop
from aiohttp.http_exceptions import BadHttpMessage
from structlog.testing import capture_logs

from proxy import config
from proxy.errors import ConfigError
from proxy.tls.limits import (
    AddressCap,
    ConnectionSlots,
    HeaderBlockBudget,
    accept_connections,
    accept_queued,
    serve_accepted,
)
from tests.unit.test_config import GOOD, _write


def test_defaults_fit_one_big_token_and_many_held_connections(tmp_path: Path) -> None:
    """Without settings: a 128 KiB header block (one 64 KiB token in base64 plus ordinary headers), above
    the 96 KiB field cap, and 10,000 connections per worker."""
    listener = config.load(_write(tmp_path, GOOD)).listener
    assert listener.max_header_bytes == 128 * 1024 > config.MAX_FIELD_BYTES
    assert listener.max_connections == 10_000
    tuned = GOOD.replace("[listener]\n", "[listener]\nmax_header_bytes = 65536\nmax_connections = 500\n")
    listener = config.load(_write(tmp_path, tuned)).listener
    assert (listener.max_header_bytes, listener.max_connections) == (65536, 500)


@pytest.mark.parametrize(
    ("setting", "problem"),
    [
        ("max_header_bytes = 1000", "listener.max_header_bytes: at least 8192 bytes"),
        ("max_header_bytes = -1", "listener.max_header_bytes: must be positive"),
        ('max_connections = "many"', "listener.max_connections: expected int"),
        ("max_connections = 0", "listener.max_connections: must be positive"),
        ("max_connections_per_address = -1", "listener.max_connections_per_address: 0 (off) or a positive number"),
        ("max_connections_per_address = true", "listener.max_connections_per_address: expected int"),
        ('max_connections_per_address = "8"', "listener.max_connections_per_address: expected int"),
        ("max_connections_per_address = 2.5", "listener.max_connections_per_address: expected int"),
    ],
)
def test_bad_caps_name_their_key(tmp_path: Path, setting: str, problem: str) -> None:
    """A cap that is not a positive number, or a header budget too small for ordinary clients, names its key."""
    with pytest.raises(ConfigError) as e:
        config.load(_write(tmp_path, GOOD.replace("[listener]\n", f"[listener]\n{setting}\n")))
    assert any(p.startswith(problem) for p in e.value.problems), e.value.problems


def test_the_per_address_cap_is_off_unless_set(tmp_path: Path) -> None:
    """max_connections_per_address: 0 (off) without the key, as many devices share an address behind CGNAT;
    a positive number when set."""
    assert config.load(_write(tmp_path, GOOD)).listener.max_connections_per_address == 0
    tuned = GOOD.replace("[listener]\n", "[listener]\nmax_connections_per_address = 40\n")
    assert config.load(_write(tmp_path, tuned)).listener.max_connections_per_address == 40


def test_the_per_address_cap_counts_open_connections_per_address() -> None:
    """Two open from one address: the third is refused (logged, counted), another address is not affected, an
    IPv6 client counts by its /64 and an IPv4-mapped one as its IPv4 address; a closed connection's place is
    free again, given back once however often its end is heard, and the connection's own close still runs."""
    refused: list[None] = []
    closed: list[str] = []
    cap = AddressCap(2, on_refused=lambda: refused.append(None))
    with capture_logs() as logs:
        first = cap.admit(("192.0.2.1", 1001), lambda: closed.append("first"))
        second = cap.admit(("::ffff:192.0.2.1", 1002), lambda: closed.append("second"))
        assert first is not None
        assert second is not None
        assert cap.admit(("192.0.2.1", 1003), lambda: closed.append("third")) is None
        assert cap.admit(("192.0.2.2", 1004), lambda: None) is not None
        assert cap.admit(("2001:db8:1:2::1", 1), lambda: None) is not None
        assert cap.admit(("2001:db8:1:2::ffff", 2), lambda: None) is not None
        assert cap.admit(("2001:db8:1:2:3::9", 3), lambda: None) is None  # the same /64
        first()
        first()
        assert closed == ["first"]
        assert cap.admit(("192.0.2.1", 1005), lambda: None) is not None
        assert cap.admit(("192.0.2.1", 1006), lambda: None) is None
    assert len(refused) == 3
    events = [e for e in logs if e["event"] == "address_connection_limit_reached"]
    assert [(e["address"], e["peer"], e["limit"]) for e in events] == [
        ("192.0.2.1", "192.0.2.1:1003", 2),
        ("2001:db8:1:2::/64", "[2001:db8:1:2:3::9]:3", 2),
        ("192.0.2.1", "192.0.2.1:1006", 2),
    ]


def test_a_refused_connection_is_reset_before_a_byte_is_read_and_holds_no_slot() -> None:
    """The accept loop with max_connections 2 and one connection per address, over real loopback sockets: a
    second connection from 127.0.0.1 is reset before any protocol is made; it holds none of the two slots, so a
    connection from 127.0.0.2 is still taken."""

    async def run() -> None:
        made: list[object] = []
        slots = ConnectionSlots(2)
        cap = AddressCap(1)

        class Held(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                made.append(transport.get_extra_info("peername")[0])

        listener = socket.create_server(("127.0.0.1", 0))
        listener.setblocking(False)
        port = listener.getsockname()[1]
        accepting = asyncio.ensure_future(accept_connections(listener, lambda _closed: Held(), slots, cap))
        try:
            kept = await asyncio.open_connection("127.0.0.1", port)
            await _until(lambda: made == ["127.0.0.1"])
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"\x16\x03\x01")  # a ClientHello's first bytes: never read
            try:
                answered = await asyncio.wait_for(reader.read(1), 30)
            except ConnectionResetError:  # what the abortive close sends
                answered = b""
            assert answered == b""
            other = await asyncio.open_connection("127.0.0.1", port, local_addr=("127.0.0.2", 0))
            await _until(lambda: made == ["127.0.0.1", "127.0.0.2"])
            assert slots.open == 2
            for _, w in (kept, other):
                w.close()
            writer.close()
        finally:
            accepting.cancel()
            listener.close()

    asyncio.run(run())


async def _until(condition: Callable[[], bool], within: float = 30) -> None:
    """Poll `condition` until it holds (a loaded machine may take a while to run the accept loop)."""
    deadline = asyncio.get_running_loop().time() + within
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition never held"
        await asyncio.sleep(0.01)


def test_connection_slots_wait_for_a_free_one() -> None:
    """With two slots taken the third take waits until one is given back; giving back twice frees one slot."""

    async def run() -> None:
        waits: list[int] = []
        slots = ConnectionSlots(2, on_wait=lambda: waits.append(1))
        first = await slots.take()
        await slots.take()
        third = asyncio.ensure_future(slots.take())
        await asyncio.sleep(0.05)
        assert not third.done()
        assert waits == [1]
        first()
        first()
        await asyncio.wait_for(third, timeout=30)
        assert slots.open == 2

    asyncio.run(run())


class _Payload:
    def __init__(self, eof: bool) -> None:
        self.eof = eof

    def is_eof(self) -> bool:
        return self.eof


class _Message:
    chunked = False
    headers: ClassVar[dict[str, str]] = {"Content-Length": "500"}


class _Parser:
    """Hands over a message (with a 500-byte body) whenever fed the end of a head; records what it was fed."""

    def __init__(self) -> None:
        self.fed: list[bytes] = []
        self.payload = _Payload(eof=True)

    def feed_data(self, data: bytes) -> tuple[list[Any], bool, bytes]:
        self.fed.append(data)
        if data.endswith(b"\r\n\r\n"):
            self.payload = _Payload(eof=False)
            return [(_Message(), self.payload)], False, b""
        if len(b"".join(self.fed).rpartition(b"\r\n\r\n")[2]) >= 500:
            self.payload.eof = True
        return [], False, b""


class _Handler:
    transport = None


def test_header_budget_counts_header_blocks_and_not_bodies() -> None:
    """Bytes count while a header block is read; a body being received does not; past the budget the
    parser is fed nothing more and the refusal is reported once."""
    refused: list[int] = []
    parser = _Parser()
    budget = HeaderBlockBudget(parser, _Handler(), 100, lambda: refused.append(1))  # type: ignore[arg-type]
    budget.feed_data(b"h" * 60)
    budget.feed_data(b"h" * 36 + b"\r\n\r\n")  # 100 bytes: the block ends at the budget
    budget.feed_data(b"b" * 500)  # the body: not a header block
    budget.feed_data(b"h" * 90)  # the next request's headers
    assert refused == []
    budget.feed_data(b"h" * 20)
    budget.feed_data(b"h" * 20)
    assert refused == [1]
    assert sum(map(len, parser.fed)) == 60 + 40 + 500 + 90


def test_a_head_in_the_read_that_ends_a_body_is_counted_from_its_first_byte() -> None:
    """The end of a body and the start of the next head in one read: the head's bytes in that read count (they did
    not: a head could pass the budget by what the read held of it), and the parser gets body and head apart."""
    refused: list[int] = []
    parser = _Parser()
    budget = HeaderBlockBudget(parser, _Handler(), 100, lambda: refused.append(1))  # type: ignore[arg-type]
    budget.feed_data(b"h" * 96 + b"\r\n\r\n")
    budget.feed_data(b"b" * 400)
    budget.feed_data(b"b" * 100 + b"h" * 95)  # the body's last 100 bytes, then 95 of the next head
    assert refused == []
    assert parser.fed[-2:] == [b"b" * 100, b"h" * 95]
    budget.feed_data(b"h" * 6)  # 101
    assert refused == [1]


def test_a_parse_error_through_the_budget_is_still_aiohttps(out: io.StringIO) -> None:
    """aiohttp's parse error raised below the budget is logged as aiohttp's: type and description, not the
    traceback that quotes the client's header line."""

    class Failing(_Parser):
        def feed_data(self, data: bytes) -> tuple[list[Any], bool, bytes]:
            raise BadHttpMessage(f"Invalid header token:\n\n    {data!r}")

    budget = HeaderBlockBudget(Failing(), _Handler(), 1000, lambda: None)  # type: ignore[arg-type]
    try:
        budget.feed_data(b"Authorization: Basic c2VjcmV0LXBhc3N3b3Jk\r\n")
    except BadHttpMessage:
        logging.getLogger("aiohttp.server").exception("Error handling request")
    text = out.getvalue()
    assert "traceback" not in json.loads(text.splitlines()[-1])
    assert "c2VjcmV0" not in text


def test_a_connection_whose_protocol_cannot_be_made_does_not_end_the_accept_loop() -> None:
    """A protocol factory that raises for one connection (a bug of ours, never a client's doing) costs that
    connection only: it is closed, its slot given back, and the next connection is served by the same loop."""

    class Echo(asyncio.Protocol):
        def __init__(self, give_back: Any) -> None:
            self.give_back = give_back

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            assert isinstance(transport, asyncio.Transport)
            self.transport = transport

        def data_received(self, data: bytes) -> None:
            self.transport.write(data)

        def connection_lost(self, exc: Exception | None) -> None:
            self.give_back()

    made = 0

    def factory(give_back: Any) -> asyncio.Protocol:
        nonlocal made
        made += 1
        if made == 1:
            raise RuntimeError("a protocol that cannot be made")
        return Echo(give_back)

    async def scenario() -> None:
        listener = socket.create_server(("127.0.0.1", 0))
        listener.setblocking(False)
        slots = ConnectionSlots(1)
        task = asyncio.create_task(accept_connections(listener, factory, slots))
        port = listener.getsockname()[1]
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            assert await asyncio.wait_for(reader.read(), 30) == b""  # closed, not left open
            writer.close()
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"ping")
            assert await asyncio.wait_for(reader.readexactly(4), 30) == b"ping"
            writer.close()
            assert not task.done()
        finally:
            task.cancel()
            listener.close()

    asyncio.run(scenario())


def test_the_connections_gauge_counts_connections_not_the_slot_an_idle_accept_holds() -> None:
    """`kcd_listener_connections` reads `ConnectionSlots.connections`: 0 on a listener nobody has connected to
    (an accept loop that waits holds no slot: `open` was once 1 per listening socket on an idle gateway), 1 while one
    connection is open, 0 again once it has closed."""

    class Hold(asyncio.Protocol):
        def __init__(self, give_back: Any) -> None:
            self.give_back = give_back

        def connection_lost(self, exc: Exception | None) -> None:
            self.give_back()

    async def counted(slots: ConnectionSlots, wanted: int) -> None:
        async with asyncio.timeout(30):
            while slots.connections != wanted:  # noqa: ASYNC110  a counter, polled as a probe would
                await asyncio.sleep(0.01)

    async def scenario() -> None:
        listeners = [socket.create_server(("127.0.0.1", 0)) for _ in range(2)]  # IPv4 and IPv6, say
        slots = ConnectionSlots(10)
        tasks = []
        for listener in listeners:
            listener.setblocking(False)
            tasks.append(asyncio.create_task(accept_connections(listener, Hold, slots)))
        try:
            await asyncio.sleep(0.05)  # both loops are waiting in accept
            assert slots.open == 0
            assert slots.connections == 0
            _, writer = await asyncio.open_connection("127.0.0.1", listeners[0].getsockname()[1])
            await counted(slots, 1)
            writer.close()
            await counted(slots, 0)
        finally:
            for task in tasks:
                task.cancel()
            for listener in listeners:
                listener.close()

    asyncio.run(scenario())


def test_an_accept_loop_on_a_quiet_address_holds_no_slot() -> None:
    """Two listening sockets sharing a cap of 2, both connections on one of them: both get a protocol and a slot (a
    loop waiting on the other socket held one, and the second connection stayed in the listen backlog)."""

    made: list[object] = []

    class Held(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            made.append(transport)

    async def scenario() -> None:
        listeners = [socket.create_server(("127.0.0.1", 0)) for _ in range(2)]
        slots = ConnectionSlots(2)
        tasks = []
        for listener in listeners:
            listener.setblocking(False)
            tasks.append(asyncio.create_task(accept_connections(listener, lambda _closed: Held(), slots)))
        writers = []
        try:
            port = listeners[0].getsockname()[1]
            for count in (1, 2):
                writers.append((await asyncio.open_connection("127.0.0.1", port))[1])
                await _until(lambda count=count: len(made) == count)  # type: ignore[misc]
            assert slots.open == 2
        finally:
            for writer in writers:
                writer.close()
            for task in tasks:
                task.cancel()
            for listener in listeners:
                listener.close()

    asyncio.run(scenario())


@pytest.mark.parametrize("new_loop", [asyncio.new_event_loop, uvloop.new_event_loop], ids=["asyncio", "uvloop"])
def test_a_connection_the_kernel_handed_over_in_the_stops_turn_is_served(new_loop: Callable[[], Any]) -> None:
    """The stop (`proxy.app`: the accept loop cancelled, then `accept_queued`) run in the loop's turn right after the
    one in which the listener was readable: the connection the kernel handed over then is served with the queued
    ones. `loop.sock_accept` had accepted it in its reader callback, and its task, cancelled before it could resume,
    dropped it: the device (a balancer's connection) was reset unserved."""
    made: list[object] = []

    class Held(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            made.append(transport)

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        listener = socket.create_server(("127.0.0.1", 0))
        listener.setblocking(False)
        slots = ConnectionSlots(10)
        task = asyncio.create_task(accept_connections(listener, lambda _closed: Held(), slots))
        await asyncio.sleep(0)  # the accept loop waits for the listener to be readable
        stopped: asyncio.Future[list[tuple[socket.socket, Callable[[], None]]]] = loop.create_future()

        def stop() -> None:
            task.cancel()
            stopped.set_result(accept_queued(listener, slots, None))

        with socket.create_connection(listener.getsockname()) as device:  # its handshake done by the kernel
            loop.call_soon(loop.call_soon, stop)  # the next turn sees the listener readable; the stop, the one after
            for conn, give_back in await stopped:
                await serve_accepted(loop, lambda _closed: Held(), conn, give_back)
            await asyncio.gather(task, return_exceptions=True)
            assert len(made) == 1, "the connection was dropped"
            device.settimeout(0)
            with pytest.raises(BlockingIOError):  # open, not reset or closed
                device.recv(1)

    loop = new_loop()
    try:
        loop.run_until_complete(scenario())
    finally:
        loop.close()
