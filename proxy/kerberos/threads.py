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
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")


class NoThread(Exception):
    """No thread for the call: `held` calls hold every thread, `abandoned` of them past their caller's wait."""

    def __init__(self, held: int, abandoned: int) -> None:
        super().__init__(f"{held} calls hold every thread, {abandoned} of them no longer waited for")
        self.held = held
        self.abandoned = abandoned


class _Call:
    """One call's thread, as the event loop sees it: whether its caller gave up on it while it ran."""

    __slots__ = ("abandoned",)

    def __init__(self) -> None:
        self.abandoned = False


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

    async def run(self, call: Callable[..., T], *args: object) -> T:
        """`call(*args)` in one of the threads; TimeoutError after `timeout` (waiting for a thread included),
        NoThread at once when there is no thread to wait for (module docstring)."""
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
            return await self._start(call, args)

    async def _start(self, call: Callable[..., T], args: tuple[object, ...]) -> T:
        loop = asyncio.get_running_loop()
        mine = _Call()
        try:
            future = self._executor.submit(call, *args)
        except RuntimeError:  # shut down (the gateway is closing)
            self._free.release()
            raise
        self.held += 1

        def returned(_: Future[T]) -> None:  # in the call's thread, or here when it never started
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nothing left to count
                loop.call_soon_threadsafe(self._returned, mine)

        future.add_done_callback(returned)
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            if not future.done():  # the thread runs on inside MIT; the caller is gone
                mine.abandoned = True
                self.abandoned += 1
            raise

    def _returned(self, call: _Call) -> None:
        self.held -= 1
        if call.abandoned:
            self.abandoned -= 1
        self._free.release()

    def close(self) -> None:
        """Start no more calls; a call still inside MIT finishes on its own."""
        self._executor.shutdown(wait=False, cancel_futures=True)
