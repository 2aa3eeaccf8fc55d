"""The event loop a gateway process runs on: asyncio's own, or uvloop's (`listener.event_loop`).

Theory of operation. Everything in the gateway is written against asyncio's interfaces; the loop under
them is chosen once per process, when the process starts serving. uvloop (libuv, in Cython) replaces the
loop and its socket transports; the listener drives TLS itself over either (`proxy.tls.server`: its own
handshake and records for the gateway's own server, asyncio's `SSLProtocol` for aiohttp's), so the handshake,
its alert on a refusal, the chain caps set on the `SSL_CTX` and the connection slots are the same code on both
loops. uvloop is the default; docs/performance.md ("uvloop as the default") says what it was measured to
change.
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


class _Unjoined(ThreadPoolExecutor):
    """The loop's default executor (`asyncio.to_thread`: CRL reads and vetting, password hashing), whose shutdown
    waits for no call under way. asyncio's runner shuts it down after `main` returns and joined its threads: a
    stopped gateway ran on until a reload's vetting of a large CRL ended (seconds of CPU for a 200,000-entry one),
    past its `stopped` line and drain_timeout. Nothing waits for such a call once the gateway has stopped, and the
    process ends next (`proxy.workers.end_process`); a CRL replay-floor file is replaced whole (`os.replace`)."""

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        super().shutdown(wait=False, cancel_futures=True)


def run(main: Coroutine[Any, Any, T], kind: EventLoop) -> T:
    """`asyncio.run(main)` on a loop of the configured kind (Python 3.11's `asyncio.run` takes no loop factory), its
    default executor not joined at the end (`_Unjoined`)."""
    with asyncio.Runner(loop_factory=loop_factory(kind)) as runner:
        runner.get_loop().set_default_executor(_Unjoined(thread_name_prefix="asyncio"))
        return runner.run(main)
