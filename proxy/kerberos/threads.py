"""Threads of their own for blocking calls that may talk to the KDC: bounded in number, waited for briefly.

Theory of operation. A call into MIT's library that talks to the KDC blocks its thread until the KDC answers or MIT
gives up: about 25 s per request for a KDC that accepts TCP and never answers (`proxy.kerberos.kdcs`), long after
the gateway answered its client at `kerberos.kdc_timeout`. No Python code can stop it. Run in asyncio's default
executor, such calls would keep its threads, which CRL reads and vetting, password hashing and other short work
share, so anyone able to start them (a Basic login needs no valid name or password) could stall that work.

`KdcThreads` runs them in an executor of `threads` threads of their own, and counts a thread as taken from the
call's start until the call returns in its thread, not until its caller stops waiting. A call finding every thread
taken may wait for one, as part of its `timeout` (the wait and the call share it), while fewer calls than there are
threads wait and at least one thread is held by a call whose caller is still waiting (the KDC answers, only slowly:
a thread frees soon). Otherwise it is refused at once (`NoThread`): every thread is held by calls whose callers gave
up (the KDC did not answer in time: no thread frees before MIT gives up), or as many calls wait already. Nothing is
queued without bound, and nothing waits for a thread that MIT holds.

A call abandoned so may still reach the KDC, and its answer still counts (a wrong password is one more towards the
account's lockout): a caller that must know it passes an `Outcome`, told when its call is abandoned and, on the
event loop, when the call returns in its thread.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol, TypeVar

T = TypeVar("T")


class NoThread(Exception):
    """No thread for the call: `held` calls hold every thread, `abandoned` of them past their caller's wait."""

    def __init__(self, held: int, abandoned: int) -> None:
        super().__init__(f"{held} calls hold every thread, {abandoned} of them no longer waited for")
        self.held = held
        self.abandoned = abandoned


class Outcome(Protocol):
    """Told what becomes of a call its caller stopped waiting for while it ran (module docstring)."""

    def abandoned(self) -> None:
        """The caller stopped waiting; the call runs on in its thread (told before the caller's exception goes on)."""

    def returned(self, future: Future[Any]) -> None:
        """The abandoned call returned in its thread (on the event loop): its result or exception is `future`'s."""


class _Call:
    """One call's thread, as the event loop sees it: whether its caller gave up on it while it ran."""

    __slots__ = ("abandoned", "outcome")

    def __init__(self, outcome: Outcome | None) -> None:
        self.abandoned = False
        self.outcome = outcome


class KdcThreads:
    """An executor of `threads` threads for blocking KDC calls, each call bounded in time (module docstring)."""

    def __init__(self, threads: int, timeout: float, name: str) -> None:
        self.threads = threads
        self.timeout = timeout
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=name)
        self._free = asyncio.Semaphore(threads)  # given back when a call returns in its thread
        self._waiting = 0
        self.held = 0  # threads inside a call
        self.abandoned = 0  # of those, the calls whose callers stopped waiting (timed out or cancelled)

    async def run(self, call: Callable[..., T], *args: object, outcome: Outcome | None = None) -> T:
        """`call(*args)` in one of the threads; TimeoutError after `timeout` (waiting for a thread included),
        NoThread at once when there is no thread to wait for; `outcome` told of the call if abandoned (module
        docstring)."""
        async with asyncio.timeout(self.timeout):
            # Every thread in a call (not merely passing from a returned call to a waiter, when none is held),
            # and as many calls waiting, or every one of those calls abandoned: no thread frees soon.
            busy = self.held >= self.threads
            if busy and (self._waiting >= self.threads or self.abandoned >= self.held):
                raise NoThread(self.held, self.abandoned)
            self._waiting += 1
            try:
                await self._free.acquire()
            finally:
                self._waiting -= 1
            return await self._start(call, args, outcome)

    async def _start(self, call: Callable[..., T], args: tuple[object, ...], outcome: Outcome | None) -> T:
        loop = asyncio.get_running_loop()
        mine = _Call(outcome)
        try:
            future = self._executor.submit(call, *args)
        except RuntimeError:  # shut down (the gateway is closing)
            self._free.release()
            raise
        self.held += 1

        def returned(done: Future[T]) -> None:  # in the call's thread, or here when it never started
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nothing left to count
                loop.call_soon_threadsafe(self._returned, mine, done)

        future.add_done_callback(returned)
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            if not future.done():  # the thread runs on inside MIT; the caller is gone
                mine.abandoned = True
                self.abandoned += 1
                if outcome is not None:
                    outcome.abandoned()
            raise

    def _returned(self, call: _Call, done: Future[Any]) -> None:
        self.held -= 1
        if call.abandoned:
            self.abandoned -= 1
        self._free.release()
        if call.abandoned and call.outcome is not None:
            call.outcome.returned(done)

    def close(self) -> None:
        """Start no more calls; a call still inside MIT finishes on its own."""
        self._executor.shutdown(wait=False, cancel_futures=True)
