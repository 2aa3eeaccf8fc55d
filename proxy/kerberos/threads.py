"""Threads of their own for blocking calls that may talk to the KDC: bounded in number, waited for briefly.

Theory of operation. A call into MIT's library that talks to the KDC blocks its thread until the KDC answers or MIT
gives up: about 25 s per request for a KDC that accepts TCP and never answers (`proxy.kerberos.kdcs`), long after
the gateway answered its client at `kerberos.kdc_timeout`. No Python code can stop it. Run in asyncio's default
executor, such calls would keep its threads, which CRL reads and vetting, password hashing and other short work
share, so anyone able to start them (a Basic login needs no valid name or password) could stall that work.

`KdcThreads` runs them in an executor of `threads` threads of their own, and counts a thread as taken from the
call's start until the call returns in its thread, not until its caller stops waiting. A call finding every thread
taken may wait for one, as part of its `timeout` (the wait and the call share it), while fewer than `waiting` calls
(`WAITING_PER_THREAD` per thread by default) wait and at least one thread is held by a call whose caller is still
waiting (the KDC answers, only slowly: a thread frees soon). Otherwise it is refused at once (`NoThread`): every thread
is held by calls whose callers gave up (the KDC did not answer in time: no thread frees before MIT gives up), or
`waiting` calls wait already. Nothing is queued without bound, and nothing waits for a thread that MIT holds. The
bound on waiting calls is generous on purpose: devices reconnecting together (a gateway restarted, a reload that
emptied the ticket cache) are many new users at once against a KDC that answers in milliseconds, and each should
wait its turn, not be refused (with as many waiting as threads, 100 calls at once on 2 threads got 96 refusals).

The threads are daemon threads, not a `ThreadPoolExecutor`'s: Python joins an executor's threads at exit, so a gateway
stopped while MIT held one waited for MIT (up to about 25 s per call). A stop does not wait for them: each call's
caller gave up on it already (its client was answered 503), and what the call would bring (a ticket in an in-memory
ccache, a password's verdict) dies with the process; the KDC keeps nothing half-done for it.

A call abandoned so may still reach the KDC, and its answer still counts (a wrong password is one more towards the
account's lockout): a caller that must know it passes an `Outcome`, told when its call is abandoned and, on the
event loop, when the call returns in its thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, Protocol, TypeVar

from proxy.errors import KdcNotAsked
from proxy.kerberos.hints import UNREACHABLE

T = TypeVar("T")

WAITING_PER_THREAD = 64  # calls that may wait for a thread, per thread (module docstring)


class NoThread(Exception):
    """No thread for the call: `held` calls hold every thread, `abandoned` of them past their caller's wait,
    `timed_out` of those given up at the threads' `timeout` (the others' requests ended first: a device hung up)."""

    def __init__(self, held: int, abandoned: int, timed_out: int = 0) -> None:
        super().__init__(f"{held} calls hold every thread, {abandoned} of them no longer waited for")
        self.held = held
        self.abandoned = abandoned
        self.timed_out = timed_out


class Outcome(Protocol):
    """Told what becomes of a call its caller stopped waiting for while it ran (module docstring)."""

    def abandoned(self) -> None:
        """The caller stopped waiting; the call runs on in its thread (told before the caller's exception goes on)."""

    def returned(self, future: Future[Any]) -> None:
        """The abandoned call returned in its thread (on the event loop): its result or exception is `future`'s."""


class _Call:
    """One call's thread, as the event loop sees it: whether its caller gave up on it while it ran."""

    __slots__ = ("abandoned", "outcome", "returned", "timed_out")

    def __init__(self, outcome: Outcome | None) -> None:
        self.abandoned = False
        self.timed_out = False  # abandoned at `KdcThreads.timeout`, not by its caller's end
        self.outcome = outcome
        self.returned = False  # the loop has counted its thread given back (`KdcThreads._returned`)


_Work = tuple[Future[Any], Callable[..., Any], tuple[object, ...]]


class _DaemonThreads:
    """At most `threads` daemon threads running submitted calls, started as calls find none idle. Daemon threads:
    the interpreter exits without waiting for a call inside MIT (module docstring)."""

    def __init__(self, threads: int, name: str) -> None:
        self._threads = threads
        self._name = name
        self._numbers = itertools.count()
        self._work: queue.SimpleQueue[_Work | None] = queue.SimpleQueue()
        self._idle = threading.Semaphore(0)
        self._started: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._closed = False

    def submit(self, call: Callable[..., T], *args: object) -> Future[T]:
        future: Future[T] = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("closed: no more calls")
            self._work.put((future, call, args))
            if not self._idle.acquire(blocking=False) and len(self._started) < self._threads:
                thread = threading.Thread(target=self._serve, name=f"{self._name}_{next(self._numbers)}", daemon=True)
                self._started.append(thread)
                thread.start()
        return future

    def _serve(self) -> None:
        while (work := self._work.get()) is not None:
            future, call, args = work
            if future.set_running_or_notify_cancel():
                try:
                    result = call(*args)
                except BaseException as e:  # noqa: BLE001  the caller's to raise, as an executor's future carries it
                    future.set_exception(e)
                else:
                    future.set_result(result)
                    del result  # a ticket with its session key: not kept by an idle thread until its next call
            del work, future, call, args  # nothing of the call outlives it here
            self._idle.release()

    def close(self) -> None:
        """Start no more calls: queued ones are cancelled, idle threads end, a thread in a call ends after it."""
        with self._lock:
            self._closed = True
            with contextlib.suppress(queue.Empty):
                while (work := self._work.get_nowait()) is not None:
                    work[0].cancel()
            for _ in self._started:
                self._work.put(None)


class KdcThreads:
    """An executor of `threads` threads for blocking KDC calls, each call bounded in time (module docstring)."""

    def __init__(self, threads: int, timeout: float, name: str, *, waiting: int | None = None) -> None:
        self.threads = threads
        self.timeout = timeout
        self.waiting = threads * WAITING_PER_THREAD if waiting is None else waiting  # calls that may wait at once
        self._executor = _DaemonThreads(threads, name)
        self._free = asyncio.Semaphore(threads)  # given back when a call returns in its thread
        self._waiting = 0
        self.held = 0  # threads inside a call
        self.abandoned = 0  # of those, the calls whose callers stopped waiting (timed out or cancelled)
        self.timed_out = 0  # of those, the ones that timed out

    async def run(
        self,
        call: Callable[..., T],
        *args: object,
        outcome: Outcome | None = None,
        started: Callable[[], None] | None = None,
    ) -> T:
        """`call(*args)` in one of the threads; TimeoutError after `timeout` (waiting for a thread included),
        NoThread at once when there is no thread to wait for; `outcome` told of the call if abandoned (module
        docstring); `started` called (on the event loop) once a thread is given to the call, so a caller counts
        the calls that began (a KDC asked), not those refused or timed out waiting for a thread."""
        async with asyncio.timeout(self.timeout) as bound:
            # Every thread in a call (not merely passing from a returned call to a waiter, when none is held),
            # and `waiting` calls waiting already, or every one of those calls abandoned: no thread frees soon.
            busy = self.held >= self.threads
            if busy and (self._waiting >= self.waiting or self.abandoned >= self.held):
                raise NoThread(self.held, self.abandoned, self.timed_out)
            self._waiting += 1
            try:
                await self._free.acquire()
            finally:
                self._waiting -= 1
            return await self._start(call, args, outcome, started, bound)

    async def _start(
        self,
        call: Callable[..., T],
        args: tuple[object, ...],
        outcome: Outcome | None,
        started: Callable[[], None] | None,
        bound: asyncio.Timeout,
    ) -> T:
        loop = asyncio.get_running_loop()
        mine = _Call(outcome)
        try:
            future = self._executor.submit(call, *args)
        except RuntimeError:  # shut down (the gateway is closing)
            self._free.release()
            raise
        self.held += 1
        if started is not None:
            started()

        def returned(done: Future[T]) -> None:  # in the call's thread, or here when it never started
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nothing left to count
                loop.call_soon_threadsafe(self._returned, mine, done)

        future.add_done_callback(returned)
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            # The call ran (it was not cancelled before its thread took it), and its caller is gone: while the loop
            # has not seen it return (it runs on inside MIT, or returned just now), `_returned` tells the outcome;
            # once seen, its result was on its way to this caller, and is told here. Judged by `future.done()`, an
            # answer that came with the cancellation (a wrong password, as the device hung up) was never told.
            if not future.cancelled() and not mine.returned:
                mine.abandoned = True
                self.abandoned += 1
                mine.timed_out = bound.expired()  # `timeout` cancelled it, or its caller's own end did
                self.timed_out += mine.timed_out
                if outcome is not None:
                    outcome.abandoned()
            elif not future.cancelled() and outcome is not None:
                outcome.abandoned()
                outcome.returned(future)
            raise

    def _returned(self, call: _Call, done: Future[Any]) -> None:
        call.returned = True
        self.held -= 1
        if call.abandoned:
            self.abandoned -= 1
            self.timed_out -= call.timed_out
        self._free.release()
        if call.abandoned and call.outcome is not None:
            call.outcome.returned(done)

    def close(self) -> None:
        """Start no more calls; a call still inside MIT finishes on its own."""
        self._executor.close()


def no_thread_error(e: NoThread, threads: KdcThreads, realm: str, calls: str) -> KdcNotAsked:
    """The 503 for a call refused for want of a thread; `calls` names whose threads they are ("Basic's KDC calls")."""
    timer = f"kerberos.kdc_timeout ({threads.timeout:g} s)"
    check = f"check krb5.conf's kdc entries for {realm} and that the KDC is up"
    if e.abandoned >= e.held and e.timed_out >= e.abandoned:
        return KdcNotAsked(
            UNREACHABLE,
            hint=f"the KDC of {realm} does not answer: all {e.held} threads for {calls} "
            f"(kerberos.max_in_flight) are held by calls it left unanswered past {timer}, until MIT gives up "
            f"(about 25 s); {check}",
        )
    if e.abandoned >= e.held:  # some given up when their request ended, younger than kdc_timeout (hardening 65)
        ended = e.abandoned - e.timed_out
        past = f"{e.timed_out} left unanswered past {timer}, " if e.timed_out else ""
        return KdcNotAsked(
            UNREACHABLE,
            hint=f"the KDC of {realm} has not answered: all {e.held} threads for {calls} (kerberos.max_in_flight) "
            f"are held by calls to it: {past}{ended} whose requests ended before it answered (a device that hung up, "
            f"or a stop; {timer} did not end them); each holds its thread until the KDC answers or MIT gives up "
            f"(about 25 s); {check}",
        )
    return KdcNotAsked(
        "the authentication service is busy; try again shortly",
        hint=f"the KDC of {realm} answers slowly: all {e.held} threads for {calls} (kerberos.max_in_flight) "
        f"are in calls to it and {threads.waiting} more wait; raise kerberos.max_in_flight if the KDC keeps up",
    )
