"""The backend connections' read timers share the event loop's timers in slots (`proxy.backend.client.ReadTimers`):
a timer is due at its deadline rounded up to a 64th of its length, held connections keep a place in a set instead of
a loop timer each, and a read timeout still ends a silent backend's exchange."""

from __future__ import annotations

import asyncio
import gc
import time
from typing import cast

import pytest

from proxy.backend.client import BackendConnection, ReadTimeout, ReadTimers, UserPool, read_timers
from tests.unit.test_backend_client import _listener


@pytest.mark.parametrize("delay", [0.001, 0.5, 1.0, 3.0, 60.0, 120.0, 3600.0, 3540.5])
@pytest.mark.parametrize("when", [0.0, 1.25, 1000.123456, 86_400.7])
def test_a_timer_is_due_at_its_deadline_or_at_most_a_64th_of_its_length_later(delay: float, when: float) -> None:
    """The slot's time is never before the deadline (a timeout never ends early) nor more than delay / 64 after it."""

    class Loop:
        def call_at(self, when: float, callback: object, *args: object) -> None:
            pass

    due = ReadTimers().add(cast(BackendConnection, object()), cast(asyncio.AbstractEventLoop, Loop()), when, delay)
    assert when <= due <= when + delay / 64


def test_timers_due_close_together_share_one_loop_timer_and_fire_only_their_own() -> None:
    """Connections due in the same slot wait on one loop timer; when it fires, each connection whose timer is still
    that slot's is checked once, and one whose timer was dropped or moved meanwhile is not."""

    class Connection:
        def __init__(self) -> None:
            self._due = 0.0
            self.checked = 0

        def _check_read(self) -> None:
            self.checked += 1
            self._due = 0.0

    async def case() -> tuple[list[int], int, int]:
        loop = asyncio.get_running_loop()
        timers = ReadTimers()
        connections = [Connection() for _ in range(4)]
        now = loop.time()
        for c in connections:
            c._due = timers.add(cast(BackendConnection, c), loop, now + 0.2, 0.2)
        slots = len({c._due for c in connections})
        handles = sum(1 for o in gc.get_objects() if isinstance(o, asyncio.TimerHandle) and not o.cancelled())
        timers.remove(cast(BackendConnection, connections[0]), connections[0]._due)  # dropped
        connections[0]._due = 0.0
        connections[1]._due = 1e12  # moved to another slot (as `_arm` would, had it been due later)
        deadline = time.monotonic() + 30
        while connections[3].checked == 0 and time.monotonic() < deadline:  # noqa: ASYNC110  the slot fired
            await asyncio.sleep(0.05)
        return [c.checked for c in connections], slots, handles

    checked, slots, handles = asyncio.run(case())
    assert checked == [0, 0, 1, 1]
    assert slots <= 2  # 4 deadlines within microseconds, slots of 2**-9 s: one slot, or two across a boundary
    assert handles <= slots


def test_a_failing_check_is_reported_and_the_rest_of_its_slot_still_checked() -> None:
    """A connection whose check raises is reported to the loop's exception handler, and every other connection in
    the slot is still checked: no read timeout is lost with it (each connection had a loop timer of its own before)."""

    class Connection:
        def __init__(self, loop: asyncio.AbstractEventLoop, fails: bool) -> None:
            self._loop = loop
            self._due = 0.0
            self.fails = fails
            self.checked = 0

        def _check_read(self) -> None:
            self.checked += 1
            self._due = 0.0
            if self.fails:
                raise RuntimeError("boom")

    async def case() -> tuple[list[int], list[str]]:
        loop = asyncio.get_running_loop()
        reported: list[str] = []
        loop.set_exception_handler(lambda _, context: reported.append(str(context.get("exception"))))
        timers = ReadTimers()
        connections = [Connection(loop, fails=i % 2 == 0) for i in range(6)]
        now = loop.time()
        for c in connections:
            c._due = timers.add(cast(BackendConnection, c), loop, now + 0.1, 0.1)
        deadline = time.monotonic() + 30
        while sum(c.checked for c in connections) < 6 and time.monotonic() < deadline:  # noqa: ASYNC110  the slot
            await asyncio.sleep(0.05)
        return [c.checked for c in connections], reported

    checked, reported = asyncio.run(case())
    assert checked == [1] * 6
    assert reported == ["boom"] * 3


def _callback_name(handle: asyncio.TimerHandle) -> str:
    return str(getattr(getattr(handle, "_callback", None), "__name__", ""))


def test_held_requests_keep_no_loop_timer_of_their_own_and_a_closed_connection_leaves_its_slot() -> None:
    """Twenty requests sent to a backend that never answers (held long-polls with an hour's read timeout) are twenty
    places in one or two slots, with a loop timer per slot, not one per connection (about 0.6 KiB each); the
    connections leave the slots when they close."""

    async def case() -> tuple[int, int, int, int]:
        loop = asyncio.get_running_loop()
        server, upstream, _ = await _listener()
        pool = UserPool()
        connections = [await pool.acquire(upstream, 5, fresh=True) for _ in range(20)]
        for c in connections:
            c.begin("GET", 3600)
            c.write(b"GET /ping HTTP/1.1\r\nHost: h\r\n\r\n")
            c.request_sent()
        gc.collect()
        callbacks = [_callback_name(o) for o in gc.get_objects() if isinstance(o, asyncio.TimerHandle)]
        own, fire = callbacks.count("_check_read"), callbacks.count("_fire")
        armed = len(read_timers(loop))
        for c in connections:
            c.close()
        left = len(read_timers(loop))
        pool.close()
        server.close()
        return own, fire, armed, left

    own, fire, armed, left = asyncio.run(case())
    assert own == 0, f"{own} loop timers of a connection's own"
    assert 1 <= fire <= 2
    assert armed == 20
    assert left == 0


def test_a_silent_backend_still_ends_in_a_read_timeout() -> None:
    """A backend that takes the request and says nothing: the answer's head fails with ReadTimeout once the read
    timeout has passed, not before."""

    async def case() -> tuple[bool, float]:
        server, upstream, _ = await _listener()
        pool = UserPool()
        connection = await pool.acquire(upstream, 5, fresh=True)
        connection.begin("GET", 0.3)
        connection.write(b"GET /ping HTTP/1.1\r\nHost: h\r\n\r\n")
        started = asyncio.get_running_loop().time()
        connection.request_sent()
        try:
            await asyncio.wait_for(connection.response_head(), 30)
        except ReadTimeout:
            timed_out = True
        else:
            timed_out = False
        waited = asyncio.get_running_loop().time() - started
        pool.close()
        server.close()
        return timed_out, waited

    timed_out, waited = asyncio.run(case())
    assert timed_out
    assert waited >= 0.3
