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
    """`asyncio.run(main)` on a loop of the configured kind (Python 3.11's `asyncio.run` takes no loop factory)."""
    with asyncio.Runner(loop_factory=loop_factory(kind)) as runner:
        return runner.run(main)
