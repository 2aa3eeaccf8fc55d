"""`KdcThreads`: blocking calls in threads of their own, a thread counted taken until its call returns."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, wait
from typing import Any

import pytest

from proxy.kerberos.threads import KdcThreads, NoThread, _DaemonThreads

LONG = 30.0  # a timeout no call here reaches unless it is meant to


class _Told:
    """An `Outcome` that writes down what it is told: "abandoned", then the returned call's result."""

    def __init__(self, told: list[object]) -> None:
        self._told = told

    def abandoned(self) -> None:
        self._told.append("abandoned")

    def returned(self, future: Future[Any]) -> None:
        self._told.append(future.result())


def _blocked(release: threading.Event) -> str:
    """A KDC that answers once `release` is set (as MIT's wait ends)."""
    assert release.wait(60)
    return "answered"


async def _until(condition: Callable[[], bool], what: str) -> None:
    """Poll the event loop until `condition()` holds (a deadline, never a fixed sleep)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while not condition():
        assert loop.time() < deadline, what
        await asyncio.sleep(0.01)


async def _time_out_while_running(threads: KdcThreads, release: threading.Event) -> None:
    """One call whose caller times out while the call runs in its thread (held, abandoned). `held` counts a call
    from its hand-over to the pool: one whose timeout came before a thread took it up (a loaded machine) is
    cancelled, never runs, and is given back; such a try is made again, until a call ran (its `running`)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while True:
        running = threading.Event()

        def call(running: threading.Event = running) -> str:
            running.set()
            return _blocked(release)

        abandoned = threads.abandoned
        with pytest.raises(TimeoutError):
            await threads.run(call)
        if threads.abandoned > abandoned:  # it ran: counted abandoned as its caller's wait ended
            await _until(running.is_set, "the call running in its thread")
            return
        assert not running.is_set(), "a call that ran was not counted abandoned"
        await _until(lambda: threads.held == threads.abandoned, "the call that never ran given back")
        assert loop.time() < deadline, "no call ran in a thread within its caller's timeout"


def _threads_that_start_late(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each new thread starts taking calls 0.3 s late (a loaded machine's scheduler, made certain): a call handed
    to it meanwhile outlives its caller's 0.2 s without running."""
    serve = _DaemonThreads._serve

    def late(self: _DaemonThreads) -> None:
        time.sleep(0.3)
        serve(self)

    monkeypatch.setattr(_DaemonThreads, "_serve", late)


@pytest.mark.parametrize("start", ["at-once", "late"])
def test_a_thread_stays_taken_after_its_caller_timed_out_and_the_next_call_is_refused_at_once(
    start: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two threads, both in calls whose callers timed out: a third call is NoThread at once (no wait for a thread
    MIT holds); once the calls return in their threads, calls run again. The state is judged once both calls run
    (`_time_out_while_running`): before, a call whose 0.2 s passed before a thread took it up (threads started
    late, a loaded machine) left (held, abandoned) at (1, 1) or (0, 0)."""
    if start == "late":
        _threads_that_start_late(monkeypatch)

    async def scenario() -> None:
        threads = KdcThreads(2, 0.2, "test")
        release = threading.Event()
        try:
            for _ in range(2):
                await _time_out_while_running(threads, release)
            assert (threads.held, threads.abandoned) == (2, 2)
            loop = asyncio.get_running_loop()
            start = loop.time()
            with pytest.raises(NoThread) as refused:
                await threads.run(_blocked, release)
            assert loop.time() - start < 0.2  # not a wait of its timeout
            assert (refused.value.held, refused.value.abandoned) == (2, 2)
            release.set()
            await _until(lambda: threads.held == 0, "the threads given back")
            assert threads.abandoned == 0
            threads.timeout = LONG  # calls run again; how soon a loaded machine's thread takes one up is not tested
            assert await threads.run(lambda: "ok") == "ok"
        finally:
            release.set()
            threads.close()

    asyncio.run(scenario())


def test_a_call_waits_for_a_thread_a_live_call_holds_and_at_most_waiting_calls_wait() -> None:
    """One thread, in a call whose caller still waits, and `waiting = 1`: one more call waits for it and runs once
    it is free; a third call meanwhile is NoThread at once (as many wait as may)."""

    async def scenario() -> None:
        threads = KdcThreads(1, LONG, "test", waiting=1)
        release = threading.Event()
        try:
            first = asyncio.create_task(threads.run(_blocked, release))
            await _until(lambda: threads.held == 1, "the first call in its thread")
            second = asyncio.create_task(threads.run(lambda: "second"))
            await _until(lambda: threads._waiting == 1, "the second call waiting")
            with pytest.raises(NoThread):
                await threads.run(lambda: "third")
            release.set()
            assert (await first, await second) == ("answered", "second")
        finally:
            release.set()
            threads.close()

    asyncio.run(scenario())


def test_a_call_waiting_for_a_thread_times_out_within_its_own_timeout() -> None:
    """The wait for a thread counts against the call's timeout: a live call holding the only thread longer makes
    the waiting call TimeoutError, and the thread is not counted twice."""

    async def scenario() -> None:
        threads = KdcThreads(1, 0.3, "test")
        release = threading.Event()
        try:
            first = asyncio.create_task(threads.run(_blocked, release))
            await _until(lambda: threads.held == 1, "the first call in its thread")
            with pytest.raises(TimeoutError):
                await threads.run(lambda: "late")
            with pytest.raises(TimeoutError):
                await first
            release.set()
            await _until(lambda: threads.held == 0, "the thread given back")
            assert await threads.run(lambda: "again") == "again"
        finally:
            release.set()
            threads.close()

    asyncio.run(scenario())


def test_a_call_arriving_while_a_freed_thread_passes_to_a_waiter_waits_too() -> None:
    """A thread's call returns and the semaphore passes the thread to the call waiting for it; a call arriving in
    between (no thread held, one call still waiting to be woken) is not refused as if a hung KDC held every thread:
    it waits and runs (a burst of Basic logins against a fast KDC got 503 this way on a loaded machine)."""

    async def scenario() -> None:
        threads = KdcThreads(1, LONG, "test")
        release = threading.Event()
        try:
            first = asyncio.create_task(threads.run(_blocked, release))
            await _until(lambda: threads.held == 1, "the first call in its thread")
            second = asyncio.create_task(threads.run(lambda: "second"))
            await _until(lambda: threads._waiting == 1, "the second call waiting")
            release.set()
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 30
            while threads.held:  # poll without sleeping past the moment: the woken waiter has not run yet
                assert loop.time() < deadline, "the first call's thread given back"
                await asyncio.sleep(0)
            assert threads._waiting == 1, "the second call has not taken the thread yet"
            third = await threads.run(lambda: "third")
            assert (await first, await second, third) == ("answered", "second", "third")
        finally:
            release.set()
            threads.close()

    asyncio.run(scenario())


EXIT_WITH_A_CALL_HELD = """
import asyncio, sys, threading
from proxy.kerberos.threads import KdcThreads

async def main() -> None:
    threads = KdcThreads(2, 0.2, "test")
    try:
        await threads.run(threading.Event().wait)  # a KDC that never answers
    except TimeoutError:
        print("timed out", flush=True)

asyncio.run(main())
"""


def test_a_call_still_held_does_not_hold_up_the_interpreters_exit() -> None:
    """A process whose only KDC call never returns (its caller timed out) exits as soon as its main code ends: the
    threads are daemon threads. Before, they were a ThreadPoolExecutor's, which Python joins at exit: such a process
    (a gateway stopped during a KDC hang) waited for MIT, here for ever."""
    done = subprocess.run(
        [sys.executable, "-c", EXIT_WITH_A_CALL_HELD], capture_output=True, text=True, timeout=60, check=False
    )
    assert (done.returncode, done.stdout) == (0, "timed out\n"), done.stderr


def test_a_closed_kdc_threads_cancels_calls_not_started_and_starts_none() -> None:
    """close(): a call queued behind a held thread is cancelled, a later one refused (RuntimeError), and the held call
    still returns in its thread."""

    async def scenario() -> None:
        threads = KdcThreads(1, LONG, "test")
        release = threading.Event()
        held = asyncio.ensure_future(threads.run(_blocked, release))
        await _until(lambda: threads.held == 1, "the first call started")
        queued = threads._executor.submit(_blocked, release)  # behind it, as a second caller's would be
        threads.close()
        assert queued.cancelled()
        release.set()
        assert await held == "answered"
        with pytest.raises(RuntimeError):
            await threads.run(_blocked, release)


def test_a_call_whose_caller_went_away_tells_its_outcome_when_it_returns() -> None:
    """A caller cancelled (the device hung up) while its call runs: its `Outcome` is told the call was abandoned
    before the cancellation reaches the caller's code, and, once the call returns in its thread, the call's result;
    a call its caller waited for tells nothing."""
    told: list[object] = []

    async def scenario() -> None:
        threads = KdcThreads(2, LONG, "test")
        release = threading.Event()
        try:
            assert await threads.run(lambda: "ok", outcome=_Told(told)) == "ok"
            running = threading.Event()

            def call() -> str:
                running.set()
                return _blocked(release)

            caller = asyncio.create_task(threads.run(call, outcome=_Told(told)))
            # The call itself says it runs: `held` counts it from its hand-over to the thread, and a call cancelled
            # before its thread took it up (a loaded machine) never runs, which is told nothing, rightly.
            await _until(running.is_set, "the call running in its thread")
            caller.cancel()
            with pytest.raises(asyncio.CancelledError):
                await caller
            assert told == ["abandoned"]
            release.set()
            await _until(lambda: threads.held == 0, "the thread given back")
            assert told == ["abandoned", "answered"]
        finally:
            release.set()
            threads.close()

    asyncio.run(scenario())


def test_many_calls_at_once_against_a_kdc_that_answers_all_wait_their_turn() -> None:
    """Two threads and 100 calls at once (devices reconnecting together, each a new user) while the KDC answers,
    if slowly: every call waits for a thread and runs; none is NoThread. With as many waiting as there are
    threads, 96 of them were refused at once."""

    async def scenario() -> list[str]:
        threads = KdcThreads(2, LONG, "test")
        release = threading.Event()
        try:
            calls = [asyncio.ensure_future(threads.run(_blocked, release)) for _ in range(100)]
            await _until(lambda: threads.held == 2 and threads._waiting == 98, "two calls in threads, 98 waiting")
            release.set()
            return list(await asyncio.gather(*calls))
        finally:
            release.set()
            threads.close()

    assert asyncio.run(scenario()) == ["answered"] * 100


def test_a_call_whose_caller_ended_counts_apart_from_one_that_timed_out() -> None:
    """A call abandoned at the threads' timeout counts in `timed_out`; one whose caller's task was cancelled first
    (a device that hung up) does not: the refusal names the limit that ended each (`no_thread_error`), not
    kdc_timeout for both. Both given back once their calls return."""

    async def scenario() -> None:
        threads = KdcThreads(2, 0.2, "test")
        release = threading.Event()
        try:
            await _time_out_while_running(threads, release)
            threads.timeout = LONG
            running = threading.Event()

            def call() -> str:
                running.set()
                return _blocked(release)

            caller = asyncio.ensure_future(threads.run(call))
            await _until(running.is_set, "the call running in its thread")
            caller.cancel()
            with pytest.raises(asyncio.CancelledError):
                await caller
            with pytest.raises(NoThread) as refused:
                await threads.run(_blocked, release)
            assert (refused.value.held, refused.value.abandoned, refused.value.timed_out) == (2, 2, 1)
            release.set()
            await _until(lambda: threads.held == 0, "the threads given back")
            assert (threads.abandoned, threads.timed_out) == (0, 0)
        finally:
            release.set()
            threads.close()

    asyncio.run(scenario())


@pytest.mark.parametrize("handed", [False, True], ids=["result-not-yet-handed-over", "result-handed-over"])
def test_a_caller_going_away_as_its_call_returns_still_tells_the_outcome(handed: bool) -> None:
    """A caller cancelled after its call returned in its thread but before the caller took the result (the KDC's
    answer and the device's hang-up or kdc_timeout at once): the `Outcome` is told the call's result all the same,
    whether the cancellation came before the result was handed to the caller's future or after (the caller not yet
    resumed); a wrong password so answered still counts."""
    told: list[object] = []

    async def scenario() -> None:
        threads = KdcThreads(1, LONG, "test")
        executor: Any = threads._executor  # the call's own future, to know when its thread is done
        submit, calls = executor.submit, []

        def capture(*args: Any) -> Future[Any]:
            future: Future[Any] = submit(*args)
            calls.append(future)
            return future

        executor.submit = capture
        release = threading.Event()
        try:
            caller = asyncio.create_task(threads.run(_blocked, release, outcome=_Told(told)))
            await _until(lambda: threads.held == 1, "the call started")
            release.set()
            wait([calls[0]], timeout=30)  # on the loop's thread: the return is queued for the loop, not yet run
            assert calls[0].done()
            if handed:
                await asyncio.sleep(0)  # the loop takes the return in and hands the result over; the caller not resumed
            caller.cancel()
            with pytest.raises(asyncio.CancelledError):
                await caller
            await _until(lambda: threads.held == 0, "the thread given back")
            assert told == ["abandoned", "answered"]
            assert threads.abandoned == 0
        finally:
            release.set()
            threads.close()

    asyncio.run(scenario())
