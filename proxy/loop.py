"""The event loop a gateway process runs on: asyncio's own, or uvloop's (`listener.event_loop`).

Theory of operation. Everything in the gateway is written against asyncio's interfaces; the loop under
them is chosen once per process, when the process starts serving. uvloop (libuv, in Cython) replaces the
loop and its socket transports; the listener drives TLS itself over either (`proxy.tls.server`: its own
handshake and records for the gateway's own server, asyncio's `SSLProtocol` for aiohttp's), so the handshake,
its alert on a refusal, the chain caps set on the `SSL_CTX` and the connection slots are the same code on both
loops. uvloop is the default; docs/performance.md ("uvloop as the default") says what it was measured to
change.

The loop's default executor (`asyncio.to_thread`: CRL reads and checks, their indexing, `crl_state` writes, Basic's
password hashes) is an `_Unwaited` one: when the gateway has stopped, closing the loop does not wait for a thread still
at work. asyncio's own close of the loop (`shutdown_default_executor`) joins every such thread, and a stop that came
while a reload or a refresh read a large CRL waited for the read to end (a million entries: 3.4 s of CPU, seconds more
on a loaded machine, twice that for the 64 MiB a CRL may be) for CRLs nothing would serve with: the task that awaited
the thread was cancelled already. The process ends through `proxy.workers.end_process` (`os._exit`), which takes the
thread with it; a `crl_state` write cut short leaves its partial file, which the next write removes
(`proxy.certs.floors`), and the CRLs whose floor it held were never swapped in (the swap awaits the write).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from proxy.config import EventLoop

T = TypeVar("T")


def uvloop_missing() -> str | None:
    """None when uvloop can be used here; else why not (for the configuration error)."""
    try:
        import uvloop  # noqa: F401
    except ImportError as e:
        return f"the uvloop package does not import: {e}"
    return None


def loop_factory(kind: EventLoop) -> Callable[[], asyncio.AbstractEventLoop]:
    """A function that makes a new event loop of the configured kind."""
    if kind == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    return asyncio.new_event_loop


def run(main: Coroutine[Any, Any, T], kind: EventLoop) -> T:
    """`asyncio.run(main)` on a loop of the configured kind (Python 3.11's `asyncio.run` takes no loop factory), its
    default executor not joined at the end (`_Unwaited`)."""
    with asyncio.Runner(loop_factory=loop_factory(kind)) as runner:
        runner.get_loop().set_default_executor(_Unwaited(thread_name_prefix="asyncio"))
        return runner.run(main)


class _Unwaited(ThreadPoolExecutor):
    """A default executor whose shutdown waits for none of its threads (module docstring): the queued calls are
    cancelled, the running ones left to the process's end."""

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        super().shutdown(wait=False, cancel_futures=True)
