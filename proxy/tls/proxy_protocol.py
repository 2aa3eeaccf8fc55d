"""The PROXY protocol (v1 and v2): the device's address, told by a layer-4 balancer in front of the gateway.

Theory of operation. TLS must end on the gateway (the client certificate is the point), so a balancer in
front of several gateways passes TCP through, and the gateway sees the balancer's address, not the
device's. With `[listener] proxy_protocol = true` the balancer (HAProxy `send-proxy` / `send-proxy-v2`,
cloud network balancers) opens each connection with a header naming the device's address and port, before
the first TLS byte. This module reads it:

- `parse` is the pure part: bytes in, a `ProxyHeader` (evidence: which version, whether the balancer
  proxied a connection or checked its own health, the device's address) or `None` while the header is
  incomplete, or `ProxyHeaderError` saying what is wrong. It refuses as soon as the bytes cannot become a
  header: a TLS ClientHello (a device or attacker that skipped the balancer) is refused at its first byte.
- `ProxyHeaderGate` is the listener's first protocol when the option is on. It trusts the header only from
  `listener.trusted_proxies`: a connection from any other address is closed at once, before a byte is read,
  so nobody can claim an address by sending the header himself. A trusted connection must bring a complete
  header within `listener.handshake_timeout`, else it is closed. Every refusal is logged
  (`proxy_header_refused`, with the connection's own address and the reason) and counted by its kind
  (`Refusal`: `untrusted_peer`, `malformed_header`, `incomplete_header`, `header_timeout`; the metrics'
  `kcd_refusals_total{stage="proxy_protocol"}`, a bounded label). Once the header is read, the
  connection goes to the TLS gate (`proxy.tls.server.TlsGate`) with the device's address, which is then
  what aiohttp reports as `request.remote`: logs, traces, throttles and `X-Forwarded-For` all use it.
  With `listener.max_connections_per_address`, that address is counted as soon as the header is read, and a
  connection over the cap is reset there, before TLS (`proxy.tls.limits.AddressCap`); a `LOCAL` health
  check, which names no device, is not counted. A connection accepted at `listener.max_connections` holds no slot
  while its header comes (`proxy.tls.limits.SlotWait`): once the header is read and the address admitted, the gate
  takes a free slot or an idle keep-alive's, or, every connection busy, waits for one (reading on, up to a TLS
  record's worth, so that a device leaving meanwhile is seen), until `handshake_timeout` after the accept
  (`connection_wait_expired`). A header that names no device closes no keep-alive: a `LOCAL` health check takes a
  free slot or goes on without one (in a place of its own, `SlotWait.aside`, for twice `handshake_timeout` from its
  accept at most), or, those places all taken, is closed (`health_check_closed`); an `UNSPEC` / `UNKNOWN` connection
  with no free slot is closed at once (`proxy_header_refused`, `no_device_address`): its requests would be refused,
  and waiting among the `HEADER_WAITS` it kept devices out of the accept loop. `handshake_timeout` bounds the accept
  to the end of TLS: the TLS gate is handed this gate's deadline, and its handshake gets what is left of it.

A `LOCAL` v2 header (the balancer's own health check) carries no device: the connection's own address stands; so does
a header that describes the connection it came on, the balancer's own address and port to ours (`names_itself`:
HAProxy's v1 health check, v1 having no LOCAL), taken as a `LOCAL` one. A v1
`UNKNOWN` or a v2 `PROXY` header of family `UNSPEC` relays a device the balancer cannot name (a chain through a Unix
socket, say): every such device would be the balancer's address, one for the Basic throttles and uncounted by the
per-address cap, so the connection's requests are refused (400, `no_device_address`, `proxy.app`); its TLS
handshake, which a health check may stop at, goes on as any. A `LOCAL` connection whose TLS handshake then ends
without a client certificate (HAProxy's `check-ssl`) is the balancer checking the port, not a device refused: the
TLS gate logs it at debug level and counts it as a health check, not as a refusal (`TlsGate.behind_balancer`). A
connection that ends before its first byte (HAProxy's health checks end with a reset, often before they are
accepted, when no address is left to judge) is closed without a refusal, counted as an empty connection
(`kcd_listener_empty_connections_total`) and logged at debug level only.
Unix-socket and UDP addresses are refused (a gateway listens on TCP), and so is a v1 IPv6 address with a zone
(`%eth0`). An IPv4-mapped IPv6 address (`::ffff:a.b.c.d`, from a dual-stack balancer) names the IPv4 device
a.b.c.d. The header's TLVs (v2 extensions) are skipped unread.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import structlog

from proxy.tls.limits import HEALTH_CHECKS, AddressCap, SlotWait
from proxy.tls.server import TlsGate, peer_text, socket_transport

log = structlog.get_logger("proxy.tls")

V1_PREFIX = b"PROXY "
V1_MAX = 107  # the longest v1 line, CRLF included (the specification's figure)
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_FIXED = 16  # signature, version/command, family/transport, length
# Bytes read past the header while a connection waits for a slot (`proxy.tls.limits.SlotWait`): a TLS record and its
# header. Reading goes on until then, so that a device that leaves while it waits is seen to.
_WAIT_BUFFER = V2_FIXED + 0xFFFF + 5 + 16 * 1024 + 256
# A v2 header's length field allows 64 KiB of addresses and TLVs. Balancers send tens to a few hundred
# bytes (addresses, plus a TLV or two naming the endpoint); more is refused rather than buffered.
V2_MAX_PAYLOAD = 2048

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = tuple[str, int]
# Why a connection was refused before TLS: the metrics' label (the log line has the words and the address).
Refusal = Literal["untrusted_peer", "malformed_header", "incomplete_header", "header_timeout", "no_device_address"]


class ProxyHeaderError(ValueError):
    """The bytes are not a PROXY header this gateway accepts; the message says why."""


@dataclass(frozen=True)
class ProxyHeader:
    """What the balancer said about one connection."""

    version: Literal[1, 2]
    command: Literal["proxy", "local"]  # local: the balancer's own connection (a health check), no device
    source: Address | None  # the device's address and port; None for local/UNKNOWN
    destination: Address | None  # the address the device connected to (the balancer's)
    length: int  # bytes the header took; what follows is the device's first TLS bytes
    health_check: bool = False  # v2 LOCAL: a connection the balancer made itself (its health check), relaying no one
    unnamed: bool = False  # v1 UNKNOWN, v2 PROXY with UNSPEC: a device relayed that the balancer cannot name


def parse(data: bytes) -> ProxyHeader | None:
    """The header at the start of `data`; None if `data` is a valid beginning of one; ProxyHeaderError otherwise."""
    if data[:1] == V1_PREFIX[:1]:
        return _parse_v1(data)
    if data[:1] == V2_SIGNATURE[:1]:
        return _parse_v2(data)
    if not data:
        return None
    raise ProxyHeaderError(f"no PROXY header: the connection began with {data[:1]!r}")


def _parse_v1(data: bytes) -> ProxyHeader | None:
    if not data.startswith(V1_PREFIX):
        if V1_PREFIX.startswith(data):
            return None
        raise ProxyHeaderError("no PROXY header: bytes that begin like v1 but are not")
    end = data.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(data) >= V1_MAX:
            raise ProxyHeaderError(f"v1 header longer than {V1_MAX} bytes")
        if b"\n" in data or b"\r" in data[:-1]:
            raise ProxyHeaderError("v1 header with a line end other than CRLF")
        return None
    try:
        line = data[:end].decode("ascii")
    except UnicodeDecodeError:
        raise ProxyHeaderError("v1 header with non-ASCII bytes") from None
    fields = line.split(" ")
    length = end + 2
    if len(fields) >= 2 and fields[1] == "UNKNOWN":
        return ProxyHeader(1, "local", None, None, length, unnamed=True)
    if len(fields) != 6:
        raise ProxyHeaderError(f"v1 header with {len(fields)} fields, expected 6: {line[:V1_MAX]!r}")
    _, family, src, dst, sport, dport = fields
    versions = {"TCP4": 4, "TCP6": 6}
    if family not in versions:
        raise ProxyHeaderError(f"v1 header with unknown protocol {family!r}")
    return ProxyHeader(
        1,
        "proxy",
        (_v1_address(src, versions[family]), _v1_port(sport)),
        (_v1_address(dst, versions[family]), _v1_port(dport)),
        length,
    )


def _v1_address(text: str, version: int) -> str:
    # No zone: `ip_address` takes any text after a `%` (`fe80::1%eth0,192.0.2.66`), which would be the device's
    # address in the log and X-Forwarded-For; a zone names an interface of the balancer, never a device.
    try:
        address = ipaddress.ip_address(text) if "%" not in text else None
    except ValueError:
        address = None
    if address is None:
        raise ProxyHeaderError(f"v1 header with a bad address {text[:V1_MAX]!r}")
    if address.version != version:
        raise ProxyHeaderError(f"v1 header: {text} is not an IPv{version} address")
    return _named(address)


def _named(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """An address as the gateway names the device: an IPv4-mapped IPv6 address (a dual-stack balancer's name for an
    IPv4 device) as its IPv4 address, as `proxy.addresses.address_key` counts it."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


def _v1_port(text: str) -> int:
    # Decimal digits only, no sign, no leading zero (int() would take "+1", " 1" and "0_1").
    if not text.isascii() or not text.isdigit() or (len(text) > 1 and text[0] == "0") or int(text) > 65535:
        raise ProxyHeaderError(f"v1 header with a bad port {text!r}")
    return int(text)


def _parse_v2(data: bytes) -> ProxyHeader | None:
    if not V2_SIGNATURE.startswith(data[: len(V2_SIGNATURE)]):
        raise ProxyHeaderError("no PROXY header: a wrong v2 signature")
    if len(data) < V2_FIXED:
        return None
    version_command, family_transport, payload = struct.unpack_from("!BBH", data, len(V2_SIGNATURE))
    if version_command >> 4 != 2:
        raise ProxyHeaderError(f"v2 header with version {version_command >> 4}")
    command = version_command & 0x0F
    if command not in (0, 1):
        raise ProxyHeaderError(f"v2 header with unknown command {command}")
    if payload > V2_MAX_PAYLOAD:
        raise ProxyHeaderError(f"v2 header of {payload} bytes, more than the {V2_MAX_PAYLOAD} accepted")
    length = V2_FIXED + payload
    if len(data) < length:
        return None
    if command == 0:  # LOCAL: the balancer speaking for itself; whatever follows is ignored
        return ProxyHeader(2, "local", None, None, length, health_check=True)
    family, transport = family_transport >> 4, family_transport & 0x0F
    if family == 0:  # UNSPEC: the balancer does not know the addresses
        return ProxyHeader(2, "local", None, None, length, unnamed=True)
    if transport != 1:
        raise ProxyHeaderError(f"v2 header for transport {transport}, not a TCP stream")
    sizes = {1: 4, 2: 16}
    if family not in sizes:
        raise ProxyHeaderError(f"v2 header for address family {family}, not IPv4 or IPv6")
    size = sizes[family]
    if payload < 2 * size + 4:
        raise ProxyHeaderError(f"v2 header of {payload} bytes, too short for two IPv{4 if size == 4 else 6} addresses")
    at = V2_FIXED
    src = ipaddress.ip_address(data[at : at + size])
    dst = ipaddress.ip_address(data[at + size : at + 2 * size])
    sport, dport = struct.unpack_from("!HH", data, at + 2 * size)
    return ProxyHeader(2, "proxy", (_named(src), sport), (_named(dst), dport), length)


def trusted(peer: object, networks: Sequence[IPNetwork]) -> bool:
    """Whether the connection's own address is one of the balancers'."""
    if not isinstance(peer, tuple) or not peer or not isinstance(peer[0], str):
        return False  # a Unix socket, or no address at all
    try:
        address = ipaddress.ip_address(peer[0].partition("%")[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # a dual-stack listener sees IPv4 balancers as ::ffff:a.b.c.d
    return any(address in network for network in networks)


def names_itself(header: ProxyHeader, peer: object, local: object) -> bool:
    """Whether a header describes the very connection it came on: its device (source) the connection's peer, a trusted
    balancer's address and port, and its destination our end of it (`local`). The balancer speaking for itself:
    HAProxy (2.6) sends its health checks' v1 header so, v1 having no LOCAL (`PROXY TCP4 <its address> <ours> <its
    port> <our port>`). A relayed device's connection is another one, never the balancer's own to us."""
    if header.command != "proxy":
        return False
    ends = [_endpoint(peer), _endpoint(local)]
    return None not in ends and ends == [header.source, header.destination]


def _endpoint(address: object) -> Address | None:
    """A socket's (host, port, ...) as a header names it (`_named`); None for no IP address."""
    if not isinstance(address, tuple) or len(address) < 2 or not isinstance(address[0], str):
        return None
    try:
        return _named(ipaddress.ip_address(address[0].partition("%")[0])), address[1]
    except ValueError:
        return None


class ProxyHeaderGate(asyncio.Protocol):
    """Reads the PROXY header from a trusted balancer, then hands the connection to the TLS gate."""

    def __init__(
        self,
        networks: Callable[[], Sequence[IPNetwork]],
        timeout: float,
        tls_gate: Callable[[Callable[[], None]], TlsGate],
        closed: Callable[[], None] = lambda: None,
        on_refused: Callable[[Refusal], None] = lambda _: None,
        on_empty: Callable[[], None] = lambda: None,
        cap: AddressCap | None = None,
    ) -> None:
        self._networks = networks  # asked per connection: a reload's new list applies to the next one
        self._on_refused = on_refused  # counts the refusal (proxy.observability.metrics)
        self._on_empty = on_empty  # counts a connection that ended before its first byte
        self._timeout = timeout
        self._tls_gate = tls_gate  # called with what the TLS gate calls when the connection ends
        self._closed = closed  # gives the connection's slot back (proxy.tls.limits) if it ends here
        self._cap = cap  # listener.max_connections_per_address, counted by the device's address
        self._buffer = b""
        self._peer: object = None
        self._local: object = None  # our end of the connection (`names_itself`)
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._room: asyncio.Task[None] | None = None  # waiting for a slot, the header read (`SlotWait.room`)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = socket_transport(transport)
        self._peer = transport.get_extra_info("peername")
        self._local = transport.get_extra_info("sockname")
        if self._peer is None:  # reset before it was accepted: no address was ever read, so none to refuse
            self._gone("reset before it was accepted")
            return
        if not trusted(self._peer, self._networks()):
            self._refuse("untrusted_peer", "connection from an address not in listener.trusted_proxies")
            return
        self._timer = asyncio.get_running_loop().call_later(self._timeout, self._expire)

    def data_received(self, data: bytes) -> None:
        if self._transport is None:
            return
        self._buffer += data
        if self._room is not None:  # the header is read, a slot awaited: these bytes are the TLS gate's
            if len(self._buffer) > _WAIT_BUFFER:
                self._transport.pause_reading()  # its end is then seen only once a slot is taken
            return
        try:
            header = parse(self._buffer)
        except ProxyHeaderError as exc:
            self._refuse("malformed_header", str(exc))
            return
        if header is None:
            return
        if names_itself(header, self._peer, self._local):
            header = dataclasses.replace(header, command="local", source=None, destination=None, health_check=True)
        client = header.source if header.command == "proxy" else None
        closed = self._closed
        if client is not None and self._cap is not None:
            admitted = self._cap.admit(client, closed)  # logged and counted there: not a PROXY refusal
            if admitted is None:
                self._cancel_timer()
                transport, self._transport = self._transport, None
                transport.abort()  # a reset; connection_lost gives the slot back
                return
            closed = admitted
        wait = self._closed
        device = client is not None  # only a device named and admitted may close an idle keep-alive at the cap
        if isinstance(wait, SlotWait) and not wait.claim(reclaim=device):
            if header.health_check:  # no free slot: on in a place of its own, for a bounded time, or closed
                if wait.aside():
                    self._hand_over(header, closed, in_place=True)
                else:
                    self._no_place()
                return
            if header.unnamed:  # its requests would be refused (400): waiting, it kept a device out of HEADER_WAITS
                self._refuse(
                    "no_device_address",
                    "no free slot of listener.max_connections, and the header names no "
                    "device (UNSPEC, UNKNOWN) whose requests could be served",
                )
                return
            # at the cap, every connection busy (or no device named): wait for a slot, the header's timer running on
            self._closed = closed  # the address's place too, if the connection ends while it waits
            self._peer = client or self._peer  # the device's address in the log, as the TLS gate's lines name it
            self._room = asyncio.get_running_loop().create_task(wait.room(reclaim=device))
            self._room.add_done_callback(lambda task: self._slot_taken(task, header, closed))
            return
        self._hand_over(header, closed)

    def _slot_taken(self, task: asyncio.Task[None], header: ProxyHeader, closed: Callable[[], None]) -> None:
        """A connection that waited for a slot, its header read, got one: on to TLS (unless it ended meanwhile)."""
        if task.cancelled() or self._transport is None:
            return
        if task.exception() is not None:  # never expected: the connection, not the listener, pays for it
            self._transport.abort()
            return
        if not self._transport.is_reading():
            self._transport.resume_reading()
        self._hand_over(header, closed)

    def _hand_over(self, header: ProxyHeader, closed: Callable[[], None], *, in_place: bool = False) -> None:
        """The header read, the address admitted and a slot held (or, `in_place`, a health check's place of its own):
        to the TLS gate, whose handshake must end by this gate's deadline, `handshake_timeout` after the accept (a
        header that came just before it got a fresh `handshake_timeout` for TLS: a connection held pre-TLS for up to
        twice it). A health check in a place of its own keeps it `handshake_timeout` past that deadline at most: time
        for its one request (HAProxy's `option httpchk`), not a device's keep-alive (`_place_expired`)."""
        assert self._timer is not None  # cancelled only here and when the connection ends
        deadline = self._timer.when()
        self._cancel_timer()
        client = header.source if header.command == "proxy" else None
        transport, self._transport = self._transport, None
        assert transport is not None
        gate = self._tls_gate(closed)
        if in_place:
            held = 2 * self._timeout
            loop = asyncio.get_running_loop()
            loop.call_at(deadline + self._timeout, _place_expired, transport, gate, self._peer, held)
        preread = self._buffer[header.length :]
        gate.behind_balancer(
            client, preread, health_check=header.health_check, unnamed=header.unnamed, deadline=deadline
        )
        transport.set_protocol(gate)
        gate.connection_made(transport)

    def eof_received(self) -> bool | None:
        if self._room is not None:  # ended while it waited for a slot, its header read: closed, nothing to refuse
            return False
        if not self._buffer:  # closed before its first byte: a health check, not a header cut short
            self._gone("closed before its first byte")
        else:
            self._refuse("incomplete_header", "the connection ended before a complete PROXY header")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        """Only while this gate owns the connection: once handed over, the TLS gate hears its end."""
        if self._transport is not None and not self._buffer:  # reset after it was accepted, before its first byte
            self._gone("reset before its first byte")
        self._cancel_timer()
        if self._room is not None:
            self._room.cancel()
        self._transport = None
        self._closed()

    def _gone(self, detail: str) -> None:
        """A connection that ended before its first byte: before the listener could read its address (HAProxy
        ends its health checks with a reset, often before they are accepted), or from a trusted balancer (its
        health check, accepted first). Closed, counted as an empty connection, logged at debug level only (a
        flood of them would otherwise flood the log); never a refusal: not an untrusted peer, which would tell
        the operator that someone reaches the gateways around the balancer, nor an incomplete header."""
        self._cancel_timer()
        transport, self._transport = self._transport, None
        log.debug("connection_empty", stage="proxy_protocol", peer=peer_text(self._peer), detail=detail)
        self._on_empty()
        if transport is not None:
            transport.abort()

    def _expire(self) -> None:
        if self._room is None:
            self._refuse("header_timeout", f"no complete PROXY header within {self._timeout:g} s")
            return
        if self._transport is not None:  # its header read, no slot came within handshake_timeout of its accept
            transport, self._transport = self._transport, None
            log.warning(
                "connection_wait_expired",
                peer=peer_text(self._peer),
                waited_s=self._timeout,
                detail="no slot of listener.max_connections came free within listener.handshake_timeout of its "
                "accept; closed before TLS (the balancer's next pick may have room)",
            )
            transport.abort()  # connection_lost ends the wait and gives the address's place back

    def _no_place(self) -> None:
        """A health check at the cap with no free slot and every one of its `HEALTH_CHECKS` places taken: closed (a
        reset). Left to wait for a slot, such checks took the `HEADER_WAITS` places that gate the accept loop, and the
        slots freed, from the devices, for as long as the balancer's checks kept coming."""
        self._cancel_timer()
        transport, self._transport = self._transport, None
        assert transport is not None
        log.warning(
            "health_check_closed",
            peer=peer_text(self._peer),
            reason=f"no free slot of listener.max_connections and every one of the {HEALTH_CHECKS} places kept for "
            "health checks taken",
            fix="checks stalled in their TLS handshake hold those places: is the balancer's check hung? The gateway is "
            "at its cap: its devices keep every connection busy",
        )
        transport.abort()  # connection_lost ends the wait

    def _refuse(self, kind: Refusal, reason: str) -> None:
        self._cancel_timer()
        if self._transport is None:
            return
        transport, self._transport = self._transport, None
        peer = peer_text(self._peer)
        log.warning("proxy_header_refused", stage="proxy_protocol", peer=peer, reason=reason, refusal=kind)
        self._on_refused(kind)
        transport.abort()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


def _place_expired(transport: asyncio.Transport, gate: TlsGate, peer: object, held: float) -> None:
    """A health check's place of its own (`SlotWait.aside`) held `held` seconds since its accept: its connection is
    closed, and the place comes back as it ends; nothing if it has ended already. One serving a request read whole is
    closed once that answer is sent (`serving`): HAProxy sends a v2 `LOCAL` header for a device it relays without IP
    addresses too (a frontend on a Unix socket), whose request (an ActiveSync Ping held for minutes) a reset would
    cut; any other is reset at once, one whose request body still comes included (a check sends none, and a body
    sent a byte at a time held the place for as long as it came)."""
    if transport.is_closing():
        return
    serving = gate.close_after_answer()
    log.warning(
        "health_check_closed",
        peer=peer_text(peer),
        serving=serving,
        reason=f"a health check held its place of its own {held:g} s after its accept (twice "
        "listener.handshake_timeout), past a check's one request"
        + (": closed once the answer it is serving is sent" if serving else ""),
        fix="a balancer's check that keeps its connection open (an HTTP check with keep-alive, a hung check) holds "
        "one of the places kept for checks at the cap: have it close after its answer; a device relayed with a LOCAL "
        "header (HAProxy's for a client on a Unix socket) is served as the balancer: relay devices over TCP",
    )
    if not serving:
        transport.abort()


def gate_factory(
    tls_gate: Callable[[Callable[[], None]], TlsGate],
    networks: Callable[[], Sequence[IPNetwork]],
    timeout: float,
    on_refused: Callable[[Refusal], None] = lambda _: None,
    on_empty: Callable[[], None] = lambda: None,
    cap: AddressCap | None = None,
) -> Callable[[Callable[[], None]], asyncio.Protocol]:
    """A protocol factory for `proxy.tls.limits.accept_connections`: the PROXY header first, then `tls_gate`'s
    TLS handshake. Called with the function that gives the connection's slot back, which either gate calls
    when the connection ends while it owns it; `networks` gives the trusted balancers (asked per connection,
    so a reload applies); `on_refused` hears each refusal's kind, `on_empty` each connection that ended before its
    first byte; `cap` (`listener.max_connections_per_address`) counts the header's device address."""
    return lambda closed: ProxyHeaderGate(networks, timeout, tls_gate, closed, on_refused, on_empty, cap)
