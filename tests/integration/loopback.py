"""An aiohttp application served on a free loopback port, for tests that need a real HTTP peer in-process; and the
way to close a listening socket that a thread of the test's serves."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from aiohttp import web


@asynccontextmanager
async def serving(app: web.Application) -> AsyncIterator[str]:
    """Run `app` on a free loopback port; yields its base URL."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


def stop_listening(sock: socket.socket) -> None:
    """Close `sock`, a listening socket a thread of the test's may be blocked in `accept()` on. `close()` alone wakes
    nothing on Linux: the blocked call keeps the socket, and so the port, listening for the rest of the worker's life,
    and the thread waiting, to take the next connection made to that port. `shutdown()` first ends the call (EINVAL),
    and the thread's loop with it."""
    with contextlib.suppress(OSError):  # not listening (never was, or already shut down)
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()
