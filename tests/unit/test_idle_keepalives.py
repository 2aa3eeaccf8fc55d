"""Idle keep-alives at the connection cap (`proxy.tls.limits.IdleKeepAlives`, `ConnectionSlots.room`) and the aiohttp
state `proxy.device.aiohttp_side.idle_handlers` reads."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from aiohttp.web_protocol import RequestHandler
from structlog.testing import capture_logs

from proxy.tls.limits import HEADER_WAITS, HEALTH_CHECKS, ConnectionSlots, IdleKeepAlives, SlotWait, frees_a_slot


class _Connection:
    """An idle connection as a server's scan reports it: since when, and whether it still lets itself be closed."""

    def __init__(self, since: float, closes: bool = True) -> None:
        self.since = since
        self.closes = closes
        self.closed = False

    def close(self, since: float) -> bool:
        if not self.closes or since != self.since:
            return False
        self.closed = True
        return True


def _scan(connections: list[_Connection]) -> Callable[[], list[tuple[float, Callable[[float], bool]]]]:
    return lambda: [(c.since, c.close) for c in connections if not c.closed]


def test_the_oldest_idle_connection_is_closed_first_and_one_that_moved_is_skipped() -> None:
    """Three idle connections: the oldest goes first; one that served a request since the scan (newer now) or that
    refuses (bytes waiting) is skipped for the next; the count goes up only for a closed one; none left: False."""

    async def run() -> None:
        old, moved, young = _Connection(1.0), _Connection(2.0), _Connection(3.0, closes=False)
        idle = IdleKeepAlives(_scan([young, moved, old]))
        assert idle.count() == 3
        assert idle.reclaim()
        assert old.closed
        moved.since = 9.0  # served a request since the scan: the order's entry is stale
        assert idle.reclaim()  # the stale entry and the refusing one are skipped; a rescan finds `moved` again
        assert moved.closed
        assert not young.closed
        assert not idle.reclaim()
        assert idle.reclaimed == 2

    asyncio.run(run())


def test_one_scan_orders_every_idle_connection_and_those_that_refuse_hide_none() -> None:
    """Of many idle connections, one scan orders them all by age: the 70 oldest refuse their close (bytes of the
    device's waiting, half a TLS record), and the 10 after them are closed oldest first, with one scan for all (a scan
    kept only the 64 oldest, and gave up when all of those refused)."""

    async def run() -> None:
        connections = [_Connection(float(n), closes=n >= 70) for n in reversed(range(80))]
        scans: list[int] = []

        def scan() -> list[tuple[float, Callable[[float], bool]]]:
            scans.append(1)
            return _scan(connections)()

        idle = IdleKeepAlives(scan)
        for n in range(10):
            assert idle.reclaim()
            assert [c.since for c in connections if c.closed] == [float(k) for k in reversed(range(70, 71 + n))]
        assert len(scans) == 1
        assert not idle.reclaim()

    asyncio.run(run())


def test_at_the_cap_a_connection_takes_an_idle_ones_slot_and_waits_when_none_is_idle() -> None:
    """`room` at the cap: with an idle connection, it is closed and its slot (given back as it closes) taken, no wait
    logged or counted; with none, the wait is logged and counted, and a slot freed later is taken."""

    async def run() -> None:
        waits: list[int] = []
        gives: list[Callable[[], None]] = []
        connections: list[_Connection] = []

        def close(since: float) -> bool:
            asyncio.get_running_loop().call_soon(gives.pop(0))  # its socket closes: the slot comes back
            return True

        slots = ConnectionSlots(
            2, on_wait=lambda: waits.append(1), idle=IdleKeepAlives(lambda: [(c.since, close) for c in connections])
        )
        gives.extend([await slots.take(), await slots.take()])
        connections.append(_Connection(1.0))
        with capture_logs() as logs:
            await asyncio.wait_for(slots.room(), 30)
        assert slots.open == 2
        assert not waits
        assert not [e for e in logs if e["event"] == "connection_limit_reached"]
        connections.clear()
        with capture_logs() as logs:
            waiting = asyncio.ensure_future(slots.room())
            await asyncio.sleep(0)
            assert not waiting.done()
            assert waits == [1]
            gives.pop(0)()
            await asyncio.wait_for(waiting, 30)
        assert [e["event"] for e in logs] == ["connection_limit_reached"]

    asyncio.run(run())


def test_a_connection_waiting_for_its_proxy_header_holds_no_slot_and_closes_nobody_until_it_claims() -> None:
    """`SlotWait` (behind a balancer, at the cap): made, it takes no slot and closes no idle connection; one that ends
    waiting closes nobody's; `claim` closes the oldest idle one and takes its slot; with every connection busy `claim`
    is False and `room` takes the next slot freed; calling it twice gives that slot back once."""

    async def run() -> None:
        connections = [_Connection(1.0)]
        slots = ConnectionSlots(1, idle=IdleKeepAlives(_scan(connections)))
        give_back = await slots.take()
        silent, burst = SlotWait(slots), SlotWait(slots)
        assert (slots.open, slots.waiting) == (1, 2)
        silent()  # never sent its header
        assert slots.waiting == 1
        assert not connections[0].closed
        assert burst.claim()  # its header read, its address admitted: the idle connection gives way
        assert connections[0].closed
        assert (slots.open, slots.waiting) == (2, 0)  # the closed one's slot comes back as its socket closes
        give_back()
        late = SlotWait(slots)
        assert not late.claim()  # every connection busy, none idle
        waiting = asyncio.ensure_future(late.room())
        await asyncio.sleep(0)
        assert not waiting.done()
        burst()
        await asyncio.wait_for(waiting, 30)
        assert (slots.open, slots.waiting) == (1, 0)
        late()
        late()
        assert slots.open == 0

    asyncio.run(run())


def test_a_wait_without_reclaim_closes_no_idle_connection_and_takes_only_a_freed_slot() -> None:
    """`claim(reclaim=False)` and `room(reclaim=False)` (a PROXY header naming no device: a health check, UNSPEC): at a
    cap held by an idle connection, no claim and no wait closes it; the wait ends with the slot its closing frees."""

    async def run() -> None:
        connections = [_Connection(1.0)]
        slots = ConnectionSlots(1, idle=IdleKeepAlives(_scan(connections)))
        give_back = await slots.take()
        unnamed = SlotWait(slots)
        assert not unnamed.claim(reclaim=False)
        waiting = asyncio.ensure_future(unnamed.room(reclaim=False))
        await asyncio.sleep(0.6)  # past RECLAIM_LOOK: the wait looked again, and still closed nobody
        assert not waiting.done()
        assert not connections[0].closed
        give_back()  # the idle connection closes by itself
        await asyncio.wait_for(waiting, 30)
        assert (slots.open, slots.waiting) == (1, 0)
        assert not connections[0].closed
        unnamed()
        assert slots.open == 0

    asyncio.run(run())


def test_health_checks_going_on_without_a_slot_leave_the_waits_for_places_of_their_own() -> None:
    """`aside` (a LOCAL header at a full cap): the check's wait ends at once, so checks stalled in TLS keep no device
    out of the accept loop (`HEADER_WAITS`); at most `HEALTH_CHECKS` go so, the next is refused a place (the gate
    closes it); each place comes back once, as its connection ends, and a check aside takes no slot."""

    async def run() -> None:
        slots = ConnectionSlots(1, idle=IdleKeepAlives(_scan([_Connection(1.0)])))
        await slots.take()
        checks = [SlotWait(slots) for _ in range(HEALTH_CHECKS + 1)]
        assert all(check.aside() for check in checks[:-1])
        assert (slots.waiting, slots.checks, slots.open) == (1, HEALTH_CHECKS, 1)
        assert not checks[-1].aside()  # its places all taken: the gate closes it (or, later, a place)
        assert not checks[0].claim()  # aside, it takes no slot later
        checks[0]()
        checks[0]()
        assert slots.checks == HEALTH_CHECKS - 1
        assert checks[-1].aside()
        assert (slots.waiting, slots.checks) == (0, HEALTH_CHECKS)
        for check in checks[1:]:
            check()
        assert (slots.waiting, slots.checks, slots.open) == (0, 0, 1)

    asyncio.run(run())


def test_only_a_connection_holding_a_slot_frees_one_when_closed() -> None:
    """`frees_a_slot`: a health check aside (its own place) frees none, so no idle-keep-alive reclaim closes it for a
    device; a wait that claimed a slot, and a slot taken by the accept loop, do."""

    async def run() -> None:
        slots = ConnectionSlots(1)
        taken = await slots.take()
        check = SlotWait(slots)
        assert check.aside()
        assert not frees_a_slot(check)
        assert frees_a_slot(taken)
        taken()
        device = SlotWait(slots)
        assert device.claim()
        assert frees_a_slot(device)

    asyncio.run(run())


def test_a_wait_cancelled_as_a_slot_is_freed_ends_and_takes_nothing() -> None:
    """Two `SlotWait`s wait for a slot at a busy cap; both connections go in one loop pass (the first one's end wakes
    the second's wait just before the second is cancelled): both waits end and take nothing; the busy connection's
    slot given back leaves none taken (Python 3.11's `wait_for` swallowed the second cancel: that wait went on, and
    took the next slot freed for ever)."""

    async def run() -> None:
        slots = ConnectionSlots(1, idle=IdleKeepAlives(_scan([_Connection(1.0, closes=False)])))
        give_back = await slots.take()
        waits = [SlotWait(slots), SlotWait(slots)]
        rooms = [asyncio.ensure_future(wait.room()) for wait in waits]
        await asyncio.sleep(0)
        for wait, room in zip(waits, rooms, strict=True):  # as `ProxyHeaderGate.connection_lost` does, in one pass
            room.cancel()
            wait()
        await asyncio.wait(rooms, timeout=30)
        assert all(room.cancelled() for room in rooms)
        assert (slots.open, slots.waiting) == (1, 0)
        give_back()
        assert (slots.open, slots.waiting) == (0, 0)

    asyncio.run(run())


def test_waiters_that_wake_together_scan_the_connections_once() -> None:
    """HEADER_WAITS `SlotWait`s wait at a cap whose connections are all busy; a slot freed goes to one, and the others,
    woken with it, find the cap full again: the connections are scanned about once in all (a stalled loop may make it
    twice), not by each waiter as it starts and again as it wakes (31 scans of every connection before)."""

    async def run() -> None:
        scans = 0

        def scan() -> list[tuple[float, Callable[[float], bool]]]:
            nonlocal scans
            scans += 1
            return [(1.0, lambda _since: False)]  # busy to the close: a half record, an answer unsent

        slots = ConnectionSlots(1, idle=IdleKeepAlives(scan))
        give_back = await slots.take()
        waits = [SlotWait(slots) for _ in range(HEADER_WAITS)]
        rooms = [asyncio.ensure_future(wait.room()) for wait in waits]
        await asyncio.sleep(0)
        give_back()
        done, _ = await asyncio.wait(rooms, timeout=30, return_when=asyncio.FIRST_COMPLETED)
        for _ in range(3):  # the other waiters' wake-ups run
            await asyncio.sleep(0)
        assert len(done) == 1
        assert scans < HEADER_WAITS // 4
        for wait, room in zip(waits, rooms, strict=True):
            room.cancel()
            wait()
        await asyncio.wait(rooms, timeout=30)
        assert (slots.open, slots.waiting) == (0, 0)

    asyncio.run(run())


def test_aiohttps_request_handler_still_has_the_state_idle_handlers_reads() -> None:
    """aiohttp offers no hook for an idle connection: `idle_handlers` reads its handler's own state. A renamed or
    removed attribute fails here, not silently (no connection would ever be found idle). `_current_request` is what
    `TlsGate.close_after_answer` reads (a health check's place past its time, serving a request); `_request_count`,
    `_close` and `_force_close` are also what `awaiting_first_request` reads, `_parser` and `_waiter` what
    `receiving_body` reads (`proxy.app._first_requests`)."""
    names = (
        "_current_request",
        "_waiter",
        "_messages",
        "_request_count",
        "_force_close",
        "_close",
        "_keepalive",
        "_next_keepalive_close_time",
        "_parser",
    )
    slots = {name for cls in RequestHandler.__mro__ for name in getattr(cls, "__slots__", ())}
    assert set(names) <= slots, set(names) - slots
    assert isinstance(RequestHandler.keepalive_timeout, property)
