"""Bounded memory before authentication: how many connections a worker holds, and how much header each sends.

Theory of operation. Before a request is authenticated, anyone who can reach the port can make the
gateway hold memory: each open connection (its socket, its TLS state, aiohttp's handler) and each header
block it sends, which aiohttp's parser keeps whole until the block ends. Two caps bound that.

- **Connections** (`listener.max_connections`, per worker): the listener accepts a connection only while
  fewer than that many are open, counted from accept to close, the TLS handshake included
  (`ConnectionSlots`). At the cap, the next connection is accepted and given the slot of the oldest idle
  keep-alive connection, closed for it (`IdleKeepAlives`, nginx's `ngx_drain_connections`: between two
  requests, nothing of the next one read or unread in its socket; never one serving a request, reading a head or
  a body, or in its TLS handshake): logged (`device_idle_reclaimed`) and counted
  (`kcd_listener_connections_reclaimed_total`). With every connection busy it waits for a slot, the connections
  after it in the kernel's listen backlog, accepted one by one as open ones close or turn idle. That is logged
  (`connection_limit_reached`) and counted (`kcd_listener_connection_waits_total`).
- **Connections per address** (`listener.max_connections_per_address`, per worker, off by default): a
  client address (an IPv6 one by its /64, `proxy.addresses.address_key`) with that many connections open
  gets its next one reset at once, before a byte of it is read (`AddressCap`): logged
  (`address_connection_limit_reached`) and counted (`kcd_refusals_total{stage="listener",
  reason="connections_per_address"}`), and it holds no slot of `max_connections` meanwhile. Behind a balancer
  the address is the PROXY header's (`proxy.tls.proxy_protocol`), checked as soon as the header is read;
  the balancer's own address is never capped. So behind a balancer a connection accepted at the cap holds no slot
  until its header is read and its address admitted (`SlotWait`, at most `HEADER_WAITS` a worker, `handshake_timeout`
  from the accept at most): only then is an idle keep-alive closed for it, and one whose header never comes, or names
  no device (a balancer's health check), closes nobody's. Off by default because CGNAT and corporate proxies put many
  devices behind one address.
- **Header block** (`listener.max_header_bytes`): aiohttp's parser (3.14, C or Python) bounds the
  request line (`max_line_size`), each header field (`max_field_size`, 96 KiB here, for 64 KiB Kerberos
  tokens) and the number of fields (`max_headers`, 128), but not their sum: 128 fields of 95 KiB are
  about 12 MiB held by one connection. `HeaderBlockBudget` sits in front of the parser, cuts each read
  where a head or a body ends (`proxy.device.framing`) and counts the bytes of each head from its first
  byte; past the budget the client gets 431 before any stage runs, logged (`request_headers_too_large`)
  and counted, and the connection is closed after a lingering close (`Linger`): what the client still sends
  is read and discarded unparsed until it has been quiet for 2 s (30 s and 16 MiB at most), so that closing
  does not meet its bytes with a reset that can destroy the 431 before it is read (RFC 9112 9.6).
  aiohttp exposes no such setting, and its own refusals are a 400 through its error handler, so the
  budget answers by itself. It reaches the parser through the handler's `_parser` attribute
  (aiohttp's `BaseProtocol`), the one private name this relies on.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import heapq
import socket
import struct
from collections.abc import Callable, Iterable
from typing import Any, Literal

import structlog
from aiohttp.http_exceptions import BadHttpMessage, HttpProcessingError

from proxy.addresses import address_key
from proxy.device.framing import BodyEnd, head_end
from proxy.errors import BadRequest
from proxy.observability.logging import pass_through, unquoted
from proxy.tls.server import peer_text

log = structlog.get_logger("proxy.tls")

_TOO_LARGE_BODY = b"the request's header fields are too large\n"
_TOO_LARGE = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"X-KCD-Refused-Stage: request\r\n"
    b"Connection: close\r\n"
    b"Content-Length: %d\r\n\r\n%s" % (len(_TOO_LARGE_BODY), _TOO_LARGE_BODY)
)
BACKLOG = 1024  # the device listener's listen backlog (`listen_sockets`), and the most `accept_queued` takes
_ACCEPT_PAUSE = 1.0  # seconds to wait after accept() fails (out of file descriptors), as asyncio's server does
# A refused connection stays open after its 431, what the client still sends read and discarded, until the client
# has been quiet for _LINGER_QUIET seconds (nginx's lingering_timeout), at most _LINGER_TIME seconds (its
# lingering_time) or _LINGER_BYTES discarded. Closing while the client still sends makes the kernel answer its
# bytes with a reset, which can destroy the 431 before it is read (RFC 9112 9.6). _LINGER_BYTES is above the
# largest header block the parser's own caps let through (128 fields of 96 KiB, 12 MiB); the close that follows
# discards 1 MiB more (proxy.tls.record.DISCARD_LIMIT).
_LINGER_QUIET = 2.0
_LINGER_TIME = 30.0
_LINGER_BYTES = 16 * 1024 * 1024
# At the cap, a connection accepted while every connection is busy looks for one turned idle this often (seconds).
RECLAIM_LOOK = 0.5
RECLAIM_FRESH = 1.0  # seconds that order is used before the connections are scanned again
# Seconds after a scan that found no connection to close before the next may be made: the connections waiting for a
# slot at a busy cap (up to HEADER_WAITS behind a balancer) all wake when one is freed, and each scanned every
# connection again (`IdleKeepAlives.reclaim`).
RESCAN_GAP = RECLAIM_LOOK / 4
# Connections a worker accepts at the cap behind a balancer while their PROXY headers come, no slot held (`SlotWait`).
HEADER_WAITS = 16
# Health checks (PROXY `LOCAL`) a worker lets on to TLS with no slot, accepted at the cap behind a balancer, in places
# of their own rather than `HEADER_WAITS`'s (`SlotWait.aside`): a balancer checks each gateway every second or two, so
# a few at once are many; checks stalled in their handshake then keep no device out of the accept loop. Past them a
# check is closed, and a place is kept twice `handshake_timeout` from the accept at most (`proxy.tls.proxy_protocol`).
HEALTH_CHECKS = 16
_IDLE_LOOK = 0.01  # seconds to the first look for aiohttp's handler to be idle, a 431 waiting for earlier answers


class ConnectionSlots:
    """At most `limit` client connections open at once; `take` waits for a free slot. With `idle` (the device-side
    server's idle keep-alives), a connection accepted at the cap takes the slot of the oldest idle one, closed for it
    (`room`)."""

    def __init__(
        self, limit: int, *, on_wait: Callable[[], None] | None = None, idle: IdleKeepAlives | None = None
    ) -> None:
        self.limit = limit
        self.open = 0  # slots taken: the open connections (an accept loop takes one only once accept() returned)
        self.idle = idle
        self.waiting = 0  # connections accepted at the cap behind a balancer, holding no slot yet (`SlotWait`)
        self.checks = 0  # of such connections, health checks gone on to TLS with no slot (`SlotWait.aside`)
        self._on_wait = on_wait
        self._freed = asyncio.Event()

    @property
    def full(self) -> bool:
        return self.open >= self.limit

    @property
    def connections(self) -> int:
        """Connections open now, from accept to close (the `kcd_listener_connections` gauge)."""
        return self.open

    async def take(self) -> Callable[[], None]:
        """A slot, once one is free; call the function returned (once or more) when its connection closes."""
        await self.vacancy()
        self.open += 1
        return _Taken(self)

    async def vacancy(self) -> None:
        """Until a slot is free (logged and counted when none is at first); not taken."""
        if self.open >= self.limit:
            self._limit_reached()
            while self.open >= self.limit:
                self._freed.clear()
                await self._freed.wait()

    def claim(self, *, reclaim: bool = True) -> bool:
        """Take a slot now, if one is free or (with `reclaim`) an idle keep-alive can be closed for it (True); False
        otherwise. A `SlotWait`'s first try, once its connection's PROXY header is read."""
        if self.open < self.limit or (reclaim and self.idle is not None and self.idle.reclaim()):
            self.open += 1
            return True
        return False

    async def room(self) -> Callable[[], None]:
        """A slot for a connection accepted at the cap: the slot of the oldest idle keep-alive, closed for it, else
        (every connection busy: logged and counted as `take` does) the first slot freed; a connection that turns idle
        meanwhile is closed for it too (looked for every `RECLAIM_LOOK` seconds). The closed connection's slot is
        taken at once, not once its socket has closed and given it back (a loop pass or two later): for that moment
        `open` is one over the limit, for a connection already closing (half the new devices a second otherwise, the
        accept loop waiting each time: docs/performance.md, "Idle keep-alives at the cap")."""
        await self._room()
        self.open += 1
        return _Taken(self)

    async def _room(self, *, reclaim: bool = True) -> None:
        """Until a slot is free for the caller (not taken): `room`'s wait; without `reclaim`, no idle keep-alive is
        closed for it. A cancellation (a `SlotWait`'s connection gone, the listener stopping) always ends it:
        `asyncio.timeout`, not Python 3.11's `wait_for`, which returns instead when the event is set in the same loop
        pass as the cancel (the waiter then went on, took a slot no one gave back and closed an idle keep-alive for no
        one: docs/hardening.md)."""
        told = False
        while self.open >= self.limit:
            self._freed.clear()
            if reclaim and self.idle is not None and self.idle.reclaim():
                break
            if not told:
                told = True
                self._limit_reached()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(RECLAIM_LOOK):
                    await self._freed.wait()

    def _limit_reached(self) -> None:
        log.warning(
            "connection_limit_reached",
            open=self.open,
            limit=self.limit,
            detail="new connections wait in the listen backlog until one closes or turns idle "
            "(listener.max_connections)",
        )
        if self._on_wait is not None:
            self._on_wait()

    def _give_back(self) -> None:
        self.open -= 1
        self._freed.set()

    def _wait_ended(self) -> None:
        self.waiting -= 1
        self._freed.set()


def frees_a_slot(closed: object) -> bool:
    """Whether closing a connection whose end calls `closed` frees a slot of `listener.max_connections`: not a health
    check gone on in a place of its own (`SlotWait.aside`). An idle keep-alive is closed for a device at the cap only
    if it does: the device takes the slot at once, and a check's connection, served a request (HAProxy's `check-ssl`
    with a `crt`) and closed for it, gave none back (a connection past the cap for each)."""
    return not (isinstance(closed, SlotWait) and closed.in_place)


class SlotWait:
    """A connection accepted at the cap behind a balancer (`accept_connections` with `header_first`): it holds no
    slot while its PROXY header comes (under `listener.handshake_timeout`, `proxy.tls.proxy_protocol`), so that an
    idle keep-alive is closed only for a connection whose header was read and whose address passed its cap
    (`AddressCap`): the gate then asks `claim`, and `room` when every connection is busy, the wait bounded by
    `listener.handshake_timeout` from the accept. A connection whose header names no device closes no keep-alive: the
    balancer's health check (`LOCAL`) takes a free slot or goes on without one (`aside`), or is closed; a device the
    balancer cannot name (`UNSPEC`, v1 `UNKNOWN`, whose requests are refused) takes a free slot or is closed
    (`proxy.tls.proxy_protocol`: waiting, it kept devices out of the `HEADER_WAITS`). Calling it ends
    the wait, or gives the slot (or the health check's place) back once taken: once. At most `HEADER_WAITS` wait at
    once per worker (`ConnectionSlots.waiting`); the accept loop accepts no more meanwhile.

    One state, `_state`: waiting, then held (a slot) or aside (a health check's place), for good; `_slots` is None once
    the connection has ended. Each step below is taken only from waiting."""

    __slots__ = ("_slots", "_state")

    def __init__(self, slots: ConnectionSlots) -> None:
        self._slots: ConnectionSlots | None = slots
        self._state: Literal["waiting", "held", "aside"] = "waiting"
        slots.waiting += 1

    @property
    def in_place(self) -> bool:
        """Whether it went on in a health check's place of its own (`aside`), ended since or not."""
        return self._state == "aside"

    def _waiting(self) -> ConnectionSlots | None:
        """The slots it still waits on; None once it holds a slot or a place, or its connection has ended."""
        return self._slots if self._state == "waiting" else None

    def claim(self, *, reclaim: bool = True) -> bool:
        """Take a slot now, a free one or (with `reclaim`) an idle keep-alive's, closed for it (True); False when
        there is none (then await `room`)."""
        slots = self._waiting()
        if slots is None:
            return self._state == "held"
        if not slots.claim(reclaim=reclaim):
            return False
        self._state = "held"
        slots._wait_ended()
        return True

    def aside(self) -> bool:
        """A health check that found no free slot (`claim`): on to its TLS handshake with none, its wait ended (the
        accept loop goes on) and one of `HEALTH_CHECKS` places taken instead until it ends (True); False when they are
        all taken (the gate then closes it: waiting for a slot among the `HEADER_WAITS`, such checks kept devices out
        of the accept loop). Checks stalled in their handshake, counted among the waits, kept devices out of the
        accept loop up to `handshake_timeout`."""
        slots = self._waiting()
        if slots is None:
            return self.in_place
        if slots.checks >= HEALTH_CHECKS:
            return False
        slots.checks += 1
        self._state = "aside"
        slots._wait_ended()
        return True

    async def room(self, *, reclaim: bool = True) -> None:
        """Wait for a slot as `ConnectionSlots.room` does (with `reclaim`, a keep-alive turned idle is closed for it);
        take it."""
        slots = self._waiting()
        if slots is None:
            return
        await slots._room(reclaim=reclaim)
        slots.open += 1
        self._state = "held"
        slots._wait_ended()

    def __call__(self) -> None:
        slots, self._slots = self._slots, None
        if slots is None:
            return
        if self._state == "held":
            slots._give_back()
        elif self._state == "aside":
            slots.checks -= 1
        else:
            slots._wait_ended()


# A device-side server's idle keep-alive connections, as `IdleKeepAlives` scans them: for each one idle between two
# requests, since when (the loop's time) and the function that closes it if it is still idle since then (True if so).
IdleScan = Callable[[], Iterable[tuple[float, Callable[[float], bool]]]]


class IdleKeepAlives:
    """The oldest idle keep-alive connections of a device-side server, for a connection accepted at the cap
    (`ConnectionSlots.room`): nginx's `ngx_drain_connections`.

    No bookkeeping on the request path: the server's connections are scanned when a slot is wanted, and the idle ones
    kept in a heap by age (for `RECLAIM_FRESH` seconds) for the next new devices of a burst. The scan (`scan`) reads
    each connection's own state only; whether nothing moves on one (no byte of the device's unread, half a TLS record
    included, none of ours unsent: a few µs of system and OpenSSL calls) is asked of the oldest alone, as it is closed:
    each is closed only if it is still idle since the time the scan saw (a request served since makes it newer) and
    quiet, else the next oldest is tried, so connections that cannot be closed never hide an idle one behind them.
    `quiet_scan` (the scan with that asked of each: /readyz's count, of a full worker only) counts only what can be
    closed."""

    def __init__(self, scan: IdleScan, quiet_scan: IdleScan | None = None) -> None:
        self._scan = scan
        self._quiet_scan = quiet_scan or scan
        self._oldest: list[tuple[float, int, Callable[[float], bool]]] = []  # a heap: the oldest first
        self._scanned = -RECLAIM_FRESH
        self._barren = -RESCAN_GAP  # when a scan last found no connection to close
        self.reclaimed = 0  # idle connections closed for new ones (kcd_listener_connections_reclaimed_total)

    def count(self) -> int:
        """How many connections are idle between requests now and could be closed (a scan: /readyz asks only of a
        full worker)."""
        return sum(1 for _ in self._quiet_scan())

    def reclaim(self) -> bool:
        """Close the oldest idle keep-alive connection; False when there is none. The connections are scanned again
        when the order runs out, but not within `RESCAN_GAP` seconds of a scan that found none to close: a connection
        that turns idle meanwhile is found by a waiter's next look (`RECLAIM_LOOK`), and the waiters that wake together
        when a slot is freed scan once, not once each (15 scans of every connection for each slot freed at a busy cap
        behind a balancer: docs/hardening.md, review45)."""
        now = asyncio.get_running_loop().time()
        if now - self._scanned > RECLAIM_FRESH:
            self._oldest = []
        for rescan in (False, True):
            if rescan:
                if now - self._barren < RESCAN_GAP:
                    return False
                self._scanned = now
                self._oldest = [(since, n, close) for n, (since, close) in enumerate(self._scan())]
                heapq.heapify(self._oldest)  # (since, n): n is unique, the closing functions never compare
            while self._oldest:
                since, _, close = heapq.heappop(self._oldest)
                if close(since):
                    self.reclaimed += 1
                    return True
        self._barren = now
        return False


def idle_closed(transport: asyncio.BaseTransport, since: float) -> None:
    """`device_idle_reclaimed`: the idle keep-alive on `transport`, idle since `since` (the loop's time), is closed
    for a new device at the cap."""
    log.info(
        "device_idle_reclaimed",
        peer=peer_text(transport.get_extra_info("peername")),
        idle_s=round(asyncio.get_running_loop().time() - since, 3),
        detail="an idle keep-alive closed to serve a new device at listener.max_connections",
    )


class _Taken:
    """One connection's slot: calling it gives the slot back, once. A small object rather than a closure: each
    open connection holds it for its life (a closure and its two cells were 0.2 KiB of every held long-poll)."""

    __slots__ = ("_slots",)

    def __init__(self, slots: ConnectionSlots) -> None:
        self._slots: ConnectionSlots | None = slots

    def __call__(self) -> None:
        slots, self._slots = self._slots, None
        if slots is not None:
            slots._give_back()


class AddressCap:
    """At most `limit` connections open at once per client address (`address_key`), from accept, or from the
    PROXY header behind a balancer, to close; one more is refused (the caller resets it)."""

    def __init__(self, limit: int, *, on_refused: Callable[[], None] | None = None) -> None:
        self.limit = limit
        self._open: dict[str, int] = {}
        self._on_refused = on_refused

    def admit(self, peer: object, closed: Callable[[], None]) -> Callable[[], None] | None:
        """A place for one more connection from `peer` (host, port): `closed` made to give that place back too
        (call it, once or more, when the connection ends); None when the address has `limit` open (logged and
        counted: the caller resets the connection and gives its slot back)."""
        key = _key(peer)
        if self._refused(key, peer):
            return None
        self._open[key] = self._open.get(key, 0) + 1
        return _Place(self, key, closed)

    def refuses(self, peer: object) -> bool:
        """Whether `peer`'s address has `limit` connections open (logged and counted as `admit` does when so)."""
        return self._refused(_key(peer), peer)

    def _refused(self, key: str, peer: object) -> bool:
        count = self._open.get(key, 0)
        if count >= self.limit:
            log.warning(
                "address_connection_limit_reached",
                address=key,
                peer=peer_text(peer),
                open=count,
                limit=self.limit,
                detail="reset before the TLS handshake (listener.max_connections_per_address, per worker)",
            )
            if self._on_refused is not None:
                self._on_refused()
            return True
        return False

    def _give_back(self, key: str) -> None:
        left = self._open[key] - 1
        if left:
            self._open[key] = left
        else:
            del self._open[key]  # the map holds addresses with connections open, no more


def _key(peer: object) -> str:
    host = peer[0] if isinstance(peer, tuple) and peer else str(peer)
    return address_key(str(host))


class _Place:
    """One connection's place under its address's cap, and then its slot: calling it gives both back, once. A
    small object rather than a closure, as `_Taken`: each open connection holds it for its life."""

    __slots__ = ("_cap", "_closed", "_key")

    def __init__(self, cap: AddressCap, key: str, closed: Callable[[], None]) -> None:
        self._cap: AddressCap | None = cap
        self._key = key
        self._closed = closed

    def __call__(self) -> None:
        cap, self._cap = self._cap, None
        if cap is not None:
            cap._give_back(self._key)
            self._closed()


def reset(conn: socket.socket) -> None:
    """Close an accepted socket with a reset (SO_LINGER 0): nothing of it was read, nothing is answered, and the
    gateway keeps no TIME_WAIT state for a connection it refused."""
    with contextlib.suppress(OSError):
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()


ListenAddress = tuple[socket.AddressFamily, socket.SocketKind, int, str, Any]  # one of getaddrinfo's answers


def listen_addresses(host: str, port: int) -> list[ListenAddress]:
    """Every address `host` resolves to for a listener on `port`, once each: one listening socket, and one accept
    loop, each (`listen_sockets`). Resolved once, before the start shares out its descriptors
    (`proxy.descriptors.past_cap` counts the loops)."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    return list(dict.fromkeys(infos))


def listen_sockets(addresses: Iterable[ListenAddress], *, reuse_port: bool, backlog: int) -> list[socket.socket]:
    """Listening sockets for `addresses` (`listen_addresses`), set up as `loop.create_server` would."""
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in addresses:
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(backlog)
            sock.setblocking(False)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


async def accept_connections(
    sock: socket.socket,
    factory: Callable[[Callable[[], None]], asyncio.Protocol],
    slots: ConnectionSlots,
    cap: AddressCap | None = None,
    *,
    header_first: bool = False,
) -> None:
    """Accept connections on `sock` while `slots` has room; each protocol gets its slot's give-back function, the
    slot taken once accept() has returned (`_accept_below_cap`: a loop waiting on a quiet address holds none). With
    `cap` (direct connections; behind a balancer the PROXY gate asks it), a connection from an address
    that has `cap.limit` open is reset at once and its slot given back. At the cap, with `slots.idle`, the next
    connection is accepted first and then given an idle keep-alive's slot (`_accept_at_cap`); behind a balancer
    (`header_first`) it is given a `SlotWait` instead, and the PROXY gate takes the slot once the header is read; so is
    every connection while some wait, so that a slot freed goes to them, not to this loop's next connection (taken
    before accept(), it was held for a connection not yet come, and every waiting one waited on)."""
    loop = asyncio.get_running_loop()
    while True:
        if slots.idle is not None and (slots.full or (header_first and slots.waiting)):
            if header_first:
                accepted = await _accept_waiting(loop, sock, slots)
            else:
                accepted = await _accept_at_cap(loop, sock, slots, cap)
        else:
            accepted = await _accept_below_cap(loop, sock, slots, cap, header_first=header_first)
        if accepted is None:
            continue
        conn, peer, taken = accepted
        give_back = _admitted(cap, conn, peer, taken)
        if give_back is None:
            continue
        # shielded: the listener stopping cancels this loop, and a connection it had accepted was closed half set up
        # (its device's handshake or request cut: `accept_queued`)
        await asyncio.shield(serve_accepted(loop, factory, conn, give_back))


def _admitted(
    cap: AddressCap | None, conn: socket.socket, peer: Any, give_back: Callable[[], None]
) -> Callable[[], None] | None:
    """The give-back of connection `conn` from `peer`, with its slot's `give_back`, once the per-address `cap` admits
    it (direct connections; None: no cap); None if its address has `cap.limit` open: its slot given back, `conn`
    reset."""
    if cap is None:
        return give_back
    admitted = cap.admit(peer, give_back)
    if admitted is None:
        give_back()
        reset(conn)
    return admitted


async def serve_accepted(
    loop: asyncio.AbstractEventLoop,
    factory: Callable[[Callable[[], None]], asyncio.Protocol],
    conn: socket.socket,
    give_back: Callable[[], None],
) -> None:
    """Connection `conn`, accepted with its slot's `give_back`, handed to a protocol of `factory`."""
    try:
        await loop.connect_accepted_socket(functools.partial(factory, give_back), conn)
    except OSError:
        give_back()
        conn.close()
    except Exception:  # a protocol that cannot be made is our bug: it must cost one connection, not the loop
        give_back()
        conn.close()
        log.exception("connection_setup_failed")


def accept_queued(
    sock: socket.socket, slots: ConnectionSlots, cap: AddressCap | None
) -> list[tuple[socket.socket, Callable[[], None]]]:
    """A listener that stops (its accept loop cancelled): the connections the kernel has already queued on `sock`,
    accepted until none is left, then `sock` closed; each with its slot (`ConnectionSlots.claim`: a free one, or an
    idle keep-alive's, which the drain closes anyway), for the caller to serve (`serve_accepted`) as the drain's
    connections with no request yet. Closing a listening socket resets what its queue holds, and SO_REUSEPORT gives a
    closing listener's queue to no sibling unless `net.ipv4.tcp_migrate_req` is 1 (docs/operations.md): a device whose
    TCP handshake the kernel had completed for this worker lost its request. Left to the kernel still: what comes in
    the instant between the last accept and the close, what is still in its TCP handshake (SYN received, not yet
    acknowledged), and, at the cap with every connection busy, the rest of the queue. At most one backlog's worth is
    taken (`BACKLOG`): a stream of new connections faster than the accepts would hold the listener open."""
    taken: list[tuple[socket.socket, Callable[[], None]]] = []
    asyncio.get_running_loop().remove_reader(sock)  # the cancelled accept loop's (`_readable`), before the close
    try:
        for _ in range(BACKLOG):
            try:
                conn, peer = sock.accept()
            except OSError:  # BlockingIOError: none left (or EMFILE: the rest as before)
                break
            conn.setblocking(False)
            if not slots.claim():
                reset(conn)
                break
            give_back = _admitted(cap, conn, peer, _Taken(slots))
            if give_back is not None:
                taken.append((conn, give_back))
    finally:
        sock.close()
    return taken


async def _accept_below_cap(
    loop: asyncio.AbstractEventLoop,
    sock: socket.socket,
    slots: ConnectionSlots,
    cap: AddressCap | None,
    *,
    header_first: bool,
) -> tuple[socket.socket, Any, Callable[[], None]] | None:
    """Below the cap (or with no idle keep-alives to close, once a slot is free): the next connection accepted, and
    then given a slot. No slot is held while accept() waits: a listener on several addresses runs a loop on each, and
    a loop on an address with no traffic held one for as long as none came (at a cap of 3 on three addresses, the
    devices on one of them got 1). Another loop may take the last slot meanwhile: the connection is then one accepted
    at the cap (`_at_cap`). None when there is none to serve (refused, or accept() failed)."""
    if slots.idle is None:
        await slots.vacancy()  # no keep-alive to close for it: accepted only once a slot is free
    accepted = await _accept(loop, sock)
    if accepted is None:
        return None
    conn, peer = accepted
    if header_first and slots.idle is not None and (slots.full or slots.waiting):
        return conn, peer, SlotWait(slots)  # its header first (`_accept_waiting`)
    if not slots.full:
        slots.open += 1
        return conn, peer, _Taken(slots)
    return await _at_cap(conn, peer, slots, cap)


async def _accept_waiting(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, slots: ConnectionSlots
) -> tuple[socket.socket, Any, Callable[[], None]] | None:
    """At the cap behind a balancer: the next connection accepted with no slot, a `SlotWait`, once fewer than
    `HEADER_WAITS` wait. None when there is none to serve yet (the caller looks at the cap again)."""
    if slots.waiting >= HEADER_WAITS:
        slots._freed.clear()
        await slots._freed.wait()  # a wait ended, or a slot was freed
        return None
    accepted = await _accept(loop, sock)
    return None if accepted is None else (*accepted, SlotWait(slots))


async def _accept(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> tuple[socket.socket, Any] | None:
    """The next connection (no slot held meanwhile); None, logged, after a pause when accept() fails, as in
    `accept_connections`. accept() is called by this task once the listener is readable, nothing awaited after it,
    not in `loop.sock_accept`'s reader callback: a connection that callback took in the turn before the stop
    cancelled the task was dropped with the task's result (reset; `accept_queued` found the kernel's queue empty)."""
    while True:
        try:
            conn, peer = sock.accept()
        except (BlockingIOError, InterruptedError):
            await _readable(loop, sock)
            continue
        except OSError as e:
            log.warning("accept_failed", reason=str(e))
            await asyncio.sleep(_ACCEPT_PAUSE)
            return None
        conn.setblocking(False)
        return conn, peer


def _set_once(ready: asyncio.Future[None]) -> None:
    if not ready.done():
        ready.set_result(None)


async def _readable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    """Once listening socket `sock` has a connection queued. Its reader is removed by the socket, never by a number
    kept: once `sock` is closed (`accept_queued`, which removed it before the close), the number may be another
    socket's."""
    ready: asyncio.Future[None] = loop.create_future()
    loop.add_reader(sock, _set_once, ready)  # called at each turn while readable, until removed
    try:
        await ready
    finally:
        if sock.fileno() != -1:
            loop.remove_reader(sock)


async def _accept_at_cap(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, slots: ConnectionSlots, cap: AddressCap | None
) -> tuple[socket.socket, Any, Callable[[], None]] | None:
    """At the cap, with idle keep-alives to close (`slots.idle`): the next connection is accepted first, and then
    given a slot (`ConnectionSlots.room`: an idle keep-alive's, closed for it, or the next one freed). Accepted first
    so that a keep-alive is closed only for a device that came, and not for one over its address's cap (`cap`), which
    is reset at once as ever. None when there is no connection to serve (refused, or accept() failed)."""
    accepted = await _accept(loop, sock)
    return None if accepted is None else await _at_cap(*accepted, slots, cap)


async def _at_cap(
    conn: socket.socket, peer: Any, slots: ConnectionSlots, cap: AddressCap | None
) -> tuple[socket.socket, Any, Callable[[], None]] | None:
    """A slot for a connection accepted (`ConnectionSlots.room`: a free one at once, else an idle keep-alive's or the
    next one freed); one over its address's cap is reset first, so that no keep-alive is closed for it (None)."""
    if cap is not None and slots.full and cap.refuses(peer):
        reset(conn)
        return None
    try:
        give_back = await slots.room()
    except BaseException:  # the listener stops
        conn.close()
        raise
    return conn, peer, give_back


class HeaderBlockBudget:
    """Stands in for aiohttp's request parser: refuses a header block larger than `limit` bytes (431).

    Each read is cut where a head or a body ends (`proxy.device.framing`) and fed to the parser one part at a
    time, so a head is counted from its first byte even when it shares a read with the end of the request
    before it (counting whole reads let such a head pass the budget by what that read held of it)."""

    def __init__(self, parser: Any, handler: asyncio.Protocol, limit: int, on_refused: Callable[[], None]) -> None:
        self._parser = parser
        self._handler = handler
        self._limit = limit
        self._on_refused = on_refused
        self._payload: Any = None  # the body of the last request handed over, while it is being read
        self._body: BodyEnd | None = None  # where the body being read ends, while one is
        self._seen = 0  # bytes of the head being read
        self._tail = b""  # its last bytes (at most 3)
        self._refused = False
        self._linger: Linger | None = None  # once the 431 is written
        self._upgraded = False

    @property
    def body_coming(self) -> bool:
        """Whether a request's head was handed over whose body has not all been read (`proxy.app._first_requests`)."""
        return self._body is not None and not self._refused

    @property
    def between_requests(self) -> bool:
        """Whether no byte of a next request has been read since the last one's end (no head begun, no body being
        read), and nothing was refused or upgraded: the handler may be idle (`proxy.device.aiohttp_side`)."""
        return self._seen == 0 and self._body is None and not self._refused and not self._upgraded

    @pass_through  # aiohttp's parse errors raised below quote the client's bytes: they stay aiohttp's to log
    def feed_data(self, data: bytes) -> tuple[list[Any], bool, bytes]:
        """The parser's `feed_data`, within the budget. A parse error leaves with its message cut before the bytes it
        quotes: aiohttp answers the device with that message as the body of its 400, and a quoted `Cookie` or
        `Authorization` line would hand a page's script the credentials its browser keeps from it (an HttpOnly
        cookie: Apache's CVE-2012-0053), or put them in whatever records answers."""
        try:
            return self._feed(data)
        except HttpProcessingError as e:
            e.message = unquoted(e.message)
            raise

    @pass_through
    def _feed(self, data: bytes) -> tuple[list[Any], bool, bytes]:
        if self._refused:
            if self._linger is not None:
                self._linger.heard(len(data))
            return [], False, b""
        if self._upgraded:
            return self._parser.feed_data(data)  # type: ignore[no-any-return]
        out: list[Any] = []
        while data:
            body = self._body
            in_body = body is not None
            if body is not None:
                take, ended = body.end(data)
                if body.framing > self._limit:  # sizes, extensions, trailers: bounded like a head, to the byte
                    self._framing_refused(out)
            else:
                take = head_end(self._tail, data)
                if take > self._limit - self._seen:
                    self._refuse()
                    return [], False, b""
                self._seen += take
            piece, data = data[:take], data[take:]
            messages, upgraded, tail = self._parser.feed_data(piece)
            if in_body and ended:
                self._body = None
                if self._payload is not None and not self._payload.is_eof():
                    raise BadHttpMessage("the body ends where the parser did not end it")  # never guessed
            for message, payload in messages:
                self._handed_over(message, payload)
            if not messages and not in_body:  # the head goes on: its last bytes may start its end
                self._tail = (self._tail + piece[-3:])[-3:]
            out.extend(messages)
            if upgraded:
                self._upgraded = True
                return out, True, tail + data
        return out, False, b""

    def _framing_refused(self, parsed: list[Any]) -> None:
        """Too many bytes that are not payload inside a chunked body: refused as aiohttp's parser refuses a bad chunk
        (its handler's read of the body fails, and aiohttp answers 400 and closes). A body whose head aiohttp was
        given in an earlier read is being served: its read fails with a 400 of the gateway's (a `BadRequest`), so
        nothing of it ends at the backend as if whole."""
        reason = "chunk extensions or trailer fields longer than listener.max_header_bytes"
        if self._payload is not None and all(payload is not self._payload for _, payload in parsed):
            self._payload.set_exception(BadRequest(reason))
        raise BadHttpMessage(reason)

    def _handed_over(self, message: Any, payload: Any) -> None:
        """A request's head was read: the next bytes are its body, framed as it says, or the next head."""
        self._seen, self._tail, self._payload = 0, b"", payload
        length = message.headers.get("Content-Length")
        if message.chunked:
            self._body = BodyEnd(chunked=True)
        elif length is not None and length.isdigit() and int(length) > 0:
            self._body = BodyEnd(int(length))

    def _refuse(self) -> None:
        self._refused = True
        transport: Any = getattr(self._handler, "transport", None)
        refuse_header_block(transport, self._limit, self._on_refused)
        self._answer_when_idle(transport, _IDLE_LOOK)

    def _answer_when_idle(self, transport: asyncio.Transport | None, after: float) -> None:
        """The 431 goes out once aiohttp has answered every request read before the refused head (HTTP/1.1 answers
        in order): while its handler is not waiting for a next request, look again `after` seconds later, twice as
        long each time up to a second (a held long-poll may take minutes). aiohttp offers no hook for "idle", so its
        handler's `_waiter` (set only while it waits for a request) and `_messages` are read; a test
        (test_device_parser) fails if aiohttp renames them."""
        if transport is None or transport.is_closing():
            return
        handler: Any = self._handler
        waiter = getattr(handler, "_waiter", None)
        if waiter is None or waiter.done() or getattr(handler, "_messages", None):
            asyncio.get_running_loop().call_later(after, self._answer_when_idle, transport, min(2 * after, 1.0))
            return
        self._linger = answer_too_large(transport)

    def __getattr__(self, name: str) -> Any:  # feed_eof, pause_reading, message_consumed, set_upgraded ...
        return getattr(self._parser, name)


def refuse_header_block(transport: asyncio.Transport | None, limit: int, on_refused: Callable[[], None]) -> None:
    """A header block passed `limit` bytes: logged and counted (the caller answers 431 when its turn comes,
    `answer_too_large`)."""
    peer = transport.get_extra_info("peername") if transport is not None else None
    log.warning(
        "request_headers_too_large",
        stage="request",
        peer=peer_text(peer),
        reason=f"the request's header block passed {limit} bytes",
        fix="a client sending this much header is broken or hostile; listener.max_header_bytes sets the limit",
    )
    on_refused()


def answer_too_large(transport: asyncio.Transport) -> Linger | None:
    """431 on `transport`, then the connection closed after a linger (so the device reads the answer): the caller
    tells the `Linger` returned of every read it discards after this (None: the connection is already closing)."""
    if transport.is_closing():
        return None
    transport.write(_TOO_LARGE)
    return Linger(transport)


class Linger:
    """A refused connection's lingering close: `transport` is closed once the client has sent nothing for
    `_LINGER_QUIET` seconds, `_LINGER_TIME` seconds after the answer at the latest, or at once when more than
    `_LINGER_BYTES` were discarded meanwhile (`heard`). One timer, moved on only when it fires: a read costs a
    subtraction and a clock read."""

    __slots__ = ("_ends", "_heard", "_left", "_loop", "_transport")

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._loop = asyncio.get_running_loop()
        self._heard = self._loop.time()
        self._ends = self._heard + _LINGER_TIME
        self._left = _LINGER_BYTES
        self._loop.call_later(_LINGER_QUIET, self._look)

    def heard(self, nbytes: int) -> None:
        """The client sent `nbytes` more, discarded."""
        self._heard = self._loop.time()
        self._left -= nbytes
        if self._left < 0:
            self._transport.close()

    def _look(self) -> None:
        if self._transport.is_closing():
            return
        now = self._loop.time()
        until = min(self._heard + _LINGER_QUIET, self._ends)
        if now >= until:
            self._transport.close()
        else:
            self._loop.call_later(until - now, self._look)


class UnquotedParseErrors:
    """Stands in for aiohttp's request parser where no header budget does (the admin listener): a parse error leaves
    with its message cut before the bytes it quotes, which aiohttp would send back as its 400's body
    (`HeaderBlockBudget.feed_data` says why that matters)."""

    def __init__(self, parser: Any) -> None:
        self._parser = parser

    @pass_through
    def feed_data(self, data: bytes) -> tuple[list[Any], bool, bytes]:
        try:
            return self._parser.feed_data(data)  # type: ignore[no-any-return]
        except HttpProcessingError as e:
            e.message = unquoted(e.message)
            raise

    def __getattr__(self, name: str) -> Any:  # feed_eof, message_consumed, set_upgraded ...
        return getattr(self._parser, name)


def unquote_parse_errors(handler: asyncio.Protocol) -> None:
    """Put `UnquotedParseErrors` in front of the parser of aiohttp's request `handler`."""
    parser = getattr(handler, "_parser", None)
    if parser is None or not hasattr(parser, "feed_data"):
        raise RuntimeError("aiohttp's request handler has no _parser: its 400 answers would quote what a client sent")
    handler._parser = UnquotedParseErrors(parser)  # type: ignore[attr-defined]


def limit_header_block(handler: asyncio.Protocol, limit: int, on_refused: Callable[[], None]) -> None:
    """Put a `HeaderBlockBudget` of `limit` bytes in front of the parser of aiohttp's request `handler`."""
    parser = getattr(handler, "_parser", None)
    if parser is None or not hasattr(parser, "feed_data"):
        raise RuntimeError("aiohttp's request handler has no _parser: listener.max_header_bytes cannot be enforced")
    handler._parser = HeaderBlockBudget(parser, handler, limit, on_refused)  # type: ignore[attr-defined]
