"""The PROXY header parser and gate (proxy.tls.proxy_protocol): what balancers send, and what attackers send."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import struct
from collections.abc import AsyncIterator, Callable

import pytest
from structlog.testing import capture_logs

from proxy.tls import proxy_protocol
from proxy.tls.limits import ConnectionSlots, IdleKeepAlives, SlotWait
from proxy.tls.proxy_protocol import V2_SIGNATURE, ProxyHeader, ProxyHeaderError, parse, trusted

CLIENT_HELLO = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"  # how a TLS connection begins


def v2(command: int = 1, family: int = 0x11, addresses: bytes | None = None, tlvs: bytes = b"") -> bytes:
    """A v2 header as HAProxy's send-proxy-v2 writes it (IPv4 TCP by default)."""
    if addresses is None:
        addresses = socket.inet_aton("203.0.113.7") + socket.inet_aton("192.0.2.1") + struct.pack("!HH", 50123, 443)
    body = addresses + tlvs
    return V2_SIGNATURE + bytes([0x20 | command, family]) + struct.pack("!H", len(body)) + body


def test_v1_tcp4_names_the_device() -> None:
    """A v1 TCP4 line gives the device's address and port, and its length (the TLS bytes follow)."""
    line = b"PROXY TCP4 203.0.113.7 192.0.2.1 50123 443\r\n"
    assert parse(line + CLIENT_HELLO) == ProxyHeader(1, "proxy", ("203.0.113.7", 50123), ("192.0.2.1", 443), len(line))


def test_v1_tcp6_and_unknown() -> None:
    """TCP6 gives an IPv6 device; UNKNOWN (a balancer that does not know) leaves the connection's own address."""
    header = parse(b"PROXY TCP6 2001:db8::7 2001:db8::1 50123 443\r\n")
    assert header is not None
    assert header.source == ("2001:db8::7", 50123)
    unknown = parse(b"PROXY UNKNOWN\r\n")
    assert unknown is not None
    assert (unknown.command, unknown.source) == ("local", None)


def test_v2_ipv4_ipv6_and_tlvs() -> None:
    """v2 PROXY over IPv4 and IPv6 gives the device; TLVs after the addresses are skipped, not misread."""
    header = v2(tlvs=b"\x04\x00\x03abc")
    parsed = parse(header + CLIENT_HELLO)
    assert parsed == ProxyHeader(2, "proxy", ("203.0.113.7", 50123), ("192.0.2.1", 443), len(header))
    six = ipaddress.IPv6Address("2001:db8::7").packed + ipaddress.IPv6Address("2001:db8::1").packed
    parsed6 = parse(v2(family=0x21, addresses=six + struct.pack("!HH", 1, 2)))
    assert parsed6 is not None
    assert parsed6.source == ("2001:db8::7", 1)


@pytest.mark.parametrize(
    "source",
    [b"fe80::1%eth0", b"fe80::1%eth0,192.0.2.66", b'::1%x"y', b"2001:db8::7%" + b"a" * 60],
)
def test_a_v1_address_with_a_zone_is_refused(source: bytes) -> None:
    """An IPv6 zone (`%eth0`) names an interface of the balancer, not a device, and Python's `ip_address` takes any
    text after the `%`: `fe80::1%eth0,192.0.2.66` became the device's address, sent on as `X-Forwarded-For` (a list
    of two to the backend) and logged as the client. Refused, as any address that is not one."""
    with pytest.raises(ProxyHeaderError, match="bad address"):
        parse(b"PROXY TCP6 " + source + b" 2001:db8::1 50123 443\r\n")


def test_an_ipv4_mapped_device_address_is_its_ipv4_address() -> None:
    """A dual-stack balancer names an IPv4 device as `::ffff:a.b.c.d` (v1 TCP6, v2 INET6): the device is a.b.c.d,
    as the address throttle and the per-address cap count it, and so it is logged and sent as `X-Forwarded-For`
    (it was `::ffff:cb00:7107`)."""
    header = parse(b"PROXY TCP6 ::ffff:203.0.113.7 ::ffff:192.0.2.1 50123 443\r\n")
    assert header is not None
    assert (header.source, header.destination) == (("203.0.113.7", 50123), ("192.0.2.1", 443))
    mapped = ipaddress.IPv6Address("::ffff:203.0.113.7").packed + ipaddress.IPv6Address("2001:db8::1").packed
    parsed = parse(v2(family=0x21, addresses=mapped + struct.pack("!HH", 1, 2)))
    assert parsed is not None
    assert parsed.source == ("203.0.113.7", 1)


def test_v2_local_is_the_balancers_own_connection() -> None:
    """LOCAL (HAProxy's health checks) and UNSPEC carry no device: nothing is claimed. Only LOCAL is the balancer's own
    connection (a health check); UNSPEC and v1 UNKNOWN relay a device whose address the balancer does not know."""
    for header, check in ((v2(command=0, family=0, addresses=b""), True), (v2(family=0x00, addresses=b""), False)):
        parsed = parse(header)
        assert parsed is not None
        assert (parsed.command, parsed.source, parsed.health_check, parsed.unnamed) == ("local", None, check, not check)
    unknown = parse(b"PROXY UNKNOWN\r\n")
    assert unknown is not None
    assert (unknown.health_check, unknown.unnamed) == (False, True)  # its requests are refused (proxy.app)


@pytest.mark.parametrize(
    "whole",
    [b"PROXY TCP4 203.0.113.7 192.0.2.1 50123 443\r\n", v2(), v2(tlvs=b"\x04\x00\x03abc")],
    ids=["v1", "v2", "v2-tlv"],
)
def test_a_truncated_header_asks_for_more(whole: bytes) -> None:
    """Every proper prefix of a header, down to its first byte, is 'not yet', never a header or an error."""
    for end in range(1, len(whole)):
        assert parse(whole[:end]) is None, whole[:end]
    assert parse(whole) is not None


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (CLIENT_HELLO, "no PROXY header"),  # a device (or attacker) that skipped the balancer
        (b"GET / HTTP/1.1\r\n", "no PROXY header"),
        (b"PROXZ TCP4", "begin like v1"),
        (b"\r\n\r\n\x00\r\nQUIX\n", "wrong v2 signature"),
        (b"PROXY TCP4 203.0.113.7 192.0.2.1 50123 443" + b" " * 80, "longer than 107"),
        (b"PROXY TCP4 203.0.113.7 192.0.2.1 50123 443\n", "other than CRLF"),
        (b"PROXY TCP4 203.0.113.7 192.0.2.1 50123\r\n", "5 fields"),
        (b"PROXY TCP4 203.0.113.7 192.0.2.1 50123 443 9\r\n", "7 fields"),
        (b"PROXY UDP4 203.0.113.7 192.0.2.1 50123 443\r\n", "unknown protocol"),
        (b"PROXY TCP4 2001:db8::7 192.0.2.1 50123 443\r\n", "not an IPv4"),
        (b"PROXY TCP6 203.0.113.7 2001:db8::1 50123 443\r\n", "not an IPv6"),
        (b"PROXY TCP4 203.0.113.700 192.0.2.1 50123 443\r\n", "bad address"),
        (b"PROXY TCP4 203.0.113.07 192.0.2.1 50123 443\r\n", "bad address"),
        (b"PROXY TCP4 203.0.113.7 192.0.2.1 65536 443\r\n", "bad port"),
        (b"PROXY TCP4 203.0.113.7 192.0.2.1 +5 443\r\n", "bad port"),
        (b"PROXY TCP4 203.0.113.7 192.0.2.1 0443 443\r\n", "bad port"),
        (b"PROXY TCP4 203.0.113.7 192.0.2.1 \xd9\xa3 443\r\n", "non-ASCII"),
        (V2_SIGNATURE + b"\x11\x11\x00\x0c", "version 1"),  # v2 signature, version nibble 1
        (V2_SIGNATURE + b"\x22\x11\x00\x0c", "unknown command 2"),
        (V2_SIGNATURE + b"\x21\x11\xff\xff", "more than the 2048"),  # 64 KiB announced: refused, not buffered
        (v2(family=0x12), "not a TCP stream"),  # UDP
        (v2(family=0x31, addresses=b"\x00" * 216), "not IPv4 or IPv6"),  # AF_UNIX
        (v2(addresses=b"\x7f\x00\x00\x01"), "too short"),  # IPv4 family, 4 bytes of addresses
    ],
)
def test_hostile_and_careless_headers_are_refused(data: bytes, why: str) -> None:
    """Anything that is not a well-formed header is refused with a reason, as soon as the bytes show it."""
    with pytest.raises(ProxyHeaderError, match=why):
        parse(data)


def test_trusted_sources() -> None:
    """Only listed networks are trusted; IPv4-mapped IPv6 peers count as IPv4; Unix sockets never."""
    nets = (ipaddress.ip_network("10.1.2.0/24"), ipaddress.ip_network("2001:db8::/32"))
    assert trusted(("10.1.2.3", 5), nets)
    assert trusted(("::ffff:10.1.2.3", 5, 0, 0), nets)
    assert trusted(("2001:db8::9", 5, 0, 0), nets)
    assert not trusted(("10.1.3.3", 5), nets)
    assert not trusted("/run/sock", nets)
    assert not trusted(None, nets)


class _Recorder:
    """Stands in for the TLS gate: records what the PROXY gate hands it."""

    handed: list[tuple[tuple[str, int] | None, bytes]]

    def __init__(self) -> None:
        self.handed = []
        self.deadlines: list[float | None] = []

    def behind_balancer(
        self,
        client: tuple[str, int] | None,
        preread: bytes,
        *,
        health_check: bool = False,
        unnamed: bool = False,
        deadline: float | None = None,
    ) -> None:
        self.handed.append((client, preread))
        self.deadlines.append(deadline)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()

    def ended(self, closed: Callable[[], None]) -> _Recorder:
        """Itself, as the TLS gate made for a connection whose end calls `closed` (once its transport closes)."""
        self.closed = closed
        return self

    def connection_lost(self, exc: Exception | None) -> None:
        closed = getattr(self, "closed", None)
        if closed is not None:
            closed()


async def _gate(
    trusted_cidr: str, header_timeout: float, send: list[bytes], pause: float, *, eof: bool = False
) -> tuple[list[object], list[str], int]:
    """A real loopback listener with the PROXY gate; a client sends `send` chunk by chunk, `pause` s apart
    (then ends its side, if `eof`), and waits for the gate to close the connection. Returns what the TLS gate
    was handed, the log, and how often the gate gave the connection's slot back (proxy.tls.limits)."""
    recorder = _Recorder()
    handed: list[object] = []
    given_back: list[None] = []
    counted: list[str] = []

    def factory() -> asyncio.Protocol:
        return proxy_protocol.ProxyHeaderGate(
            lambda: [ipaddress.ip_network(trusted_cidr)],
            header_timeout,
            lambda _closed: recorder,  # type: ignore[arg-type,return-value]
            lambda: given_back.append(None),
            counted.append,
        )

    loop = asyncio.get_running_loop()
    with capture_logs() as logs:
        server = await loop.create_server(factory, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for chunk in send:
                writer.write(chunk)
                await writer.drain()
                await asyncio.sleep(pause)
            if eof:
                writer.write_eof()
        except ConnectionError:
            pass
        with contextlib.suppress(ConnectionError):  # b"" (or a reset) once the gate closed it; never a byte
            assert await asyncio.wait_for(reader.read(), timeout=10) == b""
        writer.close()
        server.close()
        await server.wait_closed()
    handed.extend(recorder.handed)
    for kind in counted:  # what the metrics counted is what the log says, one for one
        assert any(e.get("refusal") == kind for e in logs), (kind, logs)
    return handed, [f"{e['event']} ({e.get('refusal')}): {e.get('reason', '')}" for e in logs], len(given_back)


def test_gate_hands_the_device_and_its_first_bytes_to_tls() -> None:
    """From a trusted balancer, header and ClientHello in one segment: the TLS gate gets both, split right."""
    handed, logs, given_back = asyncio.run(_gate("127.0.0.1/32", 5, [v2() + CLIENT_HELLO], 0))
    assert handed == [(("203.0.113.7", 50123), CLIENT_HELLO)]
    assert logs == []
    assert given_back == 0  # the TLS gate owns the connection, and its slot, from here on


def test_the_tls_handshake_is_bounded_by_the_headers_deadline_not_a_fresh_timeout() -> None:
    """The TLS gate is handed the header timer's deadline, `handshake_timeout` (5 s) after the accept: a header that
    came late in it no longer gave TLS a fresh 5 s (a connection held pre-TLS for up to twice the timeout)."""

    async def run() -> None:
        recorder = _Recorder()

        def factory() -> asyncio.Protocol:
            return proxy_protocol.ProxyHeaderGate(
                lambda: [ipaddress.ip_network("127.0.0.1/32")],
                5,
                recorder.ended,  # type: ignore[arg-type]
            )

        loop = asyncio.get_running_loop()
        server = await loop.create_server(factory, "127.0.0.1", 0)
        try:
            before = loop.time()
            _, writer = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
            accepted = loop.time()  # the server's side was accepted before the client's connect returned here
            await asyncio.sleep(0.3)  # the header comes late
            writer.write(v2())
            await _until(lambda: bool(recorder.deadlines))
            deadline = recorder.deadlines[0]
            assert deadline is not None
            assert before + 5 <= deadline <= accepted + 5 + 0.1  # from the accept, not from the header (>= +5.3)
            writer.close()
        finally:
            server.close()
            await server.wait_closed()

    asyncio.run(run())


def test_gate_closes_connections_from_elsewhere_before_reading() -> None:
    """A well-formed header from an address not in trusted_proxies: closed and logged, nothing handed on."""
    handed, logs, given_back = asyncio.run(_gate("192.0.2.0/24", 5, [v2() + CLIENT_HELLO], 0))
    assert handed == []
    assert logs == ["proxy_header_refused (untrusted_peer): connection from an address not in listener.trusted_proxies"]
    assert given_back == 1


def test_gate_closes_a_connection_that_starts_with_tls() -> None:
    """From the balancer's own address but without a header (a direct TLS connection): closed, logged."""
    handed, logs, given_back = asyncio.run(_gate("127.0.0.1/32", 5, [CLIENT_HELLO], 0))
    assert handed == []
    assert logs == ["proxy_header_refused (malformed_header): no PROXY header: the connection began with b'\\x16'"]
    assert given_back == 1


def test_gate_cuts_a_slow_sender_at_the_timeout() -> None:
    """A header dribbled a byte at a time never completes within the timeout: cut and logged, not waited on."""
    header = b"PROXY TCP4 203.0.113.7 192.0.2.1 50123 443\r\n"
    dribble = [header[i : i + 1] for i in range(len(header))]
    handed, logs, given_back = asyncio.run(_gate("127.0.0.1/32", 0.5, dribble, 0.1))
    assert handed == []
    assert logs == ["proxy_header_refused (header_timeout): no complete PROXY header within 0.5 s"]
    assert given_back == 1


def test_gate_refuses_a_header_cut_short() -> None:
    """The connection ends mid-header: refused and logged."""
    handed, logs, given_back = asyncio.run(_gate("127.0.0.1/32", 5, [v2()[:20]], 0, eof=True))
    assert handed == []
    assert logs == ["proxy_header_refused (incomplete_header): the connection ended before a complete PROXY header"]
    assert given_back == 1


class _GoneTransport:
    """A connection the peer reset before it was accepted: the kernel no longer says who it was."""

    aborted = False

    def get_extra_info(self, name: str, default: object = None) -> object:
        return None  # asyncio's transport caches getpeername(), which failed (ENOTCONN)

    def abort(self) -> None:
        self.aborted = True


def _balancer_gate() -> tuple[proxy_protocol.ProxyHeaderGate, list[None], list[str], list[None]]:
    """A gate trusting 127.0.0.1, and what it reports: slots given back, refusals counted, empty connections."""
    given_back: list[None] = []
    counted: list[str] = []
    empty: list[None] = []
    gate = proxy_protocol.ProxyHeaderGate(
        lambda: [ipaddress.ip_network("127.0.0.1/32")],
        5,
        lambda _closed: _Recorder(),  # type: ignore[arg-type,return-value]
        lambda: given_back.append(None),
        counted.append,
        lambda: empty.append(None),
    )
    return gate, given_back, counted, empty


def test_a_connection_reset_before_it_was_accepted_is_no_refusal() -> None:
    """HAProxy ends its health checks with a reset: a connection whose address could not be read is closed
    and its slot given back, but neither logged as an untrusted peer nor counted (the metrics would otherwise
    tell of someone reaching the gateways around the balancer, every check interval)."""
    gate, given_back, counted, empty = _balancer_gate()
    transport = _GoneTransport()
    with capture_logs() as logs:
        gate.connection_made(transport)  # type: ignore[arg-type]
        gate.connection_lost(None)
    assert transport.aborted
    assert counted == []
    assert empty == [None]  # kcd_listener_empty_connections_total
    assert [e["event"] for e in logs if e["log_level"] != "debug"] == []
    assert given_back == [None]


class _BalancerTransport(_GoneTransport):
    """A connection from the trusted balancer, accepted before it ended."""

    def get_extra_info(self, name: str, default: object = None) -> object:
        return ("127.0.0.1", 40000) if name == "peername" else default


@pytest.mark.parametrize("end", ["reset", "close"])
def test_a_balancer_connection_that_ends_before_its_first_byte_is_no_refusal(end: str) -> None:
    """A trusted balancer's health check accepted before it ended, with a reset or a close, and no byte sent: an
    empty connection (counted, logged at debug level), neither an incomplete header nor any other refusal."""
    gate, given_back, counted, empty = _balancer_gate()
    transport = _BalancerTransport()

    async def run() -> None:  # the gate arms its header timer on the running loop
        gate.connection_made(transport)  # type: ignore[arg-type]
        if end == "close":
            gate.eof_received()
        gate.connection_lost(ConnectionResetError() if end == "reset" else None)

    with capture_logs() as logs:
        asyncio.run(run())
    assert (counted, empty, given_back) == ([], [None], [None])
    assert [e["event"] for e in logs if e["log_level"] != "debug"] == []


def test_a_v1_line_of_107_bytes_is_read_and_one_of_108_is_refused() -> None:
    """The specification's longest v1 line is 107 bytes, CRLF included: a line of exactly 107 (UNKNOWN with its
    padding) is a header; 108, or 107 bytes with no CRLF in them, is refused as soon as the 107th byte is read;
    a CR as the 106th byte waits for its LF."""
    exact = b"PROXY UNKNOWN " + b"x" * 91 + b"\r\n"
    assert len(exact) == 107
    header = parse(exact + CLIENT_HELLO)
    assert header is not None
    assert header.length == 107
    longer = b"PROXY UNKNOWN " + b"x" * 92 + b"\r\n"
    with pytest.raises(ProxyHeaderError, match="longer than 107"):
        parse(longer)
    with pytest.raises(ProxyHeaderError, match="longer than 107"):
        parse(longer[:107])
    assert parse(exact[:106]) is None  # ends with the CR


def test_a_v2_length_past_the_data_waits_and_a_local_headers_addresses_are_not_read() -> None:
    """A v2 length larger than what came is 'not yet' (the gate's deadline ends the wait); LOCAL names nobody even
    when the block carries addresses (a balancer's check claiming a device is not believed)."""
    whole = v2(command=0, family=0x11)
    assert parse(whole[:-1]) is None
    local = parse(whole)
    assert local is not None
    assert (local.command, local.source, local.health_check) == ("local", None, True)


def test_at_a_busy_cap_the_gate_waits_for_a_slot_with_its_header_read_and_its_first_bytes_kept() -> None:
    """Behind a balancer at the cap, every connection busy: a connection's header and ClientHello are read, nothing is
    handed to TLS until a slot is freed, then the device and the ClientHello are handed on and the slot is the
    connection's; one that ends while it waits takes no slot and ends its wait."""

    async def run() -> None:
        slots = ConnectionSlots(1)
        busy = await slots.take()
        recorder = _Recorder()
        loop = asyncio.get_running_loop()

        def factory() -> asyncio.Protocol:
            return proxy_protocol.ProxyHeaderGate(
                lambda: [ipaddress.ip_network("127.0.0.1/32")],
                5,
                lambda _closed: recorder,  # type: ignore[arg-type,return-value]
                SlotWait(slots),
            )

        server = await loop.create_server(factory, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            _, gone = await asyncio.open_connection("127.0.0.1", port)
            gone.write(v2())
            await gone.drain()
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(v2() + CLIENT_HELLO)
            await writer.drain()
            await _until(lambda: slots.waiting == 2)
            gone.close()  # ends while it waits
            await _until(lambda: slots.waiting == 1)
            assert recorder.handed == []
            busy()
            await _until(lambda: bool(recorder.handed))
            assert recorder.handed == [(("203.0.113.7", 50123), CLIENT_HELLO)]
            assert (slots.open, slots.waiting) == (1, 0)
            writer.close()
        finally:
            server.close()
            await server.wait_closed()

    asyncio.run(run())


async def _until(probe: Callable[[], bool]) -> None:
    """Poll `probe` until it holds, 10 s at most."""
    deadline = asyncio.get_running_loop().time() + 10
    while asyncio.get_running_loop().time() < deadline:
        if probe():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("still waiting after 10 s")


@contextlib.asynccontextmanager
async def _gate_at_an_idle_cap() -> AsyncIterator[tuple[int, _Recorder, list[float], ConnectionSlots]]:
    """A `ProxyHeaderGate` on a loopback port (127.0.0.1 trusted) at a cap of 1 held by an idle keep-alive: the port,
    what the gate handed on, the idle connection's closes (the time it was idle since, each), the slots."""
    idle_closed: list[float] = []

    def close(since: float) -> bool:
        idle_closed.append(since)
        return True

    slots = ConnectionSlots(1, idle=IdleKeepAlives(lambda: [(1.0, close)]))
    await slots.take()  # the idle keep-alive's slot
    recorder = _Recorder()

    def factory() -> asyncio.Protocol:
        return proxy_protocol.ProxyHeaderGate(
            lambda: [ipaddress.ip_network("127.0.0.1/32")],
            5,
            recorder.ended,  # type: ignore[arg-type]
            SlotWait(slots),
        )

    server = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], recorder, idle_closed, slots
    finally:
        server.close()
        await server.wait_closed()


def test_at_a_cap_of_idle_keepalives_a_health_check_closes_none_and_goes_on_without_a_slot() -> None:
    """Behind a balancer at a cap held by an idle keep-alive: a LOCAL header (the balancer's health check) is handed to
    TLS with no slot taken and the idle connection left open, its wait ended with it; a device's header then closes
    the idle connection for its slot."""

    async def run() -> None:
        async with _gate_at_an_idle_cap() as (port, recorder, idle_closed, slots):
            _, check = await asyncio.open_connection("127.0.0.1", port)
            check.write(v2(command=0))
            await _until(lambda: bool(recorder.handed))
            assert recorder.handed == [(None, b"")]
            assert (idle_closed, slots.open) == ([], 1)  # no slot taken, nobody's closed
            await _until(lambda: slots.waiting == 0)  # its wait ends with it (the stand-in TLS gate closes it)
            await _until(lambda: slots.checks == 0)  # and the health check's own place
            check.close()
            _, device = await asyncio.open_connection("127.0.0.1", port)
            device.write(v2())
            await _until(lambda: len(recorder.handed) == 2)
            assert idle_closed == [1.0]
            device.close()

    asyncio.run(run())


def test_a_v1_header_naming_its_own_connection_is_the_balancers_and_closes_no_idle_keepalive() -> None:
    """Behind a balancer at a cap held by an idle keep-alive: a v1 line naming the connection's own address and port
    (HAProxy 2.6's v1 health check, v1 having no LOCAL) is handed to TLS as a LOCAL one, no device named, no slot
    taken and the idle connection left open; a v1 line naming another port of that address is a device's."""

    async def run() -> None:
        async with _gate_at_an_idle_cap() as (port, recorder, idle_closed, slots):
            _, check = await asyncio.open_connection("127.0.0.1", port)
            own = check.get_extra_info("sockname")[1]
            check.write(f"PROXY TCP4 127.0.0.1 127.0.0.1 {own} {port}\r\n".encode())
            await _until(lambda: bool(recorder.handed))
            assert recorder.handed == [(None, b"")]
            assert (idle_closed, slots.open) == ([], 1)  # no slot taken, nobody's closed
            check.close()
            _, device = await asyncio.open_connection("127.0.0.1", port)
            other = device.get_extra_info("sockname")[1] % 65535 + 1
            device.write(f"PROXY TCP4 127.0.0.1 127.0.0.1 {other} {port}\r\n".encode())
            await _until(lambda: len(recorder.handed) == 2)
            assert recorder.handed[1] == (("127.0.0.1", other), b"")
            assert idle_closed == [1.0]
            device.close()

    asyncio.run(run())


@pytest.mark.parametrize(
    ("line", "peer", "local", "itself"),
    [
        ("192.0.2.5 192.0.2.1 40000 8443", ("192.0.2.5", 40000), ("192.0.2.1", 8443), True),
        ("192.0.2.5 192.0.2.1 40000 8443", ("::ffff:192.0.2.5", 40000, 0, 0), ("::ffff:192.0.2.1", 8443, 0, 0), True),
        ("192.0.2.5 192.0.2.1 40001 8443", ("192.0.2.5", 40000), ("192.0.2.1", 8443), False),  # another port
        ("192.0.2.5 192.0.2.9 40000 443", ("192.0.2.5", 40000), ("192.0.2.1", 8443), False),  # the balancer's front
        ("203.0.113.7 192.0.2.1 40000 8443", ("192.0.2.5", 40000), ("192.0.2.1", 8443), False),
        ("192.0.2.5 192.0.2.1 40000 8443", None, ("192.0.2.1", 8443), False),
    ],
)
def test_names_itself(line: str, peer: object, local: object, itself: bool) -> None:
    """A header is the balancer's own connection only when it names that connection: its peer and our end of it."""
    family = "TCP6" if ":" in line else "TCP4"
    header = parse(f"PROXY {family} {line}\r\n".encode())
    assert header is not None
    assert proxy_protocol.names_itself(header, peer, local) is itself
